"""Presets: Hugging Face layout plus ``metadata.json`` (version, parameter count, base preset and the
training provenance), loadable by ``MistralCausalLM.from_preset`` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from mistral_tune.core.errors import UserError
from mistral_tune.core.files import check_writable

log = logging.getLogger(__name__)


PRESET_METADATA = "metadata.json"


def preset_metadata(
    *, parameter_count: int, base_preset: Any, provenance: Any, chat_template: Optional[str], dtype: Optional[str]
) -> dict[str, Any]:
    """``metadata.json`` of a preset directory (keras-hub's fields plus our provenance)."""
    from mistral_tune import __version__

    return {
        "mistral_tune_version": __version__,
        "parameter_count": int(parameter_count),
        "date_saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": ["CausalLM"],
        "base_preset": base_preset,
        "chat_template": chat_template,
        "dtype": dtype,
        "provenance": provenance,
    }


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
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PRESET_METADATA).is_file()):
        # Only an earlier preset (or an empty directory) is replaced; anything else could be someone's data.
        raise UserError(f"{out_dir} exists and is not a mistral-tune preset directory; choose a new path.")
    check_writable(out_dir.parent)
    from mistral_tune.export.pipeline import export_in_memory

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


log = logging.getLogger("mistral_tune")


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
