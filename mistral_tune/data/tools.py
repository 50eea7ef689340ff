"""Function-calling (tool use) conversations: read, check and repair them before they are rendered.

The layout is mistral-finetune's, which is also OpenAI's:

- a row ``{"messages": [...], "tools": [...]}``; each tool ``{"type": "function", "function": {"name",
  "description", "parameters"}}`` (the bare ``{"name", "description", "parameters"}`` is accepted too);
- an assistant message with ``tool_calls``: ``[{"id", "type": "function", "function": {"name",
  "arguments"}}]``, ``arguments`` a JSON object or a string holding one;
- a ``tool`` message per call, with the call's ``tool_call_id`` and the result as ``content``.

Every Mistral format that renders tools (v3, tekken, v7) is validated by mistral-common with tool-call
ids of exactly 9 letters or digits (``MistralRequestValidatorV3``, and ``V5`` for v7), so that rule holds
for all of them. ``fix_tool_call_ids`` replaces bad ids with generated ones (``data.fix_tool_call_ids=true``);
without it a bad id makes the row a ``BadRow("bad_tool_call_id")``.

Stable interface (the data check and ``validate-data`` use it):

- ``fix_tool_call_ids(messages) -> (messages, changed)``;
- ``check_tool_call_ids(messages)`` and ``check_tool_conversation(messages)``: raise ``BadRow`` with a
  reason code (``bad_tool_call_id``, ``bad_tool_call``, ``bad_tools``);
- ``read_tools(value)``, ``read_tool_calls(value, where)``, ``read_tool_result(message, where)``,
  ``read_weight(message, where)``: one field each, normalised, or ``BadRow``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any, Optional

from mistral_tune.core.errors import BadRow

TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # mistral-common's _TOOL_CALL_ID_REGEX (validator V3 and later)
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # mistral-common's rule for function names
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

REASONS = {
    "bad_tool_call_id": "a tool-call id that is not 9 letters/digits, or a tool result naming no call",
    "bad_tool_call": "a tool call or tool result that cannot be rendered (name, arguments, order)",
    "bad_tools": "a 'tools' list that is not a list of functions",
    "bad_weight": "an assistant 'weight' other than 0 or 1",
}


def has_tool_data(row: dict[str, Any]) -> bool:
    """True when a row carries tools, tool calls or tool results (in ``messages``)."""
    if row.get("tools"):
        return True
    messages = row.get("messages")
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)


def read_tools(value: Any) -> list[dict[str, Any]]:
    """The row's ``tools`` as ``[{"type": "function", "function": {"name", "description", "parameters"}}]``
    (key order and defaults as mistral-common renders them: description "", parameters {})."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRow("bad_tools", f"'tools' is a {type(value).__name__}, not a list")
    out = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRow("bad_tools", f"{where} is a {type(tool).__name__}, not an object")
        if tool.get("type", "function") != "function":
            raise BadRow("bad_tools", f"{where}.type={tool.get('type')!r}; only 'function' tools are rendered")
        function = tool.get("function", tool if "name" in tool else None)
        if not isinstance(function, dict):
            raise BadRow("bad_tools", f"{where} has no 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadRow("bad_tools", f"{where}.function.name={name!r} must be 1-64 letters, digits, '_' or '-'")
        description = function.get("description") or ""
        parameters = function.get("parameters") or {}
        if not isinstance(description, str):
            raise BadRow("bad_tools", f"{where}.function.description is a {type(description).__name__}")
        if not isinstance(parameters, dict):
            raise BadRow("bad_tools", f"{where}.function.parameters is a {type(parameters).__name__}, not an object")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                      "parameters": parameters}})  # fmt: skip
    return out


def read_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's ``tool_calls``, each ``{"id", "type": "function", "function": {"name", "arguments"}}``
    with ``arguments`` a dict (a string is parsed; it must hold a JSON object). A missing id is kept as
    ``None`` for ``check_tool_call_ids`` / ``fix_tool_call_ids``."""
    if not isinstance(value, list) or not value:
        raise BadRow("bad_tool_call", f"{where}.tool_calls must be a non-empty list")
    out = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise BadRow("bad_tool_call", f"{at} is a {type(call).__name__}, not an object")
        if call.get("type", "function") != "function":
            raise BadRow("bad_tool_call", f"{at}.type={call.get('type')!r}; only 'function' calls are rendered")
        function = call.get("function")
        if not isinstance(function, dict):
            raise BadRow("bad_tool_call", f"{at} has no 'function' object")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadRow("bad_tool_call", f"{at}.function.name={name!r} must be 1-64 letters, digits, '_' or '-'")
        arguments = function.get("arguments", {})
        if arguments is None:
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise BadRow("bad_tool_call", f"{at}.function.arguments is not valid JSON ({exc.msg})") from exc
        if not isinstance(arguments, dict):
            raise BadRow("bad_tool_call", f"{at}.function.arguments must be a JSON object, got "
                                          f"{type(arguments).__name__}")  # fmt: skip
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            call_id = str(call_id)
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def read_tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``tool`` message as ``{"role": "tool", "content", "tool_call_id"}`` (content: a string; a JSON
    object or list given as such is written as JSON text, as a tool's output would be)."""
    content = message.get("content")
    if isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise BadRow("missing_field", f"{where}.content is a {type(content).__name__}, not a string")
    if not content.strip():
        raise BadRow("empty_field", f"{where}.content is empty")
    call_id = message.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        call_id = str(call_id)
    out = {"role": "tool", "content": content, "tool_call_id": call_id}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def read_weight(message: dict[str, Any], where: str) -> Optional[int]:
    """An assistant message's ``weight``: 0 (not trained) or 1 (trained), None when absent."""
    if "weight" not in message or message["weight"] is None:
        return None
    weight = message["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise BadRow("bad_weight", f"{where}.weight={weight!r}; it must be 0 (skip this turn's loss) or 1 (train it)")
    return int(weight)


def valid_tool_call_id(call_id: Any) -> bool:
    return isinstance(call_id, str) and bool(TOOL_CALL_ID.match(call_id))


def check_tool_call_ids(messages: list[dict[str, Any]]) -> None:
    """Raise ``BadRow("bad_tool_call_id")`` unless every tool call has a 9-character alphanumeric id and
    every tool result names a call of the assistant turn before it."""
    pending: dict[str, int] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "assistant" and m.get("tool_calls"):
            pending = {}
            for j, call in enumerate(m["tool_calls"]):
                call_id = call.get("id") if isinstance(call, dict) else None
                if not valid_tool_call_id(call_id):
                    raise BadRow("bad_tool_call_id", f"messages[{i}].tool_calls[{j}].id={call_id!r} must be exactly "
                                 "9 letters or digits (set data.fix_tool_call_ids=true to generate ids)")  # fmt: skip
                if call_id in pending:
                    raise BadRow("bad_tool_call_id", f"messages[{i}].tool_calls[{j}].id={call_id!r} is used twice")
                pending[call_id] = j
        elif m.get("role") == "assistant":
            pending = {}
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in pending:
                known = ", ".join(pending) or "none"
                raise BadRow("bad_tool_call_id", f"messages[{i}].tool_call_id={call_id!r} answers no tool call of the "
                             f"assistant turn before it (its ids: {known}); set data.fix_tool_call_ids=true to "
                             "pair results with calls in order")  # fmt: skip
            del pending[call_id]


def check_tool_conversation(messages: list[dict[str, Any]]) -> None:
    """Raise ``BadRow`` when a (normalised) conversation's tool calls and results cannot be rendered:
    results without a call before them, more results than calls, or bad ids."""
    expected = 0
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "tool":
            if expected <= 0:
                raise BadRow("bad_tool_call", f"messages[{i}] is a tool result with no unanswered tool call before it")
            expected -= 1
        elif role == "assistant":
            if expected:
                raise BadRow("bad_tool_call", f"messages[{i}]: the {expected} tool call(s) before it have no result "
                             "(each call needs one 'tool' message before the next assistant turn)")  # fmt: skip
            expected = len(m.get("tool_calls") or [])
        elif expected and role == "user":
            raise BadRow("bad_tool_call", f"messages[{i}]: a user turn before the result of the {expected} tool "
                         "call(s) before it")  # fmt: skip
    check_tool_call_ids(messages)


def _generated_id(seed: str, taken: set[str]) -> str:
    """A 9-character id from ``seed``'s SHA-256, not in ``taken`` (deterministic: same data, same ids)."""
    counter = 0
    while True:
        number = int.from_bytes(hashlib.sha256(f"{seed}#{counter}".encode()).digest()[:8], "big")
        chars = []
        for _ in range(9):
            number, k = divmod(number, len(_ALPHABET))
            chars.append(_ALPHABET[k])
        new = "".join(chars)
        if new not in taken:
            return new
        counter += 1


def fix_tool_call_ids(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """A copy of ``messages`` whose tool-call ids are all valid, and how many id fields were changed.

    Valid, unique ids are kept. Every other call id (missing, wrong length, ``call_1``, a duplicate) is
    replaced by one generated from the conversation's text and the call's position, so the same data
    always gets the same ids. Each ``tool`` message after an assistant turn gets the new id of the call
    it names; one naming no call of that turn (or none) is paired with the first call still unanswered,
    in order. The count covers calls' ``id`` and tool messages' ``tool_call_id`` fields alike.
    Works on raw rows' messages (mistral-finetune/OpenAI layout) as well as normalised ones.
    """
    out = copy.deepcopy(messages)
    seed = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    taken = {
        c.get("id")
        for m in out if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
        for c in m["tool_calls"] if isinstance(c, dict) and valid_tool_call_id(c.get("id"))
    }  # fmt: skip
    changed = 0
    renamed: dict[Any, str] = {}  # this turn's old id -> new id
    unanswered: list[str] = []
    for i, m in enumerate(out):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "assistant":
            renamed, unanswered, seen = {}, [], set()
            for j, call in enumerate(m.get("tool_calls") or []):
                if not isinstance(call, dict):
                    continue
                old = call.get("id")
                if valid_tool_call_id(old) and old not in seen:
                    new = old
                else:
                    new = _generated_id(f"{seed}:{i}:{j}:{old}", taken)
                    taken.add(new)
                    call["id"] = new
                    changed += 1
                seen.add(new)
                if old not in renamed:
                    renamed[old] = new
                unanswered.append(new)
        elif m.get("role") == "tool":
            old = m.get("tool_call_id")
            new = renamed.get(old) if renamed.get(old) in unanswered else None
            if new is None and unanswered:
                new = unanswered[0]
            if new is None:
                continue  # a result with no call to pair it with: check_tool_conversation reports it
            unanswered.remove(new)
            if new != old:
                m["tool_call_id"] = new
                changed += 1
    return out, changed
