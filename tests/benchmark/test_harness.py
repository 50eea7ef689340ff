"""The benchmark harness: argument parsing, FLOPs/MFU arithmetic, phase memory, and a tiny real run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mistral_tune.benchmark import flops
from mistral_tune.benchmark.harness import markdown_table, summarize
from mistral_tune.cli.bench import parse_bench_args
from mistral_tune.models.presets import PRESETS


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


def test_throughput_is_the_median_run_so_one_disturbed_round_does_not_dominate():
    quiet, disturbed = _raw(), _raw()
    disturbed["framework_seconds"] = [4.0, 4.0, 4.0]  # a load spike: 4x slower
    s = summarize("v", [quiet, disturbed, _raw()])
    assert s["framework"]["tokens_per_second"] == pytest.approx(3000 / 3.3)  # the quiet runs' figure
    assert sorted(s["framework"]["tokens_per_second_runs"])[0] == pytest.approx(3000 / 12.0)
    assert s["measured_steps"] == 9


def test_summarize_only_is_an_option():
    assert parse_bench_args(["recipe=sft_lora", "--summarize-only"])[3].summarize_only


def test_usage_per_step_and_tokens_per_cpu_second():
    raw = _raw()
    raw["usage"] = {
        "framework": {"user_seconds": 5.0, "system_seconds": 1.0, "minor_faults": 300},
        "bare": {"user_seconds": 3.0, "system_seconds": 0.0, "minor_faults": 30},
    }
    s = summarize("v", [raw])
    assert s["usage_per_step"]["framework"] == {
        "minor_faults": 100, "system_seconds": 1 / 3, "user_seconds": 5 / 3, "tokens_per_cpu_second": 3000 / 6.0,
    }  # fmt: skip
    assert s["usage_per_step"]["bare"]["tokens_per_cpu_second"] == pytest.approx(1000.0)
    assert summarize("v", [_raw()])["usage_per_step"]["framework"] is None  # older results: no usage recorded
