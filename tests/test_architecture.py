"""The package's shape: imports only point down the pipeline's layers, no module imports itself in a
circle, nothing imports the CLI, and each subpackage's place is written down once (LAYERS)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mistral_tune"

# Lower numbers are lower layers; a module may import its own subpackage or any lower layer.
LAYERS = {
    "core": 0,
    "compat": 0,
    "config": 1,
    "models": 2,
    "adapters": 3,
    "data": 3,
    "tracking": 3,
    "inference": 4,
    "launch": 4,
    "train": 5,
    "export": 6,
    "evaluation": 7,
    "pipeline": 8,
    "api": 9,
    "benchmark": 9,
    "cli": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = PACKAGE.parent / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every mistral_tune module this file imports, at module level or inside functions."""
    found: set[str] = set()
    me = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mistral_tune"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mistral_tune"))
    return {m for m in found if is_module(m) and m != me}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages <= set(LAYERS), f"add {sorted(subpackages - set(LAYERS))} to LAYERS"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside any subpackage: {loose}"


def test_imports_only_point_down():
    upward = [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if layer(a) and layer(b) and layer(a) != layer(b) and LAYERS[layer(b)] >= LAYERS[layer(a)]
    ]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_nothing_imports_the_cli():
    users = sorted(a for a, targets in GRAPH.items() if layer(a) != "cli" and any(layer(b) == "cli" for b in targets))
    users = [u for u in users if u != "mistral_tune.__main__"]
    assert not users, f"modules importing mistral_tune.cli: {users}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    # A package imports its own __init__ implicitly; those edges are not cycles of ours.
    graph = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, expected",
    [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]), ({"a": {"b"}, "b": set()}, None)],
)
def test_the_cycle_finder_can_fail(graph, expected):
    assert find_cycle(graph) == expected
