"""Verify an export: reload it with plain transformers and compare its logits on fixed prompts with the
model it came from, within a tolerance that depends on the export dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)


# Largest |logit difference| accepted between the reloaded export and the model it came from.
# float32: absolute; merges differ only by summation order (measured 6e-6..2e-5 on mistral_tiny).
# 16-bit: relative to the largest |logit| of the reference, twice the noise that rounding alone
# causes (casting the mistral_tiny base to bf16 moves its logits by 1.9% of max |logit|, fp16 by 0.22%).
TOLERANCE = {"float32": 1e-4}

RELATIVE_TOLERANCE = {"bfloat16": 0.04, "float16": 0.005}


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
    """Logits of ``model`` on ``prompts``, masked to real tokens, in fp32 on CPU."""
    import torch

    input_ids, attention_mask = verification_inputs(tokenizer, prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    model.train(was_training)
    if logits.dim() == 2:  # a reward model: one score per text, read at its last real token
        return logits.float().cpu()
    return logits.float().cpu() * attention_mask[..., None]


def tolerance_for(dtype_name: str, expected: Any) -> float:
    """The accepted max |logit diff| for an export in ``dtype_name`` (see TOLERANCE)."""
    if dtype_name in TOLERANCE:
        return TOLERANCE[dtype_name]
    return RELATIVE_TOLERANCE[dtype_name] * max(1.0, float(expected.abs().max()))


def verify_export(
    out_dir: Path,
    tokenizer: Any,
    prompts: Sequence[str],
    expected: Any,
    dtype_name: str,
    tolerance: Optional[float] = None,
) -> tuple[float, float]:
    """Reload ``out_dir`` with plain transformers and compare its logits (a reward model's scores);
    returns (max |diff|, tolerance)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    architectures = AutoConfig.from_pretrained(out_dir).architectures or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    reloaded = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
        out_dir, dtype=torch.float32
    )
    got = reference_logits(reloaded, tokenizer, prompts)
    del reloaded
    diff = float((got - expected).abs().max())
    tol = tolerance if tolerance is not None else tolerance_for(dtype_name, expected)
    if not diff <= tol:  # also catches NaN
        raise ExportMismatch(
            f"The export in {out_dir.name} does not reproduce the fine-tuned model: max |logit diff| "
            f"{diff:.3g} > {tol:.3g} allowed for {dtype_name}. It was not kept."
        )
    return diff, tol


def fine_tune_shift(model: Any, tokenizer: Any, prompts: Sequence[str], expected: Any) -> Optional[float]:
    """Max |logit change| the adapter makes over its base (None without an adapter).

    Printed next to the export's own difference: a verification can only tell a lost fine-tune
    apart when this is well above the tolerance.
    """
    if not hasattr(model, "disable_adapter"):
        return None
    with model.disable_adapter():
        base = reference_logits(model, tokenizer, prompts)
    return float((expected - base).abs().max())


def warn_if_indistinguishable(shift: Optional[float], tol: Optional[float], dtype_name: str) -> None:
    """Say so when the fine-tune is too small for the check to tell the export from the base."""
    if shift is not None and tol is not None and shift < 2 * tol:
        log.warning(
            "export: the adapter moves logits by at most %.3g, within reach of the %.3g tolerance of a %s "
            "export, so verification cannot tell it from the base model; export.dtype=float32 checks strictly",
            shift,
            tol,
            dtype_name,
        )


VERIFY_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return",
    "Sliding windows keep attention local. " * 6,
)
