"""The training pipeline: config -> model + tokenizer -> adapter -> data -> trainer -> export.

Each step lives in its own module; this file only wires them in order and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

log = logging.getLogger("mistral_tune")

VERIFY_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return",
    "Sliding windows keep attention local. " * 6,
)


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


_HANDLERS: list[logging.Handler] = []  # installed by the running (or previous) run() in this process


def setup_logging(run_dir: Path) -> None:
    from .safety import RedactingFilter

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    teardown_logging()  # a second run() in one process must not log into the first run's train.log
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(fmt)
        handler.addFilter(RedactingFilter())  # API keys and tokens never reach the console or train.log
        root.addHandler(handler)
        _HANDLERS.append(handler)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def teardown_logging() -> None:
    root = logging.getLogger()
    while _HANDLERS:
        handler = _HANDLERS.pop()
        root.removeHandler(handler)
        handler.close()


def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one log line each, instead of two-line stderr dumps."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def preflight(cfg: Any) -> None:
    """Cheap checks that fail in milliseconds, before minutes of model loading."""
    from . import data, models
    from .config import eval_fraction
    from .presets import PRESETS

    data.resolve_local_path(cfg.data.path)
    if cfg.data.eval_split and eval_fraction(cfg.data.eval_split) is None:
        data.resolve_local_path(cfg.data.eval_split)
    preset = PRESETS.get(cfg.model.name)
    if preset is not None and not cfg.model.path:
        models.check_max_length(cfg.trainer.max_length, preset.config.get("max_position_embeddings"))


def run(cfg: Any, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and export as ``cfg`` says; returns the run summary (also written to summary.json).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for Python API users. Raises
    ``guards.TrainingInterrupted`` after saving a checkpoint on SIGTERM/SIGINT, and
    ``guards.NonFiniteLoss`` on a NaN/inf loss with ``on_nan=stop``.
    """
    from .export import check_writable

    output_dir_given = cfg.output_dir is not None
    run_dir = Path(cfg.output_dir or default_output_dir(cfg.recipe))
    check_writable(run_dir)
    preflight(cfg)
    cfg.output_dir = str(run_dir)
    setup_logging(run_dir)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = log_warning
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # CPU-only machines: harmless
            return train_and_export(cfg, run_dir, output_dir_given, callbacks)
    finally:
        teardown_logging()


def train_and_export(cfg: Any, run_dir: Path, output_dir_given: bool, callbacks: Sequence[Any]) -> dict[str, Any]:
    from .export import save_json
    from .resume import resolve_resume
    from .safety import redact, redact_config

    resume_from = resolve_resume(cfg.resume, run_dir, output_dir_given)
    config = redact_config(cfg)  # what the run directory and the tracker get to see
    config_yaml = OmegaConf.to_yaml(config)
    (run_dir / "resolved_config.yaml").write_text(config_yaml, encoding="utf-8")
    log.info("run directory: %s", run_dir)
    if cfg.train.eval_steps and not cfg.data.eval_split:
        log.warning(
            "train.eval_steps=%d is set but data.eval_split is not: no evaluation will run", cfg.train.eval_steps
        )
    started = time.time()

    from . import models

    # Before the heavy imports, so an offline machine gets its answer in about a second.
    source = models.download_source(models.resolve_source(cfg.model.name, cfg.model.path), cfg.model)

    import torch
    from transformers import set_seed

    from . import adapters, data, resume
    from .guards import GracefulStop, NonFiniteLoss, TrainingInterrupted, stopped_summary, train_guarded
    from .model_card import write_model_card
    from .progress import ProgressReporter, use_progress_reporter
    from .tracking import MetricsJsonl, start_tracking
    from .trainers.sft import build_sft_trainer

    set_seed(cfg.train.seed)
    adapters.check_optimizer(cfg.train.optim)
    tokenizer = models.load_tokenizer(source)
    compute_dtype = models.resolve_dtype(cfg.model.dtype)
    quant = adapters.quantization_config(cfg.adapter, compute_dtype)
    model = models.load_model(cfg.model, source, seed=cfg.train.seed, quantization_config=quant)
    models.check_max_length(cfg.trainer.max_length, model.config.max_position_embeddings)
    init_dir = run_dir / ".adapter-init"  # only used when adapter.init rewrites the base (PiSSA/OLoRA)
    model = adapters.apply_adapter(
        model, cfg.adapter, gradient_checkpointing=cfg.train.gradient_checkpointing, init_dir=init_dir
    )
    trainable, total = adapters.count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    prepared = data.prepare_sft_data(cfg.data, cfg.trainer, tokenizer)
    train_ds, report = prepared.train, prepared.report
    steps = resume.planned_steps(cfg.train, len(train_ds), cfg.launcher.num_processes)
    resume.check_disk_for_run(
        cfg, run_dir, trainable=trainable, total=total, param_bytes=compute_dtype.itemsize, steps=steps
    )
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    if cfg.resume:  # drop records past the checkpoint: the resumed run logs those steps again
        metrics.records.extend(resume.trim_metrics(metrics.path, trainer_step(resume_from)))
    stop = GracefulStop()
    tracking = start_tracking(cfg.tracking, run_dir, config, config_yaml)
    try:
        trainer = build_sft_trainer(
            cfg,
            model,
            tokenizer.to_hf(),
            train_ds,
            run_dir,
            [*tracking.callbacks, metrics, stop, *callbacks],
            eval_dataset=prepared.eval,
        )
        use_progress_reporter(trainer, ProgressReporter(metrics))
        if quant is not None:
            adapters.match_adapter_dtype(trainer.model, quant.bnb_4bit_compute_dtype)
        trainer.data_fingerprint = resume.dataset_fingerprint(train_ds)
        if resume_from is not None:
            saved = resume.check_compatible(resume_from, trainer.data_fingerprint, resume.batch_geometry(trainer.args))
            trainer.nan_skipped_steps.extend(saved.get("nan_skipped_steps", []))
            log.info("resuming from %s (step %d)", resume_from, saved["step"])
        try:
            result = train_guarded(trainer, stop, resume_from)
        except (NonFiniteLoss, TrainingInterrupted) as exc:
            summary = stopped_summary(cfg, trainer, exc, report.as_dict(), resume_from, time.time() - started)
            save_json(run_dir / "summary.json", redact(summary))
            raise
        outputs = save_outputs(cfg, run_dir, trainer.model, tokenizer, prepared, init_dir)
        summary = build_summary(cfg, run_dir, result, trainer, metrics.records, report, started, resume_from)
        summary.update(outputs)
        summary["parameters"] = {"trainable": trainable, "total": total}
        summary["peak_memory_bytes"], summary["peak_memory_kind"] = peak_memory(torch)
        summary["tracking"] = tracking.info
        if outputs["adapter"]:
            write_model_card(Path(outputs["adapter"]), cfg, redact(summary))
        finish_run(run_dir, summary)
        tracking.log_summary(redact(summary))
    except BaseException:
        tracking.finish(failed=True)
        raise
    tracking.finish()
    return summary


def save_outputs(cfg: Any, run_dir: Path, model: Any, tokenizer: Any, prepared: Any, init_dir: Path) -> dict[str, Any]:
    """adapter/, samples.jsonl, merged/ and preset/; returns where they are (and each export's check)."""
    from . import adapters, data, export
    from .generation import greedy_generate
    from .model_card import base_label
    from .safety import redact

    adapter_dir = None
    if cfg.adapter.name != "none":
        adapter_dir = run_dir / "adapter"
        base = {"name": cfg.model.name, "path": cfg.model.path, "seed": cfg.train.seed, "label": base_label(cfg.model)}
        with export.atomic_directory(adapter_dir) as tmp:  # never a half-written adapter/
            adapters.save_adapter(model, tmp, base=base, kind=cfg.adapter.name, init_dir=init_dir)

    holdout = prepared.holdout
    if cfg.export.num_samples and holdout:
        pairs = [
            data.prompt_and_reference(r, prepared.format, cfg.data.system_prompt)
            for r in holdout[: cfg.export.num_samples]
        ]
        generations = greedy_generate(model, tokenizer, [p for p, _ in pairs], cfg.export.sample_max_new_tokens)
        samples = [{"prompt": p, "reference": ref, "generation": g} for (p, ref), g in zip(pairs, generations)]
        with (run_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)

    exported: dict[str, Any] = {}
    if cfg.export.merged or cfg.export.preset:
        exported = export.export_model(
            model,
            tokenizer,
            prompts=VERIFY_PROMPTS,
            dtype_name=cfg.export.dtype,
            merged_dir=run_dir / "merged" if cfg.export.merged else None,
            preset_dir=run_dir / "preset" if cfg.export.preset else None,
            max_shard_size=cfg.export.max_shard_size,
            verify=cfg.export.verify,
            tolerance=cfg.export.tolerance,
            base_preset=cfg.model.name,
            provenance=redact(provenance(cfg)),
        )
    return {
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged": exported.get("merged"),
        "preset": exported.get("preset"),
    }


def provenance(cfg: Any) -> dict[str, Any]:
    """Where a preset came from: recipe, base, adapter, data and training settings of this run."""
    return {
        "recipe": cfg.recipe,
        "run_dir": cfg.output_dir,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "adapter": OmegaConf.to_container(cfg.adapter, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
    }


def build_summary(cfg, run_dir, result, trainer, records, report, started, resume_from) -> dict[str, Any]:
    """summary.json's numbers: losses, eval losses, tokens and times."""
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float)]
    evals = [r for r in records if isinstance(r.get("eval_loss"), float)]
    runtime = result.metrics.get("train_runtime", 0.0)
    return {
        "recipe": cfg.recipe,
        "run_dir": str(run_dir),
        "status": "completed",
        "resumed_from": str(resume_from) if resume_from else None,
        "steps": result.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        "final_eval_perplexity": evals[-1].get("eval_perplexity") if evals else None,
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(runtime, 2),
        "wall_seconds": round(time.time() - started, 2),
        "tokens_per_second": round(trainer.tokens_seen / max(runtime, 1e-9), 1),
        "data": report.as_dict(),
        "nan_skips": len(trainer.nan_skipped_steps),
        "nan_skipped_steps": trainer.nan_skipped_steps,
    }


def finish_run(run_dir: Path, summary: dict[str, Any]) -> None:
    """Plot the curves, write summary.json and print its short form."""
    from .export import save_json
    from .report import format_summary, plot_metrics
    from .safety import redact

    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    summary["plot"] = str(plot) if plot else None
    save_json(run_dir / "summary.json", redact(summary))
    log.info("%s", format_summary(summary))


def trainer_step(checkpoint: Any) -> int:
    """The global step a checkpoint was saved at; 0 when starting fresh."""
    from .checkpoints import checkpoint_step

    return (checkpoint_step(checkpoint) or 0) if checkpoint else 0


def peak_memory(torch: Any) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"  # Linux reports KiB
