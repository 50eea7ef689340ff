"""Exports of a model in memory (``export_model``), and the dequantized copy of a QLoRA model that
serves as its reference; the writing itself is ``export.pipeline``'s, shared by every export.

QLoRA is never merged into 4-bit rounding: the merge streams from the original 16/32-bit base,
round-tripped through NF4 as bitsandbytes loaded it (``stream_merge``), and the reference it is
verified against is the 4-bit base dequantized exactly as the forward pass dequantizes it, with the
trained adapter attached (``dequantized_copy``). See docs/export.md.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


def dequantized_copy(model: Any, dtype: Any):
    """A 16/32-bit copy of a 4-bit (PEFT) model, on CPU, with the same adapter attached.

    Each 4-bit weight is dequantized with bitsandbytes exactly as the forward pass does, so the copy
    computes what the trained model computed; merging into it never rounds to 4-bit again.
    """
    import torch
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    tensors = {}
    for name, p in base.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue  # adapter weights come back through the PEFT state dict below
        clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if p.__class__.__name__ == "Params4bit":
            import bitsandbytes as bnb

            value = bnb.functional.dequantize_4bit(p.data, p.quant_state)
        else:
            value = p.data
        tensors[clean] = value.detach().to("cpu", dtype)
    buffers = {n.replace(".base_layer.", "."): b.detach().to("cpu") for n, b in base.named_buffers()}
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
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
    """Write ``merged_dir`` and/or ``preset_dir`` from a model in memory, merged and verified once
    (``export.pipeline.export_in_memory``). ``model`` is left as it is.

    Returns ``{"merged": {...}, "preset": {...}}`` for the formats written, each with the path, dtype,
    the measured max |logit diff| and what it was measured against (this goes into summary.json).
    """
    from mistral_tune.export.pipeline import export_in_memory

    outs = {k: Path(v) for k, v in (("merged", merged_dir), ("preset", preset_dir)) if v is not None}
    if not outs:
        return {}
    return export_in_memory(
        model,
        tokenizer,
        outs,
        verify=verify,
        prompts=prompts,
        dtype_name=dtype_name,
        max_shard_size=max_shard_size,
        tolerance=tolerance,
        base_preset=base_preset,
        provenance=provenance or {},
    )


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
