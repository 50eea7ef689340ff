"""``mistral-tune list``: recipes, built-in presets with their sizes, and every config group's options."""

from __future__ import annotations

from mistral_tune.config.compose import group_options, recipe_summary, recipes


def cmd_list(args: list[str]) -> int:
    from mistral_tune.models.presets import PRESETS, format_params

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
