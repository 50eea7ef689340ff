"""bench/gpu_campaign.sh: its CPU self-check (same code, tiny model) and the variants it plans on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def campaign_module():
    spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "bench" / "gpu_campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_plan_times_every_backend_and_loss_and_qlora_with_the_issue_settings(monkeypatch):
    campaign = campaign_module()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # flash-attn, liger "installed"
    common, variants, skipped = campaign.bench_variants("cuda", tiny=False)
    names = [n for n, _ in variants]
    grid = [f"lora_{b}_{loss}" for b in ("sdpa", "flex", "fa2") for loss in ("chunked", "liger")]
    assert names == grid[:1] + ["lora_sdpa_packed_chunked"] + grid[1:] + ["qlora"]
    assert not skipped
    for item in ("model=mistral_7b_en", "model.load_weights=false", "model.dtype=bfloat16", "trainer.max_length=2048",
                 "trainer.packing=true", "adapter.r=16", "train.per_device_train_batch_size=1"):  # fmt: skip
        assert item in common
    qlora = dict(variants)["qlora"]
    assert "adapter.name=qlora" in qlora and "train.gradient_checkpointing=true" in qlora
    assert "bench.synthetic_length=2048" in qlora


def test_cpu_plan_says_why_each_gpu_variant_is_left_out():
    campaign = campaign_module()
    _, variants, skipped = campaign.bench_variants("cpu", tiny=True)
    assert [n for n, _ in variants] == ["lora_sdpa_chunked", "lora_sdpa_packed_chunked", "qlora"]
    assert set(skipped) == {"lora_sdpa_liger", "lora_flex_*", "lora_fa2_*"}
    assert all(skipped.values())


@pytest.mark.slow
def test_cpu_self_check_runs_the_campaign_code_on_a_tiny_model(tmp_path):
    """The packed-vs-unpacked check and one LoRA bench variant, through the shell entry point (~1 min).

    The QLoRA section (one more bench worker with bitsandbytes) is left to the full self-check:
    ``bench/gpu_campaign.sh --device cpu --tiny`` (docs/BENCHMARKS.md).
    """
    out = tmp_path / "campaign.json"
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "bench" / "gpu_campaign.sh"), "--device", "cpu", "--tiny", "--only", "packing,lora",
           "--steps", "1", "--warmup", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    sections = results["sections"]
    assert sections["environment"]["status"] == "ok"
    packing = sections["packing"]
    assert packing["status"] == "ok" and packing["goal_met"] is True
    assert min(packing["example_lengths"]) > packing["sliding_window"] and sum(packing["example_lengths"]) == 256
    rows = packing["backends"]
    assert {(r["attn"], r["dtype"]) for r in rows} == {
        (a, d) for a in ("sdpa_packed", "sdpa", "eager") for d in ("float32", "bfloat16")
    }
    for r in rows:
        assert r["equal"] and r["control_differs"], r
        assert abs(r["packed_loss"] - r["unpacked_loss"]) <= r["tolerance"] * abs(r["unpacked_loss"])
    lora = sections["lora"]
    assert lora["status"] == "ok", lora
    row = lora["variants"]["lora_sdpa_chunked"]
    assert row["tokens_per_second"] > 0 and row["attn"] == "sdpa" and row["loss"] == "chunked"
    assert row["tokens_per_step"] == 256  # two 128-token examples packed into one row
    packed = lora["variants"]["lora_sdpa_packed_chunked"]
    assert packed["tokens_per_second"] > 0 and packed["attn"] == "sdpa_packed" and packed["tokens_per_step"] == 256
    assert "qlora" not in sections
