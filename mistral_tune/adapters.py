"""Apply the configured adapter (LoRA, QLoRA, DoRA, or none for full fine-tuning) through PEFT."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)


def quantization_config(adapter_cfg: Any, compute_dtype: Any):
    """bitsandbytes 4-bit NF4 config for QLoRA, or None for the other adapters."""
    if adapter_cfg.name != "qlora" and not adapter_cfg.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "adapter=qlora needs bitsandbytes for 4-bit quantization. Install it with "
            "`pip install 'mistral-tune[qlora]'` (or `pip install bitsandbytes`), or use adapter=lora."
        ) from exc
    import torch
    from transformers import BitsAndBytesConfig

    if adapter_cfg.bnb_4bit_compute_dtype != "auto":
        compute_dtype = getattr(torch, adapter_cfg.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def lora_config(adapter_cfg: Any):
    from peft import LoraConfig

    targets = list(adapter_cfg.target_modules)
    init: Any = adapter_cfg.init
    if init in ("default", "true", "True"):
        init = True
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(adapter_cfg.modules_to_save) or None,
        use_rslora=adapter_cfg.use_rslora,
        use_dora=adapter_cfg.name == "dora",
        init_lora_weights=init,
        task_type="CAUSAL_LM",
    )


def apply_adapter(model: Any, adapter_cfg: Any, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` for training; returns the model to train (a PeftModel unless adapter=none)."""
    if adapter_cfg.name == "none":
        model.requires_grad_(True)
        return model
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # Casts norms to fp32 and enables input grads, so gradients flow through frozen 4-bit layers.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapter_cfg.resume_from:
        path = Path(adapter_cfg.resume_from)
        if not (path / "adapter_config.json").exists():
            raise UserError(f"adapter.resume_from={path}: no adapter_config.json there.")
        log.info("continuing training of the adapter in %s", path)
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    return get_peft_model(model, lora_config(adapter_cfg))


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked element number."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
