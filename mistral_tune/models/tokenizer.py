"""Exact Mistral tokenization: plain text, chat formats, and a Hugging Face export.

`MistralTokenizer` wraps the SentencePiece model directly, so plain-text ids are
by construction those of `sentencepiece`.  `encode_chat` is the single definition
of the chat formats (used for training and generation alike) and reproduces
`mistral_common`'s encoder token for token.  `to_hf` exports an equivalent
`transformers` tokenizer whose Jinja chat template renders to the same ids;
the tests check both claims against `sentencepiece` and `mistral_common`.

Heavy imports (sentencepiece, tokenizers, transformers) happen lazily inside
functions so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mistral_tune.models.presets import PRESETS, preset_table
from mistral_tune.models.sources import ModelSource, resolve_handle

log = logging.getLogger(__name__)

_MODEL_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
}

CHAT_TEMPLATES = ("v1", "v3")

SIDECAR_FILE = "mistral_tune_tokenizer.json"

_SPACE = "\u2581"  # SentencePiece's visible-space symbol

# Jinja exports of `encode_chat`.  `__SYS_AT__`, `__USER__` and `__ASSISTANT__`
# are filled in per format by `_jinja_template`.
_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}{%- set offset = 1 -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- set offset = 0 -%}{%- endif -%}"
    "{%- if not turns -%}{{ raise_exception('the conversation has no user message') }}{%- endif -%}"
    '{%- set ns = namespace(last_user=0) -%}{%- set q = "\'" -%}'
    "{%- for m in turns -%}"
    "{%- set expected = ['user', 'assistant'][loop.index0 % 2] -%}"
    "{%- if m['role'] != expected -%}{{ raise_exception('message ' ~ (loop.index0 + offset) ~ ' has role ' ~ q"
    " ~ m['role'] ~ q ~ ', expected ' ~ q ~ expected ~ q ~ ': roles must alternate user/assistant after an"
    " optional leading system message') }}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and turns[-1]['role'] == 'assistant' -%}"
    "{{ raise_exception('add_generation_prompt is set but the conversation ends with an assistant turn') }}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if system and loop.index0 == __SYS_AT__ -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
    "{{- __USER__ -}}"
    "{%- else -%}{{- __ASSISTANT__ + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


class _CallableInt(int):
    """An int that returns itself when called (``vocabulary_size`` is both an int and keras-hub's method)."""

    def __call__(self) -> int:
        return int(self)


def tokenizer_file(version: str) -> Path:
    """Return the SentencePiece model shipped in `mistral_common`'s package data.

    `version` is "v1", "v2" or "v3"; anything else raises `ValueError`.
    """
    if version not in _MODEL_FILES:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {sorted(_MODEL_FILES)}")
    from importlib.resources import files

    return Path(str(files("mistral_common") / "data" / _MODEL_FILES[version]))


def _jinja_template(chat_template: str) -> str:
    """The Jinja form of `encode_chat` for one chat format."""
    if chat_template == "v1":
        # v1 writes [INST] as plain text and adds the system prompt to the first user turn.
        parts = {
            "__SYS_AT__": "0",
            "__USER__": "'[INST] ' + content + ' [/INST]'",
            "__ASSISTANT__": "' ' + m['content']",
        }
    else:
        # v3 uses [INST]/[/INST] control tokens, puts the system prompt in the last user
        # turn and drops trailing spaces from assistant answers, like mistral-common.
        parts = {
            "__SYS_AT__": "ns.last_user",
            "__USER__": "'[INST]' + content + '[/INST]'",
            "__ASSISTANT__": "m['content'].rstrip(' ')",
        }
    text = _JINJA
    for key, value in parts.items():
        text = text.replace(key, value)
    return text


def _check_conversation(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None
) -> tuple[str, list[Mapping[str, Any]]]:
    """Validate a conversation; return (system prompt or "", the user/assistant turns)."""
    if not messages:
        raise ValueError("the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    offset = 1 if messages[0]["role"] == "system" else 0
    system, turns = (messages[0]["content"] if offset else ""), list(messages[offset:])
    if not turns:
        raise ValueError("the conversation has no user message")
    for i, m in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if m["role"] != expected:
            raise ValueError(
                f"message {i + offset} has role {m['role']!r}, expected {expected!r}: roles must "
                "alternate user/assistant after an optional leading system message"
            )
        if m["role"] == "assistant" and not m["content"]:
            # mistral-common refuses empty assistant turns; refusing too keeps the ids comparable.
            raise ValueError(f"message {i + offset} is an assistant turn with empty content")
    if add_generation_prompt and turns[-1]["role"] == "assistant":
        raise ValueError("add_generation_prompt=True but the conversation ends with an assistant turn")
    return system, turns


class MistralTokenizer:
    """Exact Mistral tokenizer backed by `sentencepiece`, with the Mistral chat formats.

    `chat_template` is "v1" (Mistral Instruct v0.1/v0.2), "v3" (Instruct v0.3, needs a
    model file with the [INST]/[/INST] control tokens, i.e. v2 or v3) or None (base
    model; `encode_chat` then uses the v1 format).
    """

    def __init__(
        self, model_file: str | Path | None = None, chat_template: str | None = "v1", *, proto: Any = None
    ) -> None:
        import sentencepiece as spm

        if chat_template is not None and chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat_template {chat_template!r}; expected one of {CHAT_TEMPLATES} or None")
        # keras-hub's constructor: MistralTokenizer(proto=path or serialized bytes).
        if (model_file is None) == (proto is None):
            raise ValueError("give exactly one of model_file and proto (a path or the serialized model's bytes)")
        if isinstance(proto, (bytes, bytearray)):
            self.model_file = None
            self._proto: bytes | None = bytes(proto)
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        else:
            self.model_file = Path(model_file if proto is None else proto)
            self._proto = None
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.chat_template = chat_template
        sp = self._sp
        # An int that is also callable: ``tok.vocabulary_size`` (ours, before keras-hub parity) and
        # ``tok.vocabulary_size()`` (keras-hub's method) both give the size.
        self.vocabulary_size: int = _CallableInt(sp.get_piece_size())
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        # Padding uses <unk>, never EOS: with pad == EOS, collators that mask padding out of
        # the loss would also mask the real EOS closing each answer, and the fine-tuned model
        # would never learn to stop.  <unk> never occurs in real text (byte fallback).  keras-hub
        # pads with id 0, which is <unk> in every Mistral SentencePiece model.
        self.pad_id: int = self.unk_id
        self._special_ids = frozenset(i for i in range(self.vocabulary_size) if sp.is_control(i) or sp.is_unknown(i))
        self._format = chat_template or "v1"
        if self._format == "v3":
            self._inst, self._end_inst = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
            if not (sp.is_control(self._inst) and sp.is_control(self._end_inst)):
                raise ValueError(f"chat_template 'v3' needs [INST]/[/INST] control tokens, absent from {model_file}")
        self._hf_json: str | None = None

    @classmethod
    def from_version(cls, version: str, chat_template: str | None = "v1") -> MistralTokenizer:
        """Load the model file of tokenizer `version` ("v1", "v2", "v3") shipped with mistral_common."""
        return cls(tokenizer_file(version), chat_template=chat_template)

    @classmethod
    def from_preset(cls, preset: str, revision: str | None = None) -> MistralTokenizer:
        """The tokenizer of a preset id, `hf://org/name`, `kaggle://...` or a local preset directory.

        Built-in presets resolve offline from mistral-common's files: v1 for the 7B v0.1 base and
        Instruct v0.1/v0.2, v3 for v0.3.
        """
        return load_preset_tokenizer(preset, revision=revision)

    def __repr__(self) -> str:
        source = str(self.model_file) if self.model_file is not None else f"<{len(self._proto or b'')} bytes>"
        return f"MistralTokenizer({source!r}, chat_template={self.chat_template!r})"

    # keras-hub's tokenizer API (keras_hub.models.MistralTokenizer). Like keras-hub, ``tokenize`` adds
    # no BOS/EOS (the preprocessor does); ``encode`` is ours and adds BOS. Lists, not tensors, come out.

    start_token_id = property(lambda self: self.bos_id)
    end_token_id = property(lambda self: self.eos_id)
    pad_token_id = property(lambda self: self.pad_id)
    start_token = property(lambda self: self._sp.id_to_piece(self.bos_id))
    end_token = property(lambda self: self._sp.id_to_piece(self.eos_id))

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
            return self._sp.encode(inputs)
        if isinstance(inputs, (list, tuple)) and all(isinstance(t, (str, bytes)) for t in inputs):
            return self._sp.encode([t.decode("utf-8") if isinstance(t, bytes) else t for t in inputs])
        raise ValueError(f"tokenize() takes a str or a list of str; got {type(inputs).__name__}")

    __call__ = tokenize

    def detokenize(self, inputs: Any) -> Any:
        """Text for ids (a list of ints or a 1-D tensor) or a batch of them (list of lists, 2-D tensor).

        Decoded as sentencepiece decodes, as keras-hub does: BOS/EOS vanish, <unk> shows as " ⁇ ".
        """
        if hasattr(inputs, "tolist"):
            inputs = inputs.tolist()
        if isinstance(inputs, int):
            return self._sp.decode([inputs])
        inputs = list(inputs)
        if inputs and not isinstance(inputs[0], int):
            return [self._sp.decode([int(i) for i in row]) for row in inputs]
        return self._sp.decode([int(i) for i in inputs])

    def get_vocabulary(self) -> list[str]:
        """Every piece, in id order."""
        return [self._sp.id_to_piece(i) for i in range(self.vocabulary_size)]

    def id_to_token(self, id: int) -> str:
        if not 0 <= int(id) < self.vocabulary_size:
            raise ValueError(f"id must be in [0, {self.vocabulary_size}); got {id}")
        return self._sp.id_to_piece(int(id))

    def token_to_id(self, token: str) -> int:
        """The id of a piece; a piece not in the vocabulary gives the <unk> id, as in keras-hub."""
        return self._sp.piece_to_id(token)

    @property
    def proto(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._proto if self._proto is not None else self.model_file.read_bytes()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Encode plain text exactly like `sentencepiece`, optionally adding BOS/EOS."""
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text; with `skip_special_tokens=False` control tokens appear as their pieces."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # <unk>/pad must be dropped explicitly: sentencepiece renders it as " ⁇ ".
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        out, run = [], []
        for i in ids:
            if i in self._special_ids:
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None = None
    ) -> tuple[list[int], list[int]]:
        """Encode a conversation into `(input_ids, assistant_mask)`.

        The ids equal `mistral_common`'s `encode_chat_completion` for the same messages; a
        conversation ending with an assistant turn (training) is encoded as mistral-common
        encodes assistant turns mid-conversation (content + EOS).  The mask is 1 exactly on
        the tokens the model must learn to produce: assistant content and its closing EOS.
        Mistral formats have no assistant header, so `add_generation_prompt` adds nothing;
        True only asserts that the conversation ends with a user turn.  Raises ValueError
        when roles do not alternate user/assistant after an optional leading system message.
        """
        system, turns = _check_conversation(messages, add_generation_prompt)
        sp, v3 = self._sp, self._format == "v3"
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        system_at = users[-1] if v3 else users[0]  # mistral-common: v3 last user turn, v1 first
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(turns):
            content = m["content"]
            if m["role"] == "user":
                if system and i == system_at:
                    content = f"{system}\n\n{content}"
                # Each segment is encoded on its own (so each gets SentencePiece's dummy-prefix
                # space), exactly as mistral-common does.
                seg = (
                    [self._inst, *sp.encode(content), self._end_inst] if v3 else sp.encode(f"[INST] {content} [/INST]")
                )
                ids += seg
                mask += [0] * len(seg)
            else:
                seg = [*sp.encode(content.rstrip(" ") if v3 else content), self.eos_id]
                ids += seg
                mask += [1] * len(seg)
        return ids, mask

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of `encode_chat` only (prompt for generation by default)."""
        return self.encode_chat(messages, add_generation_prompt=add_generation_prompt)[0]

    @property
    def jinja_chat_template(self) -> str:
        """The Jinja export of `encode_chat`, as shipped in `to_hf().chat_template`."""
        return _jinja_template(self._format)

    def _hf_backend(self) -> Any:
        """Build (once) the `tokenizers.Tokenizer` equivalent to the SentencePiece model."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

        if self._hf_json is not None:
            return Tokenizer.from_str(self._hf_json)
        sp, n = self._sp, self.vocabulary_size
        vocab = {sp.id_to_piece(i): i for i in range(n)}
        normal = {
            sp.id_to_piece(i)
            for i in range(n)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
        }
        # SentencePiece BPE repeatedly merges the adjacent pair whose merged piece scores
        # highest, the leftmost pair on ties.  HF BPE merges by rank, so rank merges by
        # the merged piece's score.  All whitespace-run pieces share one score; SP then
        # grows the leftmost run first, which HF reproduces by preferring the longer left
        # part among merges of equal score (0 mismatches on 135k fuzzed and alpaca strings).
        ranked = []
        for piece in normal:
            for k in range(1, len(piece)):
                if piece[:k] in normal and piece[k:] in normal:
                    ranked.append((-sp.get_score(vocab[piece]), -k, vocab[piece], piece[:k], piece[k:]))
        ranked.sort()
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=[(a, b) for *_, a, b in ranked],
                unk_token=sp.id_to_piece(self.unk_id),
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        # Prepend the dummy-prefix space in the normalizer, not a Metaspace pre-tokenizer
        # (prepend_scheme="first"): HF normalizes each span between special tokens
        # separately, so every segment of a chat gets its own prefix space, exactly
        # like mistral-common's segment-wise encoding.  No pre-tokenizer: SP does not
        # split on spaces either, and leading/repeated spaces stay exact.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        tok.decoder = decoders.Sequence(
            [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        tok.add_special_tokens(
            [AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in sorted(self._special_ids)]
        )
        bos = sp.id_to_piece(self.bos_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
        )
        self._hf_json = tok.to_str()
        return tok

    def to_hf(self) -> Any:
        """Export as a `transformers.PreTrainedTokenizerFast` with identical encoding.

        Plain text encodes as `encode` (BOS added by the tokenizer itself), pad is <unk>, and
        `chat_template` renders conversations to the ids of `encode_chat`.  Known gap: HF
        matches special-token strings ("<s>", "[INST]", ...) written literally in text as
        control tokens, where sentencepiece/mistral-common encode them as text (pass
        `split_special_tokens=True` for plain text to get the sentencepiece ids).
        """
        from transformers import PreTrainedTokenizerFast

        piece = self._sp.id_to_piece
        return PreTrainedTokenizerFast(
            tokenizer_object=self._hf_backend(),
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
        """Write HF tokenizer files, `tokenizer.model` and a sidecar recording the chat template."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # BOS lives in tokenizer.json's post-processor, which transformers v5 treats as
        # authoritative (it drops add_bos_token from tokenizer_config.json on save and load).
        self.to_hf().save_pretrained(str(out))
        target = out / "tokenizer.model"
        if self.model_file is None:
            target.write_bytes(self.proto)
        elif not (target.exists() and target.samefile(self.model_file)):
            shutil.copyfile(self.model_file, target)
        (out / SIDECAR_FILE).write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MistralTokenizer:
        """Load from a directory with `tokenizer.model` (and optionally the sidecar json).

        Without a sidecar, the chat format is inferred: "v3" if the vocabulary has the
        [INST] control token, else "v1".
        """
        directory = Path(directory)
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"no tokenizer.model in {directory}")
        sidecar = directory / SIDECAR_FILE
        if sidecar.is_file():
            return cls(model_file, chat_template=json.loads(sidecar.read_text())["chat_template"])
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        inst = sp.piece_to_id("[INST]")
        return cls(model_file, chat_template="v3" if inst != sp.unk_id() and sp.is_control(inst) else "v1")


def load_preset_tokenizer(preset: str, revision: str | None = None):
    """Only the tokenizer of a handle (built-in presets resolve offline from mistral-common's files)."""
    return load_tokenizer(resolve_handle(preset, load_weights=False, revision=revision))


def load_tokenizer(source: ModelSource):
    """The exact sentencepiece tokenizer: a saved one, or the preset's file from mistral-common."""
    if source.local_dir is not None and (source.local_dir / "tokenizer.model").exists():
        return MistralTokenizer.from_pretrained(source.local_dir)
    keras_spm = source.local_dir / "assets" / "tokenizer" / "vocabulary.spm" if source.local_dir else None
    if keras_spm is not None and keras_spm.is_file():
        return MistralTokenizer(keras_spm, chat_template=source.preset.chat_template if source.preset else "v1")
    preset = source.preset or PRESETS["mistral_7b_en"]
    if source.preset is None:
        log.warning("no tokenizer.model in %s; using the Mistral v1 tokenizer", source.label)
    return MistralTokenizer.from_version(preset.tokenizer, chat_template=preset.chat_template or "v1")


#: Built-in presets as keras-hub lists them on every class (task, backbone, tokenizer).
MistralTokenizer.presets = preset_table()
