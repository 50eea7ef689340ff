"""The dequantized copy of a QLoRA model: the reference a QLoRA export is verified against.

QLoRA is never merged into 4-bit rounding: the merge streams from the original 16/32-bit base,
round-tripped through NF4 as bitsandbytes loaded it (``stream_merge``), and the reference it is
verified against is the 4-bit base dequantized exactly as the forward pass dequantizes it, with the
trained adapter attached (``dequantized_copy``); Mixtral's 4-bit experts (``adapters.experts4bit``)
come back as transformers' 3D expert tensors. See docs/export.md.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)


def dequantized_copy(model: Any, dtype: Any):
    """A 16/32-bit copy of a 4-bit (PEFT) model, on CPU, with the same adapter attached.

    Each 4-bit weight is dequantized with bitsandbytes exactly as the forward pass does, so the copy
    computes what the trained model computed; merging into it never rounds to 4-bit again.
    """
    import torch
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from mistral_tune.adapters.experts4bit import is_experts4bit
    from mistral_tune.compat.bitsandbytes import dequantize, is_params4bit
    from mistral_tune.compat.transformers import drop_quantization

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    tensors = {}
    experts_4bit = [name for name, module in base.named_modules() if is_experts4bit(module)]
    for name in experts_4bit:  # Mixtral's 4-bit experts: back to transformers' 3D gate_up_proj/down_proj
        for leaf, value in base.get_submodule(name).dequantized().items():
            tensors[f"{name}.{leaf}"] = value.detach().to("cpu", dtype)
    for name, p in base.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue  # adapter weights come back through the PEFT state dict below
        if any(name.startswith(prefix + ".") for prefix in experts_4bit):
            continue
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
