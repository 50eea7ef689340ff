"""One list of options per config group: validation (config/schema.py) and dispatch both read it.

Adding a trainer, tracker, attention backend, loss implementation, dtype or launcher means editing
this file (and shipping its conf/<group>/<name>.yaml); nothing else keeps its own list. Builders are
dotted ``module:attribute`` strings imported on demand by :func:`load`, so this module stays
torch-free and below every subpackage it names (tests/config/test_registry.py checks each one imports).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

# Float dtypes a model or an export can be stored in; "auto" picks one from the hardware or the base.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)

# Weight formats an export writes (export/pipeline.py): merged/ (Hugging Face layout), preset/
# (the same files hard-linked, plus metadata.json) and gguf/ (llama.cpp files written from the verified
# merged weights, export/gguf_file.py). `mistral-tune export formats=` adds "adapter" (a model card).
EXPORT_FORMATS = ("merged", "preset", "gguf")

# export.gguf_types: the GGUF tensor types written (gguf/<name>-<type>.gguf), f32/f16/bf16 and two of
# llama.cpp's block quantizations (8-bit and 4-bit, 32 weights per block with one fp16 scale).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

# trainer.name -> the trainer module (mistral_tune/train/<name>.py: build/train/... one interface).
TRAINERS = {
    "sft": "mistral_tune.train.sft",
    "dpo": "mistral_tune.train.dpo",
    "reward": "mistral_tune.train.reward",
}
PREFERENCE_TRAINERS = ("dpo", "reward")  # trained on (prompt, chosen, rejected) pairs

# tracking.name -> the function starting it: (tracking_cfg, run_dir, config, config_yaml) -> Tracking.
# None: only metrics.jsonl, which every run writes.
TRACKERS: dict[str, Optional[str]] = {
    "none": None,
    "wandb": "mistral_tune.tracking.trackers:start_wandb",
    "tensorboard": "mistral_tune.tracking.trackers:start_tensorboard",
}

# model.attn_implementation: "auto" = flash_attention_2 when flash-attn + CUDA, else sdpa_packed (models/attention.py).
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa_packed", "sdpa", "eager")

# trainer.loss (sft): how the cross-entropy meets the vocabulary (train/lm_head_loss.py).
LOSS_IMPLEMENTATIONS = ("auto", "chunked", "liger", "plain")

# adapter.name: PEFT LoRA, LoRA on a 4-bit base, DoRA, or full fine-tuning.
ADAPTERS = ("lora", "qlora", "dora", "none")

# launcher.name -> the accelerate config shipped in mistral_tune/launch/configs/ (None: this process only).
# DeepSpeed launchers also ship <name>.json there. conf/launcher/<name>.yaml selects each one.
LAUNCHERS: dict[str, Optional[str]] = {
    "local": None,
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "deepspeed_zero2": "deepspeed_zero2.yaml",
    "deepspeed_zero3": "deepspeed_zero3.yaml",
    "deepspeed_zero3_offload": "deepspeed_zero3_offload.yaml",
}


def load(target: str) -> Any:
    """Import a registry entry: ``"package.module"`` gives the module, ``"package.module:name"`` its attribute."""
    module, _, attribute = target.partition(":")
    imported = importlib.import_module(module)
    return getattr(imported, attribute) if attribute else imported
