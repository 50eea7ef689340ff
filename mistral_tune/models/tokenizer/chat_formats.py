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

Tools (v3, tekken, v7; v1 has none), as mistral-common's InstructTokenizerV3/V7 write them:

- the tool list: `[AVAILABLE_TOOLS]` + JSON of `[{"type": "function", "function": {"name", "description",
  "parameters"}}]` + `[/AVAILABLE_TOOLS]`, right before the last user turn's `[INST]`;
- an assistant's calls: (v7: its text, then) `[TOOL_CALLS]` + JSON of `[{"name", "arguments", "id"}]` + EOS;
- a tool result: `[TOOL_RESULTS]` + JSON of `{"content", "call_id"}` + `[/TOOL_RESULTS]` (v3, tekken; the
  content is parsed as JSON when it is JSON), or `[TOOL_RESULTS]` id `[TOOL_CONTENT]` content
  `[/TOOL_RESULTS]` (v7).

The loss mask covers assistant turns (text, calls and EOS) unless the message has `"weight": 0`; the
tool list and tool results are never trained.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from mistral_tune.models.tokenizer.files import SENTENCEPIECE, TEKKEN

FIRST_USER, LAST_USER, SYSTEM_BLOCK = "first_user", "last_user", "system_block"
# How a tool message is written: [TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS] (V3), or
# [TOOL_RESULTS]id[TOOL_CONTENT]content[/TOOL_RESULTS] (V7).
JSON_RESULTS, ID_RESULTS = "json", "id"
TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class ChatFormat:
    """One chat format.  `inst` opens and closes a user turn; with `inst_is_text` they are plain
    text encoded with the user's message (v1), else control tokens.  `system` says where the system
    prompt goes: merged into the FIRST_USER or LAST_USER turn as "system\\n\\nmessage", or its own
    SYSTEM_BLOCK between the `system_tokens` right after BOS.  `tool_results` is how a tool message is
    written (JSON_RESULTS, ID_RESULTS, or None: the format has no tools); `content_with_calls` allows
    an assistant turn with both text and tool calls."""

    name: str
    kinds: tuple[str, ...]  # tokenizer kinds the format is defined on
    inst: tuple[str, str] = ("[INST]", "[/INST]")
    inst_is_text: bool = False
    system: str = LAST_USER
    system_tokens: Optional[tuple[str, str]] = None
    rstrip_answers: bool = True  # mistral-common's V2+ encoders drop trailing spaces from answers
    tool_results: Optional[str] = JSON_RESULTS
    content_with_calls: bool = False

    @property
    def control_tokens(self) -> tuple[str, ...]:
        """The control tokens the vocabulary must have for this format."""
        return (() if self.inst_is_text else self.inst) + (self.system_tokens or ())

    @property
    def tool_tokens(self) -> tuple[str, ...]:
        """The control tokens tool use needs (checked when a conversation has tools)."""
        if self.tool_results is None:
            return ()
        return (*TOOL_TOKENS, *(("[TOOL_CONTENT]",) if self.tool_results == ID_RESULTS else ()))


CHAT_FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in [
        # mistral-common's InstructTokenizerV1 (tokenizer.model.v1: no [INST] control token, no tools).
        ChatFormat("v1", (SENTENCEPIECE,), inst=("[INST] ", " [/INST]"), inst_is_text=True, system=FIRST_USER,
                   rstrip_answers=False, tool_results=None),
        # InstructTokenizerV3 on SentencePiece (V2 differs only in tool calls: tools on a v2 file are refused).
        ChatFormat("v3", (SENTENCEPIECE,)),
        # InstructTokenizerV3 on a Tekkenizer (Nemo, Ministral): v3's layout without SentencePiece's prefix space.
        ChatFormat("tekken", (TEKKEN,)),
        # InstructTokenizerV7 (Mistral Large 2411; Tekken v7 files such as Mistral Small 3's).
        ChatFormat("v7", (SENTENCEPIECE, TEKKEN), system=SYSTEM_BLOCK,
                   system_tokens=("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), tool_results=ID_RESULTS,
                   content_with_calls=True),
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


def _has_tools(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]]) -> bool:
    return bool(tools) or any(
        isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages
    )


def check_conversation(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool | None,
    fmt: Optional[ChatFormat] = None,
    tools: Optional[Sequence[Any]] = None,
) -> tuple[Optional[str], list[Mapping[str, Any]]]:
    """Validate a conversation; return (the system prompt or None, the user/assistant/tool turns).

    After an optional leading system message, turns go user, assistant, user, ...; an assistant turn
    with `tool_calls` is followed by one `tool` message per call, then the next assistant turn (or user).
    """
    if not messages:
        raise ValueError("the conversation is empty")
    if _has_tools(messages, tools) and (fmt is None or fmt.tool_results is None):
        raise ValueError(
            f"chat format {fmt.name if fmt else '?'!r} has no tool calls: tools, tool_calls and tool messages "
            "need a v3, tekken or v7 format (a model with the v3 tokenizer or later)"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        calls = m["role"] == "assistant" and m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    offset = 1 if messages[0]["role"] == "system" else 0
    system, turns = (messages[0]["content"] if offset else None), list(messages[offset:])
    if not turns:
        raise ValueError("the conversation has no user message")
    expected, unanswered = ("user",), 0
    for i, m in enumerate(turns):
        role, at = m["role"], i + offset
        if unanswered and role != "tool":
            raise ValueError(f"message {at}: {unanswered} tool call(s) before it have no tool result")
        if role not in expected:
            if expected == ("user",) or expected == ("assistant",):
                raise ValueError(
                    f"message {at} has role {role!r}, expected {expected[0]!r}: roles must "
                    "alternate user/assistant after an optional leading system message"
                    + (" (tool results follow an assistant turn with tool_calls)" if role == "tool" else "")
                )
            raise ValueError(f"message {at} has role {role!r}, expected one of {list(expected)}")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ValueError(f"message {at} is a tool result without a string 'tool_call_id'")
            unanswered -= 1
            expected = ("tool",) if unanswered else ("assistant", "user")
            continue
        if role == "user":
            expected = ("assistant",)
            continue
        calls = m.get("tool_calls") or []
        weight = m.get("weight", 1)
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ValueError(f"message {at} has weight {weight!r}; an assistant turn's weight is 0 or 1")
        if calls and m.get("content") and not fmt.content_with_calls:
            raise ValueError(f"message {at} has both content and tool_calls, which format {fmt.name!r} cannot write")
        if not calls and not m["content"]:
            # mistral-common refuses empty assistant turns; refusing too keeps the ids comparable.
            raise ValueError(f"message {at} is an assistant turn with empty content")
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ValueError(f"message {at}: tool_calls[{j}] needs a 'function' with a string 'name'")
        unanswered = len(calls)
        expected = ("tool",) if calls else ("user",)
    if add_generation_prompt and turns[-1]["role"] == "assistant":
        raise ValueError("add_generation_prompt=True but the conversation ends with an assistant turn")
    return system, turns


def _json_value(value: Any) -> Any:
    """mistral-common's `_parse_json_content`: a string holding JSON becomes that value, else stays."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def tool_list(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools as mistral-common dumps them: `{"type": "function", "function": {"name", "description",
    "parameters"}}` (description "" and parameters {} when absent; other keys such as `strict` left out)."""
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
        out.append({"type": "function", "function": {"name": function["name"],
                    "description": function.get("description") or "", "parameters": function.get("parameters") or {}}})  # fmt: skip
    return out


def _call_json(calls: Sequence[Mapping[str, Any]]) -> str:
    prepared = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments")
        item = {"name": function["name"], "arguments": {} if arguments is None else _json_value(arguments)}
        if call.get("id") and call["id"] != "null":
            item["id"] = call["id"]
        prepared.append(item)
    return json.dumps(prepared, ensure_ascii=False)


def encode_chat(
    fmt: ChatFormat,
    backend: TextBackend,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool | None = None,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation; see `MistralTokenizer.encode_chat`."""
    system, turns = check_conversation(messages, add_generation_prompt, fmt, tools)
    if _has_tools(messages, tools):
        missing = [t for t in fmt.tool_tokens if backend.control_id(t) is None]
        if missing:
            raise ValueError(f"tool use needs the control tokens {missing}, absent from this tokenizer")
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    merge_at = {FIRST_USER: users[0], LAST_USER: users[-1]}.get(fmt.system)
    ids, mask = [backend.bos_id], [0]
    control = backend.control_id

    def add(segment: list[int], trained: int) -> None:
        ids.extend(segment)
        mask.extend([trained] * len(segment))

    if fmt.system == SYSTEM_BLOCK and system is not None:  # mistral-common keeps an empty one too
        open_, close = fmt.system_tokens
        add([control(open_), *backend.encode(system), control(close)], 0)
    for i, m in enumerate(turns):
        content = m.get("content") or ""
        if m["role"] == "user":
            if tools and i == users[-1]:
                listed = json.dumps(tool_list(tools), ensure_ascii=False)
                add([control("[AVAILABLE_TOOLS]"), *backend.encode(listed), control("[/AVAILABLE_TOOLS]")], 0)
            if system and i == merge_at:
                content = f"{system}\n\n{content}"
            open_, close = fmt.inst
            if fmt.inst_is_text:
                # One segment, as mistral-common encodes it (SentencePiece adds one dummy-prefix space).
                add(backend.encode(f"{open_}{content}{close}"), 0)
            else:
                add([control(open_), *backend.encode(content), control(close)], 0)
        elif m["role"] == "tool":
            if fmt.tool_results == JSON_RESULTS:
                result = json.dumps({"content": _json_value(content), "call_id": m["tool_call_id"]}, ensure_ascii=False)
                add([control("[TOOL_RESULTS]"), *backend.encode(result), control("[/TOOL_RESULTS]")], 0)
            else:
                add([control("[TOOL_RESULTS]"), *backend.encode(m["tool_call_id"]), control("[TOOL_CONTENT]"),
                     *backend.encode(content), control("[/TOOL_RESULTS]")], 0)  # fmt: skip
        else:
            segment = backend.encode(content.rstrip(" ") if fmt.rstrip_answers else content) if content else []
            if m.get("tool_calls"):
                segment += [control("[TOOL_CALLS]"), *backend.encode(_call_json(m["tool_calls"]))]
            add([*segment, backend.eos_id], 0 if m.get("weight", 1) == 0 else 1)
    return ids, mask


# The Jinja export.  The __NAMES__ are filled in per format (and tokenizer kind) by `jinja_template`.
# `json_value` stands in for mistral-common's json.loads-then-dumps of tool arguments and results: a
# mapping or list is written as JSON; a string is written as is when it looks like JSON (an object, a
# list, a quoted string, a number, true/false/null), else quoted as a JSON string.
_JINJA = (
    "{%- macro json_value(v) -%}"
    "{%- if v is string -%}{%- set s = v|trim -%}"
    "{%- if s[:1] in ['{', '[', '\"'] or s in ['true', 'false', 'null'] or (s|int|string) == s"
    " or (s|float|string) == s -%}{{- s -}}{%- else -%}{{- v|tojson -}}{%- endif -%}"
    "{%- else -%}{{- v|tojson -}}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}{%- set offset = 1 -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- set offset = 0 -%}{%- endif -%}"
    "{%- if not turns -%}{{ raise_exception('the conversation has no user message') }}{%- endif -%}"
    "__NO_TOOLS__"
    '{%- set ns = namespace(last_user=0, expected="user", unanswered=0) -%}{%- set q = "\'" -%}'
    "{%- for m in turns -%}"
    "{%- set at = loop.index0 + offset -%}"
    "{%- if ns.unanswered and m['role'] != 'tool' -%}{{ raise_exception('message ' ~ at ~ ': ' ~ ns.unanswered"
    " ~ ' tool call(s) before it have no tool result') }}{%- endif -%}"
    "{%- if m['role'] == 'tool' and ns.expected in ['tool', 'assistant_or_user'] -%}"
    "{%- if m['tool_call_id'] is not string -%}{{ raise_exception('message ' ~ at ~ ' is a tool result without a"
    " string ' ~ q ~ 'tool_call_id' ~ q) }}{%- endif -%}"
    "{%- set ns.unanswered = ns.unanswered - 1 -%}"
    "{%- set ns.expected = 'tool' if ns.unanswered else 'assistant_or_user' -%}"
    "{%- elif ns.expected == 'assistant_or_user' and m['role'] in ['assistant', 'user'] -%}"
    "{%- set ns.expected = 'assistant' if m['role'] == 'user' else 'user' -%}"
    "{%- elif m['role'] != ns.expected or ns.expected in ['tool', 'assistant_or_user'] -%}"
    "{{ raise_exception('message ' ~ at ~ ' has role ' ~ q ~ m['role'] ~ q ~ ', expected ' ~ q ~ ns.expected ~ q"
    " ~ ': roles must alternate user/assistant after an optional leading system message') }}"
    "{%- else -%}{%- set ns.expected = 'assistant' if m['role'] == 'user' else 'user' -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- set ns.unanswered = m['tool_calls']|length -%}{%- set ns.expected = 'tool' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and turns[-1]['role'] == 'assistant' -%}"
    "{{ raise_exception('add_generation_prompt is set but the conversation ends with an assistant turn') }}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "__SYSTEM_BLOCK__"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if tools and loop.index0 == ns.last_user -%}{{- '[AVAILABLE_TOOLS][' -}}"
    "{%- for t in tools -%}{%- set f = t['function'] if t['function'] is defined else t -%}"
    "{{- {'type': 'function', 'function': {'name': f['name'], 'description': f['description']"
    " if f['description'] is defined and f['description'] else '', 'parameters': f['parameters']"
    " if f['parameters'] is defined and f['parameters'] else {}}}|tojson -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}"
    "{{- '][/AVAILABLE_TOOLS]' -}}{%- endif -%}"
    "{%- set content = m['content'] -%}"
    "{%- if system and loop.index0 == __MERGE_AT__ -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
    "{{- __USER__ -}}"
    "{%- elif m['role'] == 'tool' -%}{{- __TOOL_RESULT__ -}}"
    "{%- else -%}"
    "{%- set content = m['content'] if m['content'] is string else '' -%}"
    "{%- if content -%}{{- __ASSISTANT__ -}}{%- endif -%}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}{{- '[TOOL_CALLS][' -}}"
    "{%- for c in m['tool_calls'] -%}{%- set f = c['function'] -%}"
    "{{- '{\"name\": ' + f['name']|tojson + ', \"arguments\": ' -}}"
    "{{- json_value(f['arguments'] if f['arguments'] is defined and f['arguments'] is not none else {}) -}}"
    "{%- if c['id'] is defined and c['id'] and c['id'] != 'null' -%}{{- ', \"id\": ' + c['id']|tojson -}}{%- endif -%}"
    "{{- '}' -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}{{- ']' -}}{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_NO_TOOLS = (
    "{%- set ns0 = namespace(tools=tools is defined and tools) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'tool' or (m['tool_calls'] is defined and m['tool_calls'])"
    " -%}{%- set ns0.tools = true -%}{%- endif -%}{%- endfor -%}"
    "{%- if ns0.tools -%}{{ raise_exception('chat format __NAME__ has no tool calls: tools, tool_calls and tool"
    " messages need a v3, tekken or v7 format (a model with the v3 tokenizer or later)') }}{%- endif -%}"
)

_TOOL_RESULTS = {
    JSON_RESULTS: "'[TOOL_RESULTS]{\"content\": ' + json_value(m['content']) + ', \"call_id\": '"
    " + m['tool_call_id']|tojson + '}[/TOOL_RESULTS]'",
    ID_RESULTS: "'[TOOL_RESULTS]' + m['tool_call_id'] + '[TOOL_CONTENT]' + m['content'] + '[/TOOL_RESULTS]'",
}


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
    answer = "content.rstrip(' ')" if fmt.rstrip_answers else "content"
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
        "__TOOL_RESULT__": _TOOL_RESULTS.get(fmt.tool_results, "''"),
        "__NO_TOOLS__": _NO_TOOLS.replace("__NAME__", fmt.name) if fmt.tool_results is None else "",
    }
    text = _JINJA
    for key, value in parts.items():
        text = text.replace(key, value)
    return text
