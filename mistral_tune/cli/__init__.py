"""``mistral-tune``: compose a recipe with Hydra and run it, or run a subcommand.

Kept free of torch/transformers imports at module level so ``--help`` and ``list`` answer at once.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Callable, Optional

from mistral_tune.cli.catalog import cmd_list
from mistral_tune.cli.train import cmd_train
from mistral_tune.config.compose import group_options, recipe_summary, recipes
from mistral_tune.core.errors import UserError
from mistral_tune.core.process import record_error

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


def print_help() -> None:
    print(USAGE)
    print("recipes:")
    for name in recipes():
        print(f"  {name:<14} {recipe_summary(name)}")
    print("\nconfig groups (group=option):")
    for group, options in group_options().items():
        print(f"  {group:<10} {', '.join(options)}")
    print("\nSee `mistral-tune list` for presets and sizes, and docs/configuration.md for every key.")


def cmd_generate(args: list[str]) -> int:
    from mistral_tune.cli.generate import cmd_generate as run_generate

    return run_generate(args)


def cmd_chat(args: list[str]) -> int:
    from mistral_tune.cli.generate import cmd_chat as run_chat

    return run_chat(args)


def cmd_bench(args: list[str]) -> int:
    from mistral_tune.cli.bench import cmd_bench as run_bench

    return run_bench(args)


def cmd_export(args: list[str]) -> int:
    """Merge/publish a finished run or a saved adapter (mistral_tune/export_command.py)."""
    from mistral_tune.cli.export import main as export_main

    return export_main(args)


def cmd_score(args: list[str]) -> int:
    from mistral_tune.cli.score import cmd_score as score

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
        from mistral_tune.core.redaction import redact_text

        message = redact_text(str(exc))  # error messages quote config values, which may hold a token
        # No breaks at hyphens: commands like `pip install 'mistral-tune[qlora]'` stay copyable.
        wrapped = textwrap.fill(
            message, width=100, subsequent_indent="       ", break_on_hyphens=False, break_long_words=False
        )
        print("error: " + wrapped, file=sys.stderr)
        return 2
    except Exception as exc:
        record_error(exc)
        from mistral_tune.train.signals import TrainingInterrupted

        if not isinstance(exc, TrainingInterrupted):
            raise
        print("stopped: " + textwrap.fill(str(exc), width=100, subsequent_indent="         "), file=sys.stderr)
        return exc.exit_code  # 128 + signal number, as a shell reports a signal-terminated job


if __name__ == "__main__":
    sys.exit(main())
