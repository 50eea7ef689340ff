"""SFT through TRL's ``SFTTrainer``, configured from the ``train``/``trainer`` config groups."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from .. import losses
from ..packing import batch_token_count, pack_examples
from ..tracking import report_to


class MistralSFTTrainer(SFTTrainer):
    """SFTTrainer with a lean causal-LM loss and a count of non-padding tokens.

    TRL's own ``compute_loss`` routes every step through a chunked log-prob/entropy head to log
    entropy and token accuracy; on small models that costs more than the step itself. We train on
    the mean NLL over label tokens (the model's own loss, same value) and log tokens seen instead.
    ``loss_impl`` (``trainer.loss``) picks how that NLL meets the vocabulary: ``plain`` lets the
    model build full logits; ``chunked``/``liger`` compute it from the final hidden states without
    them (mistral_tune.losses).
    """

    tokens_seen = 0

    def __init__(self, *args: Any, loss_impl: str = "plain", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen += batch_token_count(inputs) * self.accelerator.num_processes
        inputs["use_cache"] = False  # also required for packed batches: a cache hides their layout
        if self.loss_impl != "plain":
            self.loss_impl = losses.resolve_impl(self.loss_impl, self.args.device)
        if self.loss_impl == "plain" or return_outputs or "labels" not in inputs:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with losses.capture_lm_head_input(model) as captured:
            model(**model_inputs)
        loss = losses.causal_lm_loss(
            captured["hidden"],
            losses.output_head(model),
            inputs["labels"],
            num_items_in_batch=num_items_in_batch,
            impl=self.loss_impl,
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["tokens_seen"] = self.tokens_seen
        super().log(logs, start_time)


def sft_config(cfg: Any, run_dir: Path) -> SFTConfig:
    train = OmegaConf.to_container(cfg.train, resolve=True)
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        **train,
        save_strategy="steps",
        logging_strategy="steps",
        eval_strategy="no",
        report_to=report_to(cfg.tracking),
        run_name=cfg.tracking.run_name or run_dir.name,
        max_length=None,  # examples are tokenized and truncated by mistral_tune.data
        dataset_kwargs={"skip_prepare_dataset": True},
        # Packing is done by mistral_tune.packing (whole examples, counted); TRL's padding-free
        # collator then emits position_ids restarting per example.
        packing=bool(cfg.trainer.packing),
        padding_free=bool(cfg.trainer.packing),
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),
        use_cpu=False,
        label_names=["labels"],
    )


def build_sft_trainer(cfg: Any, model: Any, hf_tokenizer: Any, train_dataset: Any, run_dir: Path, callbacks: list):
    packing_report = None
    if cfg.trainer.packing:
        train_dataset, packing_report = pack_examples(train_dataset, cfg.trainer.max_length)
    trainer = MistralSFTTrainer(
        model=model,
        args=sft_config(cfg, run_dir),
        train_dataset=train_dataset,
        processing_class=hf_tokenizer,
        callbacks=callbacks,
        loss_impl=cfg.trainer.loss,
    )
    trainer.packing_report = packing_report
    return trainer
