"""The main job end to end: `mistral-tune recipe=sft_lora` on the embedded default, checked in full."""

import json
import subprocess
import sys

import pytest
import torch

from mistral_tune.core.run_lock import LOCK_NAME
from tests.helpers import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sft_lora"
    proc = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=sft_lora", f"output_dir={out}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_run_directory_layout(run_dir):
    for name in ("resolved_config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert {p.name for p in (run_dir / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    merged = {p.name for p in (run_dir / "merged").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
    } <= merged
    assert any(n.endswith(".safetensors") for n in merged)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME], (
        "no temporary export left behind"
    )


def test_metrics_records_and_loss_falls_below_half(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert len(records) >= 5
    for r in records:
        assert {"step", "loss", "learning_rate", "tokens_seen", "tokens_per_second", "elapsed_seconds"} <= r.keys()
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and records[-1]["tokens_seen"] > records[0]["tokens_seen"] > 0
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.5 * first, f"loss {first:.2f} -> {last:.2f}"


def test_adapter_is_lora_r8_on_q_and_v(run_dir):
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}


def test_samples_are_greedy_generations_on_held_out_prompts(run_dir):
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 4
    train = (run_dir / "resolved_config.yaml").read_text()
    assert "holdout: 4" in train
    for s in samples:
        assert isinstance(s["prompt"], list) and s["reference"] and isinstance(s["generation"], str)


def test_summary(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["merged"]["max_abs_logit_diff"] < 1e-4 and s["data"]["dropped_total"] == 0
    assert s["final_loss"] < s["first_loss"]


def test_merged_loads_in_plain_transformers_with_logit_parity(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mistral_tune.config.compose import compose
    from mistral_tune.models.loading import load_model
    from mistral_tune.models.sources import resolve_source

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    assert merged.config.sliding_window == 32 and merged.config.model_type == "mistral"
    assert hf_tok.chat_template and hf_tok.pad_token_id != hf_tok.eos_token_id

    # base + adapter rebuilt independently of the run: same preset, same seed, adapter from disk
    cfg = compose("sft_lora", [])
    base = load_model(cfg.model, resolve_source("mistral_tiny"), seed=cfg.train.seed)
    reference = PeftModel.from_pretrained(base, run_dir / "adapter").eval()

    text = "The opposite of hot is cold. " * 12  # well past the sliding window (32)
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 64 and ids[0, 0] == hf_tok.bos_token_id
    with torch.no_grad():
        diff = (merged(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-4
