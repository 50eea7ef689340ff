"""One export pipeline: a run's export and `mistral-tune export` write the same files, through one
streamed merge, one verification and one writer per file."""

import json
import re
import shutil
from pathlib import Path

import pytest

from mistral_tune import cli
from mistral_tune.config.compose import compose
from mistral_tune.core.run_lock import LOCK_NAME

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

PACKAGE = Path(__file__).resolve().parents[2] / "mistral_tune"
SHORT = [
    "train.max_steps=2",
    "train.per_device_train_batch_size=2",
    "data.max_samples=2",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "trainer.max_length=48",
    "export.num_samples=1",
    "export.sample_max_new_tokens=4",
]
SUMMARY_FIELDS = {
    "path",
    "dtype",
    "max_abs_logit_diff",
    "tolerance",
    "verified",
    "reference",
    "fine_tune_max_abs_logit_shift",
}


def train(recipe, out, *overrides):
    from mistral_tune.pipeline.run import run

    return run(compose(recipe, [*SHORT, *overrides, f"output_dir={out}"]))


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def test_a_runs_merged_export_and_the_standalone_one_are_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    summary = train("sft_lora", run_dir, "export=preset")
    for fmt in ("merged", "preset"):
        assert SUMMARY_FIELDS <= summary[fmt].keys(), fmt
        assert summary[fmt]["verified"] and summary[fmt]["max_abs_logit_diff"] < 1e-4
        assert summary[fmt]["reference"] == "in-memory fine-tuned model"
    assert summary["merged"]["fine_tune_max_abs_logit_shift"] > 10 * summary["merged"]["tolerance"]
    # preset/ is merged/'s verified files, hard-linked, plus metadata.json
    merged, preset = run_dir / "merged", run_dir / "preset"
    assert (merged / "model.safetensors").stat().st_ino == (preset / "model.safetensors").stat().st_ino
    assert set(files(preset)) == set(files(merged)) | {"metadata.json"}
    in_run = files(merged)
    shutil.copytree(merged, tmp_path / "in-run-merged")
    assert cli.main(["export", f"run_dir={run_dir}", "formats=[merged]"]) == 0
    standalone = files(merged)
    assert in_run.keys() == standalone.keys()
    assert [name for name in in_run if in_run[name] != standalone[name]] == []
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= in_run.keys()
    recorded = json.loads((run_dir / "summary.json").read_text())["merged"]
    assert recorded["reference"] == "base + adapter (unmerged)" and recorded["max_abs_logit_diff"] < 1e-4
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME], (
        "no temporary export left behind"
    )


def test_a_pissa_run_exports_its_converted_adapter_into_the_original_base(tmp_path):
    summary = train("sft_lora", tmp_path / "run", "adapter.init_lora_weights=pissa")
    merged = summary["merged"]
    assert merged["method"] == "streamed" and merged["verified"]
    # verified against the trained model in memory, whose base PiSSA rewrote
    assert merged["max_abs_logit_diff"] < 1e-4 and merged["reference"] == "in-memory fine-tuned model"
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["init_lora_weights"] is True  # saved converted for the original base


def test_each_export_file_and_config_is_built_in_one_place():
    sources = {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}

    def where(pattern):
        return sorted(str(p.relative_to(PACKAGE)) for p, text in sources.items() if re.search(pattern, text))

    assert where(r"BitsAndBytesConfig\(") == ["adapters/quantization.py"]
    # generation/ sets a generation config on a model in memory for sampling; export writes one file
    assert where(r"GenerationConfig\(") == ["export/pipeline.py", "inference/generation.py"]
    assert where(r"preset_metadata\(") == ["export/pipeline.py"]  # defined and called there only
    # every export's shards: one writer (models/shards.py), used by the merge and the random-init base
    assert where(r"PlannedShardWriter\(") == ["export/stream_merge.py", "models/random_init.py"]
    assert where(r"save_file\(") == []
    assert where(r"def (merge_adapter|write_hf_checkpoint|write_preset_files|copy_generation_config)\b") == []


def test_the_in_memory_fallback_never_writes_4bit_weights(tmp_path):
    """A QLoRA model without adapter files to stream from is dequantized first, then merged and verified."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig, MistralForCausalLM

    from mistral_tune.adapters.quantization import keep_cpu_4bit_numerics
    from mistral_tune.export.pipeline import export_in_memory
    from mistral_tune.models.tokenizer import MistralTokenizer

    torch.manual_seed(0)
    small = MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    MistralForCausalLM(small).save_pretrained(tmp_path / "base")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, quantization_config=bnb)
    keep_cpu_4bit_numerics(quantized)
    model = get_peft_model(quantized, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    info = export_in_memory(model, MistralTokenizer.from_version("v1"), {"merged": tmp_path / "merged"})["merged"]
    assert info["reference"] == "dequantized 4-bit base + adapter" and info["max_abs_logit_diff"] < 1e-4
    assert info["dequantized_vs_4bit_max_abs_logit_diff"] is not None and info["fine_tune_max_abs_logit_shift"] > 0
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # not packed 4-bit
