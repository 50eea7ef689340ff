"""Where a model comes from: a built-in preset, a local directory, ``hf://`` or ``kaggle://``; offline
hub access fails fast with the repo named, and pickle weights are refused unless allowed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import PRESETS, Preset, is_hub_id

METADATA_FILE = "metadata.json"


def resolve_handle(preset: str, *, load_weights: bool = True, revision: str | None = None):
    """A ``models.ModelSource`` whose files are local, except built-in presets' hub weights.

    Built-in 7B presets keep their hub repo (their tokenizer and architecture are offline data, and
    weights are only fetched when ``load_weights``); an ``hf://`` handle is fetched here, config and
    tokenizer only when ``load_weights=False``.
    """
    from mistral_tune.models.presets import PRESETS

    if not isinstance(preset, (str, Path)) or not str(preset):
        raise UserError(f"preset must be a preset id, hf://org/name, kaggle://... or a directory; got {preset!r}.")
    handle = str(preset)
    # A from_preset() argument is a handle the caller chose (keras-hub takes local directories), so
    # anything but a built-in id goes through resolve_source's explicit-path branch.
    source = resolve_source(handle) if handle in PRESETS else resolve_source(handle, handle)
    if source.hub_repo is not None and source.preset is None:
        # hf://org/name: fetch once, then everything is read from disk.
        directory = fetch_hub_repo(source.hub_repo, revision, config_only=not load_weights)
        source = ModelSource(None, directory, None)
    if not load_weights:
        source = hub_tokenizer_source(source, revision)  # Mistral Small 3: its tekken.json, no weights
    if source.local_dir is not None and source.preset is None:
        base = read_metadata(source.local_dir).get("base_preset")
        if base in PRESETS:  # our preset layout remembers the built-in it came from
            source = ModelSource(PRESETS[base], source.local_dir, None)
    return source


def read_metadata(directory: Path | None) -> dict[str, Any]:
    """The preset's ``metadata.json``, or {} for other layouts."""
    if directory is None or not (Path(directory) / METADATA_FILE).is_file():
        return {}
    try:
        return json.loads((Path(directory) / METADATA_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{Path(directory) / METADATA_FILE} is not valid JSON ({exc}).") from exc


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

    Built-in presets with ``load_weights=false`` need nothing from the hub (their architecture is data),
    except the tokenizer of a preset whose file only its repo has (Mistral Small 3): then the repo's
    config and tokenizer files are fetched, no weights.
    """
    if source.hub_repo is None:
        return source
    if source.preset is not None and not model_cfg.load_weights and not model_cfg.path:
        return hub_tokenizer_source(source, model_cfg.revision)
    return ModelSource(source.preset, fetch_hub_repo(source.hub_repo, model_cfg.revision), None)


def hub_tokenizer_source(source: ModelSource, revision: Optional[str] = None) -> ModelSource:
    """For a built-in preset whose tokenizer file ships only in its hub repo (``tokenizer: hub``), the
    repo's config and tokenizer files as the local directory; any other source as it is."""
    preset = source.preset
    if source.local_dir is not None or preset is None or preset.tokenizer != "hub" or source.hub_repo is None:
        return source
    return ModelSource(preset, fetch_hub_repo(source.hub_repo, revision, config_only=True), None)


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
