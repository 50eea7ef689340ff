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
