"""Pieces of a Hugging Face layout directory: the tokenizer files (with the chat template), the
export dtype, and LoRA folded into a state dict without touching the model (the in-memory source
``export.pipeline.export_in_memory`` writes).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mistral_tune.adapters.quantization import is_4bit_linear
from mistral_tune.config.registry import DTYPES
from mistral_tune.export.verify import ExportMismatch


def write_tokenizer_files(tokenizer: Any, out_dir: Path) -> None:
    """Tokenizer files; the chat template also goes into tokenizer_config.json.

    transformers >= 4.50 reads ``chat_template.jinja``, but older readers (and tools that parse
    tokenizer_config.json themselves) only look in tokenizer_config.json, so we write both.
    """
    tokenizer.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    template = getattr(tokenizer, "jinja_chat_template", None)
    if template and config_path.exists():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        data.setdefault("chat_template", template)
        config_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def base_dtype_name(model: Any) -> str:
    """The dtype of the base weights (for a 4-bit base: the dtype it was quantized from)."""
    for module in model.modules():
        if is_4bit_linear(module):
            return str(module.weight.quant_state.dtype).removeprefix("torch.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = str(base.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def merged_state_dict(model: Any):
    """(plain transformers model, its state dict with any LoRA folded in), leaving ``model`` unchanged.

    Plain LoRA layers are folded as W + delta, computed out of place, so a model still being trained
    keeps its adapter. Other PEFT wrappers (DoRA, modules_to_save) are merged on a copy.
    """
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    state = base.state_dict()
    if not layers:
        return base, state
    plain = all(type(m) is LoraLinear and not any(m.use_dora.values()) for m in layers.values())
    if not plain or any("modules_to_save" in k or "original_module" in k for k in state):
        unloaded = copy.deepcopy(model)
        if not isinstance(unloaded, PeftModel):
            raise ExportMismatch("LoRA layers injected outside PEFT's PeftModel cannot be merged here.")
        unloaded = unloaded.merge_and_unload()
        return unloaded, unloaded.state_dict()
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        if not layer.merged:  # a merged layer already holds W + delta in its base weight
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        merged[f"{name}.weight"] = weight.detach()
    return base, merged


def resolve_export_dtype(dtype_name: str, model: Any) -> str:
    return base_dtype_name(model) if dtype_name == "auto" else dtype_name
