"""SFT through TRL's ``SFTTrainer``, configured from the ``train``/``trainer`` config groups."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from ..checkpoints import AtomicCheckpointMixin
from ..guards import NonFiniteLossMixin
from ..resume import batch_geometry
from ..safety import redact_text
from ..tracking import report_to


class MistralSFTTrainer(AtomicCheckpointMixin, NonFiniteLossMixin, SFTTrainer):
    """SFTTrainer with the plain causal-LM loss and a count of non-padding tokens.

    TRL's own ``compute_loss`` routes every step through a chunked log-prob/entropy head to log
    entropy and token accuracy; on small models that costs more than the step itself. We train on
    the model's own loss (identical value: mean NLL over label tokens) and log tokens seen instead.
    Checkpoints are written atomically (``AtomicCheckpointMixin``) and NaN/inf losses follow
    ``on_nan`` (``NonFiniteLossMixin``).
    """

    data_fingerprint: str | None = None  # set by the pipeline; stored in checkpoints, checked on resume

    @property
    def tokens_seen(self) -> int:
        # Kept in TrainerState so that it is saved in trainer_state.json and restored on resume.
        return int(self.state.num_input_tokens_seen)

    def checkpoint_state(self) -> dict:
        return {
            "data_fingerprint": self.data_fingerprint,
            "batch_geometry": batch_geometry(self.args),
            "nan_skipped_steps": list(self.nan_skipped_steps),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            mask = inputs.get("attention_mask")
            ids = inputs["input_ids"]
            local = mask.sum() if mask is not None else ids.new_tensor(ids.numel())
            # Processes see different batches (and padding): sum their counts, as HF's own token count does.
            self.state.num_input_tokens_seen += int(self.accelerator.gather(local.reshape(1)).sum())
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["tokens_seen"] = self.tokens_seen
        if isinstance(logs.get("eval_loss"), float):
            # Perplexity of the eval split: exp of the mean token NLL (inf past float range).
            logs["eval_perplexity"] = math.exp(logs["eval_loss"]) if logs["eval_loss"] < 700 else float("inf")
        super().log(logs, start_time)


def sft_config(cfg: Any, run_dir: Path, has_eval: bool = False) -> SFTConfig:
    train = OmegaConf.to_container(cfg.train, resolve=True)
    if train.get("data_seed") is None:
        train["data_seed"] = train["seed"]  # fixes the sample order, so a resumed run continues at the same sample
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        **train,
        save_strategy="steps",
        logging_strategy="steps",
        eval_strategy="steps" if has_eval else "no",  # every train.eval_steps (default: logging_steps)
        prediction_loss_only=True,  # eval needs the loss only; gathering logits would cost vocab x tokens
        report_to=report_to(cfg.tracking),
        run_name=redact_text(cfg.tracking.run_name or run_dir.name),  # trackers store it
        max_length=None,  # examples are tokenized and truncated by mistral_tune.data
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),
        use_cpu=False,
        label_names=["labels"],
    )


def build_sft_trainer(
    cfg: Any,
    model: Any,
    hf_tokenizer: Any,
    train_dataset: Any,
    run_dir: Path,
    callbacks: list,
    eval_dataset: Any = None,
):
    return MistralSFTTrainer(
        model=model,
        args=sft_config(cfg, run_dir, has_eval=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=hf_tokenizer,
        callbacks=callbacks,
        on_nan=cfg.get("on_nan", "stop"),
    )
