"""Model FLOPs of a training step, and MFU against the GPU's dense bf16 peak.

Per token, with N the number of matmul weights of the base model (every Linear of the decoder
layers plus the LM head; embeddings are lookups, not matmuls):

    frozen base (LoRA, QLoRA, DoRA):  4 N   forward 2N + backward through activations 2N
    full fine-tuning:                 6 N   ... + weight gradients 2N
    adapter weights:                  6 N_adapter

plus attention, counted per (query, attended key) pair actually inside the causal, sliding-window,
per-example mask: 4 d flops per pair per layer forward (QK^T and AV, d = heads x head_dim), three
times that for forward + backward, so 12 L d per pair. For Mistral-7B (L=32, d=4096) at
seq 2048 that is 12 * 32 * 4096 * 1024.5 = 1.6e9 per token, against 4N = 28.4e9.

Recomputation under gradient checkpointing is not counted (that would be hardware FLOPs, not
model FLOPs), so checkpointing lowers MFU, as it should.
"""

from __future__ import annotations

from typing import Any

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOPS.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, or None when the device is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def matmul_parameters(config: Any) -> int:
    """Weights taking part in matmuls for one token: attention, MLP and LM head (no embeddings)."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_and_o = 2 * h * config.num_attention_heads * head_dim
    k_and_v = 2 * h * config.num_key_value_heads * head_dim
    mlp = 3 * h * inter  # gate, up, down
    experts = getattr(config, "num_local_experts", None) or 0
    if experts > 1:  # Mixtral: a token runs through num_experts_per_tok experts, plus the router
        mlp = config.num_experts_per_tok * mlp + h * experts
    return layers * (q_and_o + k_and_v + mlp) + vocab * h


def attended_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs of one causal example of ``length`` tokens under a sliding ``window``."""
    if not window or window >= length:
        return length * (length + 1) // 2
    # Queries 0..w-1 see i+1 keys; the remaining ones see w keys each.
    return window * (window + 1) // 2 + (length - window) * window


def example_lengths(batch: dict[str, Any]) -> list[int]:
    """Lengths of the examples in a collated batch: mask row sums, or position_ids restarts."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return [int(n) for n in mask.sum(dim=-1).tolist()]
    positions = batch.get("position_ids")
    if positions is None:
        return [int(batch["input_ids"].shape[-1])] * int(batch["input_ids"].shape[0])
    lengths = []
    for row in positions.tolist():
        # Trailing position-0 tokens are row padding (mistral_tune.packing.batch_token_count).
        end = max((i + 1 for i, p in enumerate(row) if p != 0), default=0)
        starts = [i for i, p in enumerate(row[:end]) if p == 0] + [end]
        lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    return lengths


def step_flops(config: Any, lengths: list[int], *, frozen_base: bool, adapter_parameters: int = 0) -> float:
    """Model FLOPs of one optimizer step whose examples have these token ``lengths``."""
    per_token = (4 if frozen_base else 6) * matmul_parameters(config) + 6 * adapter_parameters
    window = getattr(config, "sliding_window", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d = config.num_attention_heads * head_dim
    pairs = sum(attended_pairs(n, window) for n in lengths)
    return float(per_token * sum(lengths) + 12 * config.num_hidden_layers * d * pairs)


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1], or None without a known peak."""
    if not peak:
        return None
    return flops_per_second / (peak * 1e12)
