"""End-to-end reliability: SIGKILL + resume, SIGTERM/SIGINT, NaN stop/skip, interrupted writes, secrets.

The subprocess tests run the real CLI and really kill it. The in-process ones inject faults below the
trainer (a forward hook that makes logits NaN, a signal sent to this process, a full disk while
saving), never by replacing the trainer.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.core.redaction import MASK
from mistral_tune.pipeline.run import run
from mistral_tune.train import checkpoints
from mistral_tune.train.nonfinite import NonFiniteLoss
from mistral_tune.train.signals import TrainingInterrupted
from tests.helpers import read_metrics as metrics
from tests.helpers import read_summary as summary

REPO = Path(__file__).resolve().parents[2]


# Small and fast: 2 conversations of <= 64 tokens per step on the tiny preset.
FAST = [
    "train.logging_steps=1",
    "train.per_device_train_batch_size=2",
    "trainer.max_length=64",
    "data.max_samples=32",
    "export=none",
    "export.num_samples=0",
]


def listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "README.md")


def start_cli(args: list[str], out: Path) -> subprocess.Popen:
    """The real CLI in a child process; its output goes to OUT.log (read back on failure)."""
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", *args, f"output_dir={out}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_path = Path(log.name)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before {what}: {output(proc)[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def last_step(run_dir: Path) -> int:
    try:
        return max(r["step"] for r in metrics(run_dir))
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return 0


def in_process(tmp_path: Path, *overrides: str):
    return compose("sft_lora", [*FAST, *overrides, f"output_dir={tmp_path / 'run'}"])


class SignalAtStep(TrainerCallback):
    """Sends a real signal to this process at the end of optimizer step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNAtStep(TrainerCallback):
    """Fault injection: the final hidden states (so the loss) become NaN during optimizer step ``step``.

    The hook sits on the final norm rather than the LM head: the chunked loss reads the head's
    weights without calling it.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def poison(module, inputs, output):
            if module.training and state.global_step + 1 == self.step:
                return output * float("nan")
            return None

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model.norm.register_forward_hook(poison)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One run on hostile data, with a NaN step skipped, secrets in the environment and the config."""
    from tests.helpers import hostile_file

    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        "HF_TOKEN": "hf_" + secrets.token_hex(17),
        "WANDB_API_KEY": secrets.token_hex(20),
        "MY_SERVICE_SECRET": secrets.token_urlsafe(16),
    }
    in_config = {"run_name": "hf_" + secrets.token_hex(17), "tag": "sk-" + secrets.token_hex(16)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = in_process(
            tmp,
            f"data.path={hostile_file(tmp)}",
            "data.on_error=skip",
            "data.dedup=true",
            "trainer.truncation=drop",
            "on_nan=skip",
            "train.max_steps=4",
            "train.save_steps=1",
            "train.save_total_limit=null",
            "tracking.name=tensorboard",
            f"tracking.run_name={in_config['run_name']}",
            f"tracking.tags=[{in_config['tag']}]",
            f"tracking.entity={env['HF_TOKEN']}",
        )
        result = run(cfg, callbacks=[NaNAtStep(2)])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return Path(cfg.output_dir), result, [*env.values(), *in_config.values()]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    args = [*FAST, "train.max_steps=8", "train.save_steps=3", "train.save_total_limit=2", "train.seed=7"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = start_cli(args, killed)
    first = killed / "checkpoints" / "checkpoint-3"
    failures = []

    def kill_after_first_checkpoint():
        # Once training went past checkpoint-3, so that steps 4+ must be redone after the resume.
        try:
            wait_for(lambda: first.is_dir() and last_step(killed) >= 4, proc, "checkpoint-3 and step 4")
            proc.send_signal(signal.SIGKILL)
        except BaseException as exc:
            failures.append(exc)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    run(compose("sft_lora", [*args, f"output_dir={reference}"]))  # the uninterrupted run, meanwhile, in-process
    watcher.join(timeout=600)
    if failures:
        raise failures[0]
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "adapter").exists() and not (killed / "summary.json").exists()
    assert checkpoints.completeness_problem(first) is None

    resumed = run(compose("sft_lora", [*args, f"output_dir={killed}", "resume=auto"]))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 8

    ref, got = metrics(reference), metrics(killed)
    assert [r["step"] for r in got] == list(range(1, 9))  # records past the checkpoint were replaced, not doubled
    for a, b in zip(ref, got):
        assert b["tokens_seen"] == a["tokens_seen"], f"step {a['step']}: different samples after resume"
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), f"step {a['step']}"
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    have = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)
    # train.save_total_limit=2: saves at 3, 6 and 8 (the end) keep the last two, nothing half-written.
    assert listing(reference / "checkpoints") == listing(killed / "checkpoints") == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = start_cli([*FAST, "train.max_steps=500", "train.save_steps=1000"], out)
    wait_for(lambda: last_step(out) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM
    stderr = output(proc)
    assert "Traceback" not in stderr and "Stopped by SIGTERM" in stderr and "resume=auto" in stderr
    s = summary(out)
    assert s["status"] == "interrupted" and 2 <= s["steps"] < 500
    ckpt = out / "checkpoints" / f"checkpoint-{s['steps']}"
    assert s["last_checkpoint"] == str(ckpt) and checkpoints.completeness_problem(ckpt) is None
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == s["steps"]
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_sigint_checkpoint_resumes_and_guards_the_run_dir(tmp_path):
    cfg = in_process(tmp_path, "train.max_steps=5", "train.save_steps=100")
    with pytest.raises(TrainingInterrupted) as info:
        run(cfg, callbacks=[SignalAtStep(2, signal.SIGINT)])
    # The signal lands after GracefulStop looked at step 2, so step 3 finishes, is saved, and training stops.
    assert info.value.exit_code == 130 and info.value.step == 3
    out = Path(cfg.output_dir)
    assert listing(out / "checkpoints") == ["checkpoint-3"] and summary(out)["status"] == "interrupted"

    with pytest.raises(UserError, match="already holds an earlier run.*resume=auto"):
        run(in_process(tmp_path, "train.max_steps=5", "train.save_steps=100"))
    with pytest.raises(UserError, match="training data differ"):
        run(in_process(tmp_path, "train.max_steps=5", "train.save_steps=100", "resume=auto", "data.max_samples=16"))
    done = run(in_process(tmp_path, "train.max_steps=5", "train.save_steps=100", "resume=auto"))
    assert done["status"] == "completed" and done["steps"] == 5
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = in_process(tmp_path, "train.max_steps=6", "train.save_steps=2")
    with pytest.raises(NonFiniteLoss, match=r"stopped at step 3: the loss is nan.*checkpoint-2"):
        run(cfg, callbacks=[NaNAtStep(3)])
    out = Path(cfg.output_dir)
    assert listing(out / "checkpoints") == ["checkpoint-2"]
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    s = summary(out)
    assert s["status"] == "nonfinite_loss" and s["steps"] == 2 and s["last_checkpoint"].endswith("checkpoint-2")


@pytest.mark.slow
def test_checkpoint_write_failure_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("rng_state.pth"):  # model and optimizer already written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    cfg = in_process(tmp_path, "train.max_steps=6", "train.save_steps=2")
    with pytest.raises(UserError, match=r"checkpoint-4 failed \(No space left on device\).*checkpoint-2"):
        run(cfg)
    root = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["checkpoint-2"]  # no staging leftovers either
    assert checkpoints.latest_complete(root) == root / "checkpoint-2"


@pytest.mark.slow
def test_nan_step_skipped_and_counted(hostile_run):
    out, result, _ = hostile_run
    assert result["nan_skips"] == 1 and result["nan_skipped_steps"] == [2] and result["steps"] == 4
    ckpt = out / "checkpoints"
    w = {s: load_file(ckpt / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2, 3)}
    for name in w[1]:
        assert torch.equal(w[1][name], w[2][name])  # step 2 changed nothing
    assert any(not torch.equal(w[2][n], w[3][n]) for n in w[2])  # step 3 trained again
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())
    assert checkpoints.read_marker(ckpt / "checkpoint-4")["nan_skipped_steps"] == [2]
    assert all(math.isfinite(r["loss"]) for r in metrics(out) if isinstance(r["loss"], float))


@pytest.mark.slow
def test_every_dropped_example_is_in_summary_and_log(hostile_run):
    out, result, _ = hostile_run
    data = summary(out)["data"]
    assert data == result["data"]
    assert data["dropped"] == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "empty_field": 1,
        "too_long": 1,
        "duplicate": 1,
    }
    assert data["read"] == data["used"] + data["held_out"] + data["dropped_total"]
    log = (out / "train.log").read_text()
    for reason in data["dropped"]:
        assert f"): {reason}" in log
    assert "hostile.jsonl:21: malformed JSON" in log and "hostile.jsonl:22: not valid UTF-8" in log


@pytest.mark.slow
def test_secrets_never_reach_the_run_directory(hostile_run):
    out, _, secret_values = hostile_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files), "the tracker wrote nothing to check"
    for path in files:
        blob = path.read_bytes()
        for value in secret_values:
            assert value.encode() not in blob, f"a secret leaked into {path.relative_to(out)}"
    assert MASK in (out / "resolved_config.yaml").read_text()


def test_unwritable_output_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        run(compose("sft_lora", [f"output_dir={blocker / 'run'}"]))


@pytest.mark.slow
def test_not_enough_disk_fails_before_training(tmp_path):
    # A full fine-tune keeping a checkpoint of every one of 1e8 steps cannot fit on any disk.
    cfg = in_process(
        tmp_path, "adapter.name=none", "train.max_steps=100000000", "train.save_steps=1", "train.save_total_limit=null"
    )
    with pytest.raises(UserError, match=r"free but this run needs about .* checkpoint\(s\)"):
        run(cfg)
    out = tmp_path / "run"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
