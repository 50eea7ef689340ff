"""Streaming merge: fold a saved LoRA/DoRA adapter into a base checkpoint one safetensors shard at a time.

The base never sits in memory as a whole. Each tensor of each base shard is read, the matching
adapter delta is added in float32 (``W + scale * B @ A``; DoRA rescales each output row to its
trained magnitude), the result is cast to the export dtype and written into output shards of at
most ``max_shard_size``. Base shards are read with plain file reads, not memory-mapped, and each output
shard's header is written first, so each merged tensor goes to disk at once: peak memory is about
the largest tensor (models/shards.py); see docs/export.md and docs/BENCHMARKS.md for measurements.

For a QLoRA adapter, every weight the training run held in 4-bit is first put through the same NF4
quantize/dequantize round trip bitsandbytes applied while loading, so the merge uses exactly the base the
adapter was trained against, never 4-bit rounding of the merged result.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.models.shards import parse_size  # noqa: F401  (re-exported: callers import it from here)

log = logging.getLogger(__name__)


BLOCK_ELEMENTS = 4 * 2**20  # rows merged at a time: ~16 MB of float32 per block

FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def base_shards(base_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint, in index order."""
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [base_dir / name for name in dict.fromkeys(weight_map.values())]
    single = base_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise UserError(f"{base_dir} has no model.safetensors or model.safetensors.index.json to merge into.")


class LoraDeltas:
    """The adapter's tensors grouped by base weight name, with each module's scale."""

    def __init__(self, adapter_dir: Path, base_config: Optional[dict[str, Any]] = None):
        from safetensors.torch import load_file

        from mistral_tune.compat.peft import (
            DORA_MAGNITUDE_SUFFIX,
            LORA_A_SUFFIX,
            LORA_B_SUFFIX,
            adapter_key_to_base,
            pattern_value,
        )

        config_path = adapter_dir / "adapter_config.json"
        if not config_path.exists():
            raise UserError(f"{adapter_dir} is not an adapter directory (no adapter_config.json).")
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        problems = []
        if cfg.get("peft_type") != "LORA":
            problems.append(f"peft_type {cfg.get('peft_type')} (only LORA/DoRA adapters merge here)")
        if cfg.get("init_lora_weights") not in (True, False, "gaussian"):
            problems.append(
                f"init_lora_weights={cfg.get('init_lora_weights')!r} rewrote the base during training; export "
                "such adapters from their run (mistral-tune saves them converted for the original base)"
            )
        for key in ("fan_in_fan_out", "lora_bias", "layer_replication", "use_qalora"):
            if cfg.get(key):
                problems.append(f"{key}={cfg[key]!r}")
        if problems:
            raise UserError(f"Cannot stream-merge the adapter in {adapter_dir}: " + "; ".join(problems) + ".")
        self.use_dora = bool(cfg.get("use_dora"))
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        self.lora: dict[str, dict[str, Any]] = {}  # base weight name -> {"A", "B", "m", "scale"}
        self.replace: dict[str, Any] = {}  # modules_to_save: base tensor name -> trained tensor
        for key, value in tensors.items():
            name = adapter_key_to_base(key)
            for part, slot in ((LORA_A_SUFFIX, "A"), (LORA_B_SUFFIX, "B"), (DORA_MAGNITUDE_SUFFIX, "m")):
                if name.endswith(part):
                    self.lora.setdefault(name[: -len(part)] + ".weight", {})[slot] = value
                    break
            else:
                if "lora_" in name or "token_adapter" in name:
                    raise UserError(
                        f"Cannot stream-merge adapter tensor {key}: not a LoRA/DoRA/modules_to_save weight."
                    )
                self.replace[name] = value
        r, alpha = cfg["r"], cfg["lora_alpha"]
        self.experts = ExpertDeltas.split_from(self.lora, cfg, base_config or {})
        for weight, parts in self.lora.items():
            if "A" not in parts or "B" not in parts or (self.use_dora and "m" not in parts):
                raise UserError(f"Adapter in {adapter_dir} is incomplete for {weight}: has {sorted(parts)}.")
            module = weight.removesuffix(".weight")
            rank = pattern_value(cfg.get("rank_pattern") or {}, module, r)
            a = pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
            parts["scale"] = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank

    def merge(self, name: str, view: Any, dtype: Any):
        """Base tensor ``name`` with its adapter folded in, as ``dtype``.

        ``view`` is a safetensors slice (or a tensor): ``view[i:j]`` reads rows i..j only.
        The delta is computed in float32 a block of rows at a time, so beyond the output tensor only a
        few MB are ever held (DoRA's row norms are per row, so blocks work for it too).
        """
        import torch

        if name in self.replace:
            return self.replace.pop(name).to(dtype)
        expert_delta = self.experts.pop(name)
        if expert_delta is not None:
            return (view[:].float() + expert_delta).to(dtype)
        parts = self.lora.pop(name, None)
        if parts is None:
            return view[:].to(dtype)
        shape = list(view.shape) if isinstance(view, torch.Tensor) else list(view.get_shape())
        out = torch.empty(shape, dtype=dtype)
        a, b = parts["A"].float(), parts["B"].float()
        step = max(1, BLOCK_ELEMENTS // max(1, shape[1]))
        for i in range(0, shape[0], step):
            j = min(i + step, shape[0])
            # Same operations, in the same order, as PEFT's merge: W + (B @ A) * scale in float32.
            w = view[i:j].float() + (b[i:j] @ a) * parts["scale"]
            if self.use_dora:
                # DoRA: each output row is rescaled to its trained magnitude m / ||W + scale*BA||.
                w = (parts["m"][i:j].float() / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
            out[i:j] = w
        return out

    def leftovers(self) -> list[str]:
        return sorted(self.lora) + sorted(self.replace) + self.experts.leftovers()


# Mixtral checkpoints (the hub's, and what transformers 5 saves) keep one 2D tensor per expert
# projection: w1 = gate, w3 = up (the two halves of the in-memory experts.gate_up_proj), w2 = down.
_EXPERT_TENSOR = re.compile(r"^(?P<layer>.+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<w>w[123])\.weight$")


class ExpertDeltas:
    """LoRA on Mixtral's experts (``target_parameters``), folded into the per-expert checkpoint tensors.

    In memory transformers 5 fuses each layer's experts into ``experts.gate_up_proj`` (experts, 2 x
    intermediate, hidden) and ``experts.down_proj`` (experts, hidden, intermediate); the adapter's
    factors are for those. Which saved factor pair is which is read from its shapes (gate_up maps
    hidden -> 2 x intermediate, down intermediate -> hidden), and expert e's delta goes to its w1 and
    w3 (the first and second half of gate_up's rows) and to its w2.
    """

    def __init__(self, num_experts: int, intermediate: int):
        self.num_experts, self.intermediate = num_experts, intermediate
        self.parts: dict[tuple[str, str], dict[str, Any]] = {}  # (layer prefix, gate_up|down) -> A, B, scale
        self.pending: set[str] = set()

    @classmethod
    def split_from(cls, lora: dict[str, dict[str, Any]], cfg: dict[str, Any], base_config: dict[str, Any]):
        """Move the parameter-targeted entries of ``lora`` (base weight name -> factors) out into an ExpertDeltas."""
        from mistral_tune.compat.peft import parameter_adapter_module

        out = cls(int(base_config.get("num_local_experts") or 0), int(base_config.get("intermediate_size") or 0))
        names = [w for w in lora if w.removesuffix(".weight").endswith((".experts", ".experts.base_layer"))]
        if names and not out.num_experts:
            raise UserError(f"The adapter has LoRA on experts ({names[0]}) but the base is not a mixture of experts.")
        for weight in names:
            factors = lora.pop(weight)
            module = parameter_adapter_module(weight.removesuffix(".weight"))  # ...layers.3.mlp.experts
            a, b = factors["A"], factors["B"]
            rank = a.shape[0] // out.num_experts
            kind = "gate_up" if b.shape[0] == 2 * out.intermediate else "down"
            scale = cfg["lora_alpha"] / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
            layer = module.removesuffix(".mlp.experts")
            out.parts[(layer, kind)] = {"A": a.float(), "B": b.float(), "scale": scale}
            ws = ("w1", "w3") if kind == "gate_up" else ("w2",)
            for e in range(out.num_experts):
                out.pending.update(f"{layer}.block_sparse_moe.experts.{e}.{w}.weight" for w in ws)
        return out

    def pop(self, name: str):
        """The float32 delta for checkpoint tensor ``name`` (an expert's w1/w2/w3), or None."""
        from mistral_tune.compat.peft import expert_delta

        if name not in self.pending:
            return None
        self.pending.discard(name)
        m = _EXPERT_TENSOR.match(name)
        layer, e, w = m["layer"], int(m["expert"]), m["w"]
        parts = self.parts[(layer, "down" if w == "w2" else "gate_up")]
        delta = expert_delta(parts["A"], parts["B"], self.num_experts, e) * parts["scale"]
        if w == "w1":
            return delta[: self.intermediate]
        return delta[self.intermediate :] if w == "w3" else delta

    def leftovers(self) -> list[str]:
        return sorted(self.pending)


def nf4_round_trip(weight: Any, quant: dict[str, Any]):
    """Quantize and dequantize as bitsandbytes did when loading the QLoRA base."""
    import bitsandbytes as bnb
    import torch

    w = weight.to(getattr(torch, quant["base_dtype"]))
    packed, state = bnb.functional.quantize_4bit(
        w, blocksize=quant["blocksize"], compress_statistics=quant["double_quant"], quant_type=quant["quant_type"]
    )
    return bnb.functional.dequantize_4bit(packed, state)


def stream_merge(
    base_dir: Path,
    adapter_dir: Optional[Path],
    out_dir: Path,
    *,
    dtype_name: str = "auto",
    max_shard_size: str = "2GB",
    quantization: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write the merged weights and config.json of ``base_dir`` + ``adapter_dir`` into ``out_dir``.

    ``adapter_dir=None`` re-shards/casts the base alone. ``quantization`` is the QLoRA record from the
    adapter's sidecar (``adapters.quantization_record``). Returns the shard names and dtype. Writes
    into ``out_dir`` as it is: callers wrap it in ``export.atomic_directory``.
    """
    import torch

    from mistral_tune.models.shards import PlannedShardWriter, ShardReader, plan_shards, safetensors_dtype

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    deltas = LoraDeltas(Path(adapter_dir), config) if adapter_dir is not None else None
    quantized = set(quantization["modules"]) if quantization else set()
    shards = base_shards(base_dir)
    # Plan every output shard from the base's headers (names, shapes, dtypes), so each tensor goes to
    # disk as soon as it is merged: memory is one tensor, whatever max_shard_size is.
    entries, dtype = [], None if dtype_name == "auto" else getattr(torch, dtype_name)
    for shard in shards:
        with ShardReader(shard) as f:
            for name in f.keys():
                view = f.get_slice(name)
                kind = view.get_dtype()
                if kind in FLOAT_DTYPES and dtype is None:
                    dtype = getattr(torch, FLOAT_DTYPES[kind])  # auto: the base checkpoint's own dtype
                out_kind = safetensors_dtype(dtype) if kind in FLOAT_DTYPES else kind
                entries.append((name, view.get_shape(), out_kind))
    writer = PlannedShardWriter(out_dir, plan_shards(entries, parse_size(max_shard_size)))
    for shard in shards:
        # Plain reads (no memory map): a read tensor leaves this process's memory once merged and written.
        with ShardReader(shard) as f:
            for name in f.keys():
                view = f.get_slice(name)
                if view.get_dtype() not in FLOAT_DTYPES:
                    writer.add(name, view[:])  # integer buffers, if any, pass through untouched
                    continue
                if name.removesuffix(".weight") in quantized:
                    view = nf4_round_trip(view[:], quantization)  # whole tensor: NF4 scale blocks span rows
                if deltas is None:
                    writer.add(name, view[:].to(dtype))
                else:
                    writer.add(name, deltas.merge(name, view, dtype))
    if deltas is not None and deltas.leftovers():
        missing = deltas.leftovers()
        raise UserError(
            f"The adapter has weights for {len(missing)} tensors the base lacks (e.g. {missing[0]}): "
            f"it was not trained on {base_dir}."
        )
    shards = writer.finish()
    dtype_out = str(dtype).removeprefix("torch.")
    config.pop("quantization_config", None)
    if config.get("num_local_experts"):
        # Router logits (and their load-balancing loss) are for training; the export generates.
        config["output_router_logits"] = False
    config["dtype"] = dtype_out
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log.info("streamed merge: %d shard(s), %s, %.1f MB", len(shards), dtype_out, writer.total / 1e6)
    return {"shards": shards, "dtype": dtype_out, "bytes": writer.total}
