"""Function calling trains through the real CLI on the tiny presets of both tool-capable tokenizer kinds:
v3 SentencePiece (mistral_0.3_tiny) and Tekken (mistral_nemo_tiny), on the shipped tools sample, with
the documented command (docs/data-formats.md#function-calling) shortened to two steps."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.helpers import read_metrics, read_summary

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["mistral_0.3_tiny", "mistral_nemo_tiny"])
def test_tools_sample_trains_through_the_cli(tmp_path, model):
    run_dir = tmp_path / "run"
    args = [
        "recipe=sft_lora", "data=tools_sample", f"model={model}", "trainer.max_length=512",
        "train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1",
        "data.holdout=0", "export=none", "export.num_samples=0", f"output_dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    data = summary["data"]
    # every conversation trained, all of them with tools; the sample's 8 weight-0 turns skipped, none dropped
    assert data["used"] == data["read"] == data["tool_rows"] == 32 and data["dropped_total"] == 0
    assert data["assistant_turns_skipped"] == 8 and data["truncated"] == 0
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "weight 0 and are not trained" in (run_dir / "train.log").read_text()
