"""TRL internals: DPOTrainer's dataset/reference-log-prob hooks, its fused LM head, trainer metrics, the DPO loss types."""

from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from mistral_tune.compat import broken


class DPOHooks:
    """DPOTrainer mixin: ``_prepare_dataset`` and ``_precompute_ref_logps`` forwarded to public-named hooks.

    Override ``prepare_dpo_dataset(dataset, processing_class, args, dataset_name)`` and
    ``precompute_reference_logps(dataset, name, batch_size)``; ``trl_prepare_dataset`` and
    ``trl_precompute_ref_logps`` are TRL's own.
    """

    def trl_prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def trl_precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def prepare_dpo_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return self.trl_prepare_dataset(dataset, processing_class, args, dataset_name)

    def precompute_reference_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return self.trl_precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepare_dpo_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.precompute_reference_logps(dataset, name, batch_size)


# Attribute names of TRL trainers read here (the canary tests name them from this table).
MODEL_HASH = "_precompute_model_hash"  # DPOTrainer
METRICS = "_metrics"  # DPOTrainer, RewardTrainer: {"train": defaultdict(list), "eval": ...}


def reference_model_hash(trainer: Any) -> str | None:
    """DPOTrainer's hash of the reference weights (``_precompute_model_hash``; None unless precomputing)."""
    return getattr(trainer, MODEL_HASH)


def trainer_metrics(trainer: Any, mode: str) -> dict[str, list]:
    """The per-mode lists TRL's trainers average into each log (``_metrics[mode]``), to append to or rename."""
    return getattr(trainer, METRICS)[mode]


def _loss_types_from_help(help_text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"`'([a-z_]+)'`", help_text.split("Possible values are:")[1].split(". If")[0]))


def _dpo_config_help_from_source() -> str:
    """``DPOConfig.loss_type``'s help text read from TRL's source, without importing TRL (and torch)."""
    from importlib.util import find_spec

    spec = find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "trainer" / "dpo_config.py"
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == "DPOConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == "loss_type":
                    for kw in item.value.keywords:
                        if kw.arg == "metadata":
                            return ast.literal_eval(kw.value)["help"]
    raise LookupError(f"no DPOConfig.loss_type help in {source}")


def dpo_config_loss_help() -> str:
    """``DPOConfig.loss_type``'s help text from the imported class."""
    from trl import DPOConfig

    return DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]


@lru_cache(maxsize=1)
def dpo_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL documents for ``DPOConfig.loss_type`` (TRL has no public list).

    Read from the class when TRL's DPO config is already imported, else from its source file, so
    config validation stays torch-free. The one list: validation and the trainer both use it.
    """
    if "trl.trainer.dpo_config" in sys.modules:
        return _loss_types_from_help(dpo_config_loss_help())
    try:
        return _loss_types_from_help(_dpo_config_help_from_source())
    except (OSError, LookupError, ImportError, IndexError, SyntaxError, ValueError):
        return _loss_types_from_help(dpo_config_loss_help())


# The function trl.trainer.utils.add_fused_lm_head binds as ``model.forward`` (its code object's name; functools.wraps
# renames the function itself to ``forward``). DPOTrainer calls it as ``model(..., labels=, fused_lm_head=True)`` for
# the policy (outputs log_probs, entropy, mean_logits, is_top1 [+ log_sum_sq_probs with use_weighting]) and the
# reference, and reads those fields of the FusedCausalLMOutput it returns, each ``(batch, seq - 1)``, zero where the
# label is -100.
FUSED_FORWARD = "_fused_forward"
FUSED_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
ROUTED = "mistral_tune_scorer"  # marks our forward (idempotent routing)


def has_trl_fused_lm_head(model: Any) -> bool:
    """True when ``model.forward`` is the fused LM head TRL's ``add_fused_lm_head`` installed."""
    code = getattr(getattr(model.forward, "__func__", None), "__code__", None)
    return code is not None and code.co_name == FUSED_FORWARD


def is_routed(model: Any) -> bool:
    return getattr(getattr(model.forward, "__func__", None), ROUTED, None) is not None


def dpo_fused_outputs(args: Any) -> tuple[str, ...]:
    """The optional per-token fields DPOTrainer asks its policy's fused head for (its ``__init__``)."""
    return ("entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if args.use_weighting else ())


def route_fused_lm_head(
    model: Any,
    score: Callable[..., tuple],
    supports: Callable[[Any, Any], bool],
    outputs: tuple[str, ...] = (),
) -> bool:
    """Route the fused LM head TRL installed on ``model`` through ``score`` (TRL's own for what it can't take).

    TRL 1.16 scores, where Triton is absent (CPU), every position (prompt and padding too) over the whole vocabulary
    in 4096-token tiles. ``score(hidden, weight, targets, outputs)`` gets only the rows whose label is not -100 and
    returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` for them (the unrequested ones None).
    ``supports(head, device)`` says whether it can take this head on this device; when not, or for a shifted-labels
    call, a forward asking for router logits or a plain (not fused) call, TRL's forward runs as before. Returns False
    (nothing changed) when ``model`` has no TRL fused head, or scales or softcaps its logits, or is a mixture of experts
    that adds its load-balancing loss (TRL's head does those).
    """
    import functools
    import types

    from trl.trainer.utils import FusedCausalLMOutput

    if is_routed(model):
        return True
    if not has_trl_fused_lm_head(model):
        return False
    missing = [f for f in (*FUSED_FIELDS, "loss", "label_mask") if f not in FusedCausalLMOutput.__dataclass_fields__]
    if missing:
        raise RuntimeError(broken("trl", "trl.trainer.utils.FusedCausalLMOutput", f"has no {missing}"))
    trl_forward = model.forward
    text_config = model.config.get_text_config()
    scaled = any(
        getattr(text_config, key, None) is not None
        for key in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "lm_head_multiplier",
            "logits_scaling",
        )
    )
    if scaled or getattr(text_config, "output_router_logits", False):
        return False  # softcapping, logit scales, the MoE load-balancing loss: TRL's head handles them, ours does not

    @functools.wraps(trl_forward.__func__)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        device = head.weight.device
        if (
            not fused_lm_head
            or labels is None
            or shift_labels is not None
            or kwargs.get("output_router_logits")
            or not supports(head, device)
        ):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1].to(device)
        labels = labels[:, 1:].to(device)
        mask = labels != -100
        rows = score(hidden[mask], head.weight, labels[mask], outputs)
        # masked_scatter keeps the result connected to the model even when no label is valid (as TRL's does)
        per_token = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in rows]
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = per_token
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / divisor,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq_probs,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
        )

    setattr(forward, ROUTED, score)
    model.forward = types.MethodType(forward, model)
    return True
