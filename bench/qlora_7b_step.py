"""One QLoRA training step of Mistral 7B on CPU: resident memory per term, against the dry-run estimate.

The base is a bf16 checkpoint on disk (bench/merge_7b.py base writes one: the mistral_7b_en
architecture with random weights). The step runs through the project's own pieces, as a run does:
``models.load_model`` (bitsandbytes NF4 with double quantization while loading, compute dtype fp32 on
CPU), ``adapters.apply_adapter`` (prepare_model_for_kbit_training + LoRA r=16 on every linear layer),
and the SFT trainer (``train.sft.build_sft_trainer``) for one optimizer step of batch 1 x 128 tokens
with gradient checkpointing and the chunked loss. A thread samples this process's RSS every
millisecond (mistral_tune/benchmark/memory.py), so each phase gets its peak:

    /usr/bin/time -v python bench/qlora_7b_step.py --base /tmp/merge7b/base --out bench/results/qlora_7b_step.json

Prints and writes one JSON object: RSS after imports (baseline), after loading the 4-bit base, after
the adapter, the peak during the step, after the step; the dry run's terms for the same config
(``mistral-tune recipe=sft_qlora model=mistral_7b_en model.path=BASE trainer.max_length=128 ... dry_run=true``), and the
measured terms beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3


def overrides(base: Path, seq: int) -> list[str]:
    return [
        f"model.path={base}",
        "model=mistral_7b_en",  # its tokenizer and chat format; the weights come from model.path
        f"trainer.max_length={seq}",
        "train.per_device_train_batch_size=1",
        "train.gradient_checkpointing=true",
        "train.max_steps=1",
        "train.logging_steps=1",
        "export=none",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a bf16 Mistral 7B checkpoint directory")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/qlora-7b-step-run"))
    args = parser.parse_args()

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import mistral_tune.adapters.build as adapters
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.quantization import quantization_config
    from mistral_tune.benchmark.memory import PhasePeaks, current_rss
    from mistral_tune.benchmark.worker import synthetic_dataset
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.pipeline.dry_run import dry_run
    from mistral_tune.train.sft import build_sft_trainer

    cfg = compose("sft_qlora", [*overrides(args.base, args.seq), f"output_dir={args.run_dir}"])
    estimate = dry_run(cfg)  # the same config's estimate (prints its table)

    r: dict = {"base": str(args.base), "seq_len": args.seq, "torch_threads": torch.get_num_threads()}
    peaks = PhasePeaks(cuda=False)
    r["rss_baseline"] = current_rss()
    peaks.enter("load")
    t = time.perf_counter()
    source = resolve_source("mistral_7b_en", str(args.base))
    tokenizer = load_tokenizer(resolve_source("mistral_7b_en", None))
    quant = quantization_config(cfg.adapter, models.resolve_dtype(cfg.model.dtype))
    model = models.load_model(cfg.model, source, seed=cfg.train.seed, quantization_config=quant)
    r["load_seconds"] = round(time.perf_counter() - t, 1)
    r["rss_after_load"] = current_rss()
    peaks.enter("adapter")
    model = adapters.apply_adapter(model, cfg.adapter, gradient_checkpointing=True)
    trainable, total = adapters.count_parameters(model)
    r["parameters"] = {"trainable": trainable, "total": total}
    r["rss_after_adapter"] = current_rss()
    dataset = synthetic_dataset(1, args.seq, model.config.vocab_size, cfg.train.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), dataset, args.run_dir, [])
    r["loss_impl"] = getattr(trainer, "loss_impl", None)
    r["rss_before_step"] = current_rss()
    peaks.enter("step")
    t = time.perf_counter()
    trainer.train()
    r["step_seconds"] = round(time.perf_counter() - t, 1)
    peaks.enter(None)
    r["rss_after_step"] = current_rss()
    peaks.stop()
    r["peaks"] = peaks.peaks
    r["losses"] = [x["loss"] for x in trainer.state.log_history if "loss" in x]

    est = estimate["memory_bytes"]
    act_est = est.get("activations", 0) + est.get("recompute or logits peak", 0)
    measured = {
        "weights": r["rss_after_load"] - r["rss_baseline"],
        "adapter (weights only)": r["rss_after_adapter"] - r["rss_after_load"],
        "adapter + grads + optimizer": r["rss_after_step"] - r["rss_after_load"],
        "activations (step peak above the state after the step)": r["peaks"]["step"] - r["rss_after_step"],
        "peak above baseline": max(r["peaks"].values()) - r["rss_baseline"],
        "peak RSS": max(r["peaks"].values()),
    }
    estimated = {
        "weights": est["weights"],
        "adapter + grads + optimizer": est.get("adapter + grads + optimizer"),
        "activations + recompute/logits": act_est,
        "CUDA context (GPU only)": est.get("CUDA context"),
        "peak": estimate["peak_memory_bytes"],
    }
    r["measured_bytes"], r["estimated_bytes"] = measured, estimated
    r["measured_gib"] = {k: round(v / GiB, 3) for k, v in measured.items()}
    r["estimated_gib"] = {k: round(v / GiB, 3) for k, v in estimated.items() if v is not None}
    r["estimate_over_measured_peak_above_baseline"] = round(
        estimate["peak_memory_bytes"] / measured["peak above baseline"], 3
    )
    text = json.dumps(r, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
