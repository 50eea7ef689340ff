"""Tracking end to end with the real packages: a W&B offline run and TensorBoard event files, both read
back from disk; plus the run experience around them (eval split, progress lines, plot, summary)."""

import json
import math
import os
import subprocess
import sys

import pytest

from mistral_tune import cli
from mistral_tune.tracking.trackers import wandb_mode
from tests.helpers import read_jsonl
from tests.wandb_offline import read_run

SECRETS = {"WANDB_API_KEY": "wandb-test-key-0123456789abcdef0123456789", "HF_TOKEN": "hf_testtokenZYXWVUTSRQPONMLK"}


SHORT_RUN = [
    "recipe=sft_lora",
    "train.max_steps=6",
    "train.logging_steps=2",
    "train.per_device_train_batch_size=4",
    "trainer.max_length=64",
    "export.merged=false",
    "export.num_samples=0",
]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "run"
    args = [
        *SHORT_RUN,
        "train.eval_steps=3",
        "data.eval_split=0.05",
        "tracking=wandb",
        "tracking.mode=offline",
        "tracking.project=mt-tests",
        "tracking.run_name=offline-check",
        "tracking.tags=[lora,tiny]",
        "tracking.group=ci",
        f"output_dir={out}",
    ]
    env = {**os.environ, **SECRETS, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is faster on a busy CPU
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_wandb_mode(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k" * 40})[0] == "online"
    assert wandb_mode("auto", {"NETRC": str(netrc)}) == ("offline", "not logged in to W&B and WANDB_API_KEY is not set")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode("auto", {"NETRC": str(netrc)})[0] == "online"  # `wandb login` writes this entry
    assert wandb_mode("auto", {"NETRC": str(netrc), "WANDB_MODE": "offline"})[0] == "offline"
    assert wandb_mode("offline", {"WANDB_API_KEY": "k" * 40})[0] == "offline"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_config(wandb_run):
    out, _ = wandb_run
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    logged = read_run(run_files[0])
    assert logged["run"] == {"name": "offline-check", "project": "mt-tests", "tags": ["lora", "tiny"], "group": "ci"}
    # the resolved config, as composed
    assert logged["config"]["recipe"] == "sft_lora" and logged["config"]["model"]["name"] == "mistral_tiny"
    assert logged["config"]["train"]["max_steps"] == 6 and logged["config"]["data"]["eval_split"] == "0.05"
    # every training loss and eval loss of metrics.jsonl, at the same step
    records = read_jsonl(out / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [3, 6]
    logged_train = {h["train/global_step"]: h["train/loss"] for h in logged["history"] if "train/loss" in h}
    logged_eval = {h["train/global_step"]: h["eval/loss"] for h in logged["history"] if "eval/loss" in h}
    assert logged_train == pytest.approx(train) and logged_eval == pytest.approx(evals)
    assert logged["summary"]["final_loss"] == pytest.approx(train[6])


@pytest.mark.slow
def test_wandb_offline_log_says_how_to_sync(wandb_run):
    out, stdout = wandb_run
    summary = json.loads((out / "summary.json").read_text())
    sync = summary["tracking"]["sync_command"]
    assert summary["tracking"]["mode"] == "offline" and sync.startswith("wandb sync ")
    assert os.path.isdir(sync.split(" ", 2)[2]) and str(out) in sync
    assert sync in (out / "train.log").read_text() and sync in stdout


@pytest.mark.slow
def test_no_secret_lands_in_any_file_of_the_run(wandb_run):
    out, stdout = wandb_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10  # config, logs, metrics, adapter, wandb's own files
    for path in files:
        data = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} found in {path}"
    assert not any(secret in stdout for secret in SECRETS.values())


@pytest.mark.slow
def test_eval_split_logs_eval_loss_and_perplexity(wandb_run):
    out, _ = wandb_run
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals and all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert all(r["tokens_per_second"] is None for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["eval_read"] == summary["data"]["eval_used"] == 20  # 5% of the 396 non-held-out rows
    d = summary["data"]
    assert d["read"] == d["used"] + d["held_out"] + d["dropped_total"] + d["eval_read"] == 400
    assert summary["final_eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["best_eval_loss"] == pytest.approx(min(r["eval_loss"] for r in evals))


@pytest.mark.slow
def test_progress_lines_and_printed_summary(wandb_run):
    _, stdout = wandb_run
    lines = [ln for ln in stdout.splitlines() if "mistral_tune.tracking.progress" in ln]
    assert any("step 2/6  loss " in ln and " tok/s " in ln and " eta 0:" in ln for ln in lines), lines
    assert any("step 3/6  eval_loss " in ln for ln in lines)
    assert "{'loss'" not in stdout  # transformers' raw dict prints are replaced
    assert "run finished: 6 steps" in stdout and "eval loss" in stdout and "summary.json" in stdout


@pytest.mark.slow
def test_summary_json_and_plot(wandb_run):
    out, _ = wandb_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_loss", "best_loss", "tokens_seen", "wall_seconds", "tokens_per_second", "peak_memory_bytes"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["best_loss"] <= summary["final_loss"] and summary["adapter"] == str(out / "adapter")
    assert summary["plot"] == str(out / "metrics.png")
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tensorboard_event_files_hold_metrics_and_config(tmp_path, capsys, single_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main([*SHORT_RUN, "train.max_steps=4", "tracking=tensorboard", f"output_dir={out}"]) == 0
    capsys.readouterr()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "event files under <run_dir>/tensorboard"
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    assert logged == pytest.approx(expected) and sorted(logged) == [2, 4]
    text = acc.Tensors("resolved_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "recipe: sft_lora" in text and "name: tensorboard" in text
    assert json.loads((out / "summary.json").read_text())["tracking"] == {
        "name": "tensorboard",
        "dir": str(out / "tensorboard"),
    }
