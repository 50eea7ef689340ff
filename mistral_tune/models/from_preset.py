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
    import mistral_tune.models.loading as models
    from mistral_tune.config.registry import DTYPE_CHOICES
    from mistral_tune.config.schema import ModelConfig
    from mistral_tune.models.tokenizer import load_tokenizer

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
    return model, tokenizer, metadata, metadata.get("base_preset") or preset_label(preset, source)


def preset_table() -> dict[str, dict[str, Any]]:
    """keras-hub's ``presets`` shape: id -> {"metadata": {description, params, ...}, handle}."""
    from mistral_tune.models.presets import PRESETS, format_params

    return {
        p.id: {
            "metadata": {
                "description": p.description,
                "params": p.parameter_count,
                "params_human": format_params(p.parameter_count),
                "official_name": {"mixtral": "Mixtral", "ministral": "Ministral"}.get(p.model_type, "Mistral"),
                "path": p.model_type,
                "architecture": p.architecture,
                "tokenizer": p.tokenizer_file,
                "chat_template": p.chat_template,
            },
            "handle": f"hf://{p.hf_repo}" if p.hf_repo else "embedded",
        }
        for p in PRESETS.values()
    }
