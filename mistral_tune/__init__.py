"""mistral-tune: config-driven fine-tuning for Mistral models.

The Python API (keras-hub's names) loads lazily, so ``import mistral_tune`` stays cheap:

    from mistral_tune import MistralBackbone, MistralCausalLM, MistralTokenizer
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MistralBackbone": "backbone",
    "MistralCausalLM": "causal_lm",
    "MistralTokenizer": "tokenizer",
    "Sampler": "samplers",
    "GreedySampler": "samplers",
    "TopKSampler": "samplers",
    "TopPSampler": "samplers",
    "RandomSampler": "samplers",
    "BeamSampler": "samplers",
    "ContrastiveSampler": "samplers",
    "UserError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # import once
        return value
    raise AttributeError(f"module 'mistral_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
