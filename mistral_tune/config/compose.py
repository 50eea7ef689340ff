"""Compose a recipe with Hydra's compose API and validate it; every config problem becomes one UserError
that names the key and where it came from (recipe file, config group file or command-line override).

Example::

    cfg = compose("sft_lora", ["train.max_steps=5"])
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Optional

from mistral_tune.core.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mistral_tune/


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

    from mistral_tune.config.schema import check_values, register_schemas, schema_trainer_name, unknown_keys

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
        trainer = schema_trainer_name(cfg.trainer)
        raise UserError(unknown_key_message(extra[0], overrides, recipe, trainer=trainer))
    try:
        problems = check_values(cfg)
    except OmegaConfBaseException as exc:  # e.g. an interpolation that does not resolve
        raise UserError(describe_config_error(exc, overrides, recipe)) from None
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
    return cfg


# Removed options and keys, with what replaces them (one clear error instead of "unknown option").
REMOVED = {
    ("export", "adapter_only"): "export=adapter_only was removed: it wrote exactly what export=none writes "
    "(adapter/ with its README.md model card, samples.jsonl, no merged weights). Use export=none, and merge later "
    "with `mistral-tune export run_dir=RUN formats=[merged]`",
    ("export.adapter_only", None): "export.adapter_only was removed with export=adapter_only, which wrote exactly "
    "what export=none writes. Use export=none (or export.merged=false)",
}


def check_group_options(overrides: list[str]) -> None:
    """``group=option`` must name a file of that group: no paths (``model=../../etc/x``) into the filesystem."""
    options = group_options()
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        removed = REMOVED.get((key, value if sep else None)) or REMOVED.get((key, None))
        if removed:
            raise UserError(f"{removed} (from command-line override '{override}').")
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


def unknown_key_message(key: str, overrides: list[str], recipe: Optional[str], trainer: Optional[str] = None) -> str:
    """``trainer``: the trainer whose schema refused the key (each trainer has its own, TRL's names)."""
    from mistral_tune.config.schema import renamed_key_message, schema_keys, trainers_with_key

    origin = key_origin(key, overrides, recipe)
    renamed = renamed_key_message(key, origin)
    if renamed:
        return renamed
    section = key.rsplit(".", 1)[0] if "." in key else ""
    if section == "trainer" and trainer:
        owners = [t for t in trainers_with_key(key.split(".", 1)[1]) if t != trainer]
        if owners:
            return (
                f"Config key '{key}' (from {origin}) is a key of trainer={' and trainer='.join(owners)}; "
                f"trainer={trainer} has no such key. See docs/configuration.md for each trainer's keys."
            )
    known = schema_keys(trainer=trainer)
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
    return f"Unknown config key '{key}' (from {origin}).{hint} See docs/configuration.md for every key."


def schema_trainer(exc: Exception) -> Optional[str]:
    """The trainer whose schema raised ``exc`` (OmegaConf names the dataclass), else None."""
    from mistral_tune.config.schema import TRAINER_SCHEMAS

    object_type = getattr(exc, "object_type", None)
    return next((name for name, node in TRAINER_SCHEMAS.items() if node is object_type), None)


def source_entry_error(inner: Exception, overrides: list[str], recipe: Optional[str]) -> Optional[str]:
    """A bad key or value inside a ``data.sources`` entry (OmegaConf names only the entry's own key)."""
    import dataclasses

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from mistral_tune.config.schema import SourceConfig

    if getattr(inner, "object_type", None) is not SourceConfig:
        return None
    key = str(inner.full_key).rsplit(".", 1)[-1]
    keys = ", ".join(f.name for f in dataclasses.fields(SourceConfig))
    origin = key_origin("data.sources", overrides, recipe)
    reason = str(inner).strip().splitlines()[0].strip()
    if isinstance(inner, (ConfigAttributeError, ConfigKeyError)) and "not in" in reason:
        return f"Unknown key '{key}' in a data.sources entry (from {origin}); an entry has {keys}."
    return f"Bad value for '{key}' in a data.sources entry (from {origin}): {reason}."


def describe_config_error(exc: Exception, overrides: list[str], recipe: Optional[str] = None) -> str:
    """One sentence naming the key and where it came from, without Hydra's search-path dump."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = [exc, exc.__cause__ or exc.__context__]
    inner = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if inner is not None:
        key = inner.full_key
        source = source_entry_error(inner, overrides, recipe)
        if source:
            return source
        reason = str(inner).strip().splitlines()[0].strip()  # drops 'full_key: ... reference_type=...' lines
        if isinstance(inner, (ConfigAttributeError, ConfigKeyError)) and "not in" in reason:
            return unknown_key_message(key, overrides, recipe, trainer=schema_trainer(inner))
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
    odd = [o for o in overrides if not o.isascii() and "LexerNoViableAlt" in text]
    if odd:  # Hydra's override grammar takes unquoted values in ASCII only
        key, _, value = odd[0].partition("=")
        return (
            f"Invalid configuration: the override {odd[0]!r} has non-ASCII characters, which Hydra reads only inside "
            f"quotes. Quote the value, e.g. {key}='\"{value}\"' in a shell (single quotes around double quotes)."
        )
    return f"Invalid configuration: {first.rstrip('.')}. See `mistral-tune --help`."
