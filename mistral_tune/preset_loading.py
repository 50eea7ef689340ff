"""``from_preset`` for the Python API: one handle -> (transformers model, tokenizer, metadata).

A handle is a built-in preset id (``mistral_7b_en``), ``hf://org/name``, ``kaggle://owner/model/
framework/variation``, or a local directory (Hugging Face layout, our preset layout = Hugging Face
layout + ``metadata.json``, or a keras-hub preset for its architecture and tokenizer). The work is
done by ``models.py`` (the same code the training recipes use); this module maps handles onto it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"


def resolve_handle(preset: str, *, load_weights: bool = True, revision: str | None = None):
    """A ``models.ModelSource`` whose files are local, except built-in presets' hub weights.

    Built-in 7B presets keep their hub repo (their tokenizer and architecture are offline data, and
    weights are only fetched when ``load_weights``); an ``hf://`` handle is fetched here, config and
    tokenizer only when ``load_weights=False``.
    """
    from . import models

    if not isinstance(preset, (str, Path)) or not str(preset):
        raise UserError(f"preset must be a preset id, hf://org/name, kaggle://... or a directory; got {preset!r}.")
    handle = str(preset)
    # A from_preset() argument is a handle the caller chose (keras-hub takes local directories), so
    # anything but a built-in id goes through resolve_source's explicit-path branch.
    source = models.resolve_source(handle) if handle in models.PRESETS else models.resolve_source(handle, handle)
    if source.hub_repo is not None and source.preset is None:
        # hf://org/name: fetch once, then everything is read from disk.
        directory = models.fetch_hub_repo(source.hub_repo, revision, config_only=not load_weights)
        source = models.ModelSource(None, directory, None)
    if source.local_dir is not None and source.preset is None:
        base = read_metadata(source.local_dir).get("base_preset")
        if base in models.PRESETS:  # our preset layout remembers the built-in it came from
            source = models.ModelSource(models.PRESETS[base], source.local_dir, None)
    return source


def read_metadata(directory: Path | None) -> dict[str, Any]:
    """The preset's ``metadata.json``, or {} for other layouts."""
    if directory is None or not (Path(directory) / METADATA_FILE).is_file():
        return {}
    try:
        return json.loads((Path(directory) / METADATA_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{Path(directory) / METADATA_FILE} is not valid JSON ({exc}).") from exc


def preset_label(preset: Any, source: Any) -> str:
    """What a saved preset records as its base: the built-in id, or the handle as given."""
    return source.preset.id if source.preset is not None else str(preset)


def load_preset_model(
    preset: str,
    load_weights: bool = True,
    *,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    revision: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
):
    """(transformers causal LM, MistralTokenizer, metadata dict, base preset label) for a handle."""
    from . import models
    from .config import ModelConfig

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16, float16.")
    source = resolve_handle(preset, load_weights=load_weights, revision=revision)
    model_cfg = ModelConfig(
        name=source.preset.id if source.preset else "custom",
        dtype=dtype,
        attn_implementation=attn_implementation,
        load_weights=load_weights,
        revision=revision,
        allow_pickle=allow_pickle,
    )
    model = models.load_model(model_cfg, source, seed=seed)
    tokenizer = models.load_tokenizer(source)
    if tokenizer.vocabulary_size > model.config.vocab_size:
        raise UserError(
            f"{source.label}: the tokenizer has {tokenizer.vocabulary_size} pieces but the model only "
            f"{model.config.vocab_size} embeddings; they do not belong together."
        )
    metadata = read_metadata(source.local_dir)
    return model, tokenizer, metadata, metadata.get("base_preset") or preset_label(preset, source)


def load_preset_tokenizer(preset: str, revision: str | None = None):
    """Only the tokenizer of a handle (built-in presets resolve offline from mistral-common's files)."""
    from . import models

    return models.load_tokenizer(resolve_handle(preset, load_weights=False, revision=revision))


def preset_table() -> dict[str, dict[str, Any]]:
    """keras-hub's ``presets`` shape: id -> {"metadata": {description, params, ...}, handle}."""
    from .presets import PRESETS, format_params

    return {
        p.id: {
            "metadata": {
                "description": p.description,
                "params": p.parameter_count,
                "params_human": format_params(p.parameter_count),
                "official_name": "Mistral",
                "path": "mistral",
            },
            "handle": f"hf://{p.hf_repo}" if p.hf_repo else "embedded",
        }
        for p in PRESETS.values()
    }
