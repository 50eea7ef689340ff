"""``mistral-tune``: compose a recipe with Hydra and run it, or run a subcommand.

Kept free of torch/transformers imports at module level so ``--help`` and ``list`` answer at once.
"""

from __future__ import annotations

import difflib
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional

from .distributed import record_error
from .errors import UserError

PACKAGE_DIR = Path(__file__).parent

USAGE = """\
usage: mistral-tune recipe=NAME [group=option ...] [key=value ...] [--cfg job]
       mistral-tune list
       mistral-tune generate preset=ID_OR_PATH prompt="..." [sampler=greedy max_length=64 ...]
       mistral-tune chat preset=ID_OR_PATH
       mistral-tune bench recipe=NAME [key=value ...] [--steps N] [--warmup N]   (see `mistral-tune bench --help`)
       mistral-tune export run_dir=PATH formats=[merged,preset]   (or adapter=PATH base=PRESET out=DIR)
       mistral-tune score preset=RUN/merged text=TEXT   (rewards from a reward model; score --help)
       mistral-tune --help

Train:      mistral-tune recipe=sft_lora train.max_steps=50 output_dir=runs/x
Swap parts: mistral-tune recipe=sft_lora model=mistral_7b_en adapter=qlora data.path=my.jsonl
Inspect:    mistral-tune recipe=sft_lora --cfg job   (print the resolved config, run nothing)
Generate:   mistral-tune generate preset=runs/x/merged prompt="Hello" sampler=greedy strip_prompt=true
Resume:     mistral-tune recipe=sft_lora output_dir=runs/x resume=auto   (after a crash, kill or preemption)
Size up:    mistral-tune recipe=sft_lora model=mistral_7b_en dry_run=true dry_run_gpu=A100
            (parameters, peak memory per device and step time; no weights, no download)
Track:      mistral-tune recipe=sft_lora tracking=wandb tracking.project=my-project   (or tracking=tensorboard)
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

    from .config import check_values, register_schemas, unknown_keys

    if recipe not in recipes():
        raise unknown_recipe(recipe)
    check_group_options(overrides)
    register_schemas()
    search = f"hydra.searchpath=[file://{config_dir('conf')}]"
    try:
        with initialize_config_dir(config_dir=str(config_dir("recipes")), version_base="1.3"):
            cfg = hydra_compose(config_name=recipe, overrides=[*overrides, search])
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(describe_config_error(exc, overrides, recipe)) from None
    OmegaConf.set_struct(cfg, True)
    if "hydra" in cfg:
        with _open(cfg):
            del cfg["hydra"]
    cfg.recipe = recipe
    extra = unknown_keys(cfg)
    if extra:  # `+key=value` appends past the schema; nothing downstream would read it
        raise UserError(unknown_key_message(extra[0], overrides, recipe))
    try:
        problems = check_values(cfg)
    except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
        raise UserError(describe_config_error(exc, overrides, recipe)) from None
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
    return cfg


def check_group_options(overrides: list[str]) -> None:
    """``group=option`` must name a file of that group: no paths (``model=../../etc/x``) into the filesystem."""
    options = group_options()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and key in options and value not in options[key]:
            close = difflib.get_close_matches(value, options[key], n=1)
            hint = f" Did you mean {key}={close[0]}?" if close else ""
            raise UserError(
                f"Unknown {key} option '{value}' (from command-line override '{override}').{hint} "
                f"Available: {', '.join(options[key])}."
            )


def _open(cfg):
    from omegaconf import open_dict

    return open_dict(cfg)


def key_origin(key: str, overrides: list[str], recipe: Optional[str]) -> str:
    """Where ``key`` was set: a command-line override, the recipe, or the config group file it selects."""
    groups = group_options()
    for o in overrides:
        name = o.lstrip("+~").split("=", 1)[0]
        if name in groups and key != name:
            continue  # `export=none` picked a file; the key itself came from that file
        if name == key or key.startswith(name + ".") or name.startswith(key + "."):
            return f"command-line override '{o}'"
    if recipe is None:
        return "the configuration"
    from omegaconf import OmegaConf

    recipe_file = config_dir("recipes") / f"{recipe}.yaml"
    recipe_cfg = OmegaConf.load(recipe_file)
    if OmegaConf.select(recipe_cfg, key, default=None) is not None or key in recipe_cfg:
        return f"the config file recipes/{recipe}.yaml"
    group = key.split(".", 1)[0]
    for o in overrides:
        if o.startswith(f"{group}="):
            return f"the config file conf/{group}/{o.split('=', 1)[1]}.yaml"
    for entry in recipe_cfg.get("defaults", []):
        if isinstance(entry, (dict,)) or hasattr(entry, "keys"):
            for g, option in entry.items():
                if g == group:
                    return f"the config file conf/{group}/{option}.yaml"
    return f"the config file recipes/{recipe}.yaml or a config group file it selects"


def unknown_key_message(key: str, overrides: list[str], recipe: Optional[str]) -> str:
    from .config import schema_keys

    section = key.rsplit(".", 1)[0] if "." in key else ""
    known = schema_keys()
    # Candidates at the same depth: 'train.max_stpes' -> train.*, 'trackng' -> the top-level names.
    siblings = sorted(
        {
            k[len(section) + 1 :].split(".")[0] if section else k.split(".")[0]
            for k in known
            if not section or k.startswith(section + ".")
        }
    )
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    prefix = f"{section}." if section else ""
    if close:
        hint = f" Did you mean '{prefix}{close[0]}'?"
    else:
        hint = f" Keys {'under ' + repr(section) if section else 'at the top level'}: {', '.join(siblings)}."
    return (
        f"Unknown config key '{key}' (from {key_origin(key, overrides, recipe)}).{hint} "
        "See docs/configuration.md for every key."
    )


def describe_config_error(exc: Exception, overrides: list[str], recipe: Optional[str] = None) -> str:
    """One sentence naming the key and where it came from, without Hydra's search-path dump."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = [exc, exc.__cause__ or exc.__context__]
    inner = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if inner is not None:
        key = inner.full_key
        reason = str(inner).strip().splitlines()[0].strip()  # drops 'full_key: ... reference_type=...' lines
        if isinstance(inner, (ConfigAttributeError, ConfigKeyError)) and "not in" in reason:
            return unknown_key_message(key, overrides, recipe)
        return f"Bad value for config key '{key}' (from {key_origin(key, overrides, recipe)}): {reason}."
    text = str(exc).strip()
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = group_options().get(group, [])
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return (
            f"Unknown {group} option '{option}' (from {key_origin(group, overrides, recipe)}).{hint} "
            f"Available: {', '.join(options) or 'none'}."
        )
    head = text.split("Config search path")[0]
    first = " ".join(line.strip() for line in head.splitlines() if line.strip() and "full_key:" not in line)
    return f"Invalid configuration: {first.rstrip('.')}. See `mistral-tune --help`."


def cmd_train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    recipe, overrides = split_recipe(args)
    show = "--cfg" in overrides  # `--cfg` or Hydra's `--cfg job`: print the config, run nothing
    if show:
        i = overrides.index("--cfg")
        # only a Hydra section name goes with it, never the next override
        del overrides[i : i + (2 if overrides[i + 1 : i + 2] in (["job"], ["hydra"], ["all"]) else 1)]
    if recipe is None:
        raise UserError(
            "No recipe given. Pass recipe=NAME, e.g. `mistral-tune recipe=sft_lora`; see `mistral-tune --help`."
        )
    cfg = compose(recipe, overrides)
    if show:
        print(OmegaConf.to_yaml(cfg, resolve=True))  # the values the run would use
        return 0
    if cfg.dry_run:
        from .dryrun import dry_run

        dry_run(cfg)
        return 0
    from .launch import launch, should_launch

    if should_launch(cfg):  # launcher=ddp|fsdp|deepspeed_*: start the processes, each of which runs below
        return launch(cfg, recipe, overrides)
    from .run import run

    run(cfg)
    return 0


def cmd_generate(args: list[str]) -> int:
    from .generate_cli import cmd_generate as run_generate

    return run_generate(args)


def cmd_chat(args: list[str]) -> int:
    from .generate_cli import cmd_chat as run_chat

    return run_chat(args)


def cmd_bench(args: list[str]) -> int:
    from .benchmark.harness import cmd_bench as run_bench

    return run_bench(args)


def cmd_export(args: list[str]) -> int:
    """Merge/publish a finished run or a saved adapter (mistral_tune/export_command.py)."""
    from .export_command import main as export_main

    return export_main(args)


def cmd_score(args: list[str]) -> int:
    from .reward_scoring import cmd_score as score

    return score(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": cmd_list,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "bench": cmd_bench,
    "export": cmd_export,
    "score": cmd_score,
}


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print_help()
            return 0
        command = COMMANDS.get(args[0])
        return command(args[1:]) if command else cmd_train(args)
    except UserError as exc:
        record_error(exc)  # in a launched process: the launcher shows this rank's error
        from .safety import redact_text

        message = redact_text(str(exc))  # error messages quote config values, which may hold a token
        # No breaks at hyphens: commands like `pip install 'mistral-tune[qlora]'` stay copyable.
        wrapped = textwrap.fill(
            message, width=100, subsequent_indent="       ", break_on_hyphens=False, break_long_words=False
        )
        print("error: " + wrapped, file=sys.stderr)
        return 2
    except Exception as exc:
        record_error(exc)
        from .guards import TrainingInterrupted

        if not isinstance(exc, TrainingInterrupted):
            raise
        print("stopped: " + textwrap.fill(str(exc), width=100, subsequent_indent="         "), file=sys.stderr)
        return exc.exit_code  # 128 + signal number, as a shell reports a signal-terminated job


if __name__ == "__main__":
    sys.exit(main())
