from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_tune.cli.bench import parse_bench_args
from mistral_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_variant_may_run_another_recipe():
    from mistral_tune.cli.bench import split_overrides

    _, _, variants, _ = parse_bench_args(
        ["recipe=sft_lora", "--variant", "sft", "--variant", "dpo", "bench.recipe=dpo_lora", "data=preference_sample"]
    )
    assert variants[1] == ("dpo", ["bench.recipe=dpo_lora", "data=preference_sample"])
    hydra, options, problems = split_overrides(variants[1][1])
    assert hydra == ["data=preference_sample"] and options["recipe"] == "dpo_lora" and not problems
    assert split_overrides([])[1]["recipe"] == ""  # the command's recipe
