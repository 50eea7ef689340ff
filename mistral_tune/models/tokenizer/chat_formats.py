"""The Mistral chat formats, each defined once as data and rendered two ways.

`encode_chat` turns a conversation into ids segment by segment (control tokens by id, text through
the tokenizer), which is how mistral-common's instruct encoders work, so training, generation and
the tests share one definition.  `jinja_template` writes the same format as a Jinja chat template for
the exported Hugging Face tokenizer; the tests check that both give mistral-common's ids.

| format | files | user turn | system prompt | answers |
| --- | --- | --- | --- | --- |
| v1 | v1 | text `[INST] ... [/INST]` | prepended to the first user turn | as written |
| v3 | v2, v3 | `[INST]`/`[/INST]` tokens | prepended to the last user turn | trailing spaces dropped |
| tekken | tekken_* (config v3) | as v3, on a Tekken vocabulary | as v3 | as v3 |
| v7 | v7 (and Tekken v7 files) | as v3 | `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]` after BOS | as v3 |

Tool calls ([AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]) are not rendered yet; they would be
further fields here (the block before the last user turn, the assistant's call segment) and a
`tools` role in `check_conversation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from mistral_tune.models.tokenizer.files import SENTENCEPIECE, TEKKEN

FIRST_USER, LAST_USER, SYSTEM_BLOCK = "first_user", "last_user", "system_block"


@dataclass(frozen=True)
class ChatFormat:
    """One chat format.  `inst` opens and closes a user turn; with `inst_is_text` they are plain
    text encoded with the user's message (v1), else control tokens.  `system` says where the system
    prompt goes: merged into the FIRST_USER or LAST_USER turn as "system\\n\\nmessage", or its own
    SYSTEM_BLOCK between the `system_tokens` right after BOS."""

    name: str
    kinds: tuple[str, ...]  # tokenizer kinds the format is defined on
    inst: tuple[str, str] = ("[INST]", "[/INST]")
    inst_is_text: bool = False
    system: str = LAST_USER
    system_tokens: Optional[tuple[str, str]] = None
    rstrip_answers: bool = True  # mistral-common's V2+ encoders drop trailing spaces from answers

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """The control tokens the vocabulary must have for this format."""
        return (() if self.inst_is_text else self.inst) + (self.system_tokens or ())


CHAT_FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in [
        # mistral-common's InstructTokenizerV1 (tokenizer.model.v1: no [INST] control token).
        ChatFormat("v1", (SENTENCEPIECE,), inst=("[INST] ", " [/INST]"), inst_is_text=True, system=FIRST_USER,
                   rstrip_answers=False),
        # InstructTokenizerV2/V3 on SentencePiece (V2 differs only in tool calls).
        ChatFormat("v3", (SENTENCEPIECE,)),
        # InstructTokenizerV3 on a Tekkenizer (Nemo, Ministral): v3's layout without SentencePiece's prefix space.
        ChatFormat("tekken", (TEKKEN,)),
        # InstructTokenizerV7 (Mistral Large 2411; Tekken v7 files such as Mistral Small 3's).
        ChatFormat("v7", (SENTENCEPIECE, TEKKEN), system=SYSTEM_BLOCK,
                   system_tokens=("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")),
    ]
}  # fmt: skip

CHAT_TEMPLATES = tuple(CHAT_FORMATS)


class TextBackend(Protocol):
    """What a format needs from a tokenizer."""

    kind: str
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...  # no BOS/EOS

    def control_id(self, piece: str) -> Optional[int]: ...  # None if `piece` is no control token


def check_format(fmt: ChatFormat, backend: TextBackend, label: str) -> None:
    """Raise ValueError unless `fmt` is defined on this tokenizer."""
    if backend.kind not in fmt.kinds:
        usable = [f.name for f in CHAT_FORMATS.values() if backend.kind in f.kinds]
        raise ValueError(
            f"chat_template {fmt.name!r} is not defined on a {backend.kind} tokenizer; use one of {usable}"
        )
    missing = [t for t in fmt.control_tokens if backend.control_id(t) is None]
    if missing:
        raise ValueError(f"chat_template {fmt.name!r} needs the control tokens {missing}, absent from {label}")


def check_conversation(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool | None
) -> tuple[Optional[str], list[Mapping[str, Any]]]:
    """Validate a conversation; return (the system prompt or None, the user/assistant turns)."""
    if not messages:
        raise ValueError("the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    offset = 1 if messages[0]["role"] == "system" else 0
    system, turns = (messages[0]["content"] if offset else None), list(messages[offset:])
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


def encode_chat(
    fmt: ChatFormat,
    backend: TextBackend,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation; see `MistralTokenizer.encode_chat`."""
    system, turns = check_conversation(messages, add_generation_prompt)
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    merge_at = {FIRST_USER: users[0], LAST_USER: users[-1]}.get(fmt.system)
    ids, mask = [backend.bos_id], [0]

    def add(segment: list[int], trained: int) -> None:
        ids.extend(segment)
        mask.extend([trained] * len(segment))

    if fmt.system == SYSTEM_BLOCK and system is not None:  # mistral-common keeps an empty one too
        open_, close = fmt.system_tokens
        add([backend.control_id(open_), *backend.encode(system), backend.control_id(close)], 0)
    for i, m in enumerate(turns):
        content = m["content"]
        if m["role"] == "user":
            if system and i == merge_at:
                content = f"{system}\n\n{content}"
            open_, close = fmt.inst
            if fmt.inst_is_text:
                # One segment, as mistral-common encodes it (SentencePiece adds one dummy-prefix space).
                add(backend.encode(f"{open_}{content}{close}"), 0)
            else:
                add([backend.control_id(open_), *backend.encode(content), backend.control_id(close)], 0)
        else:
            add([*backend.encode(content.rstrip(" ") if fmt.rstrip_answers else content), backend.eos_id], 1)
    return ids, mask


# The Jinja export.  The __NAMES__ are filled in per format (and tokenizer kind) by `jinja_template`.
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
    "__SYSTEM_BLOCK__"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if system and loop.index0 == __MERGE_AT__ -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
    "{{- __USER__ -}}"
    "{%- else -%}{{- __ASSISTANT__ + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def jinja_template(fmt: ChatFormat, kind: str) -> str:
    """The Jinja form of `encode_chat` for `fmt` on a tokenizer of `kind`.

    Hugging Face tokenizes a rendered template piece by piece between special tokens, as
    mistral-common encodes segment by segment; our exported SentencePiece tokenizer adds the dummy
    prefix to each piece.  Only where two text segments meet without a control token between them
    (v1: the user turn, then the answer) does the template write the space SentencePiece would add.
    """
    open_, close = fmt.inst
    answer = "m['content'].rstrip(' ')" if fmt.rstrip_answers else "m['content']"
    separator = " " if fmt.inst_is_text and kind == SENTENCEPIECE else ""
    block = ""
    if fmt.system == SYSTEM_BLOCK:
        s_open, s_close = fmt.system_tokens
        block = f"{{%- if offset -%}}{{{{- {_quote(s_open)} + system + {_quote(s_close)} -}}}}{{%- endif -%}}"
    parts = {
        "__SYSTEM_BLOCK__": block,
        "__MERGE_AT__": {FIRST_USER: "0", LAST_USER: "ns.last_user"}.get(fmt.system, "-1"),
        "__USER__": f"{_quote(open_)} + content + {_quote(close)}",
        "__ASSISTANT__": (f"{_quote(separator)} + " if separator else "") + answer,
    }
    text = _JINJA
    for key, value in parts.items():
        text = text.replace(key, value)
    return text
