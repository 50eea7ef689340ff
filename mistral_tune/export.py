"""Merged checkpoints in Hugging Face layout, verified against the in-memory adapter model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import UserError

log = logging.getLogger(__name__)

# Largest |logit difference| accepted between the reloaded export and the adapter model, per dtype.
# fp32 merges differ only by summation order; 16-bit exports round every weight once.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.15, "float16": 0.03}


class ExportMismatch(RuntimeError):
    """The written checkpoint does not reproduce the fine-tuned model."""


def verification_inputs(tokenizer: Any, prompts: Sequence[str]):
    import torch

    ids = [tokenizer.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tokenizer.pad_id] * (width - len(i)) for i in ids])
    attention_mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return input_ids, attention_mask


def reference_logits(model: Any, tokenizer: Any, prompts: Sequence[str]):
    """Logits of the in-memory (adapter) model, masked to real tokens, in fp32 on CPU."""
    import torch

    input_ids, attention_mask = verification_inputs(tokenizer, prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    model.train(was_training)
    return logits.float().cpu() * attention_mask[..., None]


def write_hf_checkpoint(model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str = "2GB") -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        max_new_tokens=256,
    ).save_pretrained(out_dir)


def merge_adapter(model: Any, dtype: Any):
    """Fold the adapter into the base weights; a full fine-tune is returned as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.to(dtype)


def verify_export(out_dir: Path, tokenizer: Any, prompts: Sequence[str], expected: Any, dtype_name: str) -> float:
    """Reload ``out_dir`` with plain transformers and compare its logits; returns the max |diff|."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    got = reference_logits(reloaded, tokenizer, prompts)
    diff = float((got - expected).abs().max())
    tol = TOLERANCE[dtype_name]
    if not diff <= tol:  # also catches NaN
        raise ExportMismatch(
            f"The merged model in {out_dir} does not reproduce the fine-tuned model: max |logit diff| "
            f"{diff:.3g} > {tol:g} allowed for {dtype_name}. The export was not kept."
        )
    return diff


def export_merged(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    dtype_name: str,
    prompts: Sequence[str],
    max_shard_size: str = "2GB",
    verify: bool = True,
) -> dict[str, Any]:
    """Merge, write to a temporary sibling, verify, then rename into place.

    The rename is the last step, so an interrupted or failed export never leaves a directory
    that looks complete. ``model`` is merged in place: call this after everything that needs
    the adapter.
    """
    import torch

    out_dir = Path(out_dir)
    expected = reference_logits(model, tokenizer, prompts) if verify else None
    if dtype_name == "auto":
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        if dtype_name not in TOLERANCE:
            dtype_name = "float32"
    merged = merge_adapter(model, getattr(torch, dtype_name))
    with atomic_directory(out_dir) as tmp:
        write_hf_checkpoint(merged, tokenizer, tmp, max_shard_size)
        diff = verify_export(tmp, tokenizer, prompts, expected, dtype_name) if verify else None
    info = {"path": str(out_dir), "dtype": dtype_name, "max_abs_logit_diff": diff, "verified": verify}
    log.info("export: merged model written to %s (max |logit diff| %s)", out_dir, diff)
    return info


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; rename it to ``out_dir`` only if the block succeeds.

    An interrupted or failed write leaves at most a hidden ``.NAME.tmp-PID`` directory, never an
    ``out_dir`` that looks complete. An existing ``out_dir`` is replaced only after the new one is written.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def save_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir={path} is not writable ({exc.strerror}). Choose another output_dir.") from exc


def merged_state_dict(model: Any):
    """(plain transformers model, its state dict with any LoRA folded in), leaving ``model`` unchanged.

    Plain LoRA layers are folded as W + delta, computed out of place, so a model still being trained
    keeps its adapter. Other PEFT wrappers (DoRA, modules_to_save) are merged on a copy.
    """
    import copy

    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    state = base.state_dict()
    if not layers:
        return base, state
    plain = all(type(m) is LoraLinear and not any(m.use_dora.values()) for m in layers.values())
    if not plain or any("modules_to_save" in k or "original_module" in k for k in state):
        unloaded = copy.deepcopy(model)
        if not isinstance(unloaded, PeftModel):
            raise ExportMismatch("LoRA layers injected outside PEFT's PeftModel cannot be merged here.")
        unloaded = unloaded.merge_and_unload()
        return unloaded, unloaded.state_dict()
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        if not layer.merged:  # a merged layer already holds W + delta in its base weight
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        merged[f"{name}.weight"] = weight.detach()
    return base, merged


def write_preset(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    base_preset: Any,
    provenance: Any = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a preset directory: Hugging Face layout (safetensors, config, tokenizer, generation
    config) plus ``metadata.json`` (mistral_tune version, parameter_count, date_saved, tasks,
    base preset, training provenance). LoRA is folded in (see ``merged_state_dict``).

    Written to a temporary sibling and renamed into place, so ``out_dir`` is complete or absent.
    Both ``MistralCausalLM.from_preset(out_dir)`` and ``AutoModelForCausalLM.from_pretrained(out_dir)``
    load it.
    """
    from datetime import datetime, timezone

    from . import __version__

    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "metadata.json").is_file()):
        # Only an earlier preset (or an empty directory) is replaced; anything else could be someone's data.
        raise UserError(f"{out_dir} exists and is not a mistral-tune preset directory; choose a new path.")
    base, state = merged_state_dict(model)
    # Shared (tied) tensors count once. Counted now: save_pretrained consumes the dict it is given.
    parameter_count = sum({(v.data_ptr(), v.shape): v.numel() for v in state.values()}.values())
    check_writable(out_dir.parent)
    from transformers import GenerationConfig

    metadata = {
        "mistral_tune_version": __version__,
        "parameter_count": int(parameter_count),
        "date_saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": ["CausalLM"],
        "base_preset": base_preset,
        "chat_template": tokenizer.chat_template,
        "provenance": provenance,
    }
    with atomic_directory(out_dir) as tmp:
        base.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
        ).save_pretrained(tmp)
        save_json(tmp / "metadata.json", metadata)
    log.info("export: preset written to %s (%s parameters)", out_dir, f"{metadata['parameter_count']:,}")
    return out_dir
