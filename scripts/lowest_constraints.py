"""Print a pip constraints file pinning every direct dependency to the lower bound pyproject.toml declares.

``make test-oldest`` installs ``.[dev]`` under these constraints, so the suite runs against the oldest
versions the project claims to support (transitive dependencies resolve normally). Dependencies reached
through ``dev`` (the project's own ``qlora`` and ``deepspeed`` extras, pytest, ruff, hatchling) count too.

    python scripts/lowest_constraints.py [--extra dev] [--exclude torch] > lowest.txt

A requirement without a ``>=`` or ``==`` bound is reported on stderr and left unpinned. ``--exclude``
leaves a package unpinned (torch: CPU machines have only the on-disk 2.13.0 wheel).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*)(?:;(.*))?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds(pyproject: Path, extras: list[str], exclude: set[str]) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    own = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    pins: dict[str, str] = {}
    seen: set[str] = set()

    def add(requirements: list[str]) -> None:
        for requirement in requirements:
            match = REQ.match(requirement)
            if match is None:
                raise SystemExit(f"cannot parse requirement {requirement!r}")
            name, names, specifiers, _marker = match.groups()
            if canonical(name) == own:  # the project's own extras, e.g. mistral-tune[qlora,deepspeed]
                for extra in (names or "").split(","):
                    if extra.strip() and extra.strip() not in seen:
                        seen.add(extra.strip())
                        add(optional[extra.strip()])
                continue
            if canonical(name) in exclude:
                continue
            bound = re.search(r"(?:>=|==)\s*([A-Za-z0-9.!+*-]+)", specifiers)
            if bound is None:
                print(f"lowest_constraints: {requirement!r} has no lower bound; left unpinned", file=sys.stderr)
                continue
            pins[canonical(name)] = bound.group(1)

    add(project.get("dependencies", []))
    for extra in extras:
        seen.add(extra)
        add(optional[extra])
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=None, help="optional-dependency group (default: dev)")
    parser.add_argument("--exclude", action="append", default=[], help="leave this package unpinned")
    args = parser.parse_args()
    pins = lower_bounds(args.pyproject, args.extra or ["dev"], {canonical(n) for n in args.exclude})
    print("# Lowest declared versions of the direct dependencies, from pyproject.toml by scripts/lowest_constraints.py")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
