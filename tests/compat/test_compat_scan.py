"""No library internals outside mistral_tune/compat/: an ``ast`` walk of the package's source.

Flags, naming file:line: (a) ``x._name`` where ``_name`` is a known private of transformers, TRL, PEFT,
accelerate, DeepSpeed or bitsandbytes, or ``x`` is bound to one of those libraries by an import;
(b) ``super()._name(...)`` inside a class that subclasses a library class (or of a known private anywhere),
and ``def _name`` overriding a known private;
(c) ``from lib... import _private`` and imports of known-private modules/functions; (d) class-name string
checks against library classes (``type(m).__name__ == "Linear4bit"``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mistral_tune"
COMPAT = PACKAGE / "compat"

LIBRARIES = ("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes")

# Private attributes of those libraries that mistral-tune has used (or might reach for).
PRIVATE_NAMES = {
    "_save_checkpoint", "_get_output_dir", "_get_grad_norm", "_prepare_dataset", "_precompute_ref_logps",
    "_precompute_model_hash", "_metrics", "_pad_token_tensor", "_attn_implementation",
    "_attn_implementation_internal", "_pre_quantization_dtype", "_from_config", "_tag_names",
    "_maybe_log_save_evaluate", "_load_from_checkpoint", "_load_rng_state", "_wrap_model", "_inner_training_loop",
    "_prepare_inputs", "_compute_loss", "_set_signature_columns_if_needed", "_remove_unused_columns",
    "_get_train_sampler", "_eos_token_tensor", "_bos_token_tensor", "_decoder_start_token_tensor",
    "_prepare_cache_for_generation", "_get_logits_processor", "_get_stopping_criteria",
    "_hf_peft_config_loaded", "_is_quantized", "_validate_launch_command",
}  # fmt: skip

# Modules and functions of those libraries that are not public API, imported by dotted name.
PRIVATE_IMPORTS = {
    "peft.utils.other.get_pattern_key",
    "accelerate.commands.launch.launch_command",
    "accelerate.commands.launch.launch_command_parser",
    "accelerate.commands.launch._validate_launch_command",
    "deepspeed.runtime.zero.partition_parameters",
    "transformers.integrations.mistral.MistralConverter",
}

# Library classes recognised by their name somewhere (the public way is isinstance, in compat).
LIBRARY_CLASS_NAMES = {
    "Linear4bit", "Params4bit", "Linear8bitLt", "Int8Params", "QuantState", "LoraLayer", "PeftModel",
    "DeepSpeedEngine", "DynamicCache", "StaticCache", "GenerationConfig", "PreTrainedModel",
}  # fmt: skip


def is_library(module: str | None) -> bool:
    return bool(module) and (module.split(".")[0] in LIBRARIES or module.startswith("mistral_tune.compat"))


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    tree = ast.parse(source)
    bound: set[str] = set()  # names bound to a library module or an object imported from one
    library_classes: set[str] = set()
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    bound.add(alias.asname or alias.name.split(".")[0])
                if alias.name in PRIVATE_IMPORTS or any(p.startswith("_") for p in alias.name.split(".")):
                    if alias.name.split(".")[0] in LIBRARIES:
                        flag(node, f"import of private {alias.name}")
        elif isinstance(node, ast.ImportFrom) and is_library(node.module):
            private_module = node.module in PRIVATE_IMPORTS or any(p.startswith("_") for p in node.module.split("."))
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                dotted = f"{node.module}.{alias.name}"
                if node.module.startswith("mistral_tune.compat"):
                    library_classes.add(alias.asname or alias.name)
                    continue
                library_classes.add(alias.asname or alias.name)
                if alias.name.startswith("_") or dotted in PRIVATE_IMPORTS or private_module:
                    flag(node, f"import of private {dotted}")

    def is_lib_base(base: ast.expr) -> bool:
        root = base
        while isinstance(root, ast.Attribute):
            root = root.value
        return isinstance(root, ast.Name) and (root.id in library_classes or root.id in bound)

    lib_subclass_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(is_lib_base(b) for b in node.bases):
            lib_subclass_nodes.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            value = node.value
            is_super = isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super"
            if is_super:
                if id(node) in lib_subclass_nodes or node.attr in PRIVATE_NAMES:
                    flag(node, f"super().{node.attr} in a subclass of a library class")
            elif node.attr in PRIVATE_NAMES:
                flag(node, f"library private .{node.attr}")
            elif isinstance(value, ast.Name) and value.id in bound:
                flag(node, f"private {value.id}.{node.attr} of a library")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in PRIVATE_NAMES:
            flag(node, f"def {node.name} overrides a library private (put the override in a compat mixin)")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in PRIVATE_NAMES:
                flag(node, f"{node.func.id}(..., {node.args[1].value!r}) of a library private")
        elif isinstance(node, ast.Compare):
            names = [node.left, *node.comparators]
            reads_name = any(isinstance(n, ast.Attribute) and n.attr in ("__name__", "__qualname__") for n in names)
            constants = [c for n in names for c in ([n] if isinstance(n, ast.Constant) else getattr(n, "elts", []))]
            hits = [c.value for c in constants if isinstance(c, ast.Constant) and c.value in LIBRARY_CLASS_NAMES]
            if reads_name and hits:
                flag(node, f"class-name check against {hits[0]!r} (use an isinstance in mistral_tune/compat/)")
    return sorted(set(found))


def test_no_library_internals_outside_compat():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if COMPAT in path.parents:
            continue
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not found, "library internals outside mistral_tune/compat/ (add an accessor there):\n" + "\n".join(found)


def test_compat_imports_nothing_of_ours_but_core():
    bad = []
    for path in sorted(COMPAT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [
                f"{path.name}:{node.lineno}: {n}"
                for n in names
                if n.startswith("mistral_tune") and not n.startswith(("mistral_tune.core", "mistral_tune.compat"))
            ]
    assert not bad, f"compat is layer 0 and may import only mistral_tune.core: {bad}"


@pytest.mark.parametrize(
    "rule, snippet",
    [
        ("a: known private", "def f(trainer):\n    return trainer._tag_names\n"),
        ("a: known private", "def f(config):\n    return config._eos_token_tensor\n"),
        ("a: known private via getattr", "def f(c):\n    return getattr(c, '_pad_token_tensor')\n"),
        ("a: bound library", "import transformers\nx = transformers._some_private\n"),
        ("a: bound library", "from peft import utils\nx = utils._helper(1)\n"),
        (
            "b: super",
            "from transformers import Trainer\nclass T(Trainer):\n    def f(self):\n        return super()._x()\n",
        ),
        ("b: super", "import trl\nclass T(trl.DPOTrainer):\n    def g(self):\n        return super()._y(1)\n"),
        ("b: super, mixin", "class Mixin:\n    def f(self, m, t):\n        super()._load_rng_state(t)\n"),
        ("b: override", "class Mixin:\n    def _get_grad_norm(self, model, grad_norm=None):\n        return 1\n"),
        ("c: private name", "from transformers.trainer import _is_peft_model\n"),
        ("c: private module", "from transformers.generation._utils import x\n"),
        ("c: known private", "from peft.utils.other import get_pattern_key\n"),
        ("c: known private", "from accelerate.commands.launch import launch_command\n"),
        ("c: known private", "import deepspeed.runtime.zero.partition_parameters\n"),
        ("c: known private", "from transformers.integrations.mistral import MistralConverter\n"),
        ("d: class name", "def f(m):\n    return type(m).__name__ == 'Linear4bit'\n"),
        ("d: class name", "def f(p):\n    return p.__class__.__name__ in ('Params4bit', 'X')\n"),
    ],
)
def test_the_scan_can_fail(rule, snippet):
    found = violations(snippet)
    assert found, f"rule {rule} missed: {snippet}"
    assert all(f.startswith("<snippet>:") for f in found)


@pytest.mark.parametrize(
    "snippet",
    [
        "class Mine:\n    def f(self):\n        return super()._mine()\n",  # our own class, our own private
        "def f(self):\n    return self._bad_step\n",
        "from mistral_tune.compat.transformers import CheckpointHooks\nclass A(CheckpointHooks):\n    pass\n",
        "def f(m):\n    return type(m).__name__ == 'MyThing'\n",
        "from transformers import Trainer\nx = Trainer.train\n",
    ],
)
def test_the_scan_lets_our_own_code_be(snippet):
    assert violations(snippet) == []
