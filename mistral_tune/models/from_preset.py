"""``from_preset`` for the Python API: one handle -> (transformers model, tokenizer, metadata).

A handle is a built-in preset id (``mistral_7b_en``), ``hf://org/name``, ``kaggle://owner/model/
framework/variation``, or a local directory (Hugging Face layout, our preset layout = Hugging Face
layout + ``metadata.json``, or a keras-hub preset for its architecture and tokenizer). The work is
done by ``models.py`` (the same code the training recipes use); this module maps handles onto it.
"""

from __future__ import annotations

from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.models.sources import read_metadata, resolve_handle


def preset_label(preset: Any, source: Any) -> str:
    """What a saved preset records as its base: the built-in id, or the handle as given."""
    return source.preset.id if source.preset is not None else str(preset)


def dtype_name(dtype: Any) -> Any:
    """``torch.bfloat16`` -> "bfloat16" (keras-hub takes dtype objects too); names pass through."""
    text = str(dtype)
    return text.removeprefix("torch.") if text.startswith("torch.") else dtype


def load_preset_model(
    preset: str,
    load_weights: bool = True,
    *,
    dtype: Any = "auto",
    attn_implementation: str = "auto",
    revision: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
):
    """(transformers causal LM, MistralTokenizer, metadata dict, base preset label) for a handle."""
    import mistral_tune.models.loading as models
    from mistral_tune.config.registry import DTYPE_CHOICES
    from mistral_tune.config.schema import ModelConfig
    from mistral_tune.models.tokenizer import load_tokenizer

    dtype = dtype_name(dtype)
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"dtype={dtype!r} is not one of {', '.join(DTYPE_CHOICES)}.")
    source = resolve_handle(preset, load_weights=load_weights, revision=revision)
    model_cfg = ModelConfig(
        name=source.preset.id if source.preset else "custom",
        dtype=dtype,
        attn_implementation=attn_implementation,
        load_weights=load_weights,
        revision=revision,
        allow_pickle=allow_pickle,
    )
    if source.preset is not None and source.preset.tokenizer == "hub":
        from mistral_tune.models.sources import download_source

        source = download_source(source, model_cfg)  # its tokenizer file is in the repo, with the weights
    model = models.load_model(model_cfg, source, seed=seed)
    tokenizer = load_tokenizer(source)
    if tokenizer.vocabulary_size > model.config.vocab_size:
        raise UserError(
            f"{source.label}: the tokenizer has {tokenizer.vocabulary_size} pieces but the model only "
            f"{model.config.vocab_size} embeddings; they do not belong together."
        )
    metadata = read_metadata(source.local_dir)
    sequence_length = keras_sequence_length(source.local_dir)
    if sequence_length is not None:
        metadata = {**metadata, "sequence_length": sequence_length}
    return model, tokenizer, metadata, metadata.get("base_preset") or preset_label(preset, source)


def keras_sequence_length(directory: Any) -> int | None:
    """The ``sequence_length`` of a keras-hub preset's ``preprocessor.json``, if it has one."""
    import json

    path = directory / "preprocessor.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["config"]["sequence_length"]
    except (ValueError, KeyError, TypeError):
        return None
    return int(value) if isinstance(value, int) else None
