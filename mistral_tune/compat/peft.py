"""PEFT internals: its pattern matching for rank/alpha patterns and its saved state-dict key layout."""

from __future__ import annotations

from typing import Any, Iterable

# A saved adapter's tensor names: ``base_model.model.<module>.lora_A.weight`` (and ``.lora_B.weight``,
# ``.lora_magnitude_vector`` for DoRA); ``<module>`` is the module's name in the plain base model.
ADAPTER_KEY_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
DORA_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"

# Inside a live PeftModel a wrapped layer keeps the original under ``.base_layer``.
BASE_LAYER = ".base_layer"


def pattern_key(pattern_keys: Iterable[str], module_name: str) -> str:
    """The key of ``rank_pattern``/``alpha_pattern`` PEFT applies to ``module_name`` (``module_name`` if none)."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(pattern_keys), module_name)


def base_module_name(peft_module_name: str) -> str:
    """A module's name in the plain base model, from its name inside a PeftModel."""
    return peft_module_name.removeprefix(ADAPTER_KEY_PREFIX).replace(BASE_LAYER, "")


def adapter_key_to_base(key: str) -> str:
    """A saved adapter tensor's name without PEFT's ``base_model.model.`` prefix."""
    return key.removeprefix(ADAPTER_KEY_PREFIX)


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """``rank_pattern``/``alpha_pattern`` lookup as PEFT does it."""
    return patterns.get(pattern_key(patterns.keys(), module_name), default)
