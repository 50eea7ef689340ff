"""`MistralTokenizer`: exact Mistral tokenization (SentencePiece or Tekken), the chat formats, and
a Hugging Face export that gives the same ids.

Plain-text ids come from `sentencepiece` or `tiktoken` on the file itself, as in mistral-common.
`encode_chat` is the one definition of the chat formats (chat_formats.py), used for training and
generation alike; `to_hf` exports an equivalent `transformers` tokenizer whose Jinja chat template
renders to the same ids.  tests/models/test_tokenizer*.py check all of it against mistral-common.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mistral_tune.models.presets import PRESETS, preset_table
from mistral_tune.models.sources import ModelSource, resolve_handle
from mistral_tune.models.tokenizer import chat_formats
from mistral_tune.models.tokenizer.chat_formats import CHAT_FORMATS, CHAT_TEMPLATES
from mistral_tune.models.tokenizer.files import TEKKEN, TOKENIZER_FILES, tokenizer_file, tokenizer_kind

log = logging.getLogger(__name__)

SIDECAR_FILE = "mistral_tune_tokenizer.json"
AUTO = "auto"

# Tekken files name the mistral-common instruct encoder they were made for; plain chats of these
# versions are our formats (later versions add settings tokens and must be named explicitly).
_TEKKEN_VERSION_FORMATS = {"v3": "tekken", "v7": "v7"}


def _backend(model_file: Path) -> Any:
    if tokenizer_kind(model_file) == TEKKEN:
        from mistral_tune.models.tokenizer.tekken import TekkenBackend

        return TekkenBackend(model_file)
    from mistral_tune.models.tokenizer.sentencepiece import SentencePieceBackend

    return SentencePieceBackend(model_file)


def infer_chat_template(backend: Any) -> str:
    """The chat format mistral-common uses with this file: by its version (Tekken) or control tokens."""
    if backend.kind == TEKKEN:
        if backend.version not in _TEKKEN_VERSION_FORMATS:
            raise ValueError(
                f"{backend.model_file} is a Tekken {backend.version} file; its chat format is not inferred "
                f"(known: {sorted(_TEKKEN_VERSION_FORMATS)}): pass chat_template= explicitly"
            )
        return _TEKKEN_VERSION_FORMATS[backend.version]
    if backend.control_id("[SYSTEM_PROMPT]") is not None:
        return "v7"
    return "v3" if backend.control_id("[INST]") is not None else "v1"


class MistralTokenizer:
    """Exact Mistral tokenizer for a SentencePiece model or a Tekken json, with its chat format.

    Args:
        model_file: a SentencePiece model (`tokenizer.model`, `tokenizer.model.v3`, ...) or a Tekken
            file (any `*tekken*.json`, mistral-common's rule).
        chat_template: "v1", "v3", "v7", "tekken" (see `chat_formats`), "auto" (the format
            mistral-common uses with this file) or None (a base model: `encode_chat` still works,
            in the file's own format).

    Example:
        >>> tok = MistralTokenizer.from_version("tekken_240911")   # Ministral 8B, chat format "tekken"
        >>> tok.encode("Hello")                                      # [1, 22177]: BOS, then tiktoken's ids
        >>> ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    """

    #: Built-in presets as keras-hub lists them on every class (task, backbone, tokenizer).
    presets = preset_table()

    def __init__(
        self, model_file: str | Path | None = None, chat_template: Optional[str] = AUTO, *, proto: Any = None
    ) -> None:
        if chat_template not in (None, AUTO, *CHAT_TEMPLATES):
            raise ValueError(
                f"unknown chat_template {chat_template!r}; expected one of {CHAT_TEMPLATES}, {AUTO!r} or None"
            )
        # keras-hub's constructor: MistralTokenizer(proto=path or the serialized SentencePiece model).
        if (model_file is None) == (proto is None):
            raise ValueError("give exactly one of model_file and proto (a path or the serialized model's bytes)")
        if isinstance(proto, (bytes, bytearray)):
            model_file = _bytes_file(bytes(proto), self)
        self.model_file = Path(model_file if proto is None or model_file is not None else proto)
        self._backend = backend = _backend(self.model_file)
        if chat_template == AUTO:
            chat_template = infer_chat_template(backend)
        self.chat_template = chat_template
        self._format = CHAT_FORMATS[chat_template or infer_chat_template(backend)]
        chat_formats.check_format(self._format, backend, str(self.model_file))
        self.kind: str = backend.kind  # "sentencepiece" or "tekken"
        # An int that is also callable: ``tok.vocabulary_size`` (ours, before keras-hub parity) and
        # ``tok.vocabulary_size()`` (keras-hub's method) both give the size.
        self.vocabulary_size: int = _CallableInt(backend.vocabulary_size)
        self.bos_id: int = backend.bos_id
        self.eos_id: int = backend.eos_id
        self.unk_id: int = backend.unk_id
        self.pad_id: int = backend.pad_id  # never EOS: <unk> for SentencePiece, <pad> for Tekken
        self.special_ids: frozenset[int] = backend.special_ids

    @classmethod
    def from_version(cls, version: str, chat_template: Optional[str] = AUTO) -> MistralTokenizer:
        """A tokenizer file shipped with mistral-common: "v1", "v2", "v3", "v7", "v7m1",
        "tekken_240718" (Nemo) or "tekken_240911" (Ministral 8B).  "auto" takes the file's chat
        format from `files.TOKENIZER_FILES` (the one mistral-common's instruct encoder uses)."""
        if chat_template == AUTO and version in TOKENIZER_FILES:
            chat_template = TOKENIZER_FILES[version].chat_template
        return cls(tokenizer_file(version), chat_template=chat_template)

    @classmethod
    def from_preset(cls, preset: str, revision: str | None = None) -> MistralTokenizer:
        """The tokenizer of a preset id, `hf://org/name`, `kaggle://...` or a local preset directory.

        Built-in presets resolve offline from mistral-common's files.
        """
        return load_preset_tokenizer(preset, revision=revision)

    def __repr__(self) -> str:
        return f"MistralTokenizer({str(self.model_file)!r}, chat_template={self.chat_template!r})"

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Encode plain text exactly as mistral-common (sentencepiece / tiktoken), optionally with BOS/EOS.

        Special-token strings written in the text ("<s>", "[INST]") are encoded as text."""
        ids = self._backend.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text; with `skip_special_tokens=False` control tokens appear as their strings."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.id_to_piece(int(token_id))

    # keras-hub's tokenizer API (keras_hub.models.MistralTokenizer). Like keras-hub, ``tokenize`` adds
    # no BOS/EOS (the preprocessor does); ``encode`` is ours and adds BOS. Lists, not tensors, come out.

    start_token_id = property(lambda self: self.bos_id)
    end_token_id = property(lambda self: self.eos_id)
    pad_token_id = property(lambda self: self.pad_id)
    start_token = property(lambda self: self.id_to_piece(self.bos_id))
    end_token = property(lambda self: self.id_to_piece(self.eos_id))

    @property
    def special_tokens(self) -> list[str]:
        """keras-hub's list of the tokenizer's own special tokens: BOS and EOS."""
        return [self.start_token, self.end_token]

    @property
    def special_token_ids(self) -> list[int]:
        return [self.bos_id, self.eos_id]

    def tokenize(self, inputs: Any) -> Any:
        """Ids without BOS/EOS: a list of ids for a str, a list of lists for a list of str.

        Example:
            >>> tok = MistralTokenizer.from_preset("mistral_tiny")
            >>> tok.tokenize("Hello")
            [23325]
        """
        if isinstance(inputs, bytes):
            inputs = inputs.decode("utf-8")
        if isinstance(inputs, str):
            return self._backend.encode(inputs)
        if isinstance(inputs, (list, tuple)) and all(isinstance(t, (str, bytes)) for t in inputs):
            return [self._backend.encode(t.decode("utf-8") if isinstance(t, bytes) else t) for t in inputs]
        raise ValueError(f"tokenize() takes a str or a list of str; got {type(inputs).__name__}")

    __call__ = tokenize

    def detokenize(self, inputs: Any) -> Any:
        """Text for ids (a list of ints or a 1-D tensor) or a batch of them (list of lists, 2-D tensor).

        Special tokens (BOS, EOS, padding) are left out, as keras-hub's decoding does.
        """
        if hasattr(inputs, "tolist"):
            inputs = inputs.tolist()
        if isinstance(inputs, int):
            inputs = [inputs]
        inputs = list(inputs)
        if inputs and not isinstance(inputs[0], int):
            return [self.decode(row) for row in inputs]
        return self.decode(inputs)

    def get_vocabulary(self) -> list[str]:
        """Every token's string, in id order."""
        return [self.id_to_piece(i) for i in range(self.vocabulary_size)]

    def id_to_token(self, id: int) -> str:
        if not 0 <= int(id) < self.vocabulary_size:
            raise ValueError(f"id must be in [0, {self.vocabulary_size}); got {id}")
        return self.id_to_piece(int(id))

    def token_to_id(self, token: str) -> int:
        """The id of a token string; one not in the vocabulary gives the <unk> id, as in keras-hub."""
        if self.__dict__.get("_token_ids") is None:
            self.__dict__["_token_ids"] = {piece: i for i, piece in reversed(list(enumerate(self.get_vocabulary())))}
        return self._token_ids.get(token, self.unk_id)

    @property
    def proto(self) -> bytes:
        """The tokenizer file's bytes (the serialized SentencePiece model)."""
        return self.model_file.read_bytes()

    def control_id(self, piece: str) -> Optional[int]:
        """The id of control token `piece` ("[INST]", "</s>", ...), or None if the vocabulary has none."""
        return self._backend.control_id(piece)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool | None = None,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> tuple[list[int], list[int]]:
        """Encode a conversation into `(input_ids, assistant_mask)`.

        The ids equal `mistral_common`'s `encode_chat_completion` for the same messages; a
        conversation ending with an assistant turn (training) is encoded as mistral-common
        encodes assistant turns mid-conversation (content + EOS).  The mask is 1 exactly on
        the tokens the model must learn to produce: assistant content and its closing EOS.
        Mistral formats have no assistant header, so `add_generation_prompt` adds nothing;
        True only asserts that the conversation ends with a user turn.  Raises ValueError
        when roles do not alternate user/assistant after an optional leading system message.

        Function calling (formats v3, tekken, v7): `tools` is the list of available functions
        (`{"type": "function", "function": {"name", "description", "parameters"}}`), assistant
        messages may carry `tool_calls` and `tool` messages their results (`tool_call_id`,
        `content`), as in mistral-common's `ChatCompletionRequest`.  The mask also covers an
        assistant's tool calls, never the tool list or the results; an assistant message with
        `"weight": 0` is not trained (mask 0).  v1 raises ValueError on any tool data, as does a v2
        file (mistral-common's V2 encoder writes tools its own way).
        """
        if tools or any(isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages):
            if self.model_file.name.endswith(".v2"):
                raise ValueError(
                    f"{self.model_file.name} is a v2 tokenizer: its tool format (mistral-common's V2) is not "
                    "supported; use a v3 or later tokenizer for function calling"
                )
        return chat_formats.encode_chat(self._format, self._backend, messages, add_generation_prompt, tools)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> list[int]:
        """Ids of `encode_chat` only (prompt for generation by default)."""
        return self.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)[0]

    @property
    def supports_tools(self) -> bool:
        """Whether this tokenizer's chat format renders function calling (v3, tekken, v7; not v1 or a v2 file)."""
        return (
            self._format.tool_results is not None
            and not self.model_file.name.endswith(".v2")
            and all(self.control_id(t) is not None for t in self._format.tool_tokens)
        )

    @property
    def chat_format(self) -> str:
        """The format `encode_chat` uses: `chat_template`, or the file's own one for a base model."""
        return self._format.name

    @property
    def jinja_chat_template(self) -> str:
        """The Jinja export of `encode_chat`, as shipped in `to_hf().chat_template`."""
        return chat_formats.jinja_template(self._format, self.kind)

    def to_hf(self) -> Any:
        """Export as a `transformers.PreTrainedTokenizerFast` with identical encoding.

        Plain text encodes as `encode` (BOS added by the tokenizer itself), pad is <unk>
        (SentencePiece) or <pad> (Tekken), never EOS, and `chat_template` renders conversations
        to the ids of `encode_chat`.  Known gap: HF matches special-token strings ("<s>",
        "[INST]", ...) written literally in text as control tokens, where mistral-common
        encodes them as text (pass `split_special_tokens=True` for plain text to get its ids).
        """
        from transformers import PreTrainedTokenizerFast

        piece = self.id_to_piece
        return PreTrainedTokenizerFast(
            tokenizer_object=self._backend.hf_backend(),
            bos_token=piece(self.bos_id),
            eos_token=piece(self.eos_id),
            unk_token=piece(self.unk_id),
            pad_token=piece(self.pad_id),
            add_bos_token=True,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            chat_template=self.jinja_chat_template,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the HF tokenizer files, the tokenizer file itself and a sidecar naming it and the chat template.

        The file keeps mistral-common's format: `tokenizer.model` (SentencePiece) or
        `mistral_tune_tekken.json` (Tekken; not `tekken.json`, which would make transformers load
        its mistral-common backend instead of the exported tokenizer.json).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # BOS lives in tokenizer.json's post-processor, which transformers v5 treats as
        # authoritative (it drops add_bos_token from tokenizer_config.json on save and load).
        self.to_hf().save_pretrained(str(out))
        target = out / self._backend.saved_name
        if not (target.exists() and target.samefile(self.model_file)):
            shutil.copyfile(self.model_file, target)
        sidecar = {"chat_template": self.chat_template, "tokenizer_file": target.name}
        (out / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, chat_template: Optional[str] = AUTO) -> MistralTokenizer:
        """Load from a directory written by `save_pretrained`, or a hub repo's files.

        The tokenizer file is the one the sidecar names, else `tokenizer.model`, `tekken.json`, another
        `*tekken*.json` or `tokenizer.model.v*`.  With `chat_template="auto"` the sidecar's chat
        template is used, else the one inferred from the file (`infer_chat_template`).
        """
        directory = Path(directory)
        sidecar = directory / SIDECAR_FILE
        recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        model_file = find_tokenizer_file(directory, recorded.get("tokenizer_file"))
        if model_file is None:
            raise FileNotFoundError(f"no tokenizer file (tokenizer.model or *tekken*.json) in {directory}")
        if chat_template == AUTO and "chat_template" in recorded:
            chat_template = recorded["chat_template"]
        return cls(model_file, chat_template=chat_template)


class _CallableInt(int):
    """An int that returns itself when called (``vocabulary_size`` is both an int and keras-hub's method)."""

    def __call__(self) -> int:
        return int(self)


def _bytes_file(data: bytes, owner: Any) -> Path:
    """A SentencePiece model given as bytes, in a temporary file that lives as long as ``owner``."""
    import os
    import tempfile
    import weakref

    fd, name = tempfile.mkstemp(prefix="mistral-tune-proto-", suffix=".model")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    weakref.finalize(owner, os.unlink, name)
    return Path(name)


def find_tokenizer_file(directory: Path, recorded: Optional[str] = None) -> Optional[Path]:
    """The tokenizer file of a directory (see `MistralTokenizer.from_pretrained`), or None."""
    candidates = [recorded] if recorded else []
    candidates += ["tokenizer.model", "tekken.json"]
    candidates += sorted(p.name for p in directory.glob("*tekken*.json"))
    candidates += sorted(p.name for p in directory.glob("tokenizer.model.v*"))
    return next((directory / c for c in candidates if (directory / c).is_file()), None)


def load_preset_tokenizer(preset: str, revision: str | None = None) -> MistralTokenizer:
    """Only the tokenizer of a handle (built-in presets resolve offline from mistral-common's files)."""
    return load_tokenizer(resolve_handle(preset, load_weights=False, revision=revision))


def load_tokenizer(source: ModelSource) -> MistralTokenizer:
    """The exact tokenizer: a saved or downloaded one, a keras-hub vocabulary, or the preset's file.

    A directory's own tokenizer file wins; its chat template is the sidecar's, else the preset's,
    else inferred from the file.
    """
    preset = source.preset
    if source.local_dir is not None and find_tokenizer_file(source.local_dir) is not None:
        if preset is not None and not (source.local_dir / SIDECAR_FILE).is_file():
            return MistralTokenizer.from_pretrained(source.local_dir, chat_template=preset.chat_template)
        return MistralTokenizer.from_pretrained(source.local_dir)
    keras_spm = source.local_dir / "assets" / "tokenizer" / "vocabulary.spm" if source.local_dir else None
    if keras_spm is not None and keras_spm.is_file():
        return MistralTokenizer(keras_spm, chat_template=preset.chat_template if preset else "v1")
    if preset is None:
        log.warning("no tokenizer file in %s; using the Mistral v1 tokenizer", source.label)
        preset = PRESETS["mistral_7b_en"]
    return MistralTokenizer.from_version(preset.tokenizer, chat_template=preset.chat_template)
