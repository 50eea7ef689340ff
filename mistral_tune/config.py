"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Recipes list ``mistral_tune`` first in their defaults, so Hydra merges every group file and every
command-line override onto these dataclasses: an unknown key or a value of the wrong type fails at
composition time, before any model is built. This module imports no torch (the CLI stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = "mistral_tiny"  # preset id (see `mistral-tune list`)
    path: Optional[str] = None  # local directory or hub repo id; overrides the preset's source
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = bf16 on a bf16 GPU, fp32 on CPU
    attn_implementation: str = "auto"  # auto | flash_attention_2 | flex_attention | sdpa | eager
    load_weights: bool = True  # false: architecture only, random init
    trust_remote_code: bool = False  # never on unless you set it
    allow_pickle: bool = False  # refuse .bin/.pt weights unless set


@dataclass
class AdapterConfig:
    name: str = "lora"  # lora | qlora | dora | none (full fine-tuning)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: List[str] = field(default_factory=list)
    use_rslora: bool = False
    init: str = "default"  # PEFT init_lora_weights: default | gaussian | pissa | olora | ...
    resume_from: Optional[str] = None  # continue training an existing adapter directory
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU


@dataclass
class TrainerConfig:
    name: str = "sft"  # sft
    max_length: int = 256  # tokens per example after templating; longer ones are truncated/dropped
    completion_only_loss: bool = True  # loss on assistant tokens only
    truncation: str = "truncate"  # truncate | drop: what to do with examples over max_length
    packing: bool = False  # padding-free: several examples per row, attention kept within each example
    loss: str = "auto"  # auto | chunked | liger | plain: how the cross-entropy meets the vocabulary


@dataclass
class DataConfig:
    path: str = "data/sft_sample.jsonl"  # .jsonl/.json/.parquet file, or a hub dataset name
    format: str = "auto"  # auto | messages | alpaca | text
    split: str = "train"  # split of a hub dataset
    max_samples: Optional[int] = None  # cap on training examples (after holdout)
    holdout: int = 4  # examples kept out of training; their prompts feed samples.jsonl
    system_prompt: Optional[str] = None  # added to every conversation that has none
    seed: int = 0  # shuffling seed for the holdout split


@dataclass
class LauncherConfig:
    name: str = "local"  # local: this process
    num_processes: int = 1


@dataclass
class TrackingConfig:
    name: str = "none"  # none | wandb | tensorboard; metrics.jsonl is always written
    project: str = "mistral-tune"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None


@dataclass
class ExportConfig:
    merged: bool = True  # write merged/ (base + adapter) in Hugging Face layout
    dtype: str = "auto"  # auto (the base's dtype) | float32 | bfloat16 | float16
    max_shard_size: str = "2GB"
    verify: bool = True  # reload merged/ and compare logits with the in-memory model
    num_samples: int = 4  # greedy generations written to samples.jsonl
    sample_max_new_tokens: int = 32


@dataclass
class TrainConfig:
    """Hugging Face ``TrainingArguments`` names, passed through as they are."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    eval_steps: Optional[int] = None
    seed: int = 42
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # compile the model; see docs/BENCHMARKS.md for when it pays off
    bf16: bool = False
    fp16: bool = False
    dataloader_num_workers: int = 0


@dataclass
class RunConfig:
    recipe: str = MISSING
    output_dir: Optional[str] = None  # default runs/<recipe>-<timestamp>
    dry_run: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


GROUPS = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "trainer": TrainerConfig,
    "data": DataConfig,
    "launcher": LauncherConfig,
    "tracking": TrackingConfig,
    "export": ExportConfig,
}

SCHEMA_NAME = "mistral_tune"


def register_schemas() -> None:
    """Store the root schema and one schema per group (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=RunConfig)
    for group, node in GROUPS.items():
        cs.store(group=f"schema/{group}", name=group, node=node)


def check_values(cfg: Any) -> list[str]:
    """Cross-field checks the types alone cannot express; returns every problem found."""
    problems = []

    def one_of(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")

    one_of("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    one_of(
        "model.attn_implementation",
        cfg.model.attn_implementation,
        ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager"),
    )
    one_of("adapter.name", cfg.adapter.name, ("lora", "qlora", "dora", "none"))
    one_of("trainer.name", cfg.trainer.name, ("sft",))
    one_of("trainer.truncation", cfg.trainer.truncation, ("truncate", "drop"))
    one_of("trainer.loss", cfg.trainer.loss, ("auto", "chunked", "liger", "plain"))
    one_of("data.format", cfg.data.format, ("auto", "messages", "alpaca", "text"))
    one_of("launcher.name", cfg.launcher.name, ("local",))
    one_of("tracking.name", cfg.tracking.name, ("none", "wandb", "tensorboard"))
    one_of("export.dtype", cfg.export.dtype, ("auto", "float32", "bfloat16", "float16"))
    positive = {
        "adapter.r": cfg.adapter.r,
        "trainer.max_length": cfg.trainer.max_length,
        "train.per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.logging_steps": cfg.train.logging_steps,
        "train.save_steps": cfg.train.save_steps,
    }
    problems += [f"{k}={v} must be > 0" for k, v in positive.items() if v <= 0]
    if cfg.train.learning_rate <= 0:
        problems.append(f"train.learning_rate={cfg.train.learning_rate} must be > 0")
    if cfg.train.max_steps == 0 or (cfg.train.max_steps < 0 and cfg.train.num_train_epochs <= 0):
        problems.append("set train.max_steps > 0 or train.num_train_epochs > 0")
    if cfg.data.holdout < 0:
        problems.append(f"data.holdout={cfg.data.holdout} must be >= 0")
    if cfg.train.bf16 and cfg.train.fp16:
        problems.append("train.bf16 and train.fp16 cannot both be true")
    return problems
