"""``mistral-tune``: compose a recipe with Hydra and run it, or run a subcommand.

Kept free of torch/transformers imports at module level so ``--help`` and ``list`` answer at once.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from typing import Callable, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.core.process import record_error

USAGE = """\
usage: mistral-tune recipe=NAME [group=option ...] [key=value ...] [--cfg job]
       mistral-tune list
       mistral-tune generate preset=ID_OR_PATH prompt="..." [sampler=greedy max_length=64 ...]
       mistral-tune chat preset=ID_OR_PATH
       mistral-tune bench recipe=NAME [key=value ...] [--steps N] [--warmup N]   (see `mistral-tune bench --help`)
       mistral-tune export run_dir=PATH formats=[merged,preset,gguf]   (or adapter=PATH base=PRESET out=DIR)
       mistral-tune score preset=RUN/merged text=TEXT   (rewards from a reward model; score --help)
       mistral-tune eval preset=RUN tasks=[mistral_tune_mc,mistral_tune_ppl]   (lm-evaluation-harness; eval --help)
       mistral-tune validate-data recipe=NAME [key=value ...] [--write-corrected OUT]   (or check; --help)
       mistral-tune --help

Train:      mistral-tune recipe=sft_lora train.max_steps=50 output_dir=runs/x
Swap parts: mistral-tune recipe=sft_lora model=mistral_7b_en adapter=qlora data.path=my.jsonl
Inspect:    mistral-tune recipe=sft_lora --cfg job   (print the resolved config, run nothing)
Generate:   mistral-tune generate preset=runs/x/merged prompt="Hello" sampler=greedy strip_prompt=true
Resume:     mistral-tune recipe=sft_lora output_dir=runs/x resume=auto   (after a crash, kill or preemption)
Size up:    mistral-tune recipe=sft_lora model=mistral_7b_en dry_run=true dry_run_gpu=A100
            (parameters, peak memory per device and step time; no weights, no download)
Check data: mistral-tune validate-data recipe=sft_lora data.path=my.jsonl
            (every bad line as file:line, tokens, lengths, truncation, epochs, ETA; no model built)
Track:      mistral-tune recipe=sft_lora tracking=wandb tracking.project=my-project   (or tracking=tensorboard)
"""


def print_help() -> None:
    from mistral_tune.cli.catalog import print_catalog

    print(USAGE)
    print_catalog(presets=False)
    print("\nSee `mistral-tune list` for presets and sizes, and docs/configuration.md for every key.")


# Every subcommand: (module, function); imported only when run, so this module stays torch-free.
# An argument list that names none of them is a recipe run (mistral_tune.cli.train).
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("mistral_tune.cli.catalog", "cmd_list"),
    "generate": ("mistral_tune.cli.generate", "cmd_generate"),
    "chat": ("mistral_tune.cli.generate", "cmd_chat"),
    "bench": ("mistral_tune.cli.bench", "cmd_bench"),
    "export": ("mistral_tune.cli.export", "main"),
    "eval": ("mistral_tune.cli.eval", "main"),
    "score": ("mistral_tune.cli.score", "cmd_score"),
    "validate-data": ("mistral_tune.cli.validate", "cmd_validate"),
    "check": ("mistral_tune.cli.validate", "cmd_validate"),
}
TRAIN = ("mistral_tune.cli.train", "cmd_train")


def command(name: str) -> Callable[[list[str]], int]:
    """The entry point of subcommand ``name`` (a recipe run for any other name), imported now."""
    module, function = COMMANDS.get(name, TRAIN)
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[list[str]] = None) -> int:
    sys.excepthook = redacted_excepthook  # an error this raises reaches the console without secrets
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print_help()
            return 0
        if args[0] in COMMANDS:
            return command(args[0])(args[1:])
        return command("train")(args)  # recipe=NAME [overrides]: no subcommand name
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
            raise  # a bug: Python API callers get the exception; the console its traceback, redacted (below)
        print("stopped: " + textwrap.fill(str(exc), width=100, subsequent_indent="         "), file=sys.stderr)
        return exc.exit_code  # 128 + signal number, as a shell reports a signal-terminated job


def redacted_excepthook(kind, exc, tb) -> None:
    """``sys.excepthook`` that prints what Python would for an uncaught exception, with secrets masked
    (tracebacks quote config values and environment-derived values)."""
    import traceback

    from mistral_tune.core.redaction import redact_text

    print(redact_text("".join(traceback.format_exception(kind, exc, tb))), end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
