"""``mistral-tune bench``: time training steps of a recipe (and its variants) in fresh worker processes
and write a JSON and Markdown report (see mistral_tune/benchmark/).
"""

from __future__ import annotations

from mistral_tune.benchmark.harness import BenchOptions, run_benchmark, split_bench_overrides
from mistral_tune.core.errors import UserError

USAGE = """\
usage: mistral-tune bench recipe=NAME [key=value ...] [--steps N] [--warmup N] [--repeat N] [--out DIR]
                          [--peak-tflops X] [--summarize-only] [--variant NAME [key=value ...]] ...

Runs the recipe for warmup + steps optimizer steps per variant, each framework step paired with a
bare PyTorch step (forward, backward, optimizer) on the same model and batches. Writes
DIR/results.json and DIR/results.md. Variant options: bench.trainer=trl (TRL's stock SFTTrainer),
bench.bare=false (no bare loop), bench.synthetic_length=N (random rows of N tokens, no data file).
--summarize-only rebuilds results.json/md from the per-variant results already in DIR.

  mistral-tune bench recipe=sft_lora --steps 10 --warmup 3
  mistral-tune bench recipe=sft_lora --variant chunked trainer.loss=chunked --variant plain trainer.loss=plain
"""


def parse_bench_args(args: list[str]):
    """``(recipe, common overrides, [(variant, overrides)], BenchOptions)`` from the command line."""
    recipe, common, variants, opts = None, [], [], BenchOptions()
    flags = {"--steps": ("steps", int), "--warmup": ("warmup", int), "--repeat": ("repeat", int)}
    flags |= {"--out": ("out", str), "--peak-tflops": ("peak_tflops", float)}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif name in flags:
            field, cast = flags[name]
            if not eq:
                i += 1
                if i >= len(args):
                    raise UserError(f"{name} needs a value. See `mistral-tune bench --help`.")
                inline = args[i]
            try:
                setattr(opts, field, cast(inline))
            except ValueError:
                raise UserError(f"{name}={inline!r} is not a valid {cast.__name__}.") from None
        elif arg == "--summarize-only":
            opts.summarize_only = True
        elif arg == "--variant":
            if i + 1 >= len(args) or args[i + 1].startswith("-") or "=" in args[i + 1]:
                raise UserError("--variant needs a name, e.g. `--variant chunked trainer.loss=chunked`.")
            variants.append((args[i + 1], []))
            i += 1
        elif arg.startswith("-"):
            raise UserError(f"Unknown option '{arg}'. See `mistral-tune bench --help`.")
        else:
            (variants[-1][1] if variants else common).append(arg)
        i += 1
    if recipe is None:
        raise UserError("No recipe given: `mistral-tune bench recipe=sft_lora`. See `mistral-tune bench --help`.")
    if opts.steps < 1 or opts.warmup < 0 or opts.repeat < 1:
        raise UserError("--steps and --repeat must be >= 1 and --warmup >= 0.")
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"Variant names must differ: {names}.")
    for _, overrides in [("", common), *variants]:
        split_bench_overrides(overrides)  # fail early on a misspelled bench.* key
    return recipe, common, variants or [("framework", [])], opts


def cmd_bench(args: list[str]) -> int:
    """Entry point of ``mistral-tune bench``."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    recipe, common, variants, opts = parse_bench_args(args)
    from mistral_tune.config.compose import compose

    for _, overrides in variants:  # fail on a bad override before spending minutes on the others
        compose(recipe, split_bench_overrides([*common, *overrides])[0])
    summary = run_benchmark(recipe, common, variants, opts, command="mistral-tune bench " + " ".join(args))
    return 1 if summary["errors"] else 0
