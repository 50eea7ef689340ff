"""``mistral-tune validate-data recipe=NAME [overrides]`` (alias ``check``): check a run's data before training.

Composes the recipe as training does, reads every source, tokenizes every row with the model's tokenizer
through the training data path (mistral_tune.data.validate), and prints every problem as ``file:line``,
per-source and total counts, token lengths, truncation, epochs per source and an ETA. Builds no model
(unless ``--measure-steps N`` asks for a measured ETA) and writes nothing unless ``--write-corrected OUT``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from mistral_tune.cli.args import Command, Key, run_help
from mistral_tune.core.errors import UserError

VALIDATE = Command(
    "validate-data",
    """\
usage: mistral-tune validate-data recipe=NAME [key=value ...] [--write-corrected OUT] [--measure-steps N]
       mistral-tune check recipe=NAME [key=value ...]   (the same command)""",
    description="""\
Checks the data of a run exactly as training would read it (same recipe, same overrides): every
malformed or unusable row is printed as file:line: reason, then per source and in total the rows,
tokens (all and trained), the token-length distribution, rows truncated at trainer.max_length,
epochs per source for train.max_steps and the global batch, and an ETA on dry_run_gpu from the
dry-run estimator. Tokenizes with the model's tokenizer; builds no model; writes nothing unless
--write-corrected is given. Exits 2 when a source cannot be trained on.""",
    noun="option",
    keys=(
        Key("recipe", help="the recipe whose data to check (Hydra composes it with the overrides)",
            required="No recipe given: `mistral-tune validate-data recipe=sft_lora data.path=my.jsonl`."),
        Key("write_corrected", flag=True, metavar="OUT",
            help="write the usable rows, fixable problems fixed, to OUT (.jsonl or .json;\n"
                 "a directory for several sources) and count each fix"),
        Key("measure_steps", int, 0, flag=True, metavar="N",
            help="also time N real optimizer steps here (after 1 warm-up step) for a\n"
                 "measured ETA; builds the model (default 0: off)"),
    ),
    epilog="""\
  mistral-tune validate-data recipe=sft_lora data.path=my.jsonl
  mistral-tune validate-data recipe=sft_lora data.path=my.jsonl --write-corrected fixed.jsonl
  mistral-tune check recipe=sft_lora model=mistral_7b_en dry_run_gpu=A100 --measure-steps 2""",
)  # fmt: skip


def parse_args(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``(own options, Hydra overrides)``: ``recipe=`` and ``--flags`` are validate-data's, the rest Hydra's."""
    own, hydra = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") or arg.startswith("recipe="):
            own.append(arg)
            key = VALIDATE.key(arg)
            if key is not None and key.flag and key.type is not bool and "=" not in arg and i + 1 < len(args):
                own.append(args[i + 1])
                i += 1
        else:
            hydra.append(arg)
        i += 1
    values = VALIDATE.parse(own)
    if values["measure_steps"] < 0:
        raise VALIDATE.error(["--measure-steps must be >= 0."])
    return values, hydra


def cmd_validate(args: list[str]) -> int:
    if run_help(VALIDATE, args):
        return 0
    values, overrides = parse_args(args)
    from mistral_tune.config.compose import compose
    from mistral_tune.config.registry import PREFERENCE_TRAINERS

    cfg = compose(values["recipe"], overrides)
    if cfg.trainer.name in PREFERENCE_TRAINERS:
        raise UserError(
            f"validate-data checks SFT data (trainer=sft); trainer={cfg.trainer.name} reads preference pairs. "
            "For those, `mistral-tune recipe=... dry_run=true` checks every pair with the tokenizer."
        )
    out = Path(values["write_corrected"]) if values["write_corrected"] else None
    return validate(cfg, values["recipe"], overrides, out=out, measure_steps=values["measure_steps"])


def validate(cfg: Any, recipe: str, overrides: list[str], *, out: Optional[Path], measure_steps: int) -> int:
    from mistral_tune.data import validate as v

    started = time.perf_counter()
    sources = v.sources_of(cfg.data)
    if out is not None:
        inputs = {Path(s.path).resolve() for s in sources}
        if out.resolve() in inputs or (len(sources) > 1 and out.is_file()):
            raise UserError(
                f"--write-corrected {out}: that is a source (or a file, for several sources); name a new path."
            )
    tokenizer, label = load_tokenizer(cfg)
    loaded = time.perf_counter()
    checks = [v.check_source(s, cfg.data, cfg.trainer, tokenizer, corrected=out is not None) for s in sources]
    evaluation = v.eval_source(cfg.data)
    eval_check = v.check_source(evaluation, cfg.data, cfg.trainer, tokenizer) if evaluation else None
    seconds, tokenizer_seconds = time.perf_counter() - loaded, loaded - started
    rows = sum(c.lines for c in checks) + (eval_check.lines if eval_check else 0)
    t = cfg.trainer
    print(
        f"validate-data: recipe {recipe}; {len(checks)} source(s); tokenizer of {label}; "
        f"trainer.max_length={t.max_length}, trainer.truncation={t.truncation}"
    )
    problems = [p for c in checks + ([eval_check] if eval_check else []) for p in c.problems]
    print(f"\nproblems ({len(problems)}):" if problems else "\nproblems: none")
    for p in problems:
        print(f"  {p}")
    processes, process_note = world_size(cfg)
    plan = v.schedule(checks, cfg.data, cfg.trainer, cfg.train, processes)
    for c in checks:
        print("\n" + "\n".join(source_lines(c, plan, cfg)))
    if len(checks) > 1:
        print("\n" + "\n".join(total_lines(checks, cfg)))
    if eval_check:
        print("\n" + "\n".join(source_lines(eval_check, plan, cfg)))
    print("\n" + "\n".join(schedule_lines(plan, cfg, process_note)))
    print("\n" + "\n".join(eta_lines(cfg, checks, plan, recipe, overrides, measure_steps)))
    fixable = sum((c.fixable for c in checks), Counter())
    written: dict = {}
    if out is not None:
        written = v.write_corrected(checks, out)
        applied = sum((c.corrected_fixes for c in checks), Counter())
        changes = ", ".join(f"{n} {name}" for name, n in sorted(applied.items())) or "none"
        left = sum(c.lines - len(c.corrected) for c in checks)
        for path, n in written.items():
            print(f"\nwrote {path}: {n} rows")
        if not written:
            print(f"\nwrote nothing to {out}: no row is usable, even with the fixes")
        elif len(checks) > 1:  # the same mixture, from the corrected files
            weights = {Path(c.source.path.rstrip("/")).stem: c.source.weight for c in checks}
            mix = ",".join(f"{path}:{weights[Path(path).stem]:g}" for path in written)
            print(f"  train on them with data.path='{mix}'")
        print(f"  changes: {changes}; {left} unusable line(s) left out (listed above)")
    elif fixable:
        fixes = ", ".join(f"{n} {name}" for name, n in sorted(fixable.items()))
        print(f"\nfixable: {fixes}; --write-corrected OUT writes the usable rows with these fixed")
    print(
        f"\nchecked {rows} rows in {seconds:.2f} s ({rows / max(seconds, 1e-9):,.0f} rows/s: read, convert, "
        f"tokenize) after loading the tokenizer in {tokenizer_seconds:.2f} s; "
        f"wrote {'only ' + str(out) if out and written else 'nothing'}"
    )
    return finish(checks + ([eval_check] if eval_check else []), cfg)


def finish(checks: list, cfg: Any) -> int:
    """0, or one UserError naming each source training could not use as configured."""
    from mistral_tune.data.validate import line_number

    bad = [c.error for c in checks if c.error]
    if cfg.data.on_error != "skip":
        for c in checks:
            stops = sorted(c.unreadable + c.strict, key=line_number)
            if stops and not c.error:
                bad.append(
                    f"{c.source.path}: {len(stops)} line(s) training stops at with data.on_error=fail, first "
                    f"{stops[0]} (fix them, set data.on_error=skip, or use --write-corrected)"
                )
    if bad:
        raise UserError("validate-data: " + "; ".join(bad))
    return 0


def world_size(cfg: Any) -> tuple[int, str]:
    """Processes sharing a step: ``launcher.num_processes`` x machines, or 1 for the local launcher."""
    from mistral_tune.launch.accelerate import total_processes

    if cfg.launcher.name == "local":
        return 1, "1 process"
    try:
        n = total_processes(cfg.launcher)
    except UserError as exc:
        return 1, f"1 process assumed ({exc})"
    return n, f"{n} processes"


def load_tokenizer(cfg: Any):
    """The model's tokenizer, fetching at most the repo's config and tokenizer files (never weights)."""
    from mistral_tune.models.sources import ModelSource, fetch_hub_repo, hub_tokenizer_source, resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer as load

    source = resolve_source(cfg.model.name, cfg.model.path)
    if source.local_dir is None and source.hub_repo is not None:
        if source.preset is not None and not cfg.model.path:
            source = hub_tokenizer_source(source, cfg.model.revision)  # most presets: a shipped file
        else:
            source = ModelSource(source.preset, fetch_hub_repo(source.hub_repo, cfg.model.revision, True), None)
    tokenizer = load(source)
    return tokenizer, f"{cfg.model.name} ({getattr(tokenizer, 'chat_template', None) or 'its'} chat format)"


def _num(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.2f}"


def source_lines(c: Any, plan: Any, cfg: Any) -> list[str]:
    from mistral_tune.data.validate import percentiles

    if c.source.eval:
        kind = "data.eval_split: evaluation only"
    else:
        share = plan.shares.get(c.source.key)
        kind = f"{c.source.key}, weight {c.source.weight:g}" + (
            f" = {share:.1%} of the examples" if share is not None and len(plan.shares) > 1 else ""
        )
    head = (
        f"{'eval ' if c.source.eval else ''}source {c.source.path} ("
        + (f"{c.format}, " if c.format else "")
        + f"{kind})"
    )
    if c.format is None and c.error:
        return [head, f"  UNUSABLE  {c.error}"]
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(c.reasons.items()))
    lines = [
        head,
        f"  rows       {c.lines:,}: {c.usable:,} usable, {c.unusable:,} unusable"
        + (f" ({reasons})" if reasons else ""),
        f"  tokens     {c.tokens:,} total, {c.trained_tokens:,} trained (loss on them), as trained after truncation",
    ]
    if c.lengths:
        p = percentiles(c.lengths)
        lines.append("  length     " + ", ".join(f"{k} {v:,}" for k, v in p.items()) + " tokens per row (whole)")
    lines.append(f"  truncated  {c.truncated:,} at trainer.max_length={cfg.trainer.max_length}")
    if c.assistant_turns:
        turns = (
            f'  turns      {c.assistant_turns:,} assistant turns, {c.skipped_turns:,} with "weight": 0 (not trained)'
        )
        if c.tool_rows:
            turns += f"; {c.tool_rows:,} rows with tool use"
        if c.tool_call_ids_fixed:
            turns += f"; {c.tool_call_ids_fixed:,} tool-call ids generated (data.fix_tool_call_ids=true)"
        lines.append(turns)
    if c.duplicates:
        what = "dropped by data.dedup=true" if cfg.data.dedup else "kept; data.dedup=true drops them"
        lines.append(f"  duplicates {c.duplicates:,} exact duplicate row(s) ({what})")
    if c.usable and c.source.key in plan.train_rows:
        rows = plan.train_rows[c.source.key]
        unit = " (packing: counted in tokens)" if cfg.trainer.packing else ""
        lines.append(f"  epochs     {plan.epochs[c.source.key]:.2f} over its {rows:,} training rows{unit}")
    if c.error:
        lines.append(f"  UNUSABLE  {c.error}")
    return lines


def total_lines(checks: list, cfg: Any) -> list[str]:
    from mistral_tune.data.validate import percentiles

    lengths = [n for c in checks for n in c.lengths]
    lines = [
        "total",
        f"  rows       {sum(c.lines for c in checks):,}: {sum(c.usable for c in checks):,} usable, "
        f"{sum(c.unusable for c in checks):,} unusable",
        f"  tokens     {sum(c.tokens for c in checks):,} total, {sum(c.trained_tokens for c in checks):,} trained",
    ]
    if lengths:
        lines.append("  length     " + ", ".join(f"{k} {v:,}" for k, v in percentiles(lengths).items()) + " tokens")
    lines.append(f"  truncated  {sum(c.truncated for c in checks):,} at trainer.max_length={cfg.trainer.max_length}")
    return lines


def schedule_lines(plan: Any, cfg: Any, process_note: str) -> list[str]:
    tr = cfg.train
    line = (
        f"schedule: {plan.steps:,} optimizer steps x {plan.examples_per_step} "
        f"{'packed rows of max_length tokens' if cfg.trainer.packing else 'examples'} per step "
        f"(per_device_train_batch_size {tr.per_device_train_batch_size} x gradient_accumulation_steps "
        f"{tr.gradient_accumulation_steps} x {process_note})"
    )
    lines = [line]
    if plan.note:
        lines.append(f"  {plan.note}")
    from mistral_tune.config.schema import eval_fraction

    fraction = eval_fraction(cfg.data.eval_split)
    lines.append(
        f"  training rows exclude data.holdout={cfg.data.holdout}"
        + (f" and data.eval_split={cfg.data.eval_split}" if fraction is not None else "")
        + (" and duplicates (data.dedup=true)" if cfg.data.dedup else "")
    )
    return lines


def eta_lines(cfg: Any, checks: list, plan: Any, recipe: str, overrides: list[str], measure_steps: int) -> list[str]:
    """The dry-run estimator's ETA on ``dry_run_gpu`` (no model built) and, on request, a measured one."""
    from mistral_tune.pipeline import estimate
    from mistral_tune.pipeline.dry_run import model_config, run_shape

    lines = []
    try:
        config, origin = model_config(cfg)
        shape = run_shape(cfg)
    except UserError as exc:
        lines.append(f"ETA on {cfg.dry_run_gpu}: not estimated ({exc})")
        config = None
    if config is not None:
        trainable = 0  # full fine-tuning: the estimator's FLOPs do not depend on it
        if shape.adapter != "none":
            trainable = estimate.lora_parameter_count(config, shape.targets, shape.lora_r, dora=shape.adapter == "dora")
        full = estimate.estimate_speed(config, shape, trainable=trainable, gpu=cfg.dry_run_gpu, mfu=cfg.dry_run_mfu)
        lines.append(
            f"ETA on {full.gpu.name} (dry-run estimator, {cfg.dry_run_mfu:.0%} FLOPs utilization, dry_run_gpu/dry_run_mfu; "
            f"no model built): {duration(full.step_seconds * plan.steps)} for {plan.steps:,} steps "
            f"({full.step_seconds:.3g} s/step with every row padded to max_length={shape.seq_len}: an upper bound)"
        )
        kept = [min(n, cfg.trainer.max_length) for c in checks for n in c.lengths]
        if kept and not cfg.trainer.packing:
            mean = max(1, round(statistics.fmean(kept)))
            shape.seq_len = mean
            short = estimate.estimate_speed(
                config, shape, trainable=trainable, gpu=cfg.dry_run_gpu, mfu=cfg.dry_run_mfu
            )
            lines.append(
                f"  {duration(short.step_seconds * plan.steps)} at the data's mean length of {mean} tokens "
                f"({short.step_seconds:.3g} s/step; padding-free: a lower bound; trainer.packing=true gets close to it)"
            )
    if measure_steps:
        lines.append(measured_eta(recipe, overrides, measure_steps, plan.steps))
    else:
        lines.append(
            "measured ETA on this machine: not measured (--measure-steps N builds the model and times N real steps)"
        )
    return lines


def measured_eta(recipe: str, overrides: list[str], steps: int, total_steps: int) -> str:
    """Time ``steps`` real optimizer steps of the recipe here (the bench worker, in a fresh process, its
    files in a temporary directory that is removed): the median step x the run's steps."""
    from mistral_tune.benchmark.harness import run_worker

    with tempfile.TemporaryDirectory(prefix="mistral-tune-validate-") as tmp:
        root = Path(tmp)
        spec = {
            "name": "validate-data",
            "recipe": recipe,
            "overrides": overrides,
            "hydra_overrides": overrides,
            "options": {"trainer": "mistral", "bare": False, "synthetic_length": 0},
            "steps": steps,
            "warmup": 1,
            "run_dir": str(root / "run"),
        }
        started = time.perf_counter()
        result = run_worker(spec, root / "spec.json", root / "result.json", root / "worker.log")
        wall = time.perf_counter() - started
    if isinstance(result, str):
        return f"measured ETA on this machine: the measurement failed: {result.splitlines()[-1] if result else '?'}"
    step = statistics.median(result["framework_seconds"])
    device = result.get("device_name") or result["device"]
    return (
        f"measured ETA on this machine ({device}, {result['torch_threads']} threads): "
        f"{duration(step * total_steps)} for {total_steps:,} steps "
        f"(median of {steps} real optimizer step(s) after 1 warm-up: {step:.3g} s/step; "
        f"model load and data preparation excluded; the measurement took {wall:.0f} s{_load(result)})"
    )


def _load(result: dict) -> str:
    """The 1-minute load average the worker saw, when this machine was busy with other work."""
    loads = [x for x in result.get("load_average") or [] if x is not None]
    threads = result.get("torch_threads") or 1
    if not loads or max(loads) <= threads:
        return ""
    return f"; load average {max(loads):.1f} on {threads} threads: other work slowed it"


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
