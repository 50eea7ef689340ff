"""Resolve a preset, load the tokenizer and build the model with the chosen attention backend."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .presets import PRESETS, Preset, config_from_keras, is_hub_id

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


@dataclass
class ModelSource:
    """Where weights and tokenizer come from, after resolving a preset id, a path or a hub id."""

    preset: Optional[Preset]  # the built-in preset, when one was named
    local_dir: Optional[Path]  # a local directory in Hugging Face layout
    hub_repo: Optional[str]  # a hub repo id to download from

    @property
    def label(self) -> str:
        return str(self.local_dir or self.hub_repo or (self.preset.id if self.preset else "?"))


def resolve_source(name: str, path: Optional[str] = None) -> ModelSource:
    """Map ``model.name``/``model.path`` to a source. Built-in ids never touch the filesystem."""
    preset = PRESETS.get(name)
    if preset is None and path is None:
        # A name is an id, never a filesystem path: model.name=../../etc must not open /etc.
        return ModelSource(None, None, check_model_name(name))
    target = path  # an explicit path (local directory, hub id or hf://id) overrides the preset's source
    if target is None:
        return ModelSource(preset, None, preset.hf_repo)
    if target.startswith("kaggle://"):
        return ModelSource(preset, fetch_kaggle_model(target[len("kaggle://") :]), None)
    if target.startswith("hf://"):
        target = target[len("hf://") :]
        if not is_hub_id(target):
            raise UserError(f"'{target}' is not a valid Hugging Face repo id (expected org/name).")
        return ModelSource(preset, None, target)
    local = Path(target).expanduser()
    if local.is_dir():
        return ModelSource(preset, local.resolve(), None)
    if is_hub_id(target) and not local.exists():
        return ModelSource(preset, None, target)
    known = ", ".join(PRESETS)
    raise UserError(
        f"Model '{target}' is neither a built-in preset ({known}), an existing local directory, "
        "nor a Hugging Face repo id (org/name)."
    )


def check_model_name(name: str) -> str:
    """The hub repo id in a non-preset ``model.name`` (``org/name`` or ``hf://org/name``), else UserError."""
    repo = name[len("hf://") :] if name.startswith("hf://") else name
    if not is_hub_id(repo):
        known = ", ".join(PRESETS)
        raise UserError(
            f"model.name='{name}' is neither a built-in preset ({known}) nor a Hugging Face repo id (org/name). "
            "Names are never read as filesystem paths; to load a local directory pass model.path=DIR."
        )
    return repo


def offline_hint(repo: str) -> str:
    return (
        f"Could not reach the Hugging Face hub to fetch '{repo}'. This machine looks offline. "
        f"Download the repo elsewhere (e.g. `huggingface-cli download {repo} --local-dir ./{repo.split('/')[-1]}`), "
        "copy it here, and pass model.path=/path/to/that/directory."
    )


def fetch_hub_repo(repo: str, revision: Optional[str] = None, config_only: bool = False) -> Path:
    """Download safetensors weights, config and tokenizer files of a hub repo; fail fast offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model*"] + ([] if config_only else ["*.safetensors"])
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        name = type(exc).__name__
        if "Connect" in name or "Offline" in name or "Timeout" in name or "LocalEntryNotFound" in name:
            raise UserError(offline_hint(repo)) from exc
        raise


def download_source(source: ModelSource, model_cfg: Any) -> ModelSource:
    """Fetch a hub source to the local cache (cheap imports only, so offline fails within a second).

    Built-in presets with ``load_weights=false`` need nothing from the hub: their architecture is data.
    """
    if source.hub_repo is None or (source.preset is not None and not model_cfg.load_weights and not model_cfg.path):
        return source
    return ModelSource(source.preset, fetch_hub_repo(source.hub_repo, model_cfg.revision), None)


def fetch_kaggle_model(handle: str) -> Path:
    """Download a Kaggle Models handle (``owner/model/framework/variation[/version]``) via kagglehub."""
    if handle.count("/") not in (3, 4) or ".." in handle:
        raise UserError(
            f"'kaggle://{handle}' is not a Kaggle model handle; expected kaggle://OWNER/MODEL/FRAMEWORK/VARIATION "
            "(e.g. kaggle://mistral-ai/mistral/pytorch/7b-v0.1-hf)."
        )
    try:
        import kagglehub
    except ImportError as exc:
        raise UserError(
            f"kaggle://{handle} needs the kagglehub package. Install it with `pip install 'mistral-tune[kaggle]'` "
            "(or `pip install kagglehub`), or download the model yourself and pass its local directory."
        ) from exc
    try:
        return Path(kagglehub.model_download(handle))
    except Exception as exc:  # kagglehub raises requests/http errors of many types
        raise UserError(
            f"Could not download kaggle://{handle} ({type(exc).__name__}: {exc}). Check the handle and your "
            "Kaggle credentials and network, or download it elsewhere and pass the local directory."
        ) from exc


def check_weight_files(directory: Path, allow_pickle: bool) -> None:
    """Refuse pickle weights (arbitrary code on load) unless the user allowed them explicitly."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise UserError(
            f"{directory} has only pickle weight files ({', '.join(pickles[:3])}). Loading pickle can run "
            "arbitrary code, so mistral-tune loads safetensors only. Convert them to safetensors, or set "
            "model.allow_pickle=true if you trust the source."
        )
    if not pickles:
        raise UserError(f"{directory} holds no weight files (*.safetensors).")


ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")


def pick_attn_implementation(requested: str) -> str:
    """Resolve ``auto`` and check that an explicit choice can run here; logs the choice.

    Every backend applies Mistral's sliding window (tests/test_attention.py checks eager, sdpa and
    flex_attention against a hand-written windowed attention).
    """
    import torch

    if requested not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"model.attn_implementation={requested!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}.")
    has_cuda = torch.cuda.is_available()
    flash_ok = False
    if has_cuda:
        try:
            import flash_attn
            from packaging.version import Version

            flash_ok = Version(flash_attn.__version__) >= Version("2.3")  # 2.3 added sliding windows
        except ImportError:
            pass
    if requested == "auto":
        choice = "flash_attention_2" if flash_ok else "sdpa"
        log.info("attention backend: %s (auto; flash-attn %s)", choice, "found" if flash_ok else "not usable")
        return choice
    if requested == "flash_attention_2" and not flash_ok:
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and flash-attn >= 2.3 "
            f"(CUDA available: {has_cuda}). Install it with `pip install .[flash]` on a GPU machine, "
            "or use model.attn_implementation=sdpa (also sliding-window correct)."
        )
    if requested == "flex_attention":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"model.attn_implementation=flex_attention needs torch >= 2.5 (installed: {torch.__version__}). "
                "Use sdpa instead."
            ) from exc
        if not has_cuda:
            # Inductor lowers flex_attention on CPU for inference only, compiling once per shape; backward
            # and some decoding shapes do not compile there (see docs/models.md).
            log.warning(
                "attention backend: flex_attention on CPU compiles per shape and supports inference only; "
                "sdpa is the better CPU choice"
            )
    log.info("attention backend: %s (requested)", requested)
    return requested


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


def mistral_config(preset: Preset, **overrides: Any):
    from transformers import MistralConfig

    return MistralConfig(**{**preset.config, **overrides})


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
    return mistral_config(source.preset, **overrides)


def load_tokenizer(source: ModelSource):
    """The exact sentencepiece tokenizer: a saved one, or the preset's file from mistral-common."""
    from .tokenizer import MistralTokenizer

    if source.local_dir is not None and (source.local_dir / "tokenizer.model").exists():
        return MistralTokenizer.from_pretrained(source.local_dir)
    keras_spm = source.local_dir / "assets" / "tokenizer" / "vocabulary.spm" if source.local_dir else None
    if keras_spm is not None and keras_spm.is_file():
        return MistralTokenizer(keras_spm, chat_template=source.preset.chat_template if source.preset else "v1")
    preset = source.preset or PRESETS["mistral_7b_en"]
    if source.preset is None:
        log.warning("no tokenizer.model in %s; using the Mistral v1 tokenizer", source.label)
    return MistralTokenizer.from_version(preset.tokenizer, chat_template=preset.chat_template or "v1")


def load_model(
    model_cfg: Any, source: ModelSource, *, seed: int = 0, quantization_config: Any = None, task: str = "CAUSAL_LM"
):
    """Build the causal LM: random init from the architecture, a local directory, or a hub download.

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
    if weightless or not model_cfg.load_weights:
        torch.manual_seed(seed)  # a random-init model is the same model for the same seed
        config = load_config(source, model_cfg.revision, **head)
        model = auto_class.from_config(config, attn_implementation=attn).to(dtype)
        if quantization_config is None:
            return model
        # bitsandbytes quantizes while loading, so a random-init base goes through a temporary save.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mistral-tune-base-") as tmp:
            model.save_pretrained(tmp)
            return auto_class.from_pretrained(
                tmp, dtype=dtype, attn_implementation=attn, quantization_config=quantization_config
            )
    directory = source.local_dir or download_source(source, model_cfg).local_dir
    if keras_layout(directory) is not None:
        raise UserError(
            f"{directory} is a keras-hub preset; its model.weights.h5 is Keras-format and mistral-tune loads "
            "Hugging Face safetensors only. Use load_weights=False for the architecture, or the Hugging Face "
            "checkpoint (e.g. hf://mistralai/Mistral-7B-v0.1 or a Kaggle PyTorch/HF variation)."
        )
    check_weight_files(directory, model_cfg.allow_pickle)
    return auto_class.from_pretrained(
        directory,
        **head,
        dtype=dtype,
        attn_implementation=attn,
        quantization_config=quantization_config,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=not model_cfg.allow_pickle,
    )
