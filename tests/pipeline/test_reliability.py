"""Reliability, round two (#19): no extra step on resume, one run per directory, a user's files are never
replaced, a full disk is reported cleanly, changed resumes are refused, damaged checkpoints are skipped,
secrets stay out of the console.

Real processes, real signals and a real tmpfs where this machine can mount one (else the full-disk test is
skipped and the injected-ENOSPC one still runs).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.pipeline.run import run
from mistral_tune.train import checkpoints
from mistral_tune.train.signals import TrainingInterrupted
from tests.helpers import read_metrics as metrics
from tests.helpers import read_summary as summary
from tests.pipeline.test_resilience import FAST, SignalAtStep, start_cli, wait_for

REPO = Path(__file__).resolve().parents[2]

# Names, not imports, so each test here also runs (and fails) against the code before #19.
LOCK_NAME, OWNER_MARKER = ".mistral-tune.lock", ".written-by-mistral-tune"


def run_lock(path: Path):
    from mistral_tune.core.run_lock import RunLock

    return RunLock(path)


def cfg_for(out: Path, *overrides: str):
    return compose("sft_lora", [*FAST, *overrides, f"output_dir={out}"])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def top_level(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


# ---- 1. resume=auto of a finished run: no training, missing outputs redone -----------------------------------


@pytest.mark.slow
def test_resume_of_a_run_killed_during_its_export_trains_nothing_and_redoes_the_outputs(tmp_path, caplog):
    out = tmp_path / "run"
    args = [a for a in FAST if not a.startswith("export")] + ["export.merged=true", "export.num_samples=0"]
    args += ["train.max_steps=4", "train.save_steps=2"]
    proc = start_cli(args, out)
    # SIGKILL once the merged export is being written: after the last checkpoint, before summary.json.
    wait_for(lambda: out.is_dir() and any(p.name.startswith(".merged.tmp-") for p in out.iterdir()), proc, "export")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "summary.json").exists() and not (out / "merged").exists()
    final = out / "checkpoints" / "checkpoint-4"
    assert checkpoints.completeness_problem(final) is None
    before = metrics(out)

    caplog.set_level(logging.INFO, logger="mistral_tune")
    done = run(compose("sft_lora", [*args, f"output_dir={out}", "resume=auto"]))
    assert done["status"] == "completed" and done["steps"] == 4 and done["resumed_from"] == str(final)
    assert done["tokens_seen"] == before[-1]["tokens_seen"]  # not one batch more
    assert metrics(out) == before  # no step 5 logged, nothing re-logged
    assert "training had finished" in caplog.text and "step 5" not in caplog.text
    # The outputs of an uninterrupted run, from the final checkpoint's weights, and no export leftovers.
    assert top_level(out) == sorted(
        [LOCK_NAME, "adapter", "checkpoints", "merged", "metrics.jsonl", "metrics.png", "resolved_config.yaml",
         "summary.json", "train.log"]
    )  # fmt: skip
    want, have = tensors(final), tensors(out / "adapter")
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert (out / "merged" / "model.safetensors").is_file() and summary(out)["merged"]["max_abs_logit_diff"] < 1e-4
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "README.md")  # HF's model card
    assert kept == ["checkpoint-2", "checkpoint-4"]


# ---- 2. one run per output directory --------------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_in_the_same_directory_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "shared"
    first = start_cli([*FAST, "train.max_steps=100000", "train.save_steps=100000"], out)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), first, "the first run's step 1")
        # A second run, in this process: refused before it changes anything, naming the other process.
        with pytest.raises(UserError, match=f"in use by another run: pid {first.pid} on host"):
            run(cfg_for(out, "train.seed=7"))
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the lock file still names the dead process
    first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    caplog.set_level(logging.WARNING, logger="mistral_tune")
    with run_lock(out):  # the OS released the dead process's lock: taken over, with a warning
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by another run: pid {os.getpid()}"):
            run_lock(out).acquire()
    assert f"taking over the lock left by pid {first.pid}" in caplog.text
    assert (out / LOCK_NAME).read_text() == ""  # released on exit


def test_only_rank_0_takes_the_run_lock(tmp_path, monkeypatch):
    """Ranks > 0 of a launch share rank 0's directory: they must not be refused by its lock."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = cfg_for(out, "data.path=missing.jsonl")  # fails right after the lock step, before any model work
    with run_lock(out):
        with pytest.raises(UserError, match="in use by another run"):
            run(cfg)
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(UserError, match="missing.jsonl: no such file"):
            run(cfg_for(out, "data.path=missing.jsonl"))


# ---- 3. never replace what the project did not write ----------------------------------------------------------


def test_a_users_directories_and_files_are_never_replaced(tmp_path):
    out = tmp_path / "ud"
    for name in ("adapter", "merged"):
        (out / name).mkdir(parents=True)
        (out / name / "important.txt").write_text("keep")
    (out / "summary.json").write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"not a mistral-tune run directory.*summary\.json"):
        run(cfg_for(out, "train.max_steps=2", "export.merged=true"))
    (out / "summary.json").unlink()
    del before[out / "summary.json"]
    with pytest.raises(UserError, match=r"ud/adapter already exists and is a directory that mistral-tune did not"):
        run(cfg_for(out, "train.max_steps=2", "export.merged=true"))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing deleted, not even a lock file
    # A directory we wrote carries the marker, and only such a one is ever replaced.
    (out / "adapter" / OWNER_MARKER).write_text("")
    with pytest.raises(UserError, match=r"ud/merged already exists"):
        run(cfg_for(out, "train.max_steps=2", "export.merged=true"))


# ---- 4. a full disk: the documented message, naming the last complete checkpoint -------------------------------


class FillDisk(TrainerCallback):
    """Fills the filesystem of ``path`` (a real tmpfs) after the checkpoint of ``step`` or at the end of training."""

    def __init__(self, path: Path, step: int | None):
        self.path, self.step = path, step

    def fill(self):
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # unbuffered: close cannot fail
        try:
            for size in (2**20, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass  # ENOSPC at this chunk size; go on with a smaller one
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.fill()

    def on_train_end(self, args, state, control, **kwargs):
        if self.step is None:
            self.fill()


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); the injected-ENOSPC test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["checkpoint", "export"])
def test_full_disk_gives_the_documented_message_naming_the_last_checkpoint(tmpfs, when):
    out = tmpfs / "run"
    cfg = cfg_for(out, "train.max_steps=4", "train.save_steps=2", "train.logging_steps=100")
    with pytest.raises(UserError) as info:
        run(cfg, callbacks=[FillDisk(tmpfs, 2 if when == "checkpoint" else None)])
    message = " ".join(str(info.value).split())
    last = out / "checkpoints" / ("checkpoint-2" if when == "checkpoint" else "checkpoint-4")
    assert f"The last complete checkpoint is {last}" in message and "No space left on device" in message
    assert checkpoints.latest_complete(out / "checkpoints", verify=True) == last
    assert not (out / "adapter").exists()  # nothing half-written renamed into place
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_tokenizers_bare_exception_for_a_full_disk_is_reported_cleanly(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: tokenizers' own error type for ENOSPC, raised from its save."""
    from tokenizers import Tokenizer

    real = Tokenizer.save

    def full(self, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise Exception("No space left on device (os error 28)")  # what tokenizers raises, verbatim
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "save", full)
    cfg = cfg_for(tmp_path / "run", "train.max_steps=4", "train.save_steps=2")
    with pytest.raises(UserError, match=r"checkpoint-4 failed \(No space left on device.*checkpoint-2"):
        run(cfg)


# ---- 6 and 8. resumes that change the adapter or the optimizer; damaged checkpoints -----------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGTERM after step 3: checkpoint-2 and checkpoint-4 (6 steps planned)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    args = ["train.max_steps=6", "train.save_steps=2", "train.save_total_limit=null"]
    with pytest.raises(TrainingInterrupted):
        run(cfg_for(out, *args), callbacks=[SignalAtStep(3, signal.SIGTERM)])
    return out, args


@pytest.mark.slow
@pytest.mark.parametrize(
    "change,reason",
    [
        ("adapter.r=16", r"the adapter changed: \d+ weight\(s\) changed shape .*adapter\.r"),
        ("adapter.target_modules=[q_proj,k_proj,v_proj]", r"the adapter changed: .*adapter\.target_modules"),
        ("train.learning_rate=0.001", r"the optimizer settings changed \(train\.learning_rate: 0\.005 -> 0\.001"),
    ],
)
def test_resume_with_a_changed_adapter_or_optimizer_is_refused_and_changes_nothing(interrupted, change, reason):
    out, args = interrupted
    config = (out / "resolved_config.yaml").read_bytes()
    records = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match=f"Cannot resume from .*checkpoint-4: {reason}"):
        run(cfg_for(out, *args, "resume=auto", change))
    assert (out / "resolved_config.yaml").read_bytes() == config and (out / "metrics.jsonl").read_bytes() == records


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped_for_the_previous_good_one(interrupted, caplog):
    out, args = interrupted
    newest = out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    blob = bytearray(newest.read_bytes())
    blob[-4:] = bytes(b ^ 0xFF for b in blob[-4:])  # same size: flipped bits in the tensor data
    newest.write_bytes(bytes(blob))
    header = out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    healthy = header.read_bytes()
    damaged = healthy.replace(b'"dtype":"F32"', b'"dtype":"F16"', 1)  # same size: a damaged header
    assert len(damaged) == len(healthy) and damaged != healthy
    assert checkpoints.completeness_problem(header.parent) is None  # sizes alone cannot tell
    header.write_bytes(damaged)
    assert "checksum" in checkpoints.completeness_problem(header.parent, verify=True)
    header.write_bytes(healthy)

    caplog.set_level(logging.WARNING)
    done = run(cfg_for(out, *args, "resume=auto"))
    assert done["resumed_from"].endswith("checkpoint-2") and done["steps"] == 6 and done["status"] == "completed"
    assert "checkpoint-4 is damaged (adapter_model.safetensors does not match its checksum" in caplog.text
    assert all(torch.isfinite(t).all() for t in tensors(out / "adapter").values())
    assert checkpoints.completeness_problem(out / "checkpoints" / "checkpoint-4", verify=True) is None  # rewritten


# ---- 7. values that passed validation and then crashed -----------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.learning_rate=nan", r"train\.learning_rate=nan must be a finite number > 0"),
        ("train.learning_rate=inf", r"train\.learning_rate=inf must be a finite number > 0"),
        ("data.max_samples=-1", r"data\.max_samples=-1 must be > 0"),
        ("data.max_samples=0", r"data\.max_samples=0 must be > 0"),
    ],
)
def test_values_that_crashed_later_are_config_errors(override, message):
    with pytest.raises(UserError, match=message):
        compose("sft_lora", [override])


@pytest.mark.slow
def test_unknown_target_module_names_the_existing_ones(tmp_path):
    with pytest.raises(UserError, match=r"target_modules names nonexistent_proj.*q_proj.*v_proj"):
        run(cfg_for(tmp_path / "run", "adapter.target_modules=[nonexistent_proj]", "train.max_steps=1"))


def test_custom_code_model_with_unknown_type_is_one_clear_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "totally_custom", "auto_map": {"AutoConfig": "conf.CustomConfig"}, "hidden_size": 8}
    (model / "config.json").write_text(json.dumps(config))
    (model / "conf.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match=r"model_type='totally_custom'.*no code was run.*trust_remote_code"):
        run(cfg_for(tmp_path / "run", f"model.path={model}", "train.max_steps=1"))


# ---- 9. secrets in the console ----------------------------------------------------------------------------------

TOKEN = "hf_" + "Zq8" * 12


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistral_tune", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cfg_job_masks_secrets():
    shown = cli(["recipe=sft_lora", f"tracking.run_name=x-{TOKEN}", "--cfg", "job"], REPO, HF_TOKEN=TOKEN)
    assert shown.returncode == 0 and "run_name: x-***REDACTED***" in shown.stdout
    assert TOKEN not in shown.stdout + shown.stderr


def test_console_traceback_masks_secrets(tmp_path):
    # A bug-shaped failure (not a UserError) whose message quotes a secret: a launcher variable holding a token.
    proc = cli(["recipe=sft_lora", f"output_dir={tmp_path / 'run'}"], tmp_path, HF_TOKEN=TOKEN, RANK=TOKEN)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert "ValueError: invalid literal for int() with base 10: '***REDACTED***'" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


# ---- 10. minor ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_dir", [[], ["output_dir="]])
def test_resume_auto_without_an_output_dir_is_refused_and_creates_nothing(tmp_path, monkeypatch, output_dir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="resume=auto continues the run in output_dir, but no output_dir was given"):
        run(compose("sft_lora", [*FAST, "resume=auto", *output_dir]))
    assert list(tmp_path.iterdir()) == []


def test_unquoted_non_ascii_override_gets_a_quoting_hint():
    with pytest.raises(UserError, match=r"non-ASCII characters.*Quote the value.*data\.path='\"/tmp/dätä\.jsonl\"'"):
        compose("sft_lora", ["data.path=/tmp/dätä.jsonl"])
    assert compose("sft_lora", ['data.path="/tmp/dätä.jsonl"']).data.path == "/tmp/dätä.jsonl"


def test_stale_export_temporaries_of_dead_processes_are_removed(tmp_path):
    from mistral_tune.core.files import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".merged.tmp-{dead.pid}", tmp_path / f".merged.tmp-{os.getpid()}"
    for d in (stale, live, tmp_path / "merged"):
        d.mkdir()
        (d / "x").write_text("x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "merged"])
