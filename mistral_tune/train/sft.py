"""SFT through TRL's ``SFTTrainer``, configured from the ``train``/``trainer`` config groups."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import Trainer
from trl import SFTConfig, SFTTrainer

import mistral_tune.train.lm_head_loss as losses
from mistral_tune.compat.transformers import attn_implementation
from mistral_tune.data.mixture import COUNTS_KEY, SOURCE_COLUMN, SourceCountingCollator
from mistral_tune.data.packing import batch_token_count, prepare_packing
from mistral_tune.train.base import RunStateMixin, common_args
from mistral_tune.train.checkpoints import AtomicCheckpointMixin
from mistral_tune.train.nonfinite import NonFiniteLossMixin

log = logging.getLogger(__name__)


class MistralSFTTrainer(RunStateMixin, AtomicCheckpointMixin, NonFiniteLossMixin, SFTTrainer):
    """SFTTrainer with a lean causal-LM loss and a count of non-padding tokens.

    TRL's own ``compute_loss`` routes every step through a chunked log-prob/entropy head to log
    entropy and token accuracy; on small models that costs more than the step itself. We train on
    the model's own loss (identical value: mean NLL over label tokens) and log tokens seen instead.
    ``loss_impl`` (``trainer.loss``) picks how that NLL meets the vocabulary: ``plain`` lets the
    model build full logits; ``chunked``/``liger`` compute it from the final hidden states without
    them (mistral_tune.train.lm_head_loss).
    Checkpoints are written atomically (``AtomicCheckpointMixin``) and NaN/inf losses follow
    ``on_nan`` (``NonFiniteLossMixin``).
    """

    def __init__(self, *args: Any, loss_impl: str = "plain", **kwargs: Any):
        super().__init__(*args, **kwargs)
        # auto -> liger or chunked, once (an impossible liger fails here, before the first step)
        self.loss_impl = loss_impl if loss_impl == "plain" else losses.resolve_impl(loss_impl, self.args.device)
        self._head_capture = None  # installed on the first chunked/liger step
        self._router_aux: list[float] = []  # Mixtral: load-balancing losses since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = inputs.pop(COUNTS_KEY, None)  # a weighted mixture: examples and tokens per source
        if model.training:
            self.count_tokens(model, inputs, batch_token_count(inputs))
            if counts is not None:
                self.count_sources(model, counts)
        inputs["use_cache"] = False  # also required for packed batches: a cache hides their layout
        if self.loss_impl == "plain" or return_outputs or "labels" not in inputs:
            # The model's own loss; a Mixtral with output_router_logits has already added
            # router_aux_loss_coef x its load-balancing loss to it (and returns aux_loss to log).
            loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
            self.record_router_aux_loss(model, getattr(outputs, "aux_loss", None))
            return (loss, outputs) if return_outputs else loss
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self._head_capture is None:
            if losses.head_is_sharded(losses.output_head(model)):
                log.warning(
                    "trainer.loss=%s: the LM head is sharded (ZeRO-3/FSDP); using the plain loss", self.loss_impl
                )
                self.loss_impl = "plain"
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            self._head_capture = losses.HeadInputCapture(model)
        with self._head_capture.active_for_one_call() as captured:
            outputs = model(**model_inputs)
        hidden, captured.hidden = captured.hidden, None
        loss = losses.causal_lm_loss(
            hidden,
            captured.head,
            inputs["labels"],
            num_items_in_batch=num_items_in_batch,
            impl=self.loss_impl,
        )
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:
            # Without labels the model returns the router's load-balancing loss unweighted; add it as
            # MixtralForCausalLM does when it computes the loss itself.
            loss = loss + router_aux_loss_coef(model) * aux.to(loss.device)
            self.record_router_aux_loss(model, aux)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages the gradients
        return loss

    def record_router_aux_loss(self, model: Any, aux: Any) -> None:
        """Keep a training step's router load-balancing loss (unweighted) for the next log line."""
        if aux is not None and model.training:
            self._router_aux.append(float(aux.detach()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._router_aux and "loss" in logs:
            # The mean unweighted load-balancing loss over the logging window: num_experts_per_tok (2 for
            # Mixtral) when tokens spread evenly over the experts, more as the router favours a few.
            logs["aux_loss"] = sum(self._router_aux) / len(self._router_aux)
            self._router_aux = []
        if isinstance(logs.get("eval_loss"), float):
            # Perplexity of the eval split: exp of the mean token NLL (inf past float range).
            logs["eval_perplexity"] = math.exp(logs["eval_loss"]) if logs["eval_loss"] < 700 else float("inf")
        super().log(logs, start_time)


def router_aux_loss_coef(model: Any) -> float:
    """The weight of a mixture-of-experts model's load-balancing loss (its config's router_aux_loss_coef)."""
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "module"):  # DDP/DeepSpeed wrappers
        model = model.module
        config = getattr(model, "config", None)
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def sft_config(cfg: Any, run_dir: Path, has_eval: bool = False, *, flat_packing: bool = False) -> SFTConfig:
    """TRL's config from ours. ``flat_packing``: packed rows go through TRL's flattening padding-free
    collator (flash-attn varlen); otherwise packed batches use mistral_tune.data.packing's collator."""
    return SFTConfig(
        **common_args(cfg, run_dir, has_eval),
        prediction_loss_only=True,  # eval needs the loss only; gathering logits would cost vocab x tokens
        max_length=None,  # examples are tokenized and truncated by mistral_tune.data
        dataset_kwargs={"skip_prepare_dataset": True},
        # Packing itself is done by mistral_tune.packing (whole examples, counted).
        packing=flat_packing,
        padding_free=flat_packing,
        remove_unused_columns=False,
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
    num_sources: int = 0,
):
    """``num_sources``: the sources of a weighted mixture (0 or 1: one source, nothing counted per source)."""
    collator, flat, packing_report = None, False, None
    if cfg.trainer.packing:
        train_dataset, collator, flat, packing_report = prepare_packing(
            train_dataset, cfg.trainer.max_length, attn_implementation(model.config), pad_token_id(hf_tokenizer)
        )
    trainer = MistralSFTTrainer(
        model=model,
        args=sft_config(cfg, run_dir, has_eval=eval_dataset is not None, flat_packing=flat),
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=hf_tokenizer,
        callbacks=callbacks,
        on_nan=cfg.on_nan,
        loss_impl=cfg.trainer.loss,
    )
    trainer.packing_report = packing_report
    if num_sources > 1 and SOURCE_COLUMN in train_dataset.column_names:
        trainer.data_collator = SourceCountingCollator(trainer.data_collator, num_sources)
        trainer.mixture_seen = [[0, 0] for _ in range(num_sources)]
    return trainer


def pad_token_id(hf_tokenizer: Any) -> int:
    """The id padding uses (TRL falls back to EOS the same way); padded positions are never trained."""
    return hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id


# The interface shared by every trainer module (see mistral_tune/trainers/__init__.py).
TASK_TYPE = "CAUSAL_LM"


def prepare_data(cfg: Any, tokenizer: Any):
    import mistral_tune.data.sft as data

    return data.prepare_sft_data(cfg.data, cfg.trainer, tokenizer)


def build_trainer(cfg: Any, model: Any, tokenizer: Any, data: Any, run_dir: Path, callbacks: list):
    return build_sft_trainer(
        cfg, model, tokenizer.to_hf(), data.train, run_dir, callbacks, eval_dataset=data.eval,
        num_sources=len(data.report.sources),
    )  # fmt: skip


def finish(trainer: Any, data: Any) -> dict:
    return {}


def samples(model: Any, tokenizer: Any, data: Any, cfg: Any) -> list[dict]:
    """Greedy generations for held-out prompts, next to the reference answer."""
    from mistral_tune.data.sft import prompt_and_reference
    from mistral_tune.inference.generation import greedy_generate

    if not cfg.export.num_samples or not data.holdout:
        return []
    pairs = [
        prompt_and_reference(r, data.format, cfg.data.system_prompt) for r in data.holdout[: cfg.export.num_samples]
    ]
    generations = greedy_generate(model, tokenizer, [p for p, _ in pairs], cfg.export.sample_max_new_tokens)
    return [{"prompt": p, "reference": ref, "generation": g} for (p, ref), g in zip(pairs, generations)]
