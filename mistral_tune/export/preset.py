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
from mistral_tune.core.files import atomic_directory, check_writable, save_json
from mistral_tune.export.hf_files import merged_state_dict, write_hf_checkpoint

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


def write_preset_files(
    model: Any, tokenizer: Any, directory: Path, *, base_preset: Any, provenance: Any, max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """The files of a preset directory, written into ``directory`` as it is (not atomically).

    LoRA is folded in without touching ``model`` (see ``merged_state_dict``). Returns the metadata.
    """
    base, state = merged_state_dict(model)
    # Shared (tied) tensors count once. Counted now: save_pretrained consumes the dict it is given.
    parameter_count = sum({(v.data_ptr(), v.shape): v.numel() for v in state.values()}.values())
    dtype = next((str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()), None)
    write_hf_checkpoint(base, tokenizer, directory, max_shard_size, state_dict=state)
    metadata = preset_metadata(
        parameter_count=parameter_count,
        base_preset=base_preset,
        provenance=provenance,
        chat_template=tokenizer.chat_template,
        dtype=dtype,
    )
    save_json(Path(directory) / PRESET_METADATA, metadata)
    return metadata


def write_preset(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    base_preset: Any,
    provenance: Any = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a preset directory: Hugging Face layout (safetensors, config, tokenizer with chat
    template, generation config) plus ``metadata.json`` (mistral_tune version, parameter_count,
    date_saved, tasks, base preset, training provenance). LoRA is folded in (see ``merged_state_dict``).

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
    with atomic_directory(out_dir) as tmp:
        meta = write_preset_files(
            model, tokenizer, tmp, base_preset=base_preset, provenance=provenance, max_shard_size=max_shard_size
        )
    log.info("export: preset written to %s (%s parameters)", out_dir, f"{meta['parameter_count']:,}")
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
