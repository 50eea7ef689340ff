"""``mistral-tune bench``: time training steps of a recipe (and its variants) in fresh worker processes
and write a JSON and Markdown report (see mistral_tune/benchmark/).
"""

from __future__ import annotations

from typing import Any

from mistral_tune.benchmark.harness import BenchOptions, run_benchmark
from mistral_tune.cli.args import Command, Key, run_help

# Options a variant may set besides Hydra overrides (bench.NAME=VALUE); the worker reads them.
VARIANT = Command(
    "bench",
    "variant options",
    noun="benchmark option",
    keys=(
        Key("bench.recipe", default="",
            help="NAME: this variant runs recipe NAME instead (e.g. sft_lora beside dpo_lora in one run)"),
        Key("bench.trainer", default="mistral", choices=("mistral", "trl"),
            help="mistral (default) | trl (TRL's stock SFTTrainer; for DPO, TRL's own fused LM head)"),
        Key("bench.bare", bool, True, help="false: no bare PyTorch loop (default true)"),
        Key("bench.synthetic_length", int, 0, help="N: random rows of N tokens, no data file (default 0: the recipe's data)"),
    ),
)  # fmt: skip

BENCH = Command(
    "bench",
    """\
usage: mistral-tune bench recipe=NAME [key=value ...] [--steps N] [--warmup N] [--repeat N] [--out DIR]
                          [--peak-tflops X] [--summarize-only] [--variant NAME [key=value ...]] ...""",
    description="""\
Runs the recipe for warmup + steps optimizer steps per variant, each framework step paired with a
bare PyTorch step (forward, backward, optimizer) on the same model and batches. Writes
DIR/results.json and DIR/results.md. The recipe may be SFT, DPO or reward: the bare loop computes
the same loss by hand (SFT: the model's loss; DPO: the sigmoid DPO loss from policy and reference
log-probs; reward: the pairwise loss). Variant options: bench.recipe=NAME (another recipe for this
variant, e.g. SFT and DPO side by side), bench.trainer=trl (TRL's stock SFTTrainer; for DPO, TRL's
own fused LM head), bench.bare=false (no bare loop),
bench.synthetic_length=N (random rows of N tokens, no data file), SFT recipes only.
--summarize-only rebuilds results.json/md from the per-variant results already in DIR.
key=value arguments other than bench.* are Hydra overrides of the recipe, common to every variant
before the first --variant and that variant's own after it.""",
    noun="option",
    keys=(
        Key("recipe", help="the recipe to time (Hydra composes it with the overrides)",
            required="No recipe given: `mistral-tune bench recipe=sft_lora`."),
        Key("steps", int, BenchOptions.steps, flag=True, help="measured optimizer steps per variant (default 10)"),
        Key("warmup", int, BenchOptions.warmup, flag=True, help="warm-up steps before them (default 3)"),
        Key("repeat", int, BenchOptions.repeat, flag=True, help="rounds over the variants (default 1)"),
        Key("out", flag=True, metavar="DIR", help="the report directory (default runs/bench-RECIPE-TIME)"),
        Key("peak_tflops", float, flag=True, metavar="X", help="the device's peak TFLOPS for MFU (default: looked up)"),
        Key("summarize_only", bool, False, flag=True, help="re-summarize the results already in --out, run nothing"),
        Key("variant", flag=True, metavar="NAME", help="a named variant; the key=value arguments after it are its own"),
    ),
    sections=(("variant options (key=value, common or per variant):", VARIANT),),
    epilog="""\
  mistral-tune bench recipe=sft_lora --steps 10 --warmup 3
  mistral-tune bench recipe=sft_lora --variant chunked trainer.loss=chunked --variant plain trainer.loss=plain
  mistral-tune bench recipe=sft_lora --variant sft --variant dpo bench.recipe=dpo_lora data=preference_sample""",
)  # fmt: skip


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """``(Hydra overrides, typed bench.* options by short name, problems)`` of one variant's arguments."""
    hydra = [item for item in overrides if not item.startswith("bench.")]
    values, problems = VARIANT.collect([item for item in overrides if item.startswith("bench.")])
    return hydra, {k.removeprefix("bench."): v for k, v in values.items()}, problems


def parse_bench_args(args: list[str]):
    """``(recipe, common overrides, [(variant, overrides)], BenchOptions)`` from the command line.

    ``--flags`` and ``recipe=`` are bench's own, parsed by BENCH wherever they stand; ``--variant NAME``
    starts a variant; every other argument is an override of the current variant (or, before the first
    ``--variant``, of all of them): ``bench.*`` ones are checked by VARIANT, the rest go to Hydra as they are.
    """
    own, common, variants, problems = [], [], [], []
    i = 0
    while i < len(args):
        arg = args[i]
        key = BENCH.key(arg)
        flag, eq, inline = arg.partition("=")
        if flag == "--variant":
            if eq and inline:
                variants.append((inline, []))
            elif eq or i + 1 >= len(args) or args[i + 1].startswith("-") or "=" in args[i + 1]:
                problems.append("--variant needs a name, e.g. `--variant chunked trainer.loss=chunked`.")
            else:
                variants.append((args[i + 1], []))
                i += 1
        elif arg.startswith("-") or arg.startswith("recipe="):
            own.append(arg)
            following = args[i + 1] if i + 1 < len(args) else None
            if key is not None:  # --steps 4
                takes_next = key.flag and key.type is not bool and not eq
            else:  # a misspelled --stesp 4: its value goes with it (both are reported)
                takes_next = not eq and arg.startswith("-") and following is not None
                takes_next = takes_next and not following.startswith("-") and "=" not in following
            if takes_next and following is not None:
                own.append(following)
                i += 1
        else:
            (variants[-1][1] if variants else common).append(arg)
        i += 1
    values, own_problems = BENCH.collect(own)
    problems = own_problems + problems
    for _, overrides in [("", common), *variants]:
        problems += split_overrides(overrides)[2]  # fail early on a misspelled bench.* key
    opts = BenchOptions(**{k: values[k] for k in ("steps", "warmup", "repeat", "out", "peak_tflops", "summarize_only")})
    if opts.steps < 1 or opts.warmup < 0 or opts.repeat < 1:
        problems.append("--steps and --repeat must be >= 1 and --warmup >= 0.")
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        problems.append(f"Variant names must differ: {names}.")
    if problems:
        raise BENCH.error(problems)
    return values["recipe"], common, variants or [("framework", [])], opts


def cmd_bench(args: list[str]) -> int:
    """Entry point of ``mistral-tune bench``."""
    if run_help(BENCH, args):
        return 0
    recipe, common, variants, opts = parse_bench_args(args)
    from mistral_tune.config.compose import compose

    runs = []  # (name, overrides as given, Hydra overrides, bench options): plain values for the harness
    for name, overrides in variants:
        hydra, options, _ = split_overrides([*common, *overrides])
        compose(options["recipe"] or recipe, hydra)  # fail on a bad override before spending minutes on the others
        runs.append((name, [*common, *overrides], hydra, options))
    summary = run_benchmark(recipe, common, runs, opts, command="mistral-tune bench " + " ".join(args))
    return 1 if summary["errors"] else 0
