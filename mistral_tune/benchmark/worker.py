"""Benchmark one variant in this process: the framework's steps, each followed by a bare step.

The framework is the real training path (the recipe's trainer module ``build_trainer``, with the same
metrics.jsonl callback a run has), or with ``bench.trainer=trl`` TRL's stock ``SFTTrainer`` (SFT) or our
DPO trainer with TRL's own fused LM head (DPO: the path before completion-only log-probs). After every
framework step, the exact batches that step consumed go through a bare PyTorch loop on the same model
object (same weights, adapter, dtype, attention backend), with the same optimizer class, always eagerly
(with ``train.torch_compile`` it calls the module inside the compiled wrapper):

- SFT: ``model(**batch).loss.backward()``;
- DPO: the sigmoid DPO loss by hand from full logits: ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))``, with
  policy log-probs summed over the completion tokens and the reference's under ``no_grad`` (the adapter
  TRL keeps as "ref", or the adapter disabled, or the frozen reference copy);
- reward: the pairwise loss ``-logsigmoid(r_chosen - r_rejected)`` of the one-output head;

then ``optimizer.step(); optimizer.zero_grad()``. Interleaving step by step puts both under the same
machine load, which matters on a shared CPU. Each side's minor page faults and user/system CPU seconds
(``getrusage``) are summed over its measured steps.

A framework step is timed from the end of the previous bare step to the trainer's ``on_step_end``:
data loading, collation, forward, backward, clipping, optimizer, scheduler and the previous step's
logging all fall inside it. Checkpoint saving is switched off (it is I/O, not step cost).

Run as ``python -m mistral_tune.benchmark.worker SPEC.json RESULT.json`` (the harness does this).
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mistral_tune.compat.transformers import attn_implementation

FLOPS_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
)


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _usage_delta(before: tuple, total: dict) -> None:
    now = _usage()
    for key, a, b in zip(("user_seconds", "system_seconds", "minor_faults"), before, now):
        total[key] = total.get(key, 0) + (b - a)


def synthetic_dataset(rows: int, length: int, vocab_size: int, seed: int):
    """Random token rows of exactly ``length`` tokens, every token trained (throughput runs)."""
    import torch
    from datasets import Dataset

    ids = torch.randint(3, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepTimer(TrainerCallback):
    """Trainer callback: times framework steps, runs the paired bare step, tracks phase memory."""

    def __init__(self, warmup: int, bare: bool, peaks: Any, cuda: bool, kind: str = "sft", beta: float = 0.1):
        self.warmup, self.bare, self.peaks, self.cuda = warmup, bare, peaks, cuda
        self.kind, self.beta = kind, beta  # which bare loss: sft | dpo | reward
        self.ref_model = None  # DPO with a frozen reference copy (full fine-tuning)
        self.usage: dict[str, dict] = {"framework": {}, "bare": {}}  # rusage over the measured steps
        self.usage_mark = _usage()
        self.pending: list[dict] = []  # batches the framework consumed since the last step end
        self.model = None
        self.optimizer = None
        self.trainer = None
        self.framework_seconds: list[float] = []
        self.bare_seconds: list[float] = []
        self.bare_losses: list[float] = []
        self.step_batches: list[list[dict]] = []
        self.mark = self.started = 0.0
        self.warmup_seconds = 0.0  # wall time of the warm-up steps (compilation, first-touch allocations)

    def clock(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def record(self, model: Any, inputs: dict) -> None:
        # The floor runs eagerly: with train.torch_compile the trainer's model is a compiled wrapper,
        # and the bare loop takes the module inside it, so compiled and eager steps interleave.
        self.model = getattr(model, "_orig_mod", model)
        self.pending.append(dict(inputs))

    def on_train_begin(self, args, state, control, **kwargs):
        self.peaks.enter("warmup" if self.warmup else "framework")
        self.mark = self.started = self.clock()
        self.usage_mark = _usage()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        measured = state.global_step > self.warmup
        batches, self.pending = self.pending, []
        if measured:
            _usage_delta(self.usage_mark, self.usage["framework"])
            self.framework_seconds.append(now - self.mark)
            self.step_batches.append([_token_stats(b) for b in batches])
        if self.bare:
            self.peaks.enter("bare" if measured else "warmup")
            start, usage = self.clock(), _usage()
            loss = self.bare_step(batches)
            end = self.clock()
            if measured:
                _usage_delta(usage, self.usage["bare"])
                self.bare_seconds.append(end - start)
                self.bare_losses.append(loss)
        control.should_save = False
        if state.global_step == self.warmup:
            self.warmup_seconds = self.clock() - self.started
        self.peaks.enter("framework" if state.global_step + 1 > self.warmup else "warmup")
        self.mark = self.clock()
        self.usage_mark = _usage()
        return control

    def bare_step(self, batches: list[dict]) -> float:
        """The floor: forward, backward, optimizer step, on the framework's own batches."""
        if self.optimizer is None:
            cls, kwargs = self.trainer.get_optimizer_cls_and_kwargs(self.trainer.args, self.trainer.model)
            self.optimizer = cls([p for p in self.model.parameters() if p.requires_grad], **kwargs)
        total = 0.0
        for batch in batches:
            if self.kind == "dpo":
                loss = bare_dpo_loss(self.model, batch, self.beta, self.ref_model) / len(batches)
            elif self.kind == "reward":
                loss = bare_reward_loss(self.model, batch) / len(batches)
            else:
                inputs = {k: v for k, v in batch.items() if k != "use_cache"}
                loss = self.model(**inputs, use_cache=False).loss / len(batches)
            loss.backward()
            total += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)


def bare_dpo_loss(model: Any, batch: dict, beta: float, ref_model: Any = None):
    """The sigmoid DPO loss by hand: full logits, log-softmax, completion tokens summed; the batch is [chosen, rejected]."""
    import torch
    import torch.nn.functional as F

    ids, mask = batch["input_ids"], batch["attention_mask"]
    completion = batch["completion_mask"][:, 1:]

    def sequence_logps(m):
        logits = m(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token * completion).sum(-1)

    policy = sequence_logps(model)
    with torch.no_grad():
        if ref_model is not None:
            reference = sequence_logps(ref_model)
        elif "ref" in getattr(model, "peft_config", {}):  # TRL's frozen copy of the starting adapter
            model.set_adapter("ref")
            try:
                reference = sequence_logps(model)
            finally:
                model.set_adapter("default")
        else:
            with model.disable_adapter():
                reference = sequence_logps(model)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def bare_reward_loss(model: Any, batch: dict):
    """The pairwise (Bradley-Terry) reward loss by hand; the batch is [chosen, rejected]."""
    import torch.nn.functional as F

    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def _token_stats(batch: dict) -> dict:
    from mistral_tune.benchmark.flops import example_lengths
    from mistral_tune.data.packing import batch_token_count

    if "labels" in batch:
        label_tokens = int((batch["labels"][..., 1:] != -100).sum())
    elif "completion_mask" in batch:  # DPO: the completion tokens are the scored ones
        label_tokens = int(batch["completion_mask"][..., 1:].sum())
    else:  # reward: one score per sequence
        label_tokens = int(batch["input_ids"].shape[0])
    return {
        "tokens": batch_token_count(batch),
        "padded_tokens": int(batch["input_ids"].numel()),
        "label_tokens": label_tokens,
        "lengths": example_lengths(batch),
    }


def compute_dtype(cfg: Any, model: Any) -> str:
    """The dtype the matmuls run in: the autocast dtype when mixed precision is on, else the weights'."""
    if cfg.train.bf16:
        return "bfloat16"
    if cfg.train.fp16:
        return "float16"
    return str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the variant's model, data and trainer, train warmup + steps, and return raw timings."""
    import torch
    from transformers import set_seed

    import mistral_tune.adapters.build as adapters
    import mistral_tune.data.sft as data
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.quantization import quantization_config
    from mistral_tune.benchmark.memory import PhasePeaks, current_rss, process_peak_rss
    from mistral_tune.config.compose import compose
    from mistral_tune.data.packing import prepare_packing
    from mistral_tune.models.sources import download_source, resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.tracking.metrics import MetricsJsonl
    from mistral_tune.tracking.progress import ProgressReporter, use_progress_reporter
    from mistral_tune.train.base import get_trainer
    from mistral_tune.train.sft import build_sft_trainer, pad_token_id, sft_config
    from mistral_tune.train.signals import GracefulStop

    hydra_overrides, options = spec["hydra_overrides"], spec["options"]  # typed by mistral_tune.cli.bench
    total_steps = spec["warmup"] + spec["steps"]
    run_dir = Path(spec["run_dir"])
    cfg = compose(spec["recipe"], [*hydra_overrides, f"train.max_steps={total_steps}", f"output_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)
    cuda = torch.cuda.is_available()
    kind = cfg.trainer.name  # sft | dpo | reward
    method = get_trainer(kind)

    source = download_source(resolve_source(cfg.model.name, cfg.model.path), cfg.model)
    tokenizer = load_tokenizer(source)
    quant = quantization_config(cfg.adapter, models.resolve_dtype(cfg.model.dtype))
    # On a GPU, build the random-init model there: a 7B fp32 init on the CPU takes minutes.
    with torch.device("cuda") if cuda and quant is None else contextlib.nullcontext():
        model = models.load_model(
            cfg.model, source, seed=cfg.train.seed, quantization_config=quant, task=method.TASK_TYPE
        )
    model = adapters.apply_adapter(
        model, cfg.adapter, gradient_checkpointing=cfg.train.gradient_checkpointing, task_type=method.TASK_TYPE
    )
    trainable, total = adapters.count_parameters(model)

    synthetic = options["synthetic_length"]
    if kind != "sft" and synthetic:
        from mistral_tune.core.errors import UserError

        raise UserError(f"bench.synthetic_length is for SFT recipes; trainer={kind} benchmarks its preference data.")
    if kind != "sft":
        prepared = method.prepare_data(cfg, tokenizer)
    elif synthetic:
        rows = total_steps * cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
        dataset = synthetic_dataset(rows, synthetic, model.config.vocab_size, cfg.train.seed)
    else:
        dataset = data.prepare_sft_data(cfg.data, cfg.trainer, tokenizer).train

    peaks = PhasePeaks(cuda=cuda)
    timer = StepTimer(spec["warmup"], options["bare"], peaks, cuda, kind, float(getattr(cfg.trainer, "beta", 0.1)))
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    callbacks = [metrics, timer]
    if kind != "sft":
        if options["trainer"] == "trl" and kind != "dpo":
            from mistral_tune.core.errors import UserError

            raise UserError("bench.trainer=trl is for sft and dpo recipes.")
        extra = {"completion_logps": False} if options["trainer"] == "trl" else {}  # DPO: TRL's own fused LM head
        trainer = method.build_trainer(cfg, model, tokenizer, prepared, run_dir, [GracefulStop(), *callbacks], **extra)
        use_progress_reporter(trainer, ProgressReporter(metrics))
        timer.ref_model = getattr(trainer, "ref_model", None)
    elif options["trainer"] == "trl":
        from trl import SFTTrainer

        collator, flat = None, False
        if cfg.trainer.packing:
            attn = attn_implementation(model.config)
            dataset, collator, flat, _ = prepare_packing(
                dataset, cfg.trainer.max_length, attn, pad_token_id(tokenizer.to_hf())
            )
        trainer = SFTTrainer(
            model=model,
            args=sft_config(cfg, run_dir, flat_packing=flat),
            data_collator=collator,
            train_dataset=dataset,
            processing_class=tokenizer.to_hf(),
            callbacks=callbacks,
        )
    else:
        # As mistral_tune.run builds it: metrics.jsonl, the stop-on-signal check and the progress lines.
        trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), dataset, run_dir, [GracefulStop(), *callbacks])
        use_progress_reporter(trainer, ProgressReporter(metrics))
    timer.trainer = trainer
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            timer.record(model, inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    rss_before = current_rss()
    load_before = _load_average()
    trainer.train()
    peaks.stop()

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "name": spec["name"],
        "recipe": spec["recipe"],
        "overrides": spec["overrides"],
        "trainer": options["trainer"],
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "dtype": compute_dtype(cfg, model),
        "attn_implementation": attn_implementation(model.config),
        "loss_impl": getattr(trainer, "loss_impl", None) or _logps_impl(trainer),
        "packing": trainer.packing_report.as_dict() if getattr(trainer, "packing_report", None) else None,
        "gradient_checkpointing": bool(cfg.train.gradient_checkpointing),
        "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "parameters": {"trainable": trainable, "total": total},
        "adapter": cfg.adapter.name,
        "model_config": {k: getattr(model.config, k, None) for k in FLOPS_CONFIG_KEYS},
        "warmup_seconds": timer.warmup_seconds,
        "framework_seconds": timer.framework_seconds,
        "bare_seconds": timer.bare_seconds,
        "bare_losses": timer.bare_losses,
        "framework_losses": losses,
        "usage": timer.usage,
        "step_batches": timer.step_batches,
        "memory_kind": peaks.kind,
        "peak_memory": peaks.peaks,
        "rss_before_train_bytes": rss_before,
        "process_peak_rss_bytes": process_peak_rss(),
        # 1-minute load averages before and after training: on a shared machine they say how much
        # of the absolute timings is other people's work (the interleaved ratios are robust to it).
        "load_average": [load_before, _load_average()],
    }


def _logps_impl(trainer: Any) -> str:
    """How a preference trainer meets the vocabulary: our completion-token log-probs, or TRL's fused head."""
    if getattr(trainer, "routed_heads", None):
        return "completion_logps"
    return "trl_fused_head" if hasattr(trainer, "routed_heads") else "trl"


def _load_average():
    import os

    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_variant(spec)
    Path(result_path).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
