"""Mixtral's experts in 4-bit NF4 for QLoRA.

bitsandbytes quantizes ``nn.Linear`` layers only, and transformers 5 keeps each Mixtral layer's experts
as two 3D parameters (``gate_up_proj`` [experts, 2 x intermediate, hidden] and ``down_proj``
[experts, hidden, intermediate]), so a 4-bit load leaves them in 16-bit and PEFT's
``prepare_model_for_kbit_training`` upcasts them to fp32: for Mixtral 8x7B that is ~45B parameters
at 4 bytes. :func:`quantize_experts` swaps each experts module for :class:`Experts4bit`, which holds
every expert's gate, up and down projections as one bitsandbytes ``Params4bit`` each (the same NF4
settings bitsandbytes used for the model's linear layers) and dequantizes only the experts a batch
routes to, one at a time, in its forward (bitsandbytes' ``matmul_4bit``, as ``Linear4bit`` does, so
backward dequantizes again rather than keeping dense weights for the input gradient).

Why not bitsandbytes' own ``bnb.nn.parametrize.replace_parameter_4bit`` (experimental in 0.50): it
quantizes the whole 3D tensor and dequantizes all of it whenever the parameter is read, and transformers'
expert loop then keeps that dense tensor alive for backward (every layer's, without gradient
checkpointing); its blocks and double-quantization offset span every expert, so a merge could not
reproduce them from the checkpoint's per-expert tensors.

Gate and up are quantized separately (not as the fused gate_up slice) because Mixtral checkpoints
store them as two tensors (w1, w3): a QLoRA merge then rounds each checkpoint tensor through NF4 on
its own and gets exactly these weights (``export/stream_merge.nf4_round_trip``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PROJECTIONS = ("gate", "up", "down")  # checkpoint tensors w1, w3, w2 of each expert


class Experts4bit(nn.Module):
    """A Mixtral experts module whose weights are NF4: one ``Params4bit`` per expert and projection.

    Computes what transformers' ``MixtralExperts`` computes with the dequantized weights, in
    ``compute_dtype`` (as ``bnb.nn.Linear4bit`` does): for each expert that any token is routed to,
    ``down(act(gate(x)) * up(x))`` scaled by the token's routing weight, summed per token.
    """

    def __init__(self, experts: nn.Module, *, settings: dict[str, Any], compute_dtype: torch.dtype):
        import bitsandbytes as bnb

        from mistral_tune.compat.transformers import expert_weights

        super().__init__()
        gate_up, down = expert_weights(experts)
        self.num_experts, self.intermediate_dim, self.hidden_dim = down.shape[0], down.shape[2], down.shape[1]
        self.act_fn = experts.act_fn
        self.compute_dtype = compute_dtype
        i = self.intermediate_dim
        for name in PROJECTIONS:
            setattr(self, name, nn.ParameterList())
        for e in range(self.num_experts):
            for name, w in (("gate", gate_up[e, :i]), ("up", gate_up[e, i:]), ("down", down[e])):
                param = bnb.nn.Params4bit(w.detach().contiguous(), requires_grad=False, **settings)
                getattr(self, name).append(param.to(w.device))  # moving a Params4bit quantizes it

    def weight(self, name: str, expert: int) -> torch.Tensor:
        """One expert's projection, dequantized (the matrix its forward multiplies with)."""
        from mistral_tune.compat.bitsandbytes import dequantize

        return dequantize(getattr(self, name)[expert])

    def dequantized(self) -> dict[str, torch.Tensor]:
        """The weights in transformers' own layout: ``gate_up_proj`` and ``down_proj`` (3D)."""
        gate_up = [torch.cat([self.weight("gate", e), self.weight("up", e)]) for e in range(self.num_experts)]
        down = [self.weight("down", e) for e in range(self.num_experts)]
        return {"gate_up_proj": torch.stack(gate_up), "down_proj": torch.stack(down)}

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        from mistral_tune.compat.bitsandbytes import matmul_4bit

        out = torch.zeros_like(hidden_states)
        x_all = hidden_states.to(self.compute_dtype)
        for e in top_k_index.unique().tolist():  # ascending, as transformers' own loop
            if not 0 <= e < self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == e)
            x = x_all[token_idx]
            # bitsandbytes' 4-bit matmul, as Linear4bit's: backward dequantizes again instead of keeping
            # the dense weight alive for the input gradient.
            h = self.act_fn(matmul_4bit(x, self.gate[e])) * matmul_4bit(x, self.up[e])
            h = matmul_4bit(h, self.down[e]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, nf4"


def quantize_experts(model: nn.Module) -> int:
    """Replace every Mixtral experts module of a 4-bit loaded model by :class:`Experts4bit`; returns how many.

    Layer by layer: each layer's 16-bit experts are freed as soon as their 4-bit form exists.
    """
    from mistral_tune.compat.bitsandbytes import linear4bit_settings
    from mistral_tune.compat.transformers import experts_modules

    found = experts_modules(model)
    if not found:
        return 0
    settings, compute_dtype = linear4bit_settings(model)
    if settings is None:
        raise ValueError("quantize_experts: the model has no bitsandbytes 4-bit linear layer to take NF4 settings from")
    for name in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, Experts4bit(getattr(parent, leaf), settings=settings, compute_dtype=compute_dtype))
    log.info("experts of %d MoE layers stored in 4-bit %s", len(found), settings["quant_type"])
    return len(found)


def is_experts4bit(module: Any) -> bool:
    return isinstance(module, Experts4bit)
