"""mistral-tune: config-driven fine-tuning for Mistral models.

The Python API (keras-hub's names) loads lazily, so ``import mistral_tune`` stays cheap:

"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MistralBackbone": "api.backbone",
    "MistralCausalLM": "api.causal_lm",
    "MistralTokenizer": "models.tokenizer",
    "Sampler": "inference.samplers",
    "GreedySampler": "inference.samplers",
    "TopKSampler": "inference.samplers",
    "TopPSampler": "inference.samplers",
    "RandomSampler": "inference.samplers",
    "BeamSampler": "inference.samplers",
    "ContrastiveSampler": "inference.samplers",
    "SpeculativeSampler": "inference.samplers",
    "MistralCausalLMPreprocessor": "api.preprocessor",
    "UserError": "core.errors",
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
