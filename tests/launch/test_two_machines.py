"""Two machines on one: each a separate ``mistral-tune ... launcher.num_machines=2 launcher.machine_rank=R``
of one CPU process (gloo), in its own network namespace, the two joined by a veth pair, so the rendezvous
and every collective cross a network interface between two addresses as on a cluster. Where network
namespaces cannot be made (not root, no iproute2), both machines run over loopback instead, and the
reason is printed and kept as a pytest warning (MISTRAL_TUNE_TEST_LOOPBACK=1 picks loopback anyway).

Checked: the job trains like one machine of 2 processes and like 1 process with 2 accumulation steps (same
global batch); only rank 0 writes the run directory; the merged export verifies; summary.json names 2
machines and each machine's throughput; the same under DeepSpeed ZeRO-2; a killed machine ends the other
with an error naming the lost rank within train.ddp_timeout, its last complete checkpoint intact, and
resume=auto on both machines ends like an uninterrupted run; a node-local output_dir is refused at start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mistral_tune.core.process import FAIL_HOW_ENV, FAIL_RANK_ENV, FAIL_STEP_ENV
from tests.launch.test_processes import COMMON, PER_PROCESS_BATCH, REPO, _adapter, _losses, _ok, _relative_diff

STEPS = 4
# 4 steps of a global batch of 4 (2 machines x 1 process x 2 sequences); a checkpoint at step 2.
SHARED = [
    *(o for o in COMMON if not o.startswith("train.max_steps=")),
    f"train.max_steps={STEPS}",
    "train.save_steps=2",
]


@dataclass
class TwoMachines:
    """How to run a command on machine 0 or 1, and machine 0's address."""

    main_ip: str
    port: int
    prefixes: list[list[str]]  # command prefix of each machine (``ip netns exec NS``), or [] on loopback
    envs: list[dict]  # GLOO_SOCKET_IFNAME of each machine: gloo picks the interface its address is on
    how: str  # "network namespaces ..." or "loopback (why)"
    namespaces: list[str] = field(default_factory=list)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _make_namespaces(tag: str) -> TwoMachines:
    names, links = [f"mt{tag}n0", f"mt{tag}n1"], [f"mt{tag}v0", f"mt{tag}v1"]
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    made: list[str] = []
    try:
        for ns in names:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (ns, link) in enumerate(zip(names, links)):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except BaseException:
        _remove_namespaces(made)
        raise
    return TwoMachines(
        main_ip=f"{subnet}.1",
        port=29500,  # each namespace has its own ports: no clash with anything else on this machine
        prefixes=[["ip", "netns", "exec", ns] for ns in names],
        envs=[{"GLOO_SOCKET_IFNAME": link} for link in links],
        how=f"network namespaces {names[0]} ({subnet}.1) and {names[1]} ({subnet}.2) joined by a veth pair",
        namespaces=names,
    )


def _remove_namespaces(names: list[str]) -> None:
    for ns in names:  # deleting a namespace deletes its end of the veth pair, and so the pair
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_machines():
    why = None
    if os.environ.get("MISTRAL_TUNE_TEST_LOOPBACK"):  # to run the fallback on a machine where namespaces work
        why = "MISTRAL_TUNE_TEST_LOOPBACK is set"
    elif shutil.which("ip") is None:
        why = "no `ip` command (iproute2)"
    elif os.geteuid() != 0:
        why = "not root: network namespaces need CAP_NET_ADMIN"
    machines = None
    if why is None:
        try:
            machines = _make_namespaces(str(os.getpid() % 100000))
        except subprocess.CalledProcessError as exc:
            why = f"`ip {' '.join(exc.cmd[1:])}` failed: {exc.stderr.strip()}"
    if machines is None:
        machines = TwoMachines("127.0.0.1", _free_port(), [[], []], [{}, {}], f"loopback ({why})")
        warnings.warn(f"two-machine tests run over loopback: {why}", stacklevel=1)
    print(f"two machines: {machines.how}")
    try:
        yield machines
    finally:
        _remove_namespaces(machines.namespaces)


def _start(machines: TwoMachines, tmp: Path, run_dir: Path, overrides: list[str], *, env=None, launcher="ddp",
           private_dir_on_1: Path | None = None) -> list[subprocess.Popen]:  # fmt: skip
    """Both machines' ``mistral-tune`` commands, started at once; only machine_rank differs."""
    procs = []
    for r in (0, 1):
        args = [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", f"output_dir={run_dir}", *SHARED,
                *PER_PROCESS_BATCH, f"launcher={launcher}", "launcher.num_processes=2", "launcher.num_machines=2",
                f"launcher.machine_rank={r}", f"launcher.main_process_ip={machines.main_ip}",
                f"launcher.main_process_port={machines.port}", *overrides]  # fmt: skip
        if r == 1 and private_dir_on_1 is not None:
            # machine 1 in its own mount namespace, with an empty tmpfs where machine 0 has the real directory
            script = 'mount -t tmpfs mt-private "$0" && exec "$@"'
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(private_dir_on_1), *args]
        full_env = {k: v for k, v in os.environ.items() if k not in (FAIL_RANK_ENV, FAIL_STEP_ENV, FAIL_HOW_ENV)}
        full_env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                        **machines.envs[r], **(env or {}))  # fmt: skip
        # to files, not pipes: a machine nobody reads from while waiting on the other must never block on output
        logs = [tmp / f"{run_dir.name}-machine{r}-{len(list(tmp.glob(f'{run_dir.name}-machine{r}-*')))}.{x}"
                for x in ("out", "err")]  # fmt: skip
        with logs[0].open("w") as out, logs[1].open("w") as err:
            proc = subprocess.Popen([*machines.prefixes[r], *args], cwd=tmp, env=full_env, stdout=out, stderr=err)
        proc.logs = logs
        procs.append(proc)
    return procs


def _output(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for one machine's command; its stdout and stderr."""
    proc.wait(timeout=timeout)
    return proc.logs[0].read_text(), proc.logs[1].read_text()


def _start_here(tmp: Path, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """One ``mistral-tune`` on this machine (no namespace), its output to files."""
    args = [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", f"output_dir={run_dir}", *SHARED, *overrides]
    env = {k: v for k, v in os.environ.items() if k not in (FAIL_RANK_ENV, FAIL_STEP_ENV, FAIL_HOW_ENV)}
    env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    logs = [tmp / f"{run_dir.name}.{x}" for x in ("out", "err")]
    with logs[0].open("w") as out, logs[1].open("w") as err:
        proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=out, stderr=err)
    proc.logs = logs
    return proc


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    done = []
    for p in procs:
        out, err = _output(p, timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _both_ok(results) -> None:
    for r in results:
        _ok(r)


@pytest.fixture(scope="module")
def jobs(two_machines, tmp_path_factory):
    """Runs shared by the tests, started lazily."""
    tmp = tmp_path_factory.mktemp("two_machines")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            run_dir = tmp / name
            if name in ("ddp", "deepspeed_zero2"):  # 2 machines x 1 process
                cache[name] = (_wait(_start(two_machines, tmp, run_dir, [], launcher=name)), run_dir)
            elif name in ("one_machine", "one_process"):
                # The two one-machine references at once: 3 single-threaded processes keep 2 cores busier than 2, then 1.
                refs = {
                    "one_machine": [*PER_PROCESS_BATCH, "launcher=ddp", "launcher.num_processes=2",
                                    "launcher.main_process_port=0"],  # 1 machine x 2 processes
                    "one_process": ["train.per_device_train_batch_size=2",
                                    "train.gradient_accumulation_steps=2"],  # 1 process x 2 sequences x 2 steps
                }  # fmt: skip
                procs = {
                    ref: _start_here(tmp, tmp / ref, [*extra, "export.merged=false"]) for ref, extra in refs.items()
                }
                for ref, proc in procs.items():
                    out, err = _output(proc)
                    cache[ref] = ([subprocess.CompletedProcess(proc.args, proc.returncode, out, err)], tmp / ref)
        return cache[name]

    return get


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _files(run_dir: Path) -> set[str]:
    files = {p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file()}
    return {str(f) for f in files if f.parts[0] != "merged"}  # one_machine exports no merge


@pytest.mark.slow
def test_two_machines_train_like_one_machine_and_like_one_process(jobs):
    (node0, node1), run_dir = jobs("ddp")
    _both_ok((node0, node1))
    ([one_machine], one_machine_dir), ([one_process], one_process_dir) = jobs("one_machine"), jobs("one_process")
    _ok(one_machine)
    _ok(one_process)
    two = _losses(run_dir)
    assert len(two) == STEPS
    for name, other in (
        ("1 machine x 2", _losses(one_machine_dir)),
        ("1 process x 2 accumulation", _losses(one_process_dir)),
    ):
        print(
            f"2 machines vs {name}: first loss {abs(two[0] - other[0]):.2e} apart, curve {_max_rel(two, other):.2e} rel"
        )
        assert two[0] == pytest.approx(other[0], rel=1e-6, abs=0)
        assert two == pytest.approx(other, rel=1e-3, abs=0)
    assert _relative_diff(_adapter(one_process_dir), _adapter(run_dir)) < 1e-3

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["num_machines"], summary["world_size"], summary["engine"]) == (2, 2, "ddp")
    assert summary["global_batch_size"] == 4
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] <= 1e-4
    # Each machine's own tokens (one process each); together the job's tokens, as one machine counts them.
    per_machine = summary["machines"]
    assert [m["machine_rank"] for m in per_machine] == [0, 1] and all(m["processes"] == 1 for m in per_machine)
    assert all(m["tokens_seen"] > 0 and m["tokens_per_second"] > 0 for m in per_machine)
    assert sum(m["tokens_seen"] for m in per_machine) == summary["tokens_seen"]
    assert summary["tokens_seen"] == json.loads((one_process_dir / "summary.json").read_text())["tokens_seen"]
    assert "topology: 2 machines x 1 process, global batch 4" in node0.stderr + node0.stdout

    # Only global rank 0 writes: machine 1 adds nothing to what a one-machine run leaves, and logs no progress.
    assert _files(run_dir) == _files(one_machine_dir)
    assert (run_dir / "train.log").read_text().count("run directory:") == 1
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "run directory:" not in node1.stdout + node1.stderr.replace("all 2 processes finished; run directory", "")
    assert "topology:" not in node1.stdout + node1.stderr


@pytest.mark.slow
def test_two_machines_under_deepspeed_zero2(jobs):
    results, run_dir = jobs("deepspeed_zero2")
    _both_ok(results)
    _, ddp_dir = jobs("ddp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["num_machines"], summary["world_size"], summary["engine"]) == (2, 2, "deepspeed_zero2")
    zero2, ddp = _losses(run_dir), _losses(ddp_dir)
    print(
        f"2 machines, ZeRO-2 vs DDP: first loss {abs(zero2[0] - ddp[0]):.2e} apart, curve {_max_rel(zero2, ddp):.2e} rel"
    )
    assert zero2[0] == pytest.approx(ddp[0], rel=1e-6, abs=0)
    assert zero2 == pytest.approx(ddp, rel=1e-3, abs=0)
    assert _relative_diff(_adapter(ddp_dir), _adapter(run_dir)) < 1e-3
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] <= 1e-4
    assert [m["machine_rank"] for m in summary["machines"]] == [0, 1]


def _kill(pid: int) -> None:
    for p in _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _status(pid: int) -> str | None:
    import psutil

    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None


@pytest.mark.slow
def test_a_killed_machine_ends_the_other_with_the_lost_rank_and_resume_finishes_the_run(two_machines, jobs, tmp_path):
    """Rank 1 stops itself at the end of step 3 (step 2's checkpoint complete); then every process of machine 1
    is killed, as when a machine dies. Machine 0 must end within train.ddp_timeout, naming rank 1."""
    import psutil

    timeout = 60
    run_dir = tmp_path / "run"
    drill = {FAIL_RANK_ENV: "1", FAIL_STEP_ENV: "3", FAIL_HOW_ENV: "hang"}
    node0, node1 = _start(two_machines, tmp_path, run_dir, [f"train.ddp_timeout={timeout}", "export.merged=false"],
                          env=drill)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        stopped = []
        while not stopped and time.monotonic() < deadline and node0.poll() is None:
            stopped = [p for p in _descendants(node1.pid) if _status(p) == psutil.STATUS_STOPPED]
            time.sleep(0.2)
        assert stopped, "rank 1 never reached the drill's step"
        _kill(node1.pid)  # machine 1 dies: all of its processes at once
        killed = time.monotonic()
        _, err0 = _output(node0, timeout=timeout + 120)
        detected = time.monotonic() - killed
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                _kill(p.pid)
        node1.wait()
    print(f"machine 0 ended {detected:.1f} s after machine 1 was killed (train.ddp_timeout={timeout})")
    assert node0.returncode != 0
    assert detected < timeout
    report = err0[err0.index("error: the job stopped") :]
    assert "lost rank 1 (machine 1" in report and "after step 3" in report and "resume=auto" in report, report
    assert not (run_dir / "summary.json").exists()
    print(report.splitlines()[1][:400])
    from mistral_tune.train.checkpoints import completeness_problem, list_checkpoints

    saved = [path for _, path in list_checkpoints(run_dir / "checkpoints")]
    assert [p.name for p in saved] == ["checkpoint-2"] and completeness_problem(saved[0]) is None

    # Both machines again with resume=auto: steps 3-4 from checkpoint-2 end where the uninterrupted run ends.
    resumed = _wait(_start(two_machines, tmp_path, run_dir, ["resume=auto", "export.merged=false"]))
    _both_ok(resumed)
    (_, whole_dir) = jobs("ddp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["num_machines"] == 2
    adapter_diff = _relative_diff(_adapter(whole_dir), _adapter(run_dir))
    print(
        f"resumed vs uninterrupted: curve {_max_rel(_losses(run_dir), _losses(whole_dir)):.2e} rel, adapter {adapter_diff:.2e}"
    )
    assert _losses(run_dir) == pytest.approx(_losses(whole_dir), rel=1e-5, abs=0)
    assert adapter_diff < 1e-5


@pytest.mark.slow
def test_a_node_local_output_dir_is_refused_before_training(two_machines, tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a private directory per machine needs `unshare --mount` as root")
    private = tmp_path / "scratch"  # the same path on both machines, but each machine's own storage
    run_dir = private / "run"
    private.mkdir()
    started = time.monotonic()
    results = _wait(_start(two_machines, tmp_path, run_dir, [], private_dir_on_1=private), timeout=300)
    print(f"refused after {time.monotonic() - started:.1f} s")
    for r in results:
        assert r.returncode != 0
        assert "do not share its directories" in r.stderr, r.stderr[-3000:]
        assert f"output_dir={run_dir}: not seen by machine 1" in r.stderr
    assert "parameters:" not in results[0].stderr  # refused before the model was loaded
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.glob(".mistral-tune-shared-*"))


@pytest.mark.slow
def test_a_machine_cut_off_the_network_is_given_up_after_train_ddp_timeout(two_machines, tmp_path):
    """Machine 1 hangs and its link goes down: no connection is closed, so only the timeout can end machine 0."""
    if not two_machines.namespaces:
        pytest.skip(f"needs the network namespaces, and this run uses {two_machines.how}")
    timeout = 20  # also how long the processes wait for each other at start: keep a margin for a loaded CI machine
    drill = {FAIL_RANK_ENV: "1", FAIL_STEP_ENV: "2", FAIL_HOW_ENV: "hang"}
    overrides = [f"train.ddp_timeout={timeout}", "export.merged=false", "train.save_steps=100"]
    ns1, link1 = two_machines.namespaces[1], two_machines.envs[1]["GLOO_SOCKET_IFNAME"]
    node0, node1 = _start(two_machines, tmp_path, tmp_path / "run", overrides, env=drill)
    try:
        deadline = time.monotonic() + 400
        while node0.poll() is None and time.monotonic() < deadline:
            if any(_status(p) == "stopped" for p in _descendants(node1.pid)):
                break
            time.sleep(0.2)
        _ip("-n", ns1, "link", "set", link1, "down")  # the cable is pulled
        cut = time.monotonic()
        _, err0 = _output(node0, timeout=timeout + 120)
        ended = time.monotonic() - cut
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                _kill(p.pid)
        node1.wait()
        _ip("-n", ns1, "link", "set", link1, "up")
    print(f"machine 0 ended {ended:.1f} s after machine 1 was cut off (train.ddp_timeout={timeout})")
    assert node0.returncode != 0
    assert "lost rank 1 (machine 1" in err0 and "after step 2" in err0, err0[-3000:]
    # waited for the timeout (nothing else could tell it), then at most the answer window and the teardown
    assert timeout - 2 < ended < timeout + 60
