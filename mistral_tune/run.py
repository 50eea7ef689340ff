"""The training pipeline: config -> model + tokenizer -> adapter -> data -> trainer -> export.

Each step lives in its own module; this file only wires them in order and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger("mistral_tune")

VERIFY_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return",
    "Sliding windows keep attention local. " * 6,
)


def default_output_dir(recipe: str) -> Path:
    return Path("runs") / f"{recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def setup_logging(run_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(cfg: Any) -> dict[str, Any]:
    """Train and export as ``cfg`` says; returns the run summary (also written to summary.json)."""
    from .export import check_writable, save_json

    run_dir = Path(cfg.output_dir or default_output_dir(cfg.recipe))
    check_writable(run_dir)
    cfg.output_dir = str(run_dir)
    setup_logging(run_dir)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    log.info("run directory: %s", run_dir)
    started = time.time()

    from . import models

    # Before the heavy imports, so an offline machine gets its answer in about a second.
    source = models.download_source(models.resolve_source(cfg.model.name, cfg.model.path), cfg.model)

    import torch
    from transformers import set_seed

    from . import adapters, data, export
    from .generation import greedy_generate
    from .tracking import MetricsJsonl
    from .trainers.sft import build_sft_trainer

    set_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(source)
    compute_dtype = models.resolve_dtype(cfg.model.dtype)
    quant = adapters.quantization_config(cfg.adapter, compute_dtype)
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
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), train_ds, run_dir, [metrics])
    result = trainer.train()
    model = trainer.model

    adapter_dir = None
    if cfg.adapter.name != "none":
        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir)

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
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged": merged_info,
        "peak_memory_bytes": peak_memory_bytes(torch),
    }
    save_json(run_dir / "summary.json", summary)
    log.info("summary: %s", json.dumps(summary))
    return summary


def peak_memory_bytes(torch: Any) -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
