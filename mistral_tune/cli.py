"""``mistral-tune``: compose a recipe with Hydra and run it, or run a subcommand.

Kept free of torch/transformers imports at module level so ``--help`` and ``list`` answer at once.
"""

from __future__ import annotations

import difflib
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

PACKAGE_DIR = Path(__file__).parent

USAGE = """\
usage: mistral-tune recipe=NAME [group=option ...] [key=value ...] [--cfg job]
       mistral-tune list
       mistral-tune bench recipe=NAME [key=value ...] [--steps N] [--warmup N]   (see `mistral-tune bench --help`)
       mistral-tune --help

Train:      mistral-tune recipe=sft_lora train.max_steps=50 output_dir=runs/x
Swap parts: mistral-tune recipe=sft_lora model=mistral_7b_en adapter=qlora data.path=my.jsonl
Inspect:    mistral-tune recipe=sft_lora --cfg job   (print the resolved config, run nothing)
"""


def config_dir(name: str) -> Path:
    """``recipes``/``conf``: inside the installed wheel, else the source checkout's top level."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"mistral-tune is installed without its {name}/ directory")


def recipes() -> list[str]:
    return sorted(p.stem for p in config_dir("recipes").glob("*.yaml"))


def group_options() -> dict[str, list[str]]:
    conf = config_dir("conf")
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf.iterdir()) if d.is_dir()}


def recipe_summary(name: str) -> str:
    """First line of the recipe's header comment."""
    for line in (config_dir("recipes") / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def print_help() -> None:
    print(USAGE)
    print("recipes:")
    for name in recipes():
        print(f"  {name:<14} {recipe_summary(name)}")
    print("\nconfig groups (group=option):")
    for group, options in group_options().items():
        print(f"  {group:<10} {', '.join(options)}")
    print("\nSee `mistral-tune list` for presets and sizes, and docs/configuration.md for every key.")


def cmd_list(args: list[str]) -> int:
    from .presets import PRESETS, format_params

    print("recipes:")
    for name in recipes():
        print(f"  {name:<14} {recipe_summary(name)}")
    print("\npresets:")
    for p in PRESETS.values():
        print(f"  {p.id:<28} {format_params(p.parameter_count):>8}  {p.description}")
    print("\nconfig groups:")
    for group, options in group_options().items():
        print(f"  {group:<10} {', '.join(options)}")
    return 0


def split_recipe(args: list[str]) -> tuple[Optional[str], list[str]]:
    recipe, rest = None, []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return recipe, rest


def unknown_recipe(name: str) -> UserError:
    known = recipes()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean recipe={close[0]}?" if close else ""
    return UserError(f"Unknown recipe '{name}'.{hint} Available: {', '.join(known)}.")


def compose(recipe: str, overrides: list[str]):
    """Compose and validate a recipe; every config problem becomes one UserError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import check_values, register_schemas

    if recipe not in recipes():
        raise unknown_recipe(recipe)
    register_schemas()
    search = f"hydra.searchpath=[file://{config_dir('conf')}]"
    try:
        with initialize_config_dir(config_dir=str(config_dir("recipes")), version_base="1.3"):
            cfg = hydra_compose(config_name=recipe, overrides=[*overrides, search])
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(describe_config_error(exc, overrides)) from None
    OmegaConf.set_struct(cfg, True)
    if "hydra" in cfg:
        with _open(cfg):
            del cfg["hydra"]
    cfg.recipe = recipe
    problems = check_values(cfg)
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
    return cfg


def _open(cfg):
    from omegaconf import open_dict

    return open_dict(cfg)


def describe_config_error(exc: Exception, overrides: list[str]) -> str:
    """Name the key and where it came from (a command-line override or a config file)."""
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    full_key = getattr(exc, "full_key", None) or getattr(cause, "full_key", None)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    if full_key:
        from_cli = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key]
        origin = f"command-line override '{from_cli[0]}'" if from_cli else "a config file"
        detail = f" ({cause})" if cause and str(cause) not in head else ""
        return f"Invalid config key '{full_key}' from {origin}: {head}{detail}. See `mistral-tune --help`."
    return f"Invalid configuration: {' '.join(lines)}. See `mistral-tune --help`."


def cmd_train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    recipe, overrides = split_recipe(args)
    show = None
    if "--cfg" in overrides:
        i = overrides.index("--cfg")
        show = overrides[i + 1] if i + 1 < len(overrides) else "job"
        del overrides[i : i + 2]
    if recipe is None:
        raise UserError(
            "No recipe given. Pass recipe=NAME, e.g. `mistral-tune recipe=sft_lora`; see `mistral-tune --help`."
        )
    cfg = compose(recipe, overrides)
    if show is not None:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from .run import run

    run(cfg)
    return 0


def cmd_bench(args: list[str]) -> int:
    from .benchmark.harness import cmd_bench as run_bench

    return run_bench(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"list": cmd_list, "bench": cmd_bench}


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print_help()
            return 0
        command = COMMANDS.get(args[0])
        return command(args[1:]) if command else cmd_train(args)
    except UserError as exc:
        print("error: " + textwrap.fill(str(exc), width=100, subsequent_indent="       "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
