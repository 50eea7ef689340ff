"""Chat message lists, read field by field: the ``{"role", "content"}`` layout and ShareGPT's ``{"from", "value"}``.

A row that cannot be used raises ``BadRow`` with a reason (the ``DataReport.dropped`` key) and a detail that
names the field that failed, e.g. ``messages[0] has no 'role'; found keys from, value``.
"""

from __future__ import annotations

from typing import Any

from mistral_tune.core.errors import BadRow as BadRow  # re-exported: data modules import it from here
from mistral_tune.data.tools import read_tool_calls, read_tool_result, read_weight

# ShareGPT speakers (as axolotl and LLaMA-Factory read them) -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_messages(value: Any, name: str = "messages", sharegpt: bool = False) -> list[dict[str, Any]]:
    """``value`` as ``[{"role", "content"}]``; ``sharegpt`` reads ``from``/``value`` and maps the speakers.

    In the ``role``/``content`` layout an assistant message may carry ``weight`` (0: its loss is skipped,
    1: trained) and ``tool_calls``, and ``tool`` messages carry results (see mistral_tune.data.tools).

    >>> read_messages([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "conversations", True)
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if value is None:
        raise BadRow("missing_field", f"no '{name}'")
    if not isinstance(value, list):
        raise BadRow("missing_field", f"'{name}' is a {type(value).__name__}, not a list of messages")
    if not value:
        raise BadRow("no_assistant_turn", f"'{name}' is an empty list")  # counted as in docs/reliability.md
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise BadRow("missing_field", f"{where} is a {type(m).__name__}, not an object")
        if not sharegpt and (m.get("role") == "tool" or (m.get("role") == "assistant" and m.get("tool_calls"))):
            out.append(_read_tool_message(m, where))
            continue
        for key in (role_key, content_key):
            if key not in m:
                hint = ""
                if not sharegpt and {"from", "value"} <= set(m):
                    hint = " (that is ShareGPT's layout: name the column 'conversations', or set data.format=sharegpt)"
                raise BadRow("missing_field", f"{where} has no '{key}'; found keys {', '.join(sorted(m))}{hint}")
            if not isinstance(m[key], str):
                raise BadRow("missing_field", f"{where}.{key} is a {type(m[key]).__name__}, not a string")
        role, content = m[role_key], m[content_key]
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise BadRow("bad_roles", f"{where}.from={role!r} is not one of {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        if not content.strip():
            raise BadRow("empty_field", f"{where}.{content_key} is empty")
        message = {"role": role, "content": content}
        if role == "assistant":  # "weight" as mistral-finetune (and axolotl's ShareGPT) write it
            _add_weight(message, m, where)
        out.append(message)
    return out


def _add_weight(message: dict[str, Any], raw: dict[str, Any], where: str) -> None:
    weight = read_weight(raw, where)
    if weight is not None:
        message["weight"] = weight


def _read_tool_message(m: dict[str, Any], where: str) -> dict[str, Any]:
    """An assistant turn with ``tool_calls`` or a ``tool`` result (mistral_tune.data.tools)."""
    if m["role"] == "tool":
        return read_tool_result(m, where)
    content = m.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRow("missing_field", f"{where}.content is a {type(content).__name__}, not a string")
    message = {"role": "assistant", "content": content, "tool_calls": read_tool_calls(m["tool_calls"], where)}
    _add_weight(message, m, where)
    return message
