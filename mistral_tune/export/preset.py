"""Presets: Hugging Face layout plus ``metadata.json`` (version, parameter count, base preset and the
training provenance), loadable by ``MistralCausalLM.from_preset`` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mistral_tune.core.errors import UserError
from mistral_tune.core.files import check_writable

log = logging.getLogger(__name__)


def write_preset(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    base_preset: Any,
    provenance: Any = None,
    max_shard_size: str = "2GB",
    verify: bool = False,
) -> Path:
    """Write a preset directory: Hugging Face layout (safetensors, config, tokenizer with chat
    template, generation config) plus ``metadata.json`` (mistral_tune version, parameter_count,
    date_saved, tasks, base preset, training provenance). LoRA is folded in without touching ``model``
    (see ``merged_state_dict``). The files are those of every export (``export.pipeline``);
    ``verify=True`` also reloads the preset and compares its logits with ``model``'s.

    Written to a temporary sibling and renamed into place, so ``out_dir`` is complete or absent.
    Both ``MistralCausalLM.from_preset(out_dir)`` and ``AutoModelForCausalLM.from_pretrained(out_dir)``
    load it.

    Example:
        >>> write_preset(model, tokenizer, "presets/my_tune", base_preset="mistral_tiny",
        ...              provenance={"recipe": "sft_lora", "run_dir": "runs/x"})  # doctest: +SKIP
    """
    from mistral_tune.export.pipeline import PRESET_METADATA, export_in_memory

    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PRESET_METADATA).is_file()):
        # Only an earlier preset (or an empty directory) is replaced; anything else could be someone's data.
        raise UserError(f"{out_dir} exists and is not a mistral-tune preset directory; choose a new path.")
    check_writable(out_dir.parent)

    export_in_memory(
        model,
        tokenizer,
        {"preset": out_dir},
        verify=verify,
        max_shard_size=max_shard_size,
        base_preset=base_preset,
        provenance=provenance,
    )
    return out_dir


def provenance(cfg: Any) -> dict[str, Any]:
    """Where a preset came from: recipe, base, adapter, data and training settings of this run."""
    return {
        "recipe": cfg.recipe,
        "run_dir": cfg.output_dir,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
    }
