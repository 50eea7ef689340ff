"""The training pipeline: config -> model + tokenizer -> adapter -> data -> trainer -> export.

Each step lives in its own module; this file only wires them in order and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
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


def default_output_dir(recipe: str, when: datetime | None = None) -> Path:
    return Path("runs") / f"{recipe}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


_HANDLERS: list[logging.Handler] = []  # installed by the previous run() in this process


def setup_logging(run_dir: Path, main_process: bool = True) -> None:
    """INFO to stdout and train.log; the other processes of a launch print warnings and errors only."""
    from .safety import RedactingFilter

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    while _HANDLERS:  # a second run() in one process must not log into the first run's train.log
        old = _HANDLERS.pop()
        root.removeHandler(old)
        old.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(RedactingFilter())  # API keys and tokens never reach the console or train.log
        root.addHandler(handler)
        _HANDLERS.append(handler)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(cfg: Any, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and export as ``cfg`` says; returns the run summary (also written to summary.json).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for Python API users. Raises
    ``guards.TrainingInterrupted`` after saving a checkpoint on SIGTERM/SIGINT, and
    ``guards.NonFiniteLoss`` on a NaN/inf loss with ``on_nan=stop``.
    """
    from . import distributed
    from .export import atomic_directory, check_writable, save_json
    from .resume import resolve_resume
    from .safety import redact, redact_config

    # In a multi-process launch only rank 0 writes; the others train and help save (distributed.py).
    main_process = distributed.is_main_process()
    output_dir_given = cfg.output_dir is not None
    run_dir = distributed.shared_run_dir(cfg.output_dir, lambda when: default_output_dir(cfg.recipe, when))
    if main_process:
        check_writable(run_dir)
    cfg.output_dir = str(run_dir)
    setup_logging(run_dir, main_process)
    distributed.prepare_process(cfg)
    resume_from = resolve_resume(cfg.resume, run_dir, output_dir_given)
    if main_process:
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(redact_config(cfg)), encoding="utf-8")
    log.info("run directory: %s", run_dir)
    started = time.time()

    from . import models

    # Before the heavy imports, so an offline machine gets its answer in about a second.
    source = models.download_source(models.resolve_source(cfg.model.name, cfg.model.path), cfg.model)

    import torch
    from transformers import set_seed

    from . import adapters, data, export, resume
    from .generation import greedy_generate
    from .guards import GracefulStop, NonFiniteLoss, TrainingInterrupted, stopped_summary, train_guarded
    from .tracking import MetricsJsonl
    from .trainers.sft import build_sft_trainer

    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(source)
    compute_dtype = models.resolve_dtype(cfg.model.dtype)
    quant = distributed.quantization_for_engine(adapters.quantization_config(cfg.adapter, compute_dtype))
    model = models.load_model(cfg.model, source, seed=cfg.train.seed, quantization_config=quant)
    if cfg.trainer.max_length > model.config.max_position_embeddings:
        from .errors import UserError

        raise UserError(
            f"trainer.max_length={cfg.trainer.max_length} is beyond the model's "
            f"max_position_embeddings={model.config.max_position_embeddings}."
        )
    model = adapters.apply_adapter(model, cfg.adapter, gradient_checkpointing=cfg.train.gradient_checkpointing)
    trainable, total = adapters.count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    train_ds, holdout, fmt, report = data.prepare_sft_data(cfg.data, cfg.trainer, tokenizer)
    steps = resume.planned_steps(cfg.train, len(train_ds), distributed.world_size())
    resume.check_disk_for_run(
        cfg, run_dir, trainable=trainable, total=total, param_bytes=compute_dtype.itemsize, steps=steps
    )
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    if cfg.resume and main_process:  # drop records past the checkpoint: the resumed run logs those steps again
        metrics.records.extend(resume.trim_metrics(metrics.path, trainer_step(resume_from)))
    stop = GracefulStop()
    callbacks = [metrics, stop, *distributed.fault_drill_callbacks(), *callbacks]
    trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), train_ds, run_dir, callbacks)
    trainer.data_fingerprint = resume.dataset_fingerprint(train_ds)
    if resume_from is not None:
        saved = resume.check_compatible(resume_from, trainer.data_fingerprint, resume.batch_geometry(trainer.args))
        trainer.nan_skipped_steps.extend(saved.get("nan_skipped_steps", []))
        log.info("resuming from %s (step %d)", resume_from, saved["step"])
    try:
        result = train_guarded(trainer, stop, resume_from)
    except (NonFiniteLoss, TrainingInterrupted) as exc:
        if main_process:
            summary = stopped_summary(cfg, trainer, exc, report.as_dict(), resume_from, time.time() - started)
            save_json(run_dir / "summary.json", redact(summary))
        raise
    model = trainer.model

    # Every process takes part in saving (ZeRO-3 and FSDP gather the shards); rank 0 writes, then goes on alone.
    adapter_dir = run_dir / "adapter" if cfg.adapter.name != "none" else None
    saved_dir = adapter_dir or run_dir / "checkpoints" / "final"
    if adapter_dir or distributed.params_sharded(trainer):
        with atomic_directory(saved_dir) if main_process else nullcontext(saved_dir) as target:  # never half-written
            distributed.save_trained(trainer, target)
    if not main_process:
        return {}
    if distributed.params_sharded(trainer):  # rank 0 holds only a shard: rebuild the model from the save
        model = distributed.load_trained(cfg, source, quant, saved_dir)

    samples = []
    if cfg.export.num_samples and holdout:
        pairs = [data.prompt_and_reference(r, fmt, cfg.data.system_prompt) for r in holdout[: cfg.export.num_samples]]
        generations = greedy_generate(model, tokenizer, [p for p, _ in pairs], cfg.export.sample_max_new_tokens)
        samples = [{"prompt": p, "reference": ref, "generation": g} for (p, ref), g in zip(pairs, generations)]
        with (run_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)

    merged_info = None
    if cfg.export.merged:
        merged_info = export.export_merged(
            model,
            tokenizer,
            run_dir / "merged",
            dtype_name=cfg.export.dtype,
            prompts=VERIFY_PROMPTS,
            max_shard_size=cfg.export.max_shard_size,
            verify=cfg.export.verify,
        )

    losses = [r["loss"] for r in metrics.records if isinstance(r.get("loss"), float)]
    summary = {
        "recipe": cfg.recipe,
        "run_dir": str(run_dir),
        "status": "completed",
        "resumed_from": str(resume_from) if resume_from else None,
        "steps": result.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": min(losses) if losses else None,
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "wall_seconds": round(time.time() - started, 2),
        "tokens_per_second": round(trainer.tokens_seen / max(result.metrics.get("train_runtime", 0.0), 1e-9), 1),
        "parameters": {"trainable": trainable, "total": total},
        "data": report.as_dict(),
        "nan_skips": len(trainer.nan_skipped_steps),
        "nan_skipped_steps": trainer.nan_skipped_steps,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged": merged_info,
        "peak_memory_bytes": peak_memory_bytes(torch),
        **distributed.run_facts(trainer, cfg.launcher.name),
    }
    save_json(run_dir / "summary.json", redact(summary))
    log.info("summary: %s", json.dumps(summary))
    return summary


def trainer_step(checkpoint: Any) -> int:
    """The global step a checkpoint was saved at; 0 when starting fresh."""
    from .checkpoints import checkpoint_step

    return (checkpoint_step(checkpoint) or 0) if checkpoint else 0


def peak_memory_bytes(torch: Any) -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
