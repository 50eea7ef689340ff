"""Merged checkpoints and presets in Hugging Face layout, verified against the fine-tuned model.

Every export is written to a hidden sibling directory, reloaded with plain ``transformers`` and
compared logit for logit with the model it came from, and only then renamed into place: a failed
or interrupted export never leaves a directory that looks complete.

QLoRA is never merged into 4-bit rounding: the 4-bit base is first dequantized (exactly as the
forward pass dequantizes it) into a 16/32-bit copy, the adapter is attached to that copy, and the
merge and the verification both use it. See docs/export.md.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from mistral_tune.adapters.quantization import is_4bit_linear
from mistral_tune.core.files import atomic_directory
from mistral_tune.export.hf_files import base_dtype_name, resolve_export_dtype, write_hf_checkpoint
from mistral_tune.export.preset import write_preset_files
from mistral_tune.export.verify import fine_tune_shift, reference_logits, verify_export, warn_if_indistinguishable

log = logging.getLogger(__name__)


def dequantized_copy(model: Any, dtype: Any):
    """A 16/32-bit copy of a 4-bit (PEFT) model, on CPU, with the same adapter attached.

    Each 4-bit weight is dequantized with bitsandbytes exactly as the forward pass does, so the copy
    computes what the trained model computed; merging into it never rounds to 4-bit again.
    """
    import torch
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from mistral_tune.compat.bitsandbytes import dequantize, is_params4bit
    from mistral_tune.compat.transformers import drop_quantization

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    tensors = {}
    for name, p in base.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue  # adapter weights come back through the PEFT state dict below
        clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if is_params4bit(p):
            value = dequantize(p)
        else:
            value = p.data
        tensors[clean] = value.detach().to("cpu", dtype)
    buffers = {n.replace(".base_layer.", "."): b.detach().to("cpu") for n, b in base.named_buffers()}
    config = copy.deepcopy(base.config)
    drop_quantization(config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(tensors, strict=True, assign=True)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    fresh.eval()
    if not is_peft:
        return fresh
    peft_config = copy.deepcopy(model.peft_config["default"])
    peft_config.init_lora_weights = True  # values are overwritten with the trained ones just below
    attached = get_peft_model(fresh, peft_config)
    result = set_peft_model_state_dict(attached, get_peft_model_state_dict(model))
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights not placed in the dequantized copy: {result.unexpected_keys[:5]}")
    return attached


def merge_adapter(model: Any, dtype: Any):
    """Fold the adapter into the base weights and cast to ``dtype``; a full fine-tune is only cast.

    A 16-bit base exported as float32 is upcast first, so the merge itself happens in float32.
    """
    import torch
    from peft import PeftModel

    if dtype == torch.float32:
        model = model.to(dtype)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.to(dtype)


def export_model(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    dtype_name: str = "auto",
    merged_dir: Optional[Path] = None,
    preset_dir: Optional[Path] = None,
    max_shard_size: str = "2GB",
    verify: bool = True,
    tolerance: Optional[float] = None,
    base_preset: Optional[str] = None,
    provenance: Optional[dict] = None,
) -> dict[str, Any]:
    """Merge the trained ``model`` once and write ``merged_dir`` and/or ``preset_dir``, each verified.

    Returns ``{"merged": {...}, "preset": {...}}`` for the formats written, each with the path, dtype,
    the measured max |logit diff| and what it was measured against (this goes into summary.json).
    ``model`` is merged in place: call this after everything that needs the adapter.
    """
    import torch

    dtype_name = resolve_export_dtype(dtype_name, model)
    dtype = getattr(torch, dtype_name)
    common: dict[str, Any] = {"dtype": dtype_name, "verified": verify}
    expected = None
    if any(is_4bit_linear(m) for m in model.modules()):
        base_dtype = getattr(torch, base_dtype_name(model))
        plain = dequantized_copy(model, torch.float32 if dtype == torch.float32 else base_dtype)
        common["reference"] = "dequantized 4-bit base + adapter"
        if verify:
            expected = reference_logits(plain, tokenizer, prompts)
            common["fine_tune_max_abs_logit_shift"] = fine_tune_shift(plain, tokenizer, prompts, expected)
            quantized = reference_logits(model, tokenizer, prompts)
            # How far the dequantized reference is from the 4-bit model as trained (informational).
            common["dequantized_vs_4bit_max_abs_logit_diff"] = float((quantized - expected).abs().max())
        model = plain
    else:
        common["reference"] = "in-memory fine-tuned model"
        if verify:
            expected = reference_logits(model, tokenizer, prompts)
            common["fine_tune_max_abs_logit_shift"] = fine_tune_shift(model, tokenizer, prompts, expected)
    merged = merge_adapter(model, dtype)
    info: dict[str, Any] = {}
    for kind, out_dir in (("merged", merged_dir), ("preset", preset_dir)):
        if out_dir is None:
            continue
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            if kind == "preset":
                write_preset_files(
                    merged,
                    tokenizer,
                    tmp,
                    base_preset=base_preset,
                    provenance=provenance or {},
                    max_shard_size=max_shard_size,
                )
            else:
                write_hf_checkpoint(merged, tokenizer, tmp, max_shard_size)
            diff, tol = (
                verify_export(tmp, tokenizer, prompts, expected, dtype_name, tolerance) if verify else (None, None)
            )
        info[kind] = {"path": str(out_dir), "max_abs_logit_diff": diff, "tolerance": tol, **common}
        warn_if_indistinguishable(common.get("fine_tune_max_abs_logit_shift"), tol, dtype_name)
        log.info("export: %s model written to %s (%s, max |logit diff| %s)", kind, out_dir, dtype_name, diff)
    return info


def export_merged(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    dtype_name: str,
    prompts: Sequence[str],
    max_shard_size: str = "2GB",
    verify: bool = True,
) -> dict[str, Any]:
    """Merge and write one verified ``merged/`` directory (``export_model`` with the merged format only)."""
    return export_model(
        model,
        tokenizer,
        prompts=prompts,
        dtype_name=dtype_name,
        merged_dir=out_dir,
        max_shard_size=max_shard_size,
        verify=verify,
    )["merged"]
