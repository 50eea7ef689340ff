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


# LoRA on a parameter (``target_parameters``: Mixtral's 3D expert tensors ``experts.gate_up_proj``,
# ``experts.down_proj``) saves under the owning module's name; when two parameters of one module are
# targeted, PEFT nests one wrapper in the other and the inner one's tensors gain a ``.base_layer``.
# The factors are stacked per expert: lora_A is (experts x r, in), expert-major; lora_B is
# (out, r x experts), expert-minor; expert e's delta is B[:, e::E] @ A[e*r:(e+1)*r] for weights stored
# (experts, out, in), as Mixtral's are (PEFT's ParamWrapper.get_delta_weight).


def parameter_adapter_module(module_name: str) -> str:
    """The module owning a parameter-targeted LoRA, from its saved name (``...experts.base_layer``)."""
    return module_name.replace(BASE_LAYER, "")


def expert_delta(lora_a: Any, lora_b: Any, experts: int, expert: int) -> Any:
    """Expert ``expert``'s LoRA delta (out, in), unscaled, from a parameter-targeted LoRA's factors."""
    rank = lora_a.shape[0] // experts
    a = lora_a.reshape(experts, rank, lora_a.shape[-1])[expert]
    b = lora_b.reshape(lora_b.shape[0], rank, experts)[:, :, expert]
    return b @ a
