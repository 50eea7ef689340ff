"""The fixable problems of a chat row, fixed: what ``mistral-tune validate-data --write-corrected`` applies.

Each fix has a name (counted and printed by validate-data); a row is returned unchanged (the same object)
when nothing applies. Whether the fixed row is then usable is decided by the training data path itself
(``mistral_tune.data.sft``), never here.

- ``roles_normalised``: a role (``from`` in ShareGPT rows) written with capitals or spaces, or spelled as
  ShareGPT's speakers (``human``, ``gpt``) in a ``messages`` row, becomes its chat role.
- ``trailing_user_turns_dropped``: user turns after the last assistant turn are removed (a conversation
  must end on the turn the model learns); a row with no assistant turn is left as it is.
- ``tool_call_ids_generated``: tool-call ids the chat formats cannot use (mistral-common wants 9 letters
  or digits) are replaced, and the ``tool`` messages answering them follow
  (``mistral_tune.data.tools.fix_tool_call_ids``, what ``data.fix_tool_call_ids=true`` does in training).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mistral_tune.data.messages import SHAREGPT_ROLES
from mistral_tune.data.tools import fix_tool_call_ids, has_tool_data

CHAT_FIELDS = {"messages": ("messages", "role"), "sharegpt": ("conversations", "from")}


def correct_row(row: dict[str, Any], fmt: str) -> tuple[dict[str, Any], Counter]:
    """``(row with its fixable problems fixed, Counter of the fixes applied)``; alpaca and text rows have none."""
    fixes: Counter = Counter()
    if fmt not in CHAT_FIELDS or not isinstance(row.get(CHAT_FIELDS[fmt][0]), list):
        return row, fixes
    field, role_key = CHAT_FIELDS[fmt]
    messages = [dict(m) if isinstance(m, dict) else m for m in row[field]]  # the caller's row stays as it was
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get(role_key), str):
            role = normal_role(m[role_key], sharegpt=fmt == "sharegpt")
            if role != m[role_key]:
                m[role_key] = role
                fixes["roles_normalised"] += 1
    roles = [m.get(role_key) if isinstance(m, dict) else None for m in messages]
    assistant = ("gpt", "assistant") if fmt == "sharegpt" else ("assistant",)
    user = ("human", "user") if fmt == "sharegpt" else ("user",)
    answers = [i for i, r in enumerate(roles) if r in assistant]
    if answers:
        last = answers[-1]
        trailing = roles[last + 1 :]
        if trailing and all(r in user for r in trailing):
            del messages[last + 1 :]
            fixes["trailing_user_turns_dropped"] += 1
    if fmt == "messages" and has_tool_data(row):
        messages, changed = fix_tool_call_ids(messages)
        if changed:
            fixes["tool_call_ids_generated"] += changed
    if not fixes:
        return row, fixes
    return {**row, field: messages}, fixes


def normal_role(role: str, sharegpt: bool) -> str:
    """``role`` as the format spells it: ``" User"`` -> ``"user"``; ``"human"``/``"gpt"`` -> ``"user"``/
    ``"assistant"`` in a messages row; in a ShareGPT row the speaker names stay (``"Human"`` -> ``"human"``)."""
    name = role.strip().lower()
    if sharegpt:
        return name if name in SHAREGPT_ROLES else role
    if name in SHAREGPT_ROLES:
        return SHAREGPT_ROLES[name]
    return name if name == "tool" else role
