"""``mistral-tune list``: recipes, built-in presets with their sizes, and every config group's options.

:func:`print_catalog` is also the listing under ``mistral-tune --help`` (without the presets).
"""

from __future__ import annotations

from mistral_tune.config.compose import group_options, recipe_summary, recipes


def print_catalog(presets: bool = True) -> None:
    """The recipes, the built-in presets with their sizes (``presets``) and the config groups' options."""
    print("recipes:")
    for name in recipes():
        print(f"  {name:<14} {recipe_summary(name)}")
    if presets:
        from mistral_tune.models.presets import PRESETS, format_params

        print("\npresets:")
        for p in PRESETS.values():
            print(f"  {p.id:<32} {format_params(p.parameter_count):>8}  {p.description}")
    print("\nconfig groups (group=option):")
    for group, options in group_options().items():
        print(f"  {group:<10} {', '.join(options)}")


def cmd_list(args: list[str]) -> int:
    print_catalog()
    return 0
