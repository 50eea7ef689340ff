"""Resolve a preset, load the tokenizer and build the model with the chosen attention backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.core.process import return_freed_heap
from mistral_tune.models.attention import pick_attn_implementation
from mistral_tune.models.presets import Preset, config_from_keras
from mistral_tune.models.sources import ModelSource, check_weight_files, download_source, fetch_hub_repo


def check_max_length(max_length: int, max_position_embeddings: Optional[int]) -> None:
    """Refuse a ``trainer.max_length`` longer than the positions the model was built for."""
    if max_position_embeddings and max_length > max_position_embeddings:
        raise UserError(
            f"trainer.max_length={max_length} is beyond the model's max_position_embeddings="
            f"{max_position_embeddings}: positions past it were never trained. Set trainer.max_length "
            f"to {max_position_embeddings} or less."
        )


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def preset_config(preset: Preset, **overrides: Any):
    """The transformers config of a built-in preset: MistralConfig, MinistralConfig or MixtralConfig."""
    from transformers import AutoConfig

    return AutoConfig.for_model(preset.model_type, **{**preset.config, **overrides})


def moe_overrides(model_cfg: Any, config: Any) -> dict[str, Any]:
    """Router settings for a mixture-of-experts model (nothing for a dense one).

    ``model.output_router_logits`` makes the forward pass return the router logits, from which
    transformers adds ``router_aux_loss_coef`` x the load-balancing loss to the training loss;
    ``model.router_aux_loss_coef`` null keeps the checkpoint's own coefficient.
    """
    if not getattr(config, "num_local_experts", None):
        return {}
    out = {"output_router_logits": bool(getattr(model_cfg, "output_router_logits", True))}
    coef = getattr(model_cfg, "router_aux_loss_coef", None)
    if coef is not None:
        out["router_aux_loss_coef"] = float(coef)
    return out


def keras_layout(directory: Path) -> Optional[dict[str, Any]]:
    """The backbone arguments of a keras-hub preset directory (Kaggle's Keras variations), else None."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if "class_name" not in data or not isinstance(data.get("config"), dict):
        return None
    if data["class_name"] != "MistralBackbone":
        raise UserError(f"{directory} holds a keras-hub {data['class_name']}, not a MistralBackbone.")
    return data["config"]


def check_custom_code(directory: Optional[Path], trust_remote_code: bool) -> None:
    """A local model whose config.json needs the repository's own code (``auto_map`` with a ``model_type``
    transformers does not know) cannot load without ``model.trust_remote_code``: one clear error up front."""
    if directory is None or trust_remote_code:
        return
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no or unreadable config.json: load_config says so
    if not isinstance(data, dict) or "auto_map" not in data:
        return
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type in CONFIG_MAPPING:
        return  # a known architecture: transformers' own classes load it, the shipped code stays unused
    raise UserError(
        f"model.path={directory}: its config.json has model_type={model_type!r}, which transformers does not know, "
        "and an auto_map pointing at code shipped with the model. mistral-tune never runs such code unless "
        "model.trust_remote_code=true; no code was run. Use a model of a known architecture (e.g. model_type "
        "'mistral'), or set model.trust_remote_code=true if you trust the repository's code."
    )


def load_config(source: ModelSource, revision: Optional[str] = None, **overrides: Any):
    """The architecture alone: built-in presets and local directories never touch the network."""
    from transformers import AutoConfig, MistralConfig

    if source.local_dir is not None:
        keras_args = keras_layout(source.local_dir)
        if keras_args is not None:
            return MistralConfig(**{**config_from_keras(keras_args), **overrides})
        if not (source.local_dir / "config.json").is_file():
            raise UserError(f"{source.local_dir} has no config.json; it is not a model directory.")
        return AutoConfig.from_pretrained(source.local_dir, **overrides)
    if source.hub_repo is not None and (source.preset is None or source.hub_repo != source.preset.hf_repo):
        return AutoConfig.from_pretrained(fetch_hub_repo(source.hub_repo, revision, config_only=True), **overrides)
    return preset_config(source.preset, **overrides)


def load_model(
    model_cfg: Any, source: ModelSource, *, seed: int = 0, quantization_config: Any = None, task: str = "CAUSAL_LM"
):
    """Build the causal LM: random init from the architecture, a local directory, or a hub download.

    The memory the load freed (bf16 tensors read, then cast or quantized) goes back to the system before
    training allocates anything, so the run's resident memory is the model's, not the load's high mark.
    """
    model = _build_model(model_cfg, source, seed=seed, quantization_config=quantization_config, task=task)
    return_freed_heap()
    return model


def _build_model(model_cfg: Any, source: ModelSource, *, seed: int, quantization_config: Any, task: str):
    """``load_model`` without the heap trim.

    Random init happens for the embedded presets and whenever ``model_cfg.load_weights`` is false
    (only the config is read, no weights are downloaded). Inside ``with torch.device("meta"):`` that
    builds a 7B architecture without allocating it. ``task="SEQ_CLS"`` builds a reward model instead:
    the same backbone with a one-output ``score`` head (``MistralForSequenceClassification``,
    ``num_labels=1``), new when the checkpoint is a causal LM (e.g. an SFT export).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    head = {"num_labels": 1} if task == "SEQ_CLS" else {}

    attn = pick_attn_implementation(model_cfg.attn_implementation)
    dtype = resolve_dtype(model_cfg.dtype)
    weightless = source.local_dir is None and source.hub_repo is None  # embedded preset
    directory = None
    if not weightless and model_cfg.load_weights:
        directory = source.local_dir or download_source(source, model_cfg).local_dir
    keras = directory is not None and keras_layout(directory) is not None
    if weightless or not model_cfg.load_weights or keras:
        torch.manual_seed(seed)  # a random-init model is the same model for the same seed
        config = load_config(
            ModelSource(source.preset, directory, None) if keras else source, model_cfg.revision, **head
        )
        for key, value in moe_overrides(model_cfg, config).items():
            setattr(config, key, value)
        if quantization_config is not None and not keras:
            # bitsandbytes quantizes while loading, so the base goes through a save; written tensor by
            # tensor (the same weights as from_config), a 7B base never sits in memory unquantized.
            quantized = load_random_quantized(config, auto_class, seed, dtype, attn, quantization_config, model_cfg)
            if quantized is not None:
                return quantized
            torch.manual_seed(seed)
        model = auto_class.from_config(config, attn_implementation=attn).to(dtype)
        if keras:
            from mistral_tune.models.keras_weights import load_keras_weights

            if task == "SEQ_CLS":
                raise UserError(f"{directory} is a keras-hub causal LM preset; a reward model needs a HF checkpoint.")
            load_keras_weights(model, directory)  # keras-hub's model.weights.h5, converted in memory
        if quantization_config is None:
            return model
        # bitsandbytes quantizes while loading, so the base goes through a temporary save.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mistral-tune-base-") as tmp:
            model.save_pretrained(tmp)
            return auto_class.from_pretrained(
                tmp,
                dtype=dtype,
                attn_implementation=attn,
                quantization_config=quantization_config,
                **moe_overrides(model_cfg, config),
            )
    check_weight_files(directory, model_cfg.allow_pickle)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=model_cfg.trust_remote_code)
    return auto_class.from_pretrained(
        directory,
        **head,
        **moe_overrides(model_cfg, config),
        dtype=dtype,
        attn_implementation=attn,
        quantization_config=quantization_config,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=not model_cfg.allow_pickle,
    )


def load_random_quantized(
    config: Any, auto_class: Any, seed: int, dtype: Any, attn: str, quantization_config: Any, model_cfg: Any
):
    """A random-init base loaded in 4-bit, through a checkpoint written tensor by tensor
    (``random_init.save_random_checkpoint``); None when the architecture's init is not replayed there."""
    import tempfile

    from mistral_tune.models.random_init import build_meta, replayable, save_random_checkpoint

    if not replayable(build_meta(config, auto_class, attn)):
        return None
    with tempfile.TemporaryDirectory(prefix="mistral-tune-base-") as tmp:
        save_random_checkpoint(config, Path(tmp), seed=seed, dtype=dtype, auto_class=auto_class)
        return auto_class.from_pretrained(
            tmp,
            dtype=dtype,
            attn_implementation=attn,
            quantization_config=quantization_config,
            **moe_overrides(model_cfg, config),
        )
