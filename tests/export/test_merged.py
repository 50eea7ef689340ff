import json

import pytest
import torch

import mistral_tune.export.merged as export
from mistral_tune.export.verify import ExportMismatch
from tests.helpers import small_base

pytestmark = pytest.mark.usefixtures("single_thread")


PROMPTS = ("The capital of France is", "Sliding windows keep attention local. " * 3)


@pytest.fixture(scope="module")
def tokenizer(plain_tokenizer):
    return plain_tokenizer


def trained_adapter(out_dir, seed=1, **lora_kwargs):
    """A LoRA/DoRA adapter with random (non-zero) weights, saved to ``out_dir``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_base(), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out_dir)
    return model.eval()


ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_rslora_patterns_modules_to_save": dict(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules="all-linear",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 4},
        modules_to_save=["lm_head"],
    ),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True),
}


def test_failed_verification_keeps_nothing_and_spares_the_previous_export(tmp_path, tokenizer):
    model = trained_adapter(tmp_path / "adapter", **ADAPTERS["lora"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "marker").write_text("previous export")
    with pytest.raises(ExportMismatch, match="does not reproduce"):
        # bf16 rounding makes the difference > 0, so a 1e-9 tolerance must fail after writing everything
        export.export_model(model, tokenizer, prompts=PROMPTS, dtype_name="bfloat16", merged_dir=out, tolerance=1e-9)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["marker"]


def test_in_memory_export_records_diff_and_writes_both_formats(tmp_path, tokenizer):
    model = trained_adapter(tmp_path / "adapter", **ADAPTERS["dora"])
    info = export.export_model(
        model,
        tokenizer,
        prompts=PROMPTS,
        merged_dir=tmp_path / "merged",
        preset_dir=tmp_path / "preset",
        max_shard_size="5MB",
        base_preset="small",
        provenance={"test": True},
    )
    for kind in ("merged", "preset"):
        assert info[kind]["dtype"] == "float32" and 0 <= info[kind]["max_abs_logit_diff"] < 1e-4
        assert (tmp_path / kind / "model.safetensors.index.json").exists()
    meta = json.loads((tmp_path / "preset" / "metadata.json").read_text())
    assert meta["provenance"] == {"test": True} and meta["parameter_count"] == sum(
        p.numel() for p in small_base().parameters()
    )
