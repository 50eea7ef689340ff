"""bitsandbytes: telling its 4-bit layers and weights apart, and dequantizing them.

Public API now does this: ``isinstance`` against ``bitsandbytes.nn.Linear4bit``/``Params4bit`` (was a class-name
string check). bitsandbytes is only consulted when something already imported it (a 4-bit object cannot
exist otherwise), so nothing here imports it for a 16/32-bit model.
"""

from __future__ import annotations

import sys
from typing import Any


def _bnb_nn() -> Any:
    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb, "nn", None) if bnb is not None else None


def is_linear4bit(module: Any) -> bool:
    """bitsandbytes' ``Linear4bit`` itself (not PEFT's LoRA wrapper of the same class name)."""
    nn = _bnb_nn()
    return nn is not None and isinstance(module, nn.Linear4bit)


def is_params4bit(param: Any) -> bool:
    """A weight stored packed in 4-bit (``bitsandbytes.nn.Params4bit``)."""
    nn = _bnb_nn()
    return nn is not None and isinstance(param, nn.Params4bit)


def dequantize(param: Any) -> Any:
    """A 4-bit weight as the forward pass computes with it."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(param.data, param.quant_state)


def matmul_4bit(x: Any, param: Any) -> Any:
    """``x @ W.T`` for a 4-bit weight ``W`` [out, in], as ``Linear4bit`` computes it (``x`` in the compute dtype)."""
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, param.t(), quant_state=param.quant_state)


# Params4bit's attributes that say how it was (or will be) quantized: its constructor's keywords.
PARAMS4BIT_SETTINGS = ("quant_type", "blocksize", "compress_statistics", "quant_storage")


def linear4bit_settings(model: Any) -> tuple[Any, Any]:
    """(Params4bit keyword arguments, compute dtype) of the model's first ``Linear4bit``: the NF4 settings
    bitsandbytes used when loading it, so other weights can be quantized alike. (None, None) without one."""
    for module in model.modules():
        if is_linear4bit(module):
            w = module.weight
            settings = {name: getattr(w, name) for name in PARAMS4BIT_SETTINGS}
            return settings, module.compute_dtype or w.quant_state.dtype
    return None, None
