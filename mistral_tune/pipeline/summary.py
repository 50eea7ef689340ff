"""summary.json: the numbers of a finished run (losses, tokens, times, world size) and of one that
stopped early (why, where, what to resume from).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def stopped_summary(cfg: Any, trainer: Any, exc: Exception, data: dict, resume_from: Any, seconds: float) -> dict:
    """summary.json for a run that stopped early: why, where, and what to resume from."""
    from pathlib import Path

    from mistral_tune.train.checkpoints import latest_complete
    from mistral_tune.train.signals import TrainingInterrupted  # lazily: it pulls in transformers

    last = latest_complete(Path(trainer.args.output_dir))
    return {
        "recipe": cfg.recipe,
        "run_dir": cfg.output_dir,
        "status": "interrupted" if isinstance(exc, TrainingInterrupted) else "nonfinite_loss",
        "message": str(exc),
        "steps": trainer.state.global_step,
        "last_checkpoint": str(last) if last else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "tokens_seen": trainer.tokens_seen,
        "wall_seconds": round(seconds, 2),
        "data": data,
        "nan_skips": len(trainer.nan_skipped_steps),
        "nan_skipped_steps": trainer.nan_skipped_steps,
    }


def build_summary(cfg, run_dir, result, trainer, records, report, started, resume_from) -> dict[str, Any]:
    """summary.json's numbers: losses, eval losses, tokens, times, and the launch's world size and batch."""
    import mistral_tune.launch.engine as distributed

    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float)]
    evals = [r for r in records if isinstance(r.get("eval_loss"), float)]
    accuracies = [r[ACCURACY] for r in records if isinstance(r.get(ACCURACY), float)]
    eval_accuracies = [r[f"eval_{ACCURACY}"] for r in evals if isinstance(r.get(f"eval_{ACCURACY}"), float)]
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
        # Preference trainers: the share of pairs ranked right, on training batches and on the eval split.
        "final_accuracy": accuracies[-1] if accuracies else None,
        "final_eval_accuracy": eval_accuracies[-1] if eval_accuracies else None,
        "notes": run_notes(cfg, bool(accuracies), bool(eval_accuracies)),
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(runtime, 2),
        "wall_seconds": round(time.time() - started, 2),
        "tokens_per_second": round(trainer.tokens_seen / max(runtime, 1e-9), 1),
        "data": report.as_dict(),
        "nan_skips": len(trainer.nan_skipped_steps),
        "nan_skipped_steps": trainer.nan_skipped_steps,
        **distributed.run_facts(trainer, cfg.launcher.name),
    }


ACCURACY = "rewards/accuracies"  # what DPO and reward runs log per step (and eval_ on the eval split)


def run_notes(cfg: Any, has_accuracy: bool, has_eval_accuracy: bool) -> list[str]:
    """Plain-language caveats on what the run's numbers mean (summary.json ``notes``, printed at the end)."""
    from mistral_tune.config.schema import random_demo_base

    notes = []
    if random_demo_base(cfg.model):
        notes.append(
            "the base (mistral_tiny) has random weights: the training loss and accuracy measure memorisation of "
            "the training data, not learning; use a pretrained model (model=mistral_7b_en or model.path) for that"
        )
    if has_accuracy and not has_eval_accuracy:
        notes.append(
            "the accuracy is measured on training batches only; set data.eval_split=0.05 to measure it on "
            "held-out pairs"
        )
    return notes


def finish_run(run_dir: Path, summary: dict[str, Any]) -> None:
    """Plot the curves, write summary.json and print its short form."""
    from mistral_tune.core.files import save_json
    from mistral_tune.core.redaction import redact
    from mistral_tune.tracking.report import format_summary, plot_metrics

    plot = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    summary["plot"] = str(plot) if plot else None
    save_json(run_dir / "summary.json", redact(summary))
    log.info("%s", format_summary(summary))


def peak_memory(torch: Any) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"  # Linux reports KiB
