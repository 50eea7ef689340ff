"""A weighted mixture of two sources trains through the real CLI with per-source counts in summary.json, and a
mixture run interrupted at a checkpoint and resumed ends exactly as the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mistral_tune.config.compose import compose
from mistral_tune.pipeline.run import run
from mistral_tune.train import checkpoints
from mistral_tune.train.signals import TrainingInterrupted
from tests.helpers import read_metrics, read_summary
from tests.pipeline.test_resilience import SignalAtStep

REPO = Path(__file__).resolve().parents[2]
MIX = "data.path='data/sft_sample.jsonl:3,data/text_sample.jsonl:1'"
FAST = ["train.logging_steps=1", "train.per_device_train_batch_size=4", "trainer.max_length=64", "export=none",
        "export.num_samples=0"]  # fmt: skip


@pytest.mark.slow
def test_two_source_mixture_trains_through_the_cli_with_per_source_counts(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", MIX, *FAST, "train.max_steps=6",
         "trainer.packing=true", f"output_dir={out}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "data: mixture of 2 sources (messages+text)" in log
    summary = read_summary(out)
    data = summary["data"]
    assert data["mixture"] == {"sources": 2, "stopping_strategy": "all_exhausted", "seed": 0,
                               "examples_per_pass": data["mixture"]["examples_per_pass"]}  # fmt: skip
    chat, text = data["sources"]
    assert (chat["name"], chat["format"], chat["weight"], chat["read"]) == (
        "data/sft_sample.jsonl",
        "messages",
        3.0,
        400,
    )
    assert (text["name"], text["format"], text["weight"], text["read"]) == ("data/text_sample.jsonl", "text", 1.0, 50)
    assert chat["read"] == chat["used"] + chat["held_out"] + chat["dropped_total"]
    assert text["used"] == 50 and data["read"] == 450 and data["used"] == chat["used"] + text["used"]
    # what training consumed, per source: every token of the run is attributed to exactly one source
    assert chat["tokens_seen"] + text["tokens_seen"] == summary["tokens_seen"] > 0
    assert chat["examples_seen"] > text["examples_seen"] > 0  # weight 3 vs 1
    for s in (chat, text):
        assert s["epochs_seen"] == round(s["examples_seen"] / s["used"], 4)
        assert 0 < s["tokens_seen"] <= s["examples_seen"] * 64
    assert summary["data_format"] == "messages" and summary["steps"] == 6
    printed = f"source       data/text_sample.jsonl (weight 1): {text['examples_seen']} examples"
    assert printed in log  # the end-of-run summary names each source


@pytest.mark.slow
def test_interrupted_mixture_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["sft_lora", [MIX, *FAST, "train.max_steps=6", "train.save_steps=100", "train.seed=3", "data.seed=5"]]
    reference = run(compose(args[0], [*args[1], f"output_dir={tmp_path / 'reference'}"]))

    out = tmp_path / "killed"
    with pytest.raises(TrainingInterrupted) as info:
        run(compose(args[0], [*args[1], f"output_dir={out}"]), callbacks=[SignalAtStep(2, signal.SIGINT)])
    assert info.value.step == 3 and (out / "checkpoints" / "checkpoint-3").is_dir()
    stopped = read_summary(out)["data"]["sources"]
    marker = checkpoints.read_marker(out / "checkpoints" / "checkpoint-3")
    assert marker["mixture_seen"] == [[s["examples_seen"], s["tokens_seen"]] for s in stopped]
    assert sum(s["examples_seen"] for s in stopped) == 3 * 4

    resumed = run(compose(args[0], [*args[1], f"output_dir={out}", "resume=auto"]))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 6
    ref, got = read_metrics(tmp_path / "reference"), read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(ref, got):  # the same examples in the same order: same tokens and losses at every step
        assert b["tokens_seen"] == a["tokens_seen"], f"step {a['step']}: other examples after the resume"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), f"step {a['step']}"
    want = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    have = load_file(out / "adapter" / "adapter_model.safetensors")
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-7)
    # the per-source counts continue from the checkpoint: the same totals as the uninterrupted run
    assert resumed["data"]["sources"] == reference["data"]["sources"]
    assert sum(s["examples_seen"] for s in resumed["data"]["sources"]) == 6 * 4


@pytest.mark.slow
def test_per_source_counts_sum_over_ddp_processes(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", MIX, *FAST, "train.per_device_train_batch_size=2",
         "train.max_steps=3", "launcher=ddp", "launcher.num_processes=2", "launcher.main_process_port=0",
         f"output_dir={out}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out)
    sources = summary["data"]["sources"]
    assert summary["world_size"] == 2
    assert sum(s["examples_seen"] for s in sources) == 3 * 2 * 2  # steps x per-device batch x processes
    assert sum(s["tokens_seen"] for s in sources) == summary["tokens_seen"] > 0
