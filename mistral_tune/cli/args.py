"""The one typed argument parser of every subcommand (generate, chat, score, export, bench).

A subcommand declares its keys once, as :class:`Key` rows of a :class:`Command`; the same declaration
parses ``key=value`` (and ``--flag VALUE``) arguments and renders ``--help``. Values are typed (str,
int, float, bool, list as ``[a,b]``), keys may repeat or be limited to choices, and every bad
argument of a command line is reported in one UserError: unknown keys with a close-match suggestion,
bad values naming the expected type, missing required keys.

Recipe arguments (``recipe=...`` and Hydra overrides) are not parsed here: Hydra composes them, and a
command that takes them (``bench``) passes them through untouched.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_tune.core.errors import UserError

NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list [a,b]"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class Key:
    """One argument of a subcommand.

    ``flag`` keys are spelled ``--name VALUE`` (``--name=VALUE``; a bool flag takes no value), the
    others ``name=VALUE``. ``required`` is the message shown when the key is missing. A list key takes
    ``[a,b]`` (or ``a,b``) and checks each item against ``choices``.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    required: Optional[str] = None
    flag: bool = False
    metavar: str = ""

    @property
    def spelling(self) -> str:
        """How the key is written on the command line: ``name`` or ``--name``."""
        return "--" + self.name.replace("_", "-") if self.flag else self.name

    @property
    def label(self) -> str:
        """The key as the help table shows it (``--steps N`` for a flag that takes a value)."""
        if self.flag and self.type is not bool:
            return f"{self.spelling} {self.metavar or 'N'}"
        return self.spelling


@dataclass(frozen=True)
class Command:
    """A subcommand's declaration: its keys (in help order) and the text around the key table."""

    name: str
    usage: str
    keys: tuple[Key, ...]
    description: str = ""
    epilog: str = ""
    noun: str = "argument"  # what an unknown key is called: "Unknown argument 'colour'"
    sections: tuple[tuple[str, "Command"], ...] = field(default=())  # more key tables for --help

    def key(self, token: str) -> Optional[Key]:
        """The declared key a token names (``name=...``, ``--name`` or ``--name=...``), or None."""
        name = token.partition("=")[0]
        return next((k for k in self.keys if k.spelling == name), None)

    def collect(self, args: list[str]) -> tuple[dict[str, Any], list[str]]:
        """``(values, problems)``: every declared key (None when not given and without a default)
        and a sentence per bad argument. :meth:`parse` raises them; bench combines several."""
        given: dict[str, Any] = {}
        problems: list[str] = []
        unknown: list[tuple[str, str]] = []  # (argument, key)
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            name, sep, raw = arg.partition("=")
            key = self.key(arg)
            if key is None:
                if not sep and not arg.startswith("-"):
                    problems.append(f"Argument {arg!r} is not key=value.")
                    continue
                if arg.startswith("-") and not sep and i < len(args) and not args[i].startswith("-"):
                    if "=" not in args[i]:  # `--unknown VALUE`: the value goes with it
                        arg, i = f"{arg} {args[i]}", i + 1
                unknown.append((arg, name))
                continue
            if key.flag and not sep:
                if key.type is bool:
                    raw = "true"
                elif i < len(args):
                    raw, i = args[i], i + 1
                    arg = f"{name} {raw}"
                else:
                    problems.append(f"{name} needs a value. See `mistral-tune {self.name} --help`.")
                    continue
            elif not sep:
                problems.append(f"Argument {arg!r} is not key=value.")
                continue
            try:
                value = convert(key, raw)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if key.repeatable:
                given.setdefault(key.name, []).append(value)
            elif key.name in given:
                problems.append(f"'{key.spelling}' is given twice.")
            else:
                given[key.name] = value
        if unknown:
            problems.insert(0, self._unknown(unknown))
        for key in self.keys:
            if key.required and key.name not in given:
                problems.append(key.required)
        values = {k.name: ([] if k.repeatable else k.default) for k in self.keys}
        return {**values, **given}, problems

    def _unknown(self, unknown: list[tuple[str, str]]) -> str:
        names = [k.spelling for k in self.keys]
        lines = [f"unknown {self.noun}(s) {', '.join(arg for arg, _ in unknown)}."]
        for _, name in unknown:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f": did you mean '{close[0]}'?" if close else "."
            lines.append(f"Unknown {self.noun} '{name}'{hint}")
        lines.append(f"Known: {', '.join(names)}.")
        return " ".join(lines)

    def parse(self, args: list[str]) -> dict[str, Any]:
        """Typed values of every declared key; one UserError naming every bad argument."""
        values, problems = self.collect(args)
        if problems:
            raise self.error(problems)
        return values

    def error(self, problems: list[str]) -> UserError:
        return UserError(f"mistral-tune {self.name}: {' '.join(problems)} See `mistral-tune {self.name} --help`.")

    def table(self) -> str:
        """The key table: one line per key; consecutive keys with the same help share a line."""
        rows: list[tuple[list[str], Key]] = []
        for key in self.keys:
            if rows and key.help == rows[-1][1].help and "\n" not in key.help:
                rows[-1][0].append(key.label)
            else:
                rows.append(([key.label], key))
        lines = []
        for labels, key in rows:
            label = ", ".join(labels)
            text = key.help.replace("\n", "\n" + " " * 18)
            lines.append(f"  {label:<15} {text}" if len(label) < 15 else f"  {label}   {text}")
        return "\n".join(lines)

    def help(self) -> str:
        """``--help``: the usage lines, the description, the key tables, the examples."""
        parts = [self.usage.rstrip("\n")]
        if self.description:
            parts.append(self.description.rstrip("\n"))
        parts.append(self.table())
        for title, other in self.sections:
            parts.append(f"{title}\n{other.table()}")
        if self.epilog:
            parts.append(self.epilog.rstrip("\n"))
        return "\n\n".join(parts) + "\n"


def convert(key: Key, raw: str) -> Any:
    """``raw`` as ``key.type``; a ValueError says what was expected."""
    kind, spelled = key.type, key.spelling
    if kind is bool:
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise ValueError(f"{spelled}={raw!r} must be true or false.")
    if kind is list:
        value: Any = [item.strip() for item in raw.strip().removeprefix("[").removesuffix("]").split(",")]
        value = [item for item in value if item]
    else:
        try:
            value = kind(raw)
        except ValueError:
            noun = NOUNS.get(kind, kind.__name__)
            raise ValueError(
                f"{spelled}={raw!r} must be {noun} ({spelled}= takes {noun}; {raw!r} is not a valid {kind.__name__})."
            ) from None
    if key.choices:
        bad = [item for item in (value if kind is list else [value]) if item not in key.choices]
        if bad:
            close = difflib.get_close_matches(bad[0], key.choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{spelled}: {', '.join(map(str, bad))} not one of {', '.join(key.choices)}{hint}.")
    return value


def run_help(command: Command, args: list[str], bare: bool = True) -> bool:
    """Print ``command``'s help if ``args`` ask for it (or are empty and ``bare``); True when printed."""
    if (not args and bare) or (args and args[0] in ("-h", "--help", "help")):
        print(command.help(), end="")
        return True
    return False
