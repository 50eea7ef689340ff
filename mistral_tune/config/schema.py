"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Recipes list ``mistral_tune`` first in their defaults, so Hydra merges every group file and every
command-line override onto these dataclasses: an unknown key or a value of the wrong type fails at
composition time, before any model is built. This module imports no torch (the CLI stays fast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mistral_tune.config import registry


@dataclass
class ModelConfig:
    name: str = "mistral_tiny"  # preset id (see `mistral-tune list`)
    path: Optional[str] = None  # local directory or hub repo id; overrides the preset's source
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = bf16 on a bf16 GPU, fp32 on CPU
    attn_implementation: str = "auto"  # auto | flash_attention_2 | flex_attention | sdpa_packed | sdpa | eager
    load_weights: bool = True  # false: architecture only, random init
    trust_remote_code: bool = False  # never on unless you set it
    allow_pickle: bool = False  # refuse .bin/.pt weights unless set
    # Mixture-of-experts models (Mixtral) only; transformers' MixtralConfig names:
    output_router_logits: bool = True  # add the router's load-balancing loss to the training loss (and log it)
    router_aux_loss_coef: Optional[float] = None  # its weight; null = the checkpoint's (8x7B 0.02, 8x22B 0.001)


@dataclass
class AdapterConfig:
    name: str = "lora"  # lora | qlora | dora | none (full fine-tuning)
    r: int = 8
    lora_alpha: int = 16  # PEFT LoraConfig names, passed through as they are
    lora_dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: List[str] = field(default_factory=list)
    use_rslora: bool = False
    init_lora_weights: str = "default"  # default | gaussian | pissa | pissa_niter_N | olora
    resume_from: Optional[str] = None  # continue training an existing adapter directory
    load_in_4bit: bool = False  # qlora sets this implicitly; true with lora/dora = QLoRA/QDoRA
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU


# One schema per trainer, each with the keys of the TRL config it feeds (SFTConfig, DPOConfig,
# RewardConfig): conf/trainer/<name>.yaml extends its own, so a DPO key on an SFT trainer is an unknown key.


@dataclass
class TrainerBaseConfig:
    """Keys every trainer has."""

    name: str = "sft"  # sft | dpo | reward (config/registry.py TRAINERS)
    max_length: int = 256  # tokens per example (prompt + answer) after templating; longer ones are truncated/dropped
    truncation: str = "truncate"  # truncate | drop: what to do with examples over max_length


@dataclass
class SFTTrainerConfig(TrainerBaseConfig):
    """TRL ``SFTConfig`` names."""

    completion_only_loss: bool = True  # loss on assistant tokens only; false = on every token
    packing: bool = False  # padding-free: several examples per row, attention kept within each example
    loss: str = "auto"  # auto | chunked | liger | plain: how the cross-entropy meets the vocabulary


@dataclass
class PreferenceTrainerConfig(TrainerBaseConfig):
    """Keys of TRL's ``DPOConfig`` and ``RewardConfig`` alike."""

    max_prompt_length: Optional[int] = None  # prompts longer than this keep BOS and their last tokens
    truncation_mode: str = "keep_start"  # over max_length: keep_start cuts answers' ends, keep_end the prompt's start


@dataclass
class DPOTrainerConfig(PreferenceTrainerConfig):
    """TRL ``DPOConfig`` names."""

    name: str = "dpo"
    beta: float = 0.1  # strength of the pull towards the reference model; higher = smaller steps away from it
    loss_type: str = (
        "sigmoid"  # a TRL DPO loss type (compat.trl.dpo_loss_types), or several joined by + (e.g. sigmoid+sft)
    )
    loss_weights: Optional[List[float]] = None  # one weight per loss_type entry; null = all 1.0
    label_smoothing: float = 0.0  # flip probability for robust/sigmoid, epsilon for exo_pair; in [0, 0.5)
    precompute_ref_log_probs: bool = False  # reference log-probs once before training, cached on disk
    ref_cache_dir: Optional[str] = None  # cache of precomputed reference log-probs; null = ~/.cache/mistral-tune


@dataclass
class RewardTrainerConfig(PreferenceTrainerConfig):
    """TRL ``RewardConfig`` names."""

    name: str = "reward"
    truncation_mode: str = "keep_end"
    center_rewards_coefficient: Optional[float] = None  # pulls mean reward towards 0 (e.g. 0.01)


# trainer.name -> its schema; conf/trainer/<name>.yaml lists `<name>_schema` first in its defaults.
TRAINER_SCHEMAS = {"sft": SFTTrainerConfig, "dpo": DPOTrainerConfig, "reward": RewardTrainerConfig}


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: a weighted data source of a mixture (SFT)."""

    path: str = MISSING  # .jsonl/.json/.parquet file, a directory of .jsonl files, or a hub dataset name
    format: str = "auto"  # auto (= data.format, else detected) | messages | sharegpt | alpaca | text
    weight: float = 1.0  # sampling weight relative to the other sources (> 0)


@dataclass
class DataConfig:
    # .jsonl/.json/.parquet file, a directory of .jsonl files, or a hub dataset name; or a weighted mixture
    # "a.jsonl:5,b.jsonl:1" (the shorthand of data.sources)
    path: str = "data/sft_sample.jsonl"
    sources: List[SourceConfig] = field(default_factory=list)  # weighted mixture (SFT); non-empty: data.path unused
    # how a mixture ends one pass: all_exhausted (every row of every source at least once; sources that are small
    # for their weight repeat) | first_exhausted (ends when one source runs out; no row repeats)
    stopping_strategy: str = "all_exhausted"
    format: str = "auto"  # auto; sft: messages|sharegpt|alpaca|text; dpo/reward: preference|preference_messages|hh
    split: str = "train"  # split of a hub dataset
    max_samples: Optional[int] = None  # cap on training examples (after holdout)
    holdout: int = 4  # examples kept out of training; their prompts feed samples.jsonl
    system_prompt: Optional[str] = None  # added to every conversation that has none
    seed: int = 0  # shuffling seed for the holdout and eval splits
    on_error: str = "fail"  # fail | skip: a malformed line (bad JSON/UTF-8) stops the run, or is counted and skipped
    dedup: bool = False  # drop exact duplicate rows (always counted and reported)
    # Evaluation data: a fraction of the training rows (e.g. "0.05") or a file in any supported format.
    # Eval loss and perplexity are logged every train.eval_steps (default: train.logging_steps).
    eval_split: Optional[str] = None
    # Function-calling rows: tool-call ids that are not 9 letters/digits are replaced by generated ones
    # (and the matching tool results updated); false: such a row is a bad row (bad_tool_call_id).
    fix_tool_call_ids: bool = False


LAUNCHERS = tuple(registry.LAUNCHERS)  # the names; config/registry.py is the one list


@dataclass
class LauncherConfig:
    """How many processes train and with which engine; see docs/multi-gpu.md and mistral_tune/launch.py."""

    name: str = "local"  # local | ddp | fsdp | deepspeed_zero2 | deepspeed_zero3 | deepspeed_zero3_offload
    num_processes: int = 1  # all processes of the job (every machine); 0 = one per visible GPU x num_machines
    num_machines: int = 1
    machine_rank: int = 0  # this machine's index, 0 .. num_machines-1; machine 0 hosts rank 0
    main_process_ip: Optional[str] = None  # address of machine 0; required when num_machines > 1
    main_process_port: int = 29500  # 0 = any free port (one machine only)
    accelerate_config: Optional[str] = None  # accelerate config YAML; null = the one shipped for `name`
    deepspeed_config: Optional[str] = None  # DeepSpeed JSON; null = the one shipped for `name`


@dataclass
class TrackingConfig:
    name: str = "none"  # none | wandb | tensorboard; metrics.jsonl is always written
    project: str = "mistral-tune"  # W&B project
    entity: Optional[str] = None  # W&B team or user; None = your default entity
    run_name: Optional[str] = None  # the run's name in the tracker; None = the run directory's name
    tags: List[str] = field(default_factory=list)  # W&B tags
    group: Optional[str] = None  # W&B group
    mode: str = "auto"  # W&B: auto (online when logged in or WANDB_API_KEY is set, else offline) | online | offline


@dataclass
class ExportConfig:
    merged: bool = True  # write merged/ (base + adapter) in Hugging Face layout
    dtype: str = "auto"  # auto (the base's dtype) | float32 | bfloat16 | float16
    max_shard_size: str = "2GB"
    verify: bool = True  # reload merged/ and compare logits with the in-memory model
    tolerance: Optional[float] = None  # max |logit diff| accepted; None = per-dtype default (export.TOLERANCE)
    preset: bool = False  # also write preset/ (Hugging Face layout + metadata.json with provenance)
    gguf: bool = False  # also write gguf/<name>-<type>.gguf for llama.cpp, verified in llama.cpp (xllamacpp)
    gguf_types: List[str] = field(default_factory=lambda: ["q8_0"])  # f32 | f16 | bf16 | q8_0 | q4_0
    gguf_tolerance: Optional[float] = None  # max |top-k log-prob diff| accepted; None = per-type default
    num_samples: int = 4  # greedy generations written to samples.jsonl
    sample_max_new_tokens: int = 32


@dataclass
class EvalConfig:
    tasks: List[str] = field(default_factory=list)  # lm-eval tasks run at the end of training (mistral-tune eval)
    limit: Optional[int] = None  # at most this many documents per task
    batch_size: int = 8


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
    data_seed: Optional[int] = None  # shuffling seed of the training sampler; None = seed (resume relies on it)
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # compile the model; see docs/BENCHMARKS.md for when it pays off
    bf16: bool = False
    fp16: bool = False
    dataloader_num_workers: int = 0
    ddp_backend: Optional[str] = None  # null = nccl on GPUs, gloo on CPU
    # Seconds a process waits in a collective (and for the other machines at start) before it gives up:
    # how long a job notices a hung or unreachable machine. torch's own default is 30 minutes.
    ddp_timeout: int = 300


@dataclass
class RunConfig:
    recipe: str = MISSING
    output_dir: Optional[str] = None  # default runs/<recipe>-<timestamp>
    resume: Optional[str] = None  # auto (latest complete checkpoint in output_dir) | PATH (a checkpoint or run dir)
    on_nan: str = "stop"  # stop | skip: a NaN/inf loss stops the run, or its optimizer step is skipped and counted
    dry_run: bool = False  # build the model on the meta device, print sizes and estimates, train nothing
    dry_run_gpu: str = "H100"  # H100 | H200 | A100 | L4: the GPU the dry run estimates step time for
    dry_run_mfu: float = 0.4  # model FLOPs utilization assumed for that estimate (0.3-0.5 is typical)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: Any = MISSING  # one of TRAINER_SCHEMAS, from the trainer group file's own schema
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


GROUPS = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "launcher": LauncherConfig,
    "tracking": TrackingConfig,
    "export": ExportConfig,
}

SCHEMA_NAME = "mistral_tune"

SFT_DATA_FORMATS = ("messages", "sharegpt", "alpaca", "text")

# datasets.interleave_datasets' stopping strategies that keep the weights (not all_exhausted_without_replacement)
MIXTURE_STOPPING_STRATEGIES = ("all_exhausted", "first_exhausted")

PREFERENCE_DATA_FORMATS = ("preference", "preference_messages", "hh")


def random_demo_base(model: Any) -> bool:
    """True for the embedded random-weight presets (``mistral_tiny``, ``mixtral_tiny``, ...: every built-in id
    ending in ``_tiny``, a rule tests/models/test_presets.py holds presets.py to), which need far higher
    learning rates."""
    name = str(model.name)
    return name.endswith("_tiny") and "/" not in name and not model.path  # not a hub id like org/x_tiny


def mixture_of_experts(model: Any) -> bool:
    """True for a Mixtral model: a built-in ``mixtral_*`` preset or a hub/local name saying Mixtral."""
    return "mixtral" in f"{model.name} {model.path or ''}".lower()


def by_model(demo: Any, pretrained: Any, moe: Any = None, *, _root_: Any) -> Any:
    """``${by_model:DEMO,PRETRAINED[,MOE]}`` in a recipe: DEMO on a random-weight ``*_tiny`` preset,
    PRETRAINED on real weights (a 7B-24B preset, ``model.path``), MOE (default PRETRAINED) on a real
    Mixtral. A frozen random base learns nothing at a 7B learning rate, and a real 7B diverges at the
    demo's; sparse MoE fine-tunes usually run at about half the dense rate (the router is sensitive)."""
    if random_demo_base(_root_.model):
        return demo
    return moe if moe is not None and mixture_of_experts(_root_.model) else pretrained


def register_schemas() -> None:
    """Store the root schema and one schema per group, and the recipes' resolvers (idempotent)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("by_model", by_model, replace=True)
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=RunConfig)
    for group, node in GROUPS.items():
        cs.store(group=f"schema/{group}", name=group, node=node)
    for name, node in TRAINER_SCHEMAS.items():
        cs.store(group="trainer", name=f"{name}_schema", node=node)


def check_values(cfg: Any) -> list[str]:
    """Cross-field checks the types alone cannot express; returns every problem found."""
    problems = []

    def one_of(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")

    one_of("model.dtype", cfg.model.dtype, registry.DTYPE_CHOICES)
    one_of("model.attn_implementation", cfg.model.attn_implementation, registry.ATTN_IMPLEMENTATIONS)
    one_of("adapter.name", cfg.adapter.name, registry.ADAPTERS)
    one_of("trainer.name", cfg.trainer.name, tuple(registry.TRAINERS))
    picked = schema_trainer_name(cfg.trainer)
    if cfg.trainer.name in TRAINER_SCHEMAS and picked not in (None, cfg.trainer.name):
        problems.append(
            f"trainer.name={cfg.trainer.name} changes the name only; the trainer group is trainer={picked}: "
            f"pick the trainer with trainer={cfg.trainer.name}"
        )
        return problems
    one_of("trainer.truncation", cfg.trainer.truncation, ("truncate", "drop"))
    preference = cfg.trainer.name in registry.PREFERENCE_TRAINERS
    if picked == "sft":
        one_of("trainer.loss", cfg.trainer.loss, registry.LOSS_IMPLEMENTATIONS)
    one_of("data.format", cfg.data.format, ("auto", *(PREFERENCE_DATA_FORMATS if preference else SFT_DATA_FORMATS)))
    if preference and picked in registry.PREFERENCE_TRAINERS:
        problems.extend(check_preference(cfg.trainer))
    if cfg.trainer.name == "reward" and cfg.export.preset:
        problems.append("export.preset=true writes a causal-LM preset; a reward model exports as merged/ only")
    if cfg.trainer.name == "reward" and cfg.export.gguf:
        problems.append("export.gguf=true writes a causal LM for llama.cpp; a reward model exports as merged/ only")
    one_of("data.on_error", cfg.data.on_error, ("fail", "skip"))
    one_of("data.stopping_strategy", cfg.data.stopping_strategy, MIXTURE_STOPPING_STRATEGIES)
    mixture = bool(cfg.data.sources) or "," in str(cfg.data.path)
    if preference and mixture:
        problems.append(
            f"data.sources / a weighted data.path mix SFT data; trainer={cfg.trainer.name} takes one preference "
            "source (concatenate the files, or train with trainer=sft)"
        )
    for i, src in enumerate(cfg.data.sources):
        from omegaconf import OmegaConf

        if OmegaConf.is_missing(src, "path") or not str(src.path).strip():
            problems.append(f"data.sources[{i}] has no path (a file, a directory of .jsonl files or a hub name)")
        if not src.weight > 0 or math.isinf(src.weight):
            problems.append(f"data.sources[{i}].weight={src.weight} must be a finite number > 0")
        one_of(f"data.sources[{i}].format", src.format, ("auto", *SFT_DATA_FORMATS))
    one_of("on_nan", cfg.on_nan, ("stop", "skip"))
    one_of("launcher.name", cfg.launcher.name, LAUNCHERS)
    one_of("tracking.name", cfg.tracking.name, tuple(registry.TRACKERS))
    one_of("tracking.mode", cfg.tracking.mode, ("auto", "online", "offline"))
    one_of("export.dtype", cfg.export.dtype, registry.DTYPE_CHOICES)
    for gguf_type in cfg.export.gguf_types:
        one_of("export.gguf_types", gguf_type, registry.GGUF_TYPES)
    positive = {
        "adapter.r": cfg.adapter.r,
        "trainer.max_length": cfg.trainer.max_length,
        "train.per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.logging_steps": cfg.train.logging_steps,
        "train.save_steps": cfg.train.save_steps,
    }
    problems += [f"{k}={v} must be > 0" for k, v in positive.items() if v <= 0]
    if not cfg.train.learning_rate > 0 or math.isinf(cfg.train.learning_rate):  # `not >` also catches nan
        problems.append(f"train.learning_rate={cfg.train.learning_rate} must be a finite number > 0")
    if cfg.data.max_samples is not None and cfg.data.max_samples <= 0:
        problems.append(f"data.max_samples={cfg.data.max_samples} must be > 0, or null for all rows")
    if cfg.train.max_steps == 0 or (cfg.train.max_steps < 0 and cfg.train.num_train_epochs <= 0):
        problems.append("set train.max_steps > 0 or train.num_train_epochs > 0")
    if cfg.resume is not None and not str(cfg.resume).strip():
        problems.append("resume='' is empty; use resume=auto or resume=PATH")
    if cfg.data.holdout < 0:
        problems.append(f"data.holdout={cfg.data.holdout} must be >= 0")
    problems += adapter_problems(cfg.adapter) + export_problems(cfg.export, cfg.adapter)
    if cfg.train.bf16 and cfg.train.fp16:
        problems.append("train.bf16 and train.fp16 cannot both be true")
    if cfg.train.eval_steps is not None and cfg.train.eval_steps <= 0:
        problems.append(f"train.eval_steps={cfg.train.eval_steps} must be > 0")
    if cfg.train.ddp_timeout <= 0:
        problems.append(f"train.ddp_timeout={cfg.train.ddp_timeout} must be > 0 (seconds)")
    fraction = eval_fraction(cfg.data.eval_split)
    if fraction is not None and not 0 < fraction < 1:
        problems.append(f"data.eval_split={cfg.data.eval_split} must be a fraction between 0 and 1, or a file")
    from mistral_tune.core.hardware import GPUS

    one_of("dry_run_gpu", cfg.dry_run_gpu, tuple(GPUS))
    if not 0 < cfg.dry_run_mfu <= 1:
        problems.append(f"dry_run_mfu={cfg.dry_run_mfu} must be in (0, 1]")
    problems += launcher_problems(cfg)
    return problems


def launcher_problems(cfg: Any) -> list[str]:
    """The launcher's numbers must describe a job accelerate can start on every machine alike."""
    lc, problems = cfg.launcher, []
    if lc.num_processes < 0 or lc.num_machines < 1:
        problems.append("launcher.num_processes must be >= 0 (0 = one per GPU) and launcher.num_machines >= 1")
        return problems
    if lc.name == "local" and (lc.num_processes > 1 or lc.num_machines > 1):
        problems.append(
            f"launcher=local runs this one process, but launcher.num_processes={lc.num_processes} and "
            f"launcher.num_machines={lc.num_machines}; pick launcher=ddp (or fsdp, deepspeed_zero2, ...)"
        )
    if lc.num_processes and lc.num_processes % lc.num_machines:
        problems.append(
            f"launcher.num_processes={lc.num_processes} counts the processes of all {lc.num_machines} machines "
            "and must be a multiple of launcher.num_machines"
        )
    if not 0 <= lc.machine_rank < lc.num_machines:
        problems.append(f"launcher.machine_rank={lc.machine_rank} must be in 0..{lc.num_machines - 1}")
    if lc.num_machines > 1:
        if not lc.main_process_ip:
            problems.append("launcher.num_machines > 1 needs launcher.main_process_ip (the address of machine 0)")
        if not lc.main_process_port:
            problems.append("launcher.num_machines > 1 needs a fixed launcher.main_process_port (not 0)")
        if not cfg.output_dir:
            problems.append("launcher.num_machines > 1 needs output_dir set to the same shared path on every machine")
    return problems


def eval_fraction(eval_split: Optional[str]) -> Optional[float]:
    """``data.eval_split`` as a fraction, or None when it is unset or names a file."""
    if eval_split is None:
        return None
    try:
        return float(eval_split)
    except ValueError:
        return None


def unknown_keys(cfg: Any) -> list[str]:
    """Dotted keys in ``cfg`` that the schema does not define (Hydra lets ``+key=value`` add them)."""
    known = set(schema_keys(trainer=schema_trainer_name(cfg.trainer)))
    sections = {k.rsplit(".", 1)[0] for k in known if "." in k}

    def walk(node: Any, prefix: str):
        for key in node.keys():
            dotted = f"{prefix}{key}"
            if dotted in sections:
                yield from walk(node[key], dotted + ".")
            elif dotted not in known:
                yield dotted

    return list(walk(cfg, ""))


def schema_keys(schema: Any = RunConfig, prefix: str = "", trainer: Optional[str] = None) -> list[str]:
    """Every dotted key the schema defines (for "did you mean" suggestions): with ``trainer``, that
    trainer's keys under ``trainer.``; without, the keys of every trainer."""
    import dataclasses

    keys = []
    for f in dataclasses.fields(schema):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if schema is RunConfig and f.name == "trainer":
            nodes = [TRAINER_SCHEMAS[trainer]] if trainer in TRAINER_SCHEMAS else TRAINER_SCHEMAS.values()
            keys += list(dict.fromkeys(k for node in nodes for k in schema_keys(node, "trainer.")))
        elif factory is not None and dataclasses.is_dataclass(factory):
            keys += schema_keys(factory, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def schema_trainer_name(trainer: Any) -> Optional[str]:
    """The trainer whose schema types the composed ``trainer`` node (its group file picked it), else None."""
    from omegaconf import OmegaConf

    node_type = OmegaConf.get_type(trainer)
    return next((name for name, node in TRAINER_SCHEMAS.items() if node is node_type), None)


def trainers_with_key(key: str) -> list[str]:
    """The trainers whose schema has ``trainer.<key>``."""
    import dataclasses

    return [name for name, node in TRAINER_SCHEMAS.items() if key in {f.name for f in dataclasses.fields(node)}]


# Keys that were renamed to the names of the TRL/PEFT fields they feed (docs/configuration.md lists them).
# Composing a config with an old name fails naming the new one; a saved run's resolved_config.yaml is upgraded.
RENAMED_KEYS = {
    "adapter.alpha": "adapter.lora_alpha",
    "adapter.dropout": "adapter.lora_dropout",
    "adapter.init": "adapter.init_lora_weights",
}


def renamed_key_message(key: str, origin: str) -> Optional[str]:
    """``adapter.alpha was renamed to adapter.lora_alpha (...)`` for an old key, else None."""
    if key not in RENAMED_KEYS:
        return None
    return f"{key} was renamed to {RENAMED_KEYS[key]} (from {origin}); set {RENAMED_KEYS[key]} instead."


def upgrade_renamed_keys(cfg: Any) -> Any:
    """A loaded (plain, unstructured) config with every old key moved to its new name, in place."""
    from omegaconf import OmegaConf

    for old, new in RENAMED_KEYS.items():
        section, _, name = old.rpartition(".")
        node = OmegaConf.select(cfg, section) if section else cfg
        if node is not None and name in node and new.rpartition(".")[2] not in node:
            node[new.rpartition(".")[2]] = node.pop(name)
    return cfg


LORA_INITS = ("default", "true", "gaussian", "pissa", "olora")  # plus pissa_niter_<N>

BASE_CHANGING_INITS = ("pissa", "olora")  # these rewrite the base weights at initialization


def adapter_problems(a: Any) -> list[str]:
    """Checks on the adapter group (ranges and the init names PEFT accepts)."""
    problems = []
    if a.name == "none":
        return problems
    if a.lora_alpha <= 0:
        problems.append(f"adapter.lora_alpha={a.lora_alpha} must be > 0")
    if not 0 <= a.lora_dropout < 1:
        problems.append(f"adapter.lora_dropout={a.lora_dropout} must be in [0, 1)")
    if not a.target_modules:
        problems.append("adapter.target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use [all-linear]")
    init = str(a.init_lora_weights)
    if init not in LORA_INITS and not (init.startswith("pissa_niter_") and init[12:].isdigit()):
        problems.append(f"adapter.init_lora_weights={init!r} is not one of {', '.join(LORA_INITS)}, pissa_niter_<N>")
    if (a.name == "qlora" or a.load_in_4bit) and init.startswith(BASE_CHANGING_INITS):
        problems.append(
            f"adapter.init_lora_weights={init} rewrites the base weights, which cannot be done on a 4-bit base"
        )
    if a.bnb_4bit_quant_type not in ("nf4", "fp4"):
        problems.append(f"adapter.bnb_4bit_quant_type={a.bnb_4bit_quant_type!r} is not one of nf4, fp4")
    if a.bnb_4bit_compute_dtype not in registry.DTYPE_CHOICES:
        problems.append(f"adapter.bnb_4bit_compute_dtype={a.bnb_4bit_compute_dtype!r} is not auto or a float dtype")
    return problems


def export_problems(e: Any, a: Any) -> list[str]:
    """Checks on the export group: tolerances are positive."""
    problems = []
    if e.tolerance is not None and not e.tolerance > 0:
        problems.append(f"export.tolerance={e.tolerance} must be > 0")
    if e.gguf_tolerance is not None and not e.gguf_tolerance > 0:
        problems.append(f"export.gguf_tolerance={e.gguf_tolerance} must be > 0")
    if e.gguf and not e.gguf_types:
        problems.append("export.gguf=true needs at least one type in export.gguf_types")
    return problems


def check_preference(trainer: Any) -> list[str]:
    """The DPO/reward settings TRL would only reject after the model is loaded (keys another trainer
    lacks are refused by its schema already)."""
    problems = []
    if trainer.truncation_mode not in ("keep_start", "keep_end"):
        problems.append(f"trainer.truncation_mode={trainer.truncation_mode!r} is not one of keep_start, keep_end")
    if trainer.max_prompt_length is not None and not 1 < trainer.max_prompt_length < trainer.max_length:
        problems.append(
            f"trainer.max_prompt_length={trainer.max_prompt_length} must be > 1 and below "
            f"trainer.max_length={trainer.max_length}, leaving room for the answers"
        )
    if trainer.name != "dpo":
        return problems
    losses = [t.strip() for t in str(trainer.loss_type).split("+")]
    from mistral_tune.compat.trl import dpo_loss_types

    known = dpo_loss_types()  # the installed TRL's, read without importing it (the trainer checks the same list)
    unknown = [t for t in losses if t not in known]
    if unknown:
        problems.append(f"trainer.loss_type={trainer.loss_type!r}: unknown {unknown}; use {', '.join(known)}")
    if trainer.loss_weights is not None and len(trainer.loss_weights) != len(losses):
        problems.append(f"trainer.loss_weights needs one weight per loss type ({len(losses)}: {losses})")
    if trainer.beta <= 0:
        problems.append(f"trainer.beta={trainer.beta} must be > 0")
    if not 0.0 <= trainer.label_smoothing < 0.5:
        problems.append(f"trainer.label_smoothing={trainer.label_smoothing} must be in [0, 0.5)")
    if "exo_pair" in losses and trainer.label_smoothing == 0.0:
        problems.append("trainer.loss_type=exo_pair needs trainer.label_smoothing > 0 (the EXO paper uses 1e-3)")
    return problems
