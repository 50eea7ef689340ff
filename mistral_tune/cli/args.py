"""The typed ``key=value`` parser of the generate/chat/score subcommands: unknown keys and bad values
end in one UserError that names each of them.
"""

from __future__ import annotations

from typing import Any

from mistral_tune.core.errors import UserError


def _convert(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"{key}={raw!r} must be true or false.")
    try:
        return kind(raw)
    except ValueError:
        raise UserError(f"{key}={raw!r} must be {'an integer' if kind is int else 'a number'}.") from None


def parse_args(args: list[str], known: dict[str, type], repeatable: tuple[str, ...] = ()) -> dict[str, Any]:
    """key=value arguments; repeatable keys collect lists. Unknown keys and bad values raise UserError."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise UserError(f"Argument {arg!r} is not key=value.")
        if key not in known:
            raise UserError(f"Unknown argument '{key}'. Known: {', '.join(known)}.")
        value = _convert(key, raw, known[key])
        if key in repeatable:
            out.setdefault(key, []).append(value)
        elif key in out:
            raise UserError(f"'{key}' is given twice.")
        else:
            out[key] = value
    if "preset" not in out:
        raise UserError("No preset given. Pass preset=ID_OR_PATH (a built-in id, hf://org/name or a directory).")
    return out
