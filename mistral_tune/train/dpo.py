"""DPO through TRL's ``DPOTrainer`` on pairs tokenized by ``mistral_tune.preference_data``.

The pairs arrive tokenized with the same chat template SFT uses, so TRL's own templating is skipped.
With LoRA/QLoRA the reference model is the policy's own base with the adapter at its starting point
(TRL keeps a frozen copy of the adapter, or disables it), so the base weights are held once; full
fine-tuning keeps a frozen copy of the model unless reference log-probs are precomputed. Precomputed
reference log-probs are cached on disk, keyed by the tokenized data, the model weights and the template.

Log-probs: TRL 1.16's fused LM head scores, where Triton is absent (CPU), every position of every sequence (prompt and
padding too) over the whole vocabulary, through ~0.5 GB temporaries per 4096 tokens: most of a CPU step and tens of
thousands of page faults per call. ``MistralDPOTrainer`` routes the policy's and the reference's fused head through
``lm_head_loss.token_logprobs`` instead: completion tokens only, in 16 MiB chunks, the hidden-state gradient kept from
the forward (no recomputation). Same values (tests/train/test_dpo_logps.py compares loss, rewards, metrics and
gradients with stock TRL); on CUDA with Triton, and for heads it cannot take, TRL's own head runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer

from mistral_tune.compat.trl import (
    DPOHooks,
    dpo_fused_outputs,
    dpo_loss_types,
    reference_model_hash,
    route_fused_lm_head,
    trainer_metrics,
)
from mistral_tune.core.errors import UserError
from mistral_tune.train.base import RunStateMixin, common_args
from mistral_tune.train.checkpoints import AtomicCheckpointMixin
from mistral_tune.train.nonfinite import NonFiniteLossMixin

log = logging.getLogger(__name__)


TASK_TYPE = "CAUSAL_LM"

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def installed_loss_types() -> list[str]:
    """The loss types the installed TRL documents for ``DPOConfig.loss_type`` (the one list, in compat)."""
    return list(dpo_loss_types())


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mistral-tune" / "ref_logps"


class MistralDPOTrainer(RunStateMixin, AtomicCheckpointMixin, NonFiniteLossMixin, DPOHooks, DPOTrainer):
    """DPOTrainer that takes pre-tokenized pairs and caches reference log-probs on disk.

    Like SFT: atomic checkpoints, ``on_nan``, and a token count kept across resumes.
    """

    ref_cache_dir: Path | None = None
    chat_template: str = ""
    completion_logps: bool = True  # route TRL's fused LM heads through lm_head_loss.token_logprobs
    routed_heads: tuple[str, ...] = ()  # which ones were: "policy", "reference"

    def __init__(
        self,
        *args,
        ref_cache_dir: Path | None = None,
        chat_template: str = "",
        completion_logps: bool = True,
        **kwargs,
    ):
        self.ref_cache_dir, self.chat_template = ref_cache_dir, chat_template
        self.completion_logps = completion_logps
        self.ref_cache: dict[str, dict[str, Any]] = {}  # per dataset name: cache file and whether it was hit
        super().__init__(*args, **kwargs)
        self.route_lm_heads()

    def route_lm_heads(self) -> None:
        """Score completion tokens only (``lm_head_loss.token_logprobs``) in TRL's fused heads; idempotent.

        Called at the end of ``__init__`` and before TRL precomputes reference log-probs (inside ``__init__``).
        """
        if not self.completion_logps:
            return
        from peft import PeftModel

        import mistral_tune.train.lm_head_loss as heads

        policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        routed = []
        if route_fused_lm_head(policy, heads.token_logprobs, completion_head_supported, dpo_fused_outputs(self.args)):
            routed.append("policy")
        if self.ref_model is not None:
            ref = self.accelerator.unwrap_model(self.ref_model)
            if route_fused_lm_head(ref, heads.token_logprobs, completion_head_supported):
                routed.append("reference")
        self.routed_heads = tuple(routed)

    def prepare_dpo_dataset(self, dataset, processing_class, args, dataset_name):
        if all(c in dataset.column_names for c in TOKENIZED_COLUMNS):
            return dataset  # templated, tokenized and length-fitted by mistral_tune.preference_data
        return self.trl_prepare_dataset(dataset, processing_class, args, dataset_name)

    def cache_key(self, dataset: Any) -> str:
        """Hash of what the reference log-probs depend on: the token ids, the reference weights, the template."""
        h = hashlib.sha256()
        settings = {"model": reference_model_hash(self), "template": self.chat_template, "ld_alpha": self.ld_alpha}
        h.update(json.dumps(settings, sort_keys=True).encode())
        for column in TOKENIZED_COLUMNS:
            h.update(json.dumps(list(dataset[column])).encode())
        return h.hexdigest()[:32]

    def precompute_reference_logps(self, dataset, name, batch_size):
        self.route_lm_heads()  # TRL precomputes inside its __init__, before ours routes the heads
        if self.ref_cache_dir is None:
            return self.trl_precompute_ref_logps(dataset, name, batch_size)
        from accelerate.utils import broadcast_object_list

        # Rank 0 decides for everyone: under ZeRO-3 each rank hashes only its own weight shards, and a rank
        # that skipped the pass while the others ran it would hang in their collectives.
        decision = [None, None]  # the cache key, and the cached columns when the cache hits
        if self.accelerator.is_main_process:
            key = self.cache_key(dataset)
            path = self.ref_cache_dir / f"{key}.json"
            cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            hit = cached is not None and all(len(cached.get(c, [])) == len(dataset) for c in REF_COLUMNS)
            decision = [key, cached if hit else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        key, columns = decision
        path = self.ref_cache_dir / f"{key}.json"
        if columns is not None:
            log.info("dpo: reference log-probs for %s loaded from cache %s", name, path)
            self.ref_cache[name] = {"path": str(path), "hit": True}
        else:
            columns = self._compute_ref_columns(dataset, name, batch_size, key)
            if self.accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps(columns), encoding="utf-8")
                tmp.replace(path)  # atomic: a reader never sees half a file
                log.info("dpo: reference log-probs for %s cached in %s", name, path)
            self.ref_cache[name] = {"path": str(path), "hit": False}
        from datasets import Value

        for column in REF_COLUMNS:
            dataset = dataset.add_column(column, columns[column], feature=Value("float32"))
        return dataset

    def _compute_ref_columns(self, dataset, name, batch_size, key) -> dict[str, list[float]]:
        """TRL's reference pass, as plain lists (every rank gets all of them).

        TRL hands rank 0's result to the other ranks through a file in the dataset's cache directory. Our
        datasets live in memory, and each process's in-memory cache directory is its own temporary one, so
        with several processes the dataset is first saved where every rank finds it (next to the cache),
        and removed once all ranks have read the result.
        """
        if self.accelerator.num_processes == 1 or dataset.cache_files:
            out = self.trl_precompute_ref_logps(dataset, name, batch_size)
            return {c: [float(x) for x in out[c]] for c in REF_COLUMNS}
        import shutil

        from datasets import Dataset

        shared = self.ref_cache_dir / f"{key}.{name}.dataset"
        if self.accelerator.is_main_process:
            shutil.rmtree(shared, ignore_errors=True)  # a crashed run's leftover
            dataset.save_to_disk(str(shared))
        self.accelerator.wait_for_everyone()
        out = self.trl_precompute_ref_logps(Dataset.load_from_disk(str(shared)), name, batch_size)
        columns = {c: [float(x) for x in out[c]] for c in REF_COLUMNS}
        del out
        # No barrier on an error path (a rank waiting there would outlive the failed one): a crash leaves the
        # directory behind, and the next run with the same key removes it first.
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(shared, ignore_errors=True)
        return columns

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)  # non-padding tokens of the chosen and the rejected sequences
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL's num_tokens counts training tokens; under an eval_ prefix it read as the eval set's size.
        if not self.model.training:
            trainer_metrics(self, "eval").pop("num_tokens", None)
        super().log(logs, start_time)


def completion_head_supported(head: Any, device: Any) -> bool:
    """Whether ``token_logprobs`` takes this LM head: a bias-free, unsharded ``nn.Linear``, off Triton's devices.

    On CUDA/XPU with Triton, TRL's fused kernel already scores only the label positions; we keep it there.
    """
    import torch
    from transformers.utils import is_triton_available

    import mistral_tune.train.lm_head_loss as heads

    if type(head) is not torch.nn.Linear or head.bias is not None or heads.head_is_sharded(head):
        return False
    return not (device.type in ("cuda", "xpu") and is_triton_available())


def loss_types(trainer_cfg: Any) -> list[str]:
    losses = [t.strip() for t in str(trainer_cfg.loss_type).split("+")]
    unknown = [t for t in losses if t not in installed_loss_types()]
    if unknown:
        raise UserError(
            f"trainer.loss_type={trainer_cfg.loss_type}: the installed TRL has no {unknown} loss; "
            f"it offers {', '.join(installed_loss_types())}."
        )
    return losses


def dpo_config(cfg: Any, run_dir: Path, has_eval: bool = False) -> DPOConfig:
    t = cfg.trainer
    return DPOConfig(
        **common_args(cfg, run_dir, has_eval),
        beta=t.beta,
        loss_type=loss_types(t),
        loss_weights=list(t.loss_weights) if t.loss_weights is not None else None,
        label_smoothing=t.label_smoothing,
        # Pairs are already fitted to max_length by mistral_tune.preference_data (truncation_mode applied
        # there), so TRL's collator limit never cuts; keep_start avoids TRL's keep_end deprecation warning.
        max_length=t.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=t.precompute_ref_log_probs,
        # Mixtral: TRL adds (and logs as aux_loss) the router's load-balancing loss; 0 turns it off.
        router_aux_loss_coef=cfg.model.router_aux_loss_coef if cfg.model.output_router_logits else 0.0,
    )


def reference_model(cfg: Any, model: Any):
    """A frozen copy for full fine-tuning; None otherwise (TRL uses the adapter's starting point)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) or cfg.trainer.precompute_ref_log_probs:
        return None
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def prepare_data(cfg: Any, tokenizer: Any):
    from mistral_tune.data.preference import prepare_preference_data

    return prepare_preference_data(cfg.data, cfg.trainer, tokenizer)


def build_trainer(
    cfg: Any, model: Any, tokenizer: Any, data: Any, run_dir: Path, callbacks: list, completion_logps: bool = True
):
    """``completion_logps=False`` keeps TRL's own fused LM head (``mistral-tune bench`` compares the two)."""
    cache = None
    if cfg.trainer.precompute_ref_log_probs:
        cache = Path(cfg.trainer.ref_cache_dir).expanduser() if cfg.trainer.ref_cache_dir else default_cache_dir()
    return MistralDPOTrainer(
        model=model,
        ref_model=reference_model(cfg, model),
        args=dpo_config(cfg, run_dir, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer.to_hf(),
        callbacks=callbacks,
        ref_cache_dir=cache,
        chat_template=tokenizer.jinja_chat_template,
        on_nan=cfg.on_nan,
        completion_logps=completion_logps,
    )


def finish(trainer: Any, data: Any) -> dict:
    """Drop TRL's frozen reference adapter from ``trainer.model``, so only the trained one is saved and merged."""
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")
    return {"ref_logps_cache": trainer.ref_cache} if trainer.ref_cache else {}


def samples(model: Any, tokenizer: Any, data: Any, cfg: Any) -> list[dict]:
    """Greedy generations for held-out prompts, next to their chosen and rejected answers."""
    from mistral_tune.inference.generation import greedy_generate

    if not cfg.export.num_samples or not data.holdout:
        return []
    pairs = data.holdout[: cfg.export.num_samples]
    generations = greedy_generate(model, tokenizer, [p.prompt for p in pairs], cfg.export.sample_max_new_tokens)
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "generation": g}
        for p, g in zip(pairs, generations)
    ]
