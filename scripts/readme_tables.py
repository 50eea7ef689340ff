"""Regenerate README.md's recipes and config-groups tables from recipes/ and conf/.

Each row comes from the first comment line of a YAML file, so the tables say what the files say.

    python scripts/readme_tables.py           # print the tables
    python scripts/readme_tables.py --write   # replace them in README.md, between the markers
    python scripts/readme_tables.py --check   # exit 1 if README.md is out of date (the tests run this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def header(path: Path) -> str:
    """First comment line of a YAML file, without the '#'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def recipes_table() -> str:
    rows = ["| recipe | what it does |", "| --- | --- |"]
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        rows.append(f"| `{path.stem}` | {header(path)} |")
    return "\n".join(rows)


PIPELINE_ORDER = ("model", "adapter", "trainer", "data", "launcher", "tracking", "export")


def describe(group: str, path: Path) -> str:
    if group == "model":  # presets: their size and description from presets.py
        sys.path.insert(0, str(ROOT))
        from mistral_tune.models.presets import PRESETS, format_params

        preset = PRESETS.get(path.stem)
        if preset is not None:
            return f"{format_params(preset.parameter_count)}: {preset.description}"
    return header(path)


def groups_table() -> str:
    rows = ["| group | option | what it is |", "| --- | --- | --- |"]
    groups = [p.name for p in (ROOT / "conf").iterdir() if p.is_dir()]
    order = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    for group in sorted(groups, key=lambda g: (order.get(g, len(order)), g)):
        for i, path in enumerate(sorted((ROOT / "conf" / group).glob("*.yaml"))):
            rows.append(f"| {f'`{group}`' if i == 0 else ''} | `{path.stem}` | {describe(group, path)} |")
    return "\n".join(rows)


TABLES = {"recipes": recipes_table, "groups": groups_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the <!-- {name}:begin --> / <!-- {name}:end --> markers")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    if "--write" not in argv and "--check" not in argv:
        print(recipes_table() + "\n\n" + groups_table())
        return 0
    current = README.read_text(encoding="utf-8")
    wanted = render(current)
    if "--write" in argv:
        README.write_text(wanted, encoding="utf-8")
    elif wanted != current:
        print("README.md tables are out of date: run python scripts/readme_tables.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
