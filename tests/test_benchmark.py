"""The benchmark harness: argument parsing, FLOPs/MFU arithmetic, phase memory, and a tiny real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mistral_tune.benchmark import flops
from mistral_tune.benchmark.harness import markdown_table, summarize
from mistral_tune.cli.bench import parse_bench_args
from mistral_tune.core.errors import UserError
from mistral_tune.data.packing import batch_token_count
from mistral_tune.models.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_parse_bench_args_splits_common_and_variant_overrides():
    recipe, common, variants, opts = parse_bench_args(
        ["recipe=sft_lora", "train.seed=1", "--steps", "4", "--warmup=2", "--variant", "a", "trainer.loss=plain",
         "--variant", "b", "bench.trainer=trl", "--out", "x"]
    )  # fmt: skip
    assert recipe == "sft_lora" and common == ["train.seed=1"]
    assert variants == [("a", ["trainer.loss=plain"]), ("b", ["bench.trainer=trl"])]
    assert (opts.steps, opts.warmup, opts.out) == (4, 2, "x")
    assert parse_bench_args(["recipe=sft_lora"])[2] == [("framework", [])]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3"], "No recipe"),
        (["recipe=sft_lora", "--steps", "x"], "not a valid int"),
        (["recipe=sft_lora", "--speed", "3"], "Unknown option"),
        (["recipe=sft_lora", "bench.trainr=trl"], "Unknown benchmark option"),
        (["recipe=sft_lora", "--variant", "a", "--variant", "a"], "must differ"),
        (["recipe=sft_lora", "--variant"], "needs a name"),
    ],
)
def test_parse_bench_args_rejects_bad_input(args, message):
    with pytest.raises(UserError, match=message):
        parse_bench_args(args)


def test_mistral_7b_matmul_parameters_match_the_issue():
    n = flops.matmul_parameters(SimpleNamespace(**PRESETS["mistral_7b_en"].config))
    assert n == 7_110_393_856  # 32 layers x 218.1M (attention + SwiGLU) + 131M LM head; embeddings excluded


def test_attended_pairs_and_attention_flops():
    assert flops.attended_pairs(4, None) == 10  # 1 + 2 + 3 + 4
    assert flops.attended_pairs(5, 2) == 3 + 3 * 2  # 1 + 2, then 2 keys for each of the 3 later queries
    assert flops.attended_pairs(2048, 4096) == 2048 * 2049 // 2
    cfg = SimpleNamespace(**PRESETS["mistral_7b_en"].config)
    per_token = flops.step_flops(cfg, [2048], frozen_base=True) / 2048
    attention = 12 * 32 * 4096 * 2049 / 2
    assert per_token == pytest.approx(4 * 7_110_393_856 + attention)
    assert flops.step_flops(cfg, [2048], frozen_base=False) > flops.step_flops(cfg, [2048], frozen_base=True)


def test_example_lengths_of_padded_and_packed_batches():
    padded = {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    packed = {"input_ids": torch.zeros(2, 6), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 0, 0]])}
    assert flops.example_lengths(padded) == [3, 5]
    assert flops.example_lengths(packed) == [3, 3, 2, 2]  # the second row ends in two padding tokens
    assert batch_token_count(packed) == 10 and batch_token_count(padded) == 8


def test_peak_tflops_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("Some CPU") is None
    assert flops.mfu(494.7e12, 989.4) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None


PHASE_PEAKS_SCRIPT = """
import torch
from mistral_tune.benchmark.memory import PhasePeaks

peaks = PhasePeaks(cuda=False)
peaks.enter("small")
small = torch.ones(1024)
peaks.enter("big")
big = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
big.add_(1)
peaks.enter(None)
peaks.stop()
print(peaks.peaks["big"] - peaks.peaks["small"])
"""


def test_phase_peaks_attribute_memory_to_the_running_phase():
    # A fresh process: in the test process, pages freed by earlier tests stay resident and a new
    # allocation can reuse them without the RSS growing at all.
    out = subprocess.run([sys.executable, "-c", PHASE_PEAKS_SCRIPT], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 48 * 2**20


def _raw(device="cpu", name=None, dtype="float32"):
    step = [{"tokens": 1000, "padded_tokens": 1200, "label_tokens": 600, "lengths": [500, 500]}]
    return {
        "overrides": [], "trainer": "mistral", "device": device, "device_name": name, "dtype": dtype,
        "attn_implementation": "sdpa", "loss_impl": "chunked", "gradient_checkpointing": False, "packing": None,
        "parameters": {"trainable": 1000, "total": 10**6}, "adapter": "lora",
        "model_config": PRESETS["mistral_7b_en"].config,
        "framework_seconds": [1.0, 1.2, 1.1], "bare_seconds": [1.0, 1.0, 1.0],
        "step_batches": [step, step, step], "framework_losses": [], "bare_losses": [2.0, 1.9, 1.8],
        "memory_kind": "rss_sampled", "peak_memory": {"framework": 5 * 2**30, "bare": 6 * 2**30},
        "rss_before_train_bytes": 2**30, "process_peak_rss_bytes": 7 * 2**30,
    }  # fmt: skip


def test_summarize_ratio_tokens_per_second_and_no_mfu_on_cpu():
    s = summarize("v", [_raw()])
    assert s["overhead_ratio"] == pytest.approx(1.1)  # median of 1.0, 1.2, 1.1
    assert s["overhead_ratio_min"] == pytest.approx(1.0)  # fastest framework step against fastest bare step
    assert s["framework"]["tokens_per_second"] == pytest.approx(3000 / 3.3)
    assert s["bare"]["tokens_per_second"] == pytest.approx(1000.0)
    assert s["framework"]["peak_memory_bytes"] == 5 * 2**30
    assert s["framework"]["mfu"] is None and s["tokens_per_step"] == 1000 and s["padded_tokens_per_step"] == 1200
    assert "| v | 1,000 (1,200) | 1.100 | 1.000 | 1.10 |" in markdown_table([s])


def test_summarize_mfu_on_a_gpu_result():
    # A GPU cannot exist here: feed the summary what a worker on an H100 reports.
    s = summarize("v", [_raw("cuda", "NVIDIA H100 80GB HBM3", "bfloat16")])
    expected = flops.step_flops(
        SimpleNamespace(**PRESETS["mistral_7b_en"].config), [500, 500], frozen_base=True, adapter_parameters=1000
    )
    assert s["bare"]["mfu"] == pytest.approx(expected / 1.0 / 989.4e12)
    assert 0 < s["framework"]["mfu"] < s["bare"]["mfu"]


@pytest.mark.slow
def test_bench_command_smoke(tmp_path):
    """A real two-step benchmark of the tiny recipe: the JSON and markdown hold sane values."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "mistral_tune", "bench", "recipe=sft_lora", "train.per_device_train_batch_size=2",
           "trainer.max_length=64", "--steps", "2", "--warmup", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {} and results["steps"] == 2 and results["hardware"]["cpu_count"] >= 1
    (v,) = results["variants"]
    assert v["measured_steps"] == 2 and v["device"] == "cpu" and v["loss_impl"] == "chunked"
    assert 0 < v["tokens_per_step"] <= v["padded_tokens_per_step"] <= 2 * 64
    for side in ("framework", "bare"):
        assert v[side]["step_seconds"]["median"] > 0 and v[side]["tokens_per_second"] > 0
        assert v[side]["peak_memory_bytes"] > 100 * 2**20  # a Python process with torch is >100 MiB
        assert v[side]["mfu"] is None  # no MFU on a CPU
    assert v["overhead_ratio"] > 0 and len(v["bare_losses"]) == 2
    assert all(5 < loss < 15 for loss in v["bare_losses"])  # a random 32k-vocab model starts near ln(32000)
    assert "| framework |" in (out / "results.md").read_text()


def test_throughput_is_the_median_run_so_one_disturbed_round_does_not_dominate():
    quiet, disturbed = _raw(), _raw()
    disturbed["framework_seconds"] = [4.0, 4.0, 4.0]  # a load spike: 4x slower
    s = summarize("v", [quiet, disturbed, _raw()])
    assert s["framework"]["tokens_per_second"] == pytest.approx(3000 / 3.3)  # the quiet runs' figure
    assert sorted(s["framework"]["tokens_per_second_runs"])[0] == pytest.approx(3000 / 12.0)
    assert s["measured_steps"] == 9


def test_summarize_only_is_an_option():
    assert parse_bench_args(["recipe=sft_lora", "--summarize-only"])[3].summarize_only
