"""Where a training step's time goes besides forward + backward: each piece of the Trainer loop, timed alone.

Builds the recipe's real trainer (mistral_tune.train.sft with the metrics.jsonl callback), trains a
few steps so every lazy initialization is done, then times each per-step piece of the loop on
its own (median of 30 calls) next to a full ``training_step`` (forward + backward).

Command:
    python bench/step_breakdown.py [key=value ...]     e.g. trainer.loss=plain
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, n: int = 30) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(overrides: list[str]) -> int:
    import torch
    from transformers import set_seed

    import mistral_tune.adapters.build as adapters
    import mistral_tune.data.sft as data
    import mistral_tune.models.loading as models
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.tracking.metrics import MetricsJsonl
    from mistral_tune.tracking.progress import ProgressReporter, use_progress_reporter
    from mistral_tune.train.sft import build_sft_trainer
    from mistral_tune.train.signals import GracefulStop

    cfg = compose("sft_lora", ["train.max_steps=3", "train.save_steps=1000", "train.logging_steps=1", *overrides])
    set_seed(cfg.train.seed)
    source = resolve_source(cfg.model.name, cfg.model.path)
    tokenizer = load_tokenizer(source)
    model = adapters.apply_adapter(models.load_model(cfg.model, source, seed=cfg.train.seed), cfg.adapter)
    dataset = data.prepare_sft_data(cfg.data, cfg.trainer, tokenizer).train
    run_dir = Path(tempfile.mkdtemp(prefix="step-breakdown-"))
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), dataset, run_dir, [GracefulStop(), metrics])
    use_progress_reporter(trainer, ProgressReporter(metrics))  # as mistral_tune.pipeline.run does
    trainer.train()

    model = trainer.model_wrapped
    batches = iter(trainer.get_train_dataloader())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.training_step(model, dict(batch))  # leaves gradients for clipping / the optimizer
    framework_only = [
        ("next batch (sampler + collator)", timed(lambda: next(batches))),
        ("num_items_in_batch", timed(lambda: trainer._get_num_items_in_batch([batch], trainer.args.device))),
        ("floating_point_ops (flos metric)", timed(lambda: trainer.floating_point_ops(batch))),
        ("model.train()", timed(model.train)),
        ("clip_grad_norm_ (max_grad_norm)", timed(lambda: trainer._clip_grad_norm(model))),
        ("grad-norm finite check (on_nan)", timed(lambda: trainer.grad_norm_hook(model, grad_norm=torch.tensor(1.0)))),
        ("lr_scheduler.step() + read lr", timed(lambda: (trainer.lr_scheduler.step(), trainer._get_learning_rate()))),
        (
            "log() incl. metrics.jsonl and the progress line",
            timed(lambda: trainer.log({"loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-3})),
        ),
    ]
    shared = [
        ("optimizer.step()", timed(trainer.optimizer.step)),
        ("model.zero_grad()", timed(model.zero_grad)),
    ]
    overhead = sum(t for _, t in framework_only)
    step = timed(lambda: trainer.training_step(model, dict(batch)), n=10)
    print(f"| piece (recipe sft_lora {' '.join(overrides)}) | ms per step |\n|---|---|")
    for name, t in framework_only:
        print(f"| {name} | {1e3 * t:.2f} |")
    print(f"| **framework-only pieces** | **{1e3 * overhead:.2f}** |")
    for name, t in shared:
        print(f"| {name} (the bare loop does it too) | {1e3 * t:.2f} |")
    print(f"| training_step: forward + loss + backward | {1e3 * step:.1f} |")
    print(f"\nframework-only overhead: {100 * overhead / step:.2f}% of a training_step")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
