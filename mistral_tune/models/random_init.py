"""A random-init checkpoint written to disk tensor by tensor, equal to ``from_config`` + ``save_pretrained``.

``model.load_weights=false`` builds the architecture with transformers' random init. In memory that
is the whole model in float32 (29 GB for Mistral 7B) before any cast; where the weights only need
to reach disk (the base of a QLoRA run, which bitsandbytes quantizes while loading, or the base a
streamed export merges into), ``save_random_checkpoint`` writes the same tensors with about one
tensor of memory: the architecture is built on the meta device, then transformers' initialization
is replayed in its order, drawing from torch's CPU generator exactly as ``from_config`` does:

- each ``nn.Linear`` and ``nn.Embedding`` draws torch's own init when it is constructed
  (``kaiming_uniform_`` for a Linear's weight and ``uniform_`` for its bias, ``normal_`` for an
  Embedding); these values are overwritten, but the draws advance the generator;
- at the end of each ``PreTrainedModel``'s constructor, ``post_init`` initializes every module of
  its subtree not yet initialized, children first: ``normal_(0, initializer_range)`` for Linear and
  Embedding weights, zeros for biases and the padding row, ones for RMSNorm weights.

``tests/models/test_random_init.py`` checks tensor for tensor that the result equals
``load_model(...load_weights=False)`` + ``save_pretrained``, so a transformers upgrade that changes
the order fails there. Architectures with anything else (Mixtral's fused expert parameters) are
not replayed: ``replayable`` says so and callers keep the in-memory path.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional


def _post_order(module: Any, prefix: str = ""):
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix, module


def _kind(module: Any) -> Optional[str]:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "RMSNorm" in type(module).__name__:
        return "norm"
    return None


def build_meta(config: Any, auto_class: Any = None, attn: str = "sdpa"):
    """The architecture on the meta device: shapes only, no memory, no random draws."""
    import torch
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(copy.deepcopy(config), attn_implementation=attn)


def replayable(meta_model: Any) -> bool:
    """Every parameter belongs to a Linear, an Embedding or an RMSNorm (whose inits are replayed)."""
    for _, module in _post_order(meta_model):
        if any(True for _ in module.parameters(recurse=False)) and _kind(module) is None:
            return False
    return True


def _events(meta_model: Any) -> list[tuple[str, str, str, Any]]:
    """(phase, kind, prefix, module) in the order construction and post_init touch the generator."""
    from transformers import PreTrainedModel

    events, done = [], set()

    def construct(module: Any, prefix: str) -> None:
        for name, child in module.named_children():
            construct(child, f"{prefix}{name}.")
        kind = _kind(module)
        if kind in ("linear", "embedding"):
            events.append(("ctor", kind, prefix, module))
        if isinstance(module, PreTrainedModel):
            for sub_prefix, sub in _post_order(module, prefix):
                kind = _kind(sub)
                if id(sub) not in done and kind is not None:
                    events.append(("init", kind, sub_prefix, sub))
                done.add(id(sub))

    construct(meta_model, "")
    return events


def save_random_checkpoint(
    config: Any,
    out_dir: Path,
    *,
    seed: int,
    dtype: Any,
    max_shard_size: str = "2GB",
    auto_class: Any = None,
) -> list[str]:
    """Write config.json and the safetensors of ``auto_class.from_config(config)`` under
    ``torch.manual_seed(seed)``, cast to ``dtype``, into ``out_dir``; returns the shard names.

    Raises ValueError for an architecture ``replayable`` refuses.
    """
    import torch

    from mistral_tune.models.shards import PlannedShardWriter, parse_size, plan_shards, safetensors_dtype

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_meta(config, auto_class)
    if not replayable(model):
        raise ValueError(f"{type(model).__name__} has parameters whose random init is not replayed here")
    # from_config builds in config.dtype when it is set (else torch's default) and load_model casts after.
    init_dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.get_default_dtype()
    if isinstance(getattr(config, "dtype", None), str):
        init_dtype = getattr(torch, config.dtype)
    std = getattr(config, "initializer_range", None) or 0.02
    events = _events(model)
    # Tied parameters (lm_head = embed_tokens) are saved once, under the name save_pretrained keeps.
    keep = {id(p): name for name, p in model.named_parameters()}  # named_parameters drops tied duplicates
    written: list[tuple[str, Any]] = []
    for phase, kind, prefix, module in events:
        if phase == "init" and id(module.weight) in keep and keep[id(module.weight)] == f"{prefix}weight":
            written.append((f"{prefix}weight", module.weight))
            if kind == "linear" and module.bias is not None:
                written.append((f"{prefix}bias", module.bias))
    code = safetensors_dtype(dtype)
    plan = plan_shards(((n, list(p.shape), code) for n, p in written), parse_size(max_shard_size))
    writer = PlannedShardWriter(out_dir, plan)
    torch.manual_seed(seed)
    for phase, kind, prefix, module in events:
        weight = torch.empty(module.weight.shape, dtype=init_dtype)
        if phase == "ctor":
            if kind == "linear":
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                if module.bias is not None:
                    fan_in = weight.shape[1]
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    torch.empty(module.bias.shape, dtype=init_dtype).uniform_(-bound, bound)
            else:
                weight.normal_()
            del weight
            continue
        name = f"{prefix}weight"
        if kind == "norm":
            weight.fill_(1.0)
        else:
            weight.normal_(0.0, std)
            if kind == "embedding" and module.padding_idx is not None:
                weight[module.padding_idx] = 0
        if keep.get(id(module.weight)) == name:
            writer.add(name, weight.to(dtype))
            if kind == "linear" and module.bias is not None:
                writer.add(f"{prefix}bias", torch.zeros(module.bias.shape, dtype=dtype))
        del weight
    shards = writer.finish()
    saved = copy.deepcopy(model.config)
    saved.dtype = dtype
    saved.architectures = [type(model).__name__]  # what save_pretrained records
    saved.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    return shards
