"""mistral_tune/launch/machines.py against a real TCPStore, as torchrun's agent hosts it: this process plays
rank 0 of a 2-machine job, a thread plays rank 1 through its own store client.
(tests/launch/test_two_machines.py runs the same code in two real machines' worth of processes.)"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest

import mistral_tune.launch.machines as machines
from mistral_tune.core.errors import UserError


@pytest.fixture
def store(monkeypatch):
    """A TCPStore server like torchrun's agent store, and the environment rank 0 of 2 machines sees."""
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
           "RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(machines, "_store", None)
    monkeypatch.setattr(machines, "_ranks", [])
    return server


def other_rank(server, action):
    """Rank 1 on 'machine 1': ``action(store)`` in a thread, with its own client and the same key prefix."""
    from torch.distributed import PrefixStore, TCPStore

    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    thread = threading.Thread(target=action, args=(PrefixStore("mistral_tune/0", client),), daemon=True)
    thread.start()
    return thread


def test_topology_line():
    assert (
        machines.topology(2, 1)
        == "1 machine x 1 process, global batch 2 (2 per device x 1 accumulation step x 1 process)"
    )


def test_topology_of_two_machines(store, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert machines.topology(4, 2).startswith("2 machines x 8 processes, global batch 128 (4 per device x 2 ")


def test_register_returns_every_rank(store):
    def rank1(s):
        s.set("ranks/1", json.dumps({"rank": 1, "machine_rank": 1, "host": "gpu002"}))

    other_rank(store, rank1).join()
    ranks = machines.register(timeout=10)
    assert [(r["rank"], r["machine_rank"]) for r in ranks] == [(0, 0), (1, 1)]


def test_a_directory_machine_1_cannot_see_is_refused(store, tmp_path):
    def rank1(s):  # machine 1 has its own (empty) directory at that path: it never sees the token
        s.get("shared/token")
        s.set("shared/seen/1", json.dumps({"machine_rank": 1, "host": "gpu002", "missing": ["output_dir"]}))

    thread = other_rank(store, rank1)
    with pytest.raises(UserError, match=rf"output_dir={tmp_path / 'run'}: not seen by machine 1 \(gpu002\)"):
        machines.check_shared_directories({"output_dir": tmp_path / "run"}, timeout=10)
    thread.join()
    assert list((tmp_path / "run").iterdir()) == []  # the token is removed again


def test_a_shared_directory_passes_and_machine_1_finds_the_token_rank_0_wrote(store, tmp_path):
    seen = []

    def rank1(s):
        token = s.get("shared/token").decode()
        seen.append((tmp_path / "run" / token).read_text())  # what machine 1 would find on a shared filesystem
        s.set("shared/seen/1", json.dumps({"machine_rank": 1, "host": "gpu002", "missing": []}))

    thread = other_rank(store, rank1)
    machines.check_shared_directories({"output_dir": tmp_path / "run"}, timeout=10)
    thread.join()
    assert seen and seen[0].startswith(".mistral-tune-shared-")


def test_the_rank_that_does_not_answer_is_named(store, monkeypatch):
    monkeypatch.setattr(machines, "ANSWER_SECONDS", 0.5)
    monkeypatch.setattr(machines, "_ranks", [{"rank": 0, "machine_rank": 0, "host": "gpu001"},
                                             {"rank": 1, "machine_rank": 1, "host": "gpu002"}])  # fmt: skip
    cause = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:40000")
    assert machines.is_collective_failure(cause)
    named = machines.name_lost_ranks(cause, step=3, timeout=30)
    assert isinstance(named, machines.LostRanks)
    assert str(named).startswith("lost rank 1 (machine 1, host gpu002) after step 3")
    assert "train.ddp_timeout=30" in str(named) and "Connection closed by peer" in str(named)


def test_when_every_rank_answers_the_original_error_stands(store, monkeypatch):
    monkeypatch.setattr(machines, "ANSWER_SECONDS", 5)
    monkeypatch.setattr(machines, "_ranks", [{"rank": 0, "machine_rank": 0, "host": "a"},
                                             {"rank": 1, "machine_rank": 1, "host": "b"}])  # fmt: skip
    other_rank(store, lambda s: s.set("alive/1", "1")).join()  # rank 1 failed too, for its own reason
    cause = RuntimeError("Connection closed by peer")
    assert machines.name_lost_ranks(cause, step=1, timeout=30) is cause


def test_not_a_collective_failure():
    assert not machines.is_collective_failure(ValueError("bad value"))
    assert not machines.is_collective_failure(RuntimeError("CUDA out of memory"))


def test_throughput_of_each_machine(store):
    def rank1(s):
        s.set("throughput/1", json.dumps({"machine_rank": 1, "host": "b", "tokens": 300, "seconds": 3.0}))

    other_rank(store, rank1).join()
    out = machines.machine_throughput(tokens=200, seconds=2.0, timeout=10)
    assert [(m["machine_rank"], m["processes"], m["tokens_seen"], m["tokens_per_second"]) for m in out] == [
        (0, 1, 200, 100.0),
        (1, 1, 300, 100.0),
    ]


def test_one_process_needs_no_store(monkeypatch, tmp_path):
    for k in ("WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(machines, "_store", None)
    assert machines.rendezvous_store(10) is None
    machines.check_shared_directories({"output_dir": tmp_path / "x"}, timeout=10)  # nothing to check
    assert not (tmp_path / "x").exists()
    assert machines.machine_throughput(50, 5.0, 10)[0]["tokens_per_second"] == 10.0


def test_the_directories_every_machine_must_share(tmp_path, monkeypatch):
    from mistral_tune.config.compose import compose
    from mistral_tune.pipeline.run import shared_directories

    assert shared_directories(compose("sft_lora", []), tmp_path) == {"output_dir": tmp_path}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dpo = compose("dpo_lora", ["trainer.precompute_ref_log_probs=true"])
    assert (
        shared_directories(dpo, tmp_path)["trainer.ref_cache_dir"] == tmp_path / "cache" / "mistral-tune" / "ref_logps"
    )
    given = compose("dpo_lora", ["trainer.precompute_ref_log_probs=true", f"trainer.ref_cache_dir={tmp_path / 'ref'}"])
    assert shared_directories(given, tmp_path)["trainer.ref_cache_dir"] == tmp_path / "ref"
