"""The tokenizer files `mistral-common` ships in its package data, as plain data.

Each entry names the file, its kind (SentencePiece model or Tekken json) and the chat format
mistral-common's instruct encoder uses with it. `tokenizer_file(version)` finds the file offline;
`shipped_tokenizer_files()` lists what the installed mistral-common actually has (the tests check
that every shipped file has an entry here, so a new mistral-common release cannot slip by).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SENTENCEPIECE = "sentencepiece"
TEKKEN = "tekken"


@dataclass(frozen=True)
class TokenizerFile:
    """One tokenizer file of mistral-common: where it is, what it is, which chat format it takes."""

    version: str  # our name for it: what presets write in `tokenizer:`
    filename: str  # inside mistral_common/data
    kind: str  # SENTENCEPIECE or TEKKEN
    chat_template: str  # default chat format (mistral_tune.models.tokenizer.chat_formats)
    vocabulary_size: int
    used_by: str


TOKENIZER_FILES: dict[str, TokenizerFile] = {
    f.version: f
    for f in [
        TokenizerFile("v1", "tokenizer.model.v1", SENTENCEPIECE, "v1", 32000, "Mistral 7B v0.1/v0.2, Mixtral 8x7B"),
        # mistral-common's V2 instruct encoder differs from V3 only in tool calls: plain chats are v3.
        TokenizerFile(
            "v2", "mistral_instruct_tokenizer_240216.model.v2", SENTENCEPIECE, "v3", 32768, "Mistral Small/Large 2402"
        ),
        TokenizerFile(
            "v3",
            "mistral_instruct_tokenizer_240323.model.v3",
            SENTENCEPIECE,
            "v3",
            32768,
            "Mistral 7B v0.3, Mixtral 8x22B, Codestral 22B, Mathstral 7B, Mistral Small 2409",
        ),
        TokenizerFile(
            "v7", "mistral_instruct_tokenizer_241114.model.v7", SENTENCEPIECE, "v7", 32768, "Mistral Large 2411"
        ),
        # v7m1 is byte-identical to v7 in mistral-common 1.13 (kept as its own entry: it is its own file).
        TokenizerFile(
            "v7m1", "mistral_instruct_tokenizer_241114.model.v7m1", SENTENCEPIECE, "v7", 32768, "Mistral Large 2411"
        ),
        TokenizerFile("tekken_240718", "tekken_240718.json", TEKKEN, "tekken", 131072, "Mistral Nemo 12B (2407)"),
        TokenizerFile(
            "tekken_240911", "tekken_240911.json", TEKKEN, "tekken", 131072, "Ministral 8B (2410), Pixtral 12B"
        ),
    ]
}


def _data_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("mistral_common") / "data"))


def tokenizer_file(version: str) -> Path:
    """The file of tokenizer `version` ("v1", "v3", "v7", "tekken_240718", ...) in mistral-common's data.

    An unknown version raises `ValueError`; a known one that the installed mistral-common does not
    ship raises `FileNotFoundError`.
    """
    if version not in TOKENIZER_FILES:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {sorted(TOKENIZER_FILES)}")
    path = _data_dir() / TOKENIZER_FILES[version].filename
    if not path.is_file():
        raise FileNotFoundError(f"the installed mistral-common does not ship {path.name} (tokenizer {version!r})")
    return path


def is_tekken_file(path: str | Path) -> bool:
    """mistral-common's rule: a Tekken tokenizer is a `.json` file with "tekken" in its name."""
    path = Path(path)
    return "tekken" in path.name and path.suffix == ".json"


def tokenizer_kind(path: str | Path) -> str:
    """SENTENCEPIECE or TEKKEN, from the file name as mistral-common decides it."""
    return TEKKEN if is_tekken_file(path) else SENTENCEPIECE


def shipped_tokenizer_files() -> list[str]:
    """File names of every tokenizer in the installed mistral-common's package data."""
    names = (p.name for p in _data_dir().iterdir() if p.is_file())
    return sorted(n for n in names if is_tekken_file(n) or ".model" in n)


def version_of(path: str | Path) -> str | None:
    """Our version name of a mistral-common file name, or None for any other file."""
    name = Path(path).name
    return next((f.version for f in TOKENIZER_FILES.values() if f.filename == name), None)
