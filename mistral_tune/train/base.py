"""One thin module per TRL trainer, all with the same interface; ``trainer.name`` picks one.

Each module exposes:

- ``TASK_TYPE``: ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (reward models): the model head, the PEFT task type
  and the kind of merged export;
- ``prepare_data(cfg, tokenizer) -> mistral_tune.data.PreparedData`` (train, eval, holdout, format, report);
- ``build_trainer(cfg, model, tokenizer, data, run_dir, callbacks)``: a transformers ``Trainer`` with a
  ``tokens_seen`` count (non-padding tokens trained on);
- ``finish(trainer, data) -> dict``: readies ``trainer.model`` for saving and export (DPO drops TRL's
  reference adapter here) and returns extra ``summary.json`` fields;
- ``samples(model, tokenizer, data, cfg) -> list[dict]``: the ``samples.jsonl`` records.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from mistral_tune.core.errors import UserError


def get_trainer(name: str) -> ModuleType:
    """The trainer module for ``trainer.name``, from the registry (imported on demand: each one pulls in TRL)."""
    from mistral_tune.config.registry import TRAINERS, load

    return load(TRAINERS[name])


def training_argument_names() -> set[str]:
    """The field names of the installed transformers' ``TrainingArguments``."""
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def common_args(cfg: Any, run_dir: Path, has_eval: bool = False) -> dict[str, Any]:
    """TrainingArguments shared by every trainer: the ``train`` group plus run-directory wiring."""
    from omegaconf import OmegaConf

    from mistral_tune.core.redaction import redact_text
    from mistral_tune.tracking.trackers import report_to

    train = OmegaConf.to_container(cfg.train, resolve=True)
    if train.get("data_seed") is None:
        train["data_seed"] = train["seed"]  # fixes the sample order, so a resumed run continues at the same sample
    if "activation_checkpointing" in training_argument_names():
        # transformers >= 5.2x renamed it (the old name warns and goes in v6); ours stays train.gradient_checkpointing
        train["activation_checkpointing"] = train.pop("gradient_checkpointing")
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        **train,
        save_strategy="steps",
        logging_strategy="steps",
        eval_strategy="steps" if has_eval else "no",  # on data.eval_split every train.eval_steps (or logging_steps)
        per_device_eval_batch_size=train["per_device_train_batch_size"],
        report_to=report_to(cfg.tracking),
        run_name=redact_text(cfg.tracking.run_name or run_dir.name),  # trackers store it
        disable_tqdm=not sys.stderr.isatty(),
        use_cpu=bf16_on_cpu(train),
    )


def bf16_on_cpu(train: dict[str, Any]) -> bool:
    """True when ``train.bf16`` asks for bf16 autocast and there is no accelerator: the CPU runs it.

    transformers refuses ``bf16=True`` without a bf16-capable accelerator unless ``use_cpu`` is set; on a
    machine without one that flag changes nothing else. An accelerator without bf16 (a V100 or T4, say)
    gets one clear error instead of a silent fall-back to the CPU.
    """
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    if not (train.get("bf16") or train.get("bf16_full_eval")):
        return False
    if is_torch_bf16_gpu_available():
        return False  # the GPU (or other accelerator) runs it
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else None
    if device is not None:
        raise UserError(
            f"train.bf16=true, but this {device.type} device has no bf16 support; use train.fp16=true instead."
        )
    return True


class RunStateMixin:
    """What the pipeline reads from a trainer: ``tokens_seen`` and the state stored with each checkpoint.

    Tokens live in ``TrainerState`` so that a resumed run continues the count.
    """

    data_fingerprint: str | None = None  # set by the pipeline; stored in checkpoints, checked on resume
    local_tokens_seen: int = 0  # this process's tokens in this session (not kept across a resume)
    # A weighted mixture: [examples, tokens] trained per source, all processes summed; kept across a resume
    # (stored with each checkpoint). None for a single source.
    mixture_seen: list | None = None

    @property
    def tokens_seen(self) -> int:
        return int(self.state.num_input_tokens_seen)

    def count_tokens(self, model: Any, inputs: dict, local: int | None = None) -> None:
        """Add the non-padding tokens of this training micro-batch, summed over all processes.

        ``local`` is this process's count (default: the attention mask's ones). Processes see different
        batches with different padding, so each rank's count is gathered, not multiplied by the world size.
        Every rank calls this once per micro-batch (a collective, like the forward pass).
        """
        if not model.training:
            return
        import torch

        count = int(inputs["attention_mask"].sum()) if local is None else local
        self.local_tokens_seen += count  # this process's share, for each machine's throughput
        if self.accelerator.num_processes > 1:
            count = int(self.accelerator.gather(torch.tensor([count], device=self.accelerator.device)).sum())
        self.state.num_input_tokens_seen += count

    def count_sources(self, model: Any, counts: Any) -> None:
        """Add a training micro-batch's per-source ``[examples, tokens]`` (mistral_tune.data.mixture's
        ``COUNTS_KEY`` tensor), summed over all processes (a collective on every rank, like ``count_tokens``)."""
        if not model.training or self.mixture_seen is None:
            return
        if self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather(counts.to(self.accelerator.device).unsqueeze(0))
            counts = gathered.sum(0)
        for seen, (examples, tokens) in zip(self.mixture_seen, counts.tolist()):
            seen[0] += int(examples)
            seen[1] += int(tokens)

    def checkpoint_state(self) -> dict:
        from mistral_tune.train.resume import batch_geometry, optimizer_settings

        state = {
            "data_fingerprint": self.data_fingerprint,
            "batch_geometry": batch_geometry(self.args),
            "optimizer_settings": optimizer_settings(self.args),
            "nan_skipped_steps": list(self.nan_skipped_steps),
        }
        if self.mixture_seen is not None:
            state["mixture_seen"] = [list(pair) for pair in self.mixture_seen]
        return state

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["tokens_seen"] = self.tokens_seen
        super().log(logs, start_time)
