"""Reward models through TRL's ``RewardTrainer``: ``MistralForSequenceClassification`` (one output) on pairs.

Each pair is scored as two full chats (prompt + chosen, prompt + rejected) in the SFT chat template; the loss
is ``-log sigmoid(r_chosen - r_rejected)`` (Bradley-Terry). The metrics use the DPO names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``) so both trainers'
runs read the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trl import RewardConfig, RewardTrainer

from mistral_tune.compat.trl import trainer_metrics
from mistral_tune.train.base import RunStateMixin, common_args
from mistral_tune.train.checkpoints import AtomicCheckpointMixin
from mistral_tune.train.nonfinite import NonFiniteLossMixin

TASK_TYPE = "SEQ_CLS"

RENAMED = {"accuracy": "rewards/accuracies", "margin": "rewards/margins"}  # TRL's names -> the DPO trainer's


class MistralRewardTrainer(RunStateMixin, AtomicCheckpointMixin, NonFiniteLossMixin, RewardTrainer):
    """RewardTrainer logging mean chosen/rejected rewards under the DPO metric names.

    Like SFT: atomic checkpoints, ``on_nan``, and a token count kept across resumes.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.count_tokens(model, inputs)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        pairs = outputs.logits.detach().squeeze(-1).view(2, -1).T  # the batch is [chosen..., rejected...]
        chosen, rejected = self.accelerator.gather_for_metrics(pairs).mean(0).tolist()  # one gather, one sync
        metrics = trainer_metrics(self, mode)
        metrics["rewards/chosen"].append(chosen)
        metrics["rewards/rejected"].append(rejected)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = trainer_metrics(self, mode)
        for old, new in RENAMED.items():
            if old in metrics:
                metrics[new] = metrics.pop(old)
        if mode == "eval":  # TRL's count of training tokens; under an eval_ prefix it read as the eval set's size
            metrics.pop("num_tokens", None)
        super().log(logs, start_time)


def reward_config(cfg: Any, run_dir: Path, has_eval: bool = False) -> RewardConfig:
    return RewardConfig(
        **common_args(cfg, run_dir, has_eval),
        max_length=None,  # pairs are fitted (and over-long ones counted) by mistral_tune.preference_data
        center_rewards_coefficient=cfg.trainer.center_rewards_coefficient,
    )


def as_full_chats(dataset: Any) -> Any:
    """(prompt_ids, chosen_ids, rejected_ids) -> the two complete sequences the reward model scores."""

    def join(row):
        return {
            "chosen_ids": row["prompt_ids"] + row["chosen_ids"],
            "rejected_ids": row["prompt_ids"] + row["rejected_ids"],
        }

    return dataset.map(join, remove_columns=["prompt_ids"])


def prepare_data(cfg: Any, tokenizer: Any):
    from mistral_tune.data.preference import prepare_preference_data

    data = prepare_preference_data(cfg.data, cfg.trainer, tokenizer)
    data.train = as_full_chats(data.train)
    data.eval = as_full_chats(data.eval) if data.eval is not None else None
    return data


def build_trainer(cfg: Any, model: Any, tokenizer: Any, data: Any, run_dir: Path, callbacks: list):
    model.config.pad_token_id = tokenizer.pad_id  # the score is read at the last non-pad token
    return MistralRewardTrainer(
        model=model,
        args=reward_config(cfg, run_dir, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer.to_hf(),
        callbacks=callbacks,
        on_nan=cfg.on_nan,
    )


def finish(trainer: Any, data: Any) -> dict:
    return {}


def samples(model: Any, tokenizer: Any, data: Any, cfg: Any) -> list[dict]:
    """Rewards of held-out pairs: the chosen answer should score higher."""
    from mistral_tune.inference.reward_scoring import score_chats

    pairs = data.holdout[: cfg.export.num_samples] if cfg.export.num_samples else []
    if not pairs:
        return []
    chats = [[*p.prompt, {"role": "assistant", "content": a}] for p in pairs for a in (p.chosen, p.rejected)]
    rewards = score_chats(model, tokenizer, chats)
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "chosen_reward": c, "rejected_reward": r}
        for p, c, r in zip(pairs, rewards[0::2], rewards[1::2])
    ]
