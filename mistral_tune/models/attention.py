"""The attention backend: ``auto`` picks flash-attention 2 when it can run (CUDA, flash-attn >= 2.3),
else ``sdpa_packed`` (transformers' sdpa, but each packed example attends on its own:
mistral_tune.models.packed_attention). Every backend applies Mistral's sliding window.
"""

from __future__ import annotations

import logging

from mistral_tune.config.registry import ATTN_IMPLEMENTATIONS
from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


def register_packed() -> str:
    from mistral_tune.models.packed_attention import register

    return register()


def pick_attn_implementation(requested: str) -> str:
    """Resolve ``auto`` and check that an explicit choice can run here; logs the choice.

    Every backend applies Mistral's sliding window (tests/models/test_attention.py checks eager, sdpa and
    flex_attention against a hand-written windowed attention).
    """
    import torch

    if requested not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"model.attn_implementation={requested!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}.")
    has_cuda = torch.cuda.is_available()
    flash_ok = False
    if has_cuda:
        try:
            import flash_attn
            from packaging.version import Version

            flash_ok = Version(flash_attn.__version__) >= Version("2.3")  # 2.3 added sliding windows
        except ImportError:
            pass
    if requested == "auto":
        choice = "flash_attention_2" if flash_ok else register_packed()
        log.info("attention backend: %s (auto; flash-attn %s)", choice, "found" if flash_ok else "not usable")
        return choice
    if requested == "sdpa_packed":
        register_packed()
    if requested == "flash_attention_2" and not flash_ok:
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and flash-attn >= 2.3 "
            f"(CUDA available: {has_cuda}). Install it with `pip install .[flash]` on a GPU machine, "
            "or use model.attn_implementation=sdpa_packed (also sliding-window correct)."
        )
    if requested == "flex_attention":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"model.attn_implementation=flex_attention needs torch >= 2.5 (installed: {torch.__version__}). "
                "Use sdpa instead."
            ) from exc
        if not has_cuda:
            # Inductor lowers flex_attention on CPU for inference only, compiling once per shape; backward
            # and some decoding shapes do not compile there (see docs/models.md).
            log.warning(
                "attention backend: flex_attention on CPU compiles per shape and supports inference only; "
                "sdpa is the better CPU choice"
            )
    log.info("attention backend: %s (requested)", requested)
    return requested
