"""DeepSpeed internals: recognising a ZeRO-3 partitioned parameter."""

from __future__ import annotations

from typing import Any


def is_zero3_param(param: Any) -> bool:
    """True for a parameter ZeRO-3 partitioned (it carries DeepSpeed's ``ds_id``)."""
    return hasattr(param, "ds_id")
