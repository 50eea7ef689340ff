"""``sdpa_packed``: PyTorch SDPA that attends within each packed example only, on any device.

A packed row holds several examples, kept apart by ``position_ids`` that restart at 0
(mistral_tune.data.packing). transformers' own ``sdpa`` backend turns that into one block-diagonal
``(rows, 1, length, length)`` mask and attends over the whole row: every query scores every key of the
row, masked or not, and an explicit mask keeps SDPA off its fused causal kernels. Here each example
(segment) gets its own causal SDPA call instead: the work is the sum of the examples' squared lengths,
not the row's (about 11x less attention for 90-token examples in 1024-token rows), and no mask is
needed. It is flash-attention's variable-length idea, with the kernels PyTorch has everywhere.

Everything that is not a packed row (no ``position_ids``, positions without a restart, decoding with
a cache, a bidirectional module) goes to transformers' ``sdpa`` unchanged, with the same mask, so
``sdpa_packed`` is ``sdpa`` but for packed rows. Mistral's sliding window still holds: an example
longer than the window gets the windowed causal mask for its own span. Padding at the end of a row
(every pad token at position 0, a one-token segment each) attends to itself alone, as with the
block-diagonal mask: its output is its own value vector, one copy for the whole run of pads.

Checked against the block-diagonal ``sdpa`` and ``eager`` paths (outputs and gradients) and against the
same examples unpacked in tests/models/test_packed_attention.py; speed in docs/BENCHMARKS.md.

Example:
    >>> from mistral_tune.models.packed_attention import NAME, register
    >>> register()   # then from_pretrained(..., attn_implementation=NAME)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"

_GQA_IN_SDPA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def register() -> str:
    """Make ``attn_implementation="sdpa_packed"`` known to transformers (idempotent); returns the name."""
    from mistral_tune.compat.transformers import register_attention

    register_attention(NAME, sdpa_packed_attention, mask="sdpa")
    return NAME


def packed_segments(position_ids: Optional[torch.Tensor], q_len: int, kv_len: int) -> Optional[list[list[int]]]:
    """Each row's segment starts (plus the row length at the end) when the rows are packed, else None.

    A segment starts where a position is not the previous one plus one (transformers' own packing
    test, ``masking_utils.find_packed_sequence_indices``). None when there is nothing to split: no
    positions, a query that is not the whole row (decoding with a cache), or no restart in any row.
    """
    if position_ids is None or q_len != kv_len or position_ids.shape[-1] != q_len or q_len < 2:
        return None
    positions = position_ids.reshape(-1, q_len)
    restarts = positions[:, 1:] != positions[:, :-1] + 1
    if not bool(restarts.any()):
        return None
    rows = []
    for row in restarts.cpu():
        starts = (torch.nonzero(row).flatten() + 1).tolist()
        rows.append([0, *starts, q_len])
    return rows


def window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask of one example longer than the sliding window: key j is seen by query i iff 0 <= i - j < window."""
    idx = torch.arange(length, device=device)
    offset = idx[:, None] - idx[None, :]
    return (offset >= 0) & (offset < window)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(heads_kv, n, d) -> (heads_kv * groups, n, d): each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    heads, n, d = x.shape
    return x[:, None].expand(heads, groups, n, d).reshape(heads * groups, n, d)


def _segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Any, dropout: float, window: Optional[int]
) -> torch.Tensor:
    """Causal attention of one example: q (heads, n, d), k/v (heads_kv, n, d) -> (heads, n, d)."""
    groups = q.shape[0] // k.shape[0]
    n = q.shape[1]
    if n == 1:  # one query, one key: softmax is 1, the output is the value
        return _expand_kv(v, groups).to(q.dtype)
    mask = window_mask(n, window, q.device) if window is not None and n > window else None
    extra = {"enable_gqa": True} if groups > 1 and _GQA_IN_SDPA else {}
    if groups > 1 and not extra:
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale, **extra
    )
    return out[0]


def sdpa_packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query (batch, heads, q_len, d), key/value
    (batch, heads_kv, kv_len, d); returns ((batch, q_len, heads, d), None)."""
    from mistral_tune.compat.transformers import sdpa_attention

    segments = None
    if getattr(module, "is_causal", True):
        segments = packed_segments(kwargs.get("position_ids"), query.shape[2], key.shape[2])
    if segments is not None and len(segments) != query.shape[0]:
        # one row of positions for a whole batch (transformers broadcasts them), else nothing to split by
        segments = segments * query.shape[0] if len(segments) == 1 else None
    if segments is None:
        return sdpa_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    outputs = []
    for b, starts in enumerate(segments):
        parts = []
        singles_from = None  # start of a run of one-token segments (row padding), copied in one go
        for s, e in zip(starts[:-1], starts[1:]):
            if e - s == 1:
                singles_from = s if singles_from is None else singles_from
                continue
            if singles_from is not None:
                parts.append(_expand_kv(value[b, :, singles_from:s], query.shape[1] // key.shape[1]).to(query.dtype))
                singles_from = None
            parts.append(
                _segment_attention(
                    query[b, :, s:e], key[b, :, s:e], value[b, :, s:e],
                    scale=scaling, dropout=dropout, window=sliding_window,
                )
            )  # fmt: skip
        if singles_from is not None:
            parts.append(_expand_kv(value[b, :, singles_from:], query.shape[1] // key.shape[1]).to(query.dtype))
        outputs.append(torch.cat(parts, dim=1))
    out = torch.stack(outputs)  # (batch, heads, q_len, d)
    return out.transpose(1, 2).contiguous(), None
