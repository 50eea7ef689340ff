"""Peak memory and step time of a fine-tuning run, from the architecture and the config alone.

Pure arithmetic on the numbers in a Mistral ``config.json`` (no torch import, so it answers at once).
docs/memory.md explains each term; the tests check the activation terms against the tensors autograd
really saves for ``mistral_tiny``, and the whole estimate for Mistral 7B + QLoRA against published figures.

Example:
    >>> from mistral_tune.presets import PRESETS
    >>> shape = RunShape(batch_size=1, seq_len=2048, adapter="qlora", gradient_checkpointing=True)
    >>> m = estimate_memory(PRESETS["mistral_7b_en"].config, shape, trainable=3_407_872, total=7_241_732_096)
    >>> round(m.peak_bytes / GiB, 1)  # doctest: +SKIP
    6.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_tune.core.hardware import GPUS, Gpu

GiB = 1024**3

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = LINEAR_MODULES[:4]
MLP_MODULES = LINEAR_MODULES[4:]

# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64
# weights, and one fp32 absmax per 256 of those blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)

CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context, cuBLAS workspace and allocator slack; counted once


@dataclass
class RunShape:
    """What the config says about one training step (per device)."""

    batch_size: int = 1  # per-device micro batch (train.per_device_train_batch_size)
    seq_len: int = 2048  # trainer.max_length: every sequence is assumed full (worst case)
    grad_accum: int = 1
    num_devices: int = 1
    adapter: str = "lora"  # lora | qlora | dora | none
    target_modules: tuple = ("q_proj", "v_proj")
    lora_r: int = 8
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    compute_bytes: int = 2  # 2 for bf16/fp16 weights and activations, 4 for fp32
    attn: str = "sdpa"  # flash_attention_2 | sdpa | eager
    optim: str = "adamw_torch"
    dropout_mask_bytes: int = 1  # CUDA keeps a bool dropout mask; the CPU kernel keeps a float one
    loss: str = "plain"  # trainer.loss: plain (full logits) | chunked (liger counts the same)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all devices (an upper bound: padding-free data has fewer)."""
        return self.batch_size * self.grad_accum * self.num_devices * self.seq_len

    @property
    def targets(self) -> tuple:
        names = tuple(self.target_modules)
        return LINEAR_MODULES if "all-linear" in names else tuple(n for n in names if n in LINEAR_MODULES)


@dataclass
class MemoryEstimate:
    """Peak bytes per device, term by term (``terms``: label -> (bytes, explanation))."""

    terms: dict[str, tuple[int, str]] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_bytes_other_checkpointing: int = 0  # the same run with gradient checkpointing flipped

    def add(self, label: str, nbytes: float, note: str) -> None:
        self.terms[label] = (int(nbytes), note)


def dims(c: dict[str, Any]) -> dict[str, int]:
    """The sizes every term needs, from a Mistral config dict."""
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return {
        "h": c["hidden_size"],
        "i": c["intermediate_size"],
        "layers": c["num_hidden_layers"],
        "vocab": c["vocab_size"],
        "q": c["num_attention_heads"] * head_dim,  # query width (= h for Mistral 7B)
        "kv": c["num_key_value_heads"] * head_dim,  # key/value width (GQA: h / 4 for Mistral 7B)
        "heads": c["num_attention_heads"],
        "window": c.get("sliding_window") or 0,
        "experts": c.get("num_local_experts") or 1,  # Mixtral: SwiGLU experts per layer
        "active": c.get("num_experts_per_tok") or 1,  # ... of which each token runs through this many
    }


def linear_modules(c: dict[str, Any]) -> tuple:
    """The ``nn.Linear`` modules of one decoder layer: what LoRA can target by module name and what
    bitsandbytes stores in 4-bit. Mixtral's experts are not among them: transformers 5 keeps each
    layer's experts as two 3D parameters (``experts.gate_up_proj``, ``experts.down_proj``), which
    QLoRA quantizes itself (:func:`experts_in_4bit`)."""
    return ATTENTION_MODULES if (c.get("num_local_experts") or 0) > 1 else LINEAR_MODULES


EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")  # adapters.build.EXPERT_PARAMETERS


def expert_parameter_count(c: dict[str, Any]) -> int:
    """Weights of every expert of every layer (gate, up and down of each), 0 for a dense model."""
    d = dims(c)
    return 3 * d["h"] * d["i"] * d["experts"] * d["layers"] if d["experts"] > 1 else 0


def lora_on_experts(s: "RunShape") -> bool:
    return bool(set(s.target_modules) & set(EXPERT_TARGETS))


def experts_in_4bit(c: dict[str, Any], s: "RunShape") -> bool:
    """QLoRA stores Mixtral's experts in NF4 unless LoRA targets them (PEFT's LoRA on parameters needs 16-bit)."""
    return s.adapter == "qlora" and dims(c)["experts"] > 1 and not lora_on_experts(s)


def module_shapes(c: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear module in one decoder layer."""
    d = dims(c)
    h, i, q, kv = d["h"], d["i"], d["q"], d["kv"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def lora_parameter_count(c: dict[str, Any], targets: tuple, r: int, dora: bool = False) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted module (+ out for DoRA's magnitude)."""
    shapes = module_shapes(c)
    targets = tuple(m for m in targets if m in linear_modules(c))
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) + (shapes[m][1] if dora else 0) for m in targets)
    return per_layer * c["num_hidden_layers"]


def activation_bytes(s: RunShape) -> int:
    """Bytes per activation element.

    QLoRA runs in fp32: PEFT's ``prepare_model_for_kbit_training`` upcasts the embeddings, norms
    and lm_head to fp32, and bitsandbytes casts each 4-bit matmul's output back to its input's dtype,
    so the fp32 residual stream stays fp32 (autocast, ``train.bf16=true``, would trim some of it).
    """
    return 4 if s.adapter == "qlora" else s.compute_bytes


def layer_activation_terms(c: dict[str, Any], s: RunShape) -> dict[str, float]:
    """Bytes per token that one decoder layer keeps for the backward pass, by source.

    Counted from what autograd saves in transformers' Mistral layer: RMSNorm keeps its fp32 input,
    attention keeps q/k/v/out (sdpa and eager see k/v repeated to all query heads; flash-attn does
    not), SwiGLU keeps gate, silu(gate) and up. A frozen linear, 16-bit or 4-bit, keeps nothing (its
    input gradient needs only the weight); a trainable one keeps its input; a LoRA branch keeps its
    dropout output and mask (or shares the plain input when dropout is 0).
    """
    d = dims(c)
    a = activation_bytes(s)
    shapes = module_shapes(c)
    targets = tuple(m for m in s.targets if m in linear_modules(c)) if s.adapter != "none" else ()
    full = s.adapter == "none"
    terms: dict[str, float] = {}
    terms["norms (fp32 inputs)"] = 2 * 4 * (d["h"] + 1) + (2 * a * d["h"] if full else 0)  # x and 1/rms
    kv_width = d["kv"] if s.attn == "flash_attention_2" else d["q"]
    terms["attention q/k/v/out"] = (2 * d["q"] + 2 * kv_width) * a + 4 * d["heads"]
    if s.attn == "eager":
        terms["attention probabilities"] = d["heads"] * s.seq_len * (4 + a)
    elif s.attn == "sdpa" and (s.batch_size > 1 or (d["window"] and s.seq_len > d["window"])):
        # Padding or a biting sliding window makes transformers pass a mask, which sdpa turns into
        # an additive bias per call: one seq x seq tensor per layer.
        terms["attention mask"] = s.seq_len * a
    if d["experts"] > 1:
        # Each token runs through `active` experts: SwiGLU's three tensors per expert, the expert's
        # output (scaled by its routing weight) and the fp32 router logits and softmax. Approximate:
        # the tests check dense layers to the byte, not this.
        terms["experts (swiglu + output per active expert)"] = d["active"] * (3 * d["i"] + d["h"]) * a
        if experts_in_4bit(c, s):
            # bitsandbytes' 4-bit matmul keeps its input for backward: each active expert's gathered tokens.
            terms["4-bit experts (gathered inputs)"] = d["active"] * d["h"] * a
        terms["router (fp32 logits, softmax)"] = 2 * 4 * d["experts"]
    else:
        terms["swiglu (gate, silu, up)"] = 3 * d["i"] * a
    # Inputs shared by modules: q/k/v read the same normed x, gate/up too. o_proj reads the attention
    # output, which sdpa and flash-attn already keep in (batch, seq, heads, dim) layout: same storage.
    groups = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp"}
    already = set() if s.attn == "eager" else {"o"}
    firsts = {"qkv": "q_proj", "o": "o_proj", "mlp": "gate_proj", "down_proj": "down_proj"}
    if full and d["experts"] > 1:
        firsts = {"qkv": "q_proj", "o": "o_proj"}  # each expert's input is counted with the experts above
    if full:
        kept = [g for g in firsts if g not in already]
        terms["linear inputs"] = sum(shapes[firsts[g]][0] for g in kept) * a
        already |= set(kept)
    if targets:
        if s.lora_dropout > 0:  # each adapted module drops out its own copy of the input, plus a mask
            lora = sum(shapes[m][0] * (a + s.dropout_mask_bytes) for m in targets)
        else:
            unsaved = {groups.get(m, m): shapes[m][0] for m in targets if groups.get(m, m) not in already}
            lora = sum(unsaved.values()) * a
        terms["lora inputs"] = lora + len(targets) * s.lora_r * a
    return terms


def logits_bytes_per_token(c: dict[str, Any], s: RunShape) -> float:
    """Logits, their fp32 copy for the loss (none when already fp32), and the saved fp32 log-softmax."""
    a = activation_bytes(s)
    copy = a if a < 4 else 0
    return c["vocab_size"] * (copy + 4 + 4)


LOSS_CHUNK_TOKENS = 1024  # mistral_tune.losses.DEFAULT_CHUNK_SIZE (kept here: this module imports no torch)


def logits_bytes(c: dict[str, Any], s: RunShape, tokens: int) -> float:
    """Peak bytes of the loss: full logits (plain), or one chunk of them plus the hidden-state gradient."""
    if s.loss == "plain":
        return logits_bytes_per_token(c, s) * tokens
    a = activation_bytes(s)
    copy = a if a < 4 else 0
    # one chunk: the projection in the compute dtype, its fp32 softmax/gradient (in place), and that
    # gradient cast back for the matmul; plus the gathered hidden states and their gradient.
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    return chunk * c["vocab_size"] * (copy + 4 + copy) + 2 * tokens * c["hidden_size"] * a


def optimizer_bytes_per_param(optim: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter (torch AdamW keeps two moments in the parameter dtype)."""
    name = optim.lower()
    if "8bit" in name:
        return 2.0
    if "sgd" in name or "adafactor" in name:
        return 0.0 if "sgd" in name else 0.1 * param_bytes
    return 2.0 * param_bytes


def estimate_memory(c: dict[str, Any], s: RunShape, *, trainable: int, total: int) -> MemoryEstimate:
    """Peak memory per device of one training step (see docs/memory.md for each term)."""
    d = dims(c)
    est = MemoryEstimate()
    a = s.compute_bytes
    if s.adapter == "qlora":
        # Every decoder-layer nn.Linear is NF4, and so are Mixtral's experts (adapters/experts4bit.py)
        # unless LoRA targets them; embeddings, norms, the router and lm_head stay, and PEFT's
        # prepare_model_for_kbit_training upcasts them to fp32.
        shapes = module_shapes(c)
        quantized = sum(shapes[m][0] * shapes[m][1] for m in linear_modules(c)) * d["layers"]
        experts = expert_parameter_count(c)
        if experts_in_4bit(c, s):
            quantized += experts
        rest = total - trainable - quantized
        what = "router, embeddings, norms, lm_head" if experts_in_4bit(c, s) else "embeddings, norms, lm_head"
        if experts and not experts_in_4bit(c, s):
            what = "experts (LoRA on them keeps them 16-bit), router, embeddings, norms, lm_head"
        est.add(
            "weights",
            quantized * NF4_BITS_PER_PARAM / 8 + rest * 4,
            f"{quantized / 1e9:.2f}B params in NF4 ({NF4_BITS_PER_PARAM:.3f} bits) + {format_count(rest)} in fp32 ({what})",
        )
    else:
        frozen = total - trainable
        est.add("weights", frozen * a, f"{frozen / 1e9:.2f}B frozen params x {a} bytes")
    if s.adapter == "none":
        per = a + a + optimizer_bytes_per_param(s.optim, a)
        est.add(
            "trainable + grads + optimizer",
            trainable * per,
            f"{trainable / 1e6:.1f}M params x {per:g} bytes (weight, grad, {s.optim} state)",
        )
    else:
        per = 4 + 4 + optimizer_bytes_per_param(s.optim, 4)  # PEFT keeps adapter weights in fp32
        est.add(
            "adapter + grads + optimizer",
            trainable * per,
            f"{trainable / 1e6:.1f}M fp32 params x {per:g} bytes (weight, grad, {s.optim} state)",
        )

    tokens = s.batch_size * s.seq_len
    layer = sum(layer_activation_terms(c, s).values()) * tokens
    checkpoints = d["layers"] * tokens * d["h"] * activation_bytes(s)  # each layer's input
    logits = logits_bytes(c, s, tokens)
    with_gc = checkpoints + max(logits, layer)  # one layer is recomputed at a time, after the loss
    without_gc = d["layers"] * layer + logits
    if s.gradient_checkpointing:
        est.add(
            "activations",
            checkpoints,
            f"gradient checkpointing: {d['layers']} layer inputs; without it {gib(d['layers'] * layer)}",
        )
        est.add(
            "recompute or logits peak",
            max(logits, layer),
            f"larger of one recomputed layer ({gib(layer)}) and the logits + loss ({gib(logits)})",
        )
    else:
        est.add(
            "activations",
            d["layers"] * layer,
            f"{d['layers']} layers x {gib(layer)}; with gradient checkpointing {gib(checkpoints + layer)}",
        )
        if s.loss == "plain":
            what = f"{tokens:,} tokens x {d['vocab']:,} vocab (compute dtype + 2 fp32 copies)"
        else:
            what = f"chunked loss: {min(tokens, LOSS_CHUNK_TOKENS):,} tokens x {d['vocab']:,} vocab at a time"
        est.add("logits + loss", logits, what)
    est.add("CUDA context", CUDA_CONTEXT_BYTES, "context, cuBLAS workspace, allocator slack (fixed)")
    fixed = sum(b for k, (b, _) in est.terms.items() if k in ("weights", "CUDA context") or "optimizer" in k)
    est.peak_bytes = fixed + (with_gc if s.gradient_checkpointing else without_gc)
    est.peak_bytes_other_checkpointing = fixed + (without_gc if s.gradient_checkpointing else with_gc)
    return est


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def layer_windows(c: dict[str, Any]) -> list[int]:
    """Each layer's sliding window (0: full attention). Ministral interleaves them (``layer_types``)."""
    window = c.get("sliding_window") or 0
    types = c.get("layer_types") or ["sliding_attention"] * c["num_hidden_layers"]
    return [window if t == "sliding_attention" else 0 for t in types]


def mean_context(seq_len: int, window: int) -> float:
    """Average number of keys a causal query attends to (capped by the sliding window)."""
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_per_token(c: dict[str, Any], s: RunShape, trainable: int) -> float:
    """Training FLOPs per token the hardware executes, recomputation included."""
    d = dims(c)
    shapes = module_shapes(c)
    # Only the experts a token is routed to do work (2 of Mixtral's 8), plus the router's matmul.
    attention = sum(shapes[m][0] * shapes[m][1] for m in ATTENTION_MODULES)
    mlp = sum(shapes[m][0] * shapes[m][1] for m in MLP_MODULES) * d["active"]
    router = d["h"] * d["experts"] if d["experts"] > 1 else 0
    layer_mm = (attention + mlp + router) * d["layers"]
    head_mm = d["vocab"] * d["h"]
    attn_fwd = 4 * d["q"] * sum(mean_context(s.seq_len, w) for w in layer_windows(c))  # QK^T and AV
    fwd = 2 * (layer_mm + head_mm) + attn_fwd
    if s.adapter == "none":
        bwd = 4 * (layer_mm + head_mm) + 2 * attn_fwd  # input and weight gradients
    else:
        bwd = 2 * (layer_mm + head_mm) + 2 * attn_fwd + 4 * trainable  # input gradients; adapters get both
        fwd += 2 * trainable
    recompute = 2 * layer_mm + attn_fwd if s.gradient_checkpointing else 0
    return fwd + bwd + recompute


@dataclass
class SpeedEstimate:
    gpu: Gpu
    mfu: float
    flops_per_token: float
    step_seconds: float
    tokens_per_second: float  # all devices together


def estimate_speed(c: dict[str, Any], s: RunShape, *, trainable: int, gpu: str, mfu: float) -> SpeedEstimate:
    """Step time and throughput on ``gpu`` at a stated utilization ``mfu`` of its dense peak."""
    card = GPUS[gpu]
    peak = (card.bf16_tflops if s.compute_bytes < 4 else card.tf32_tflops) * 1e12
    per_token = flops_per_token(c, s, trainable)
    tokens_per_device = s.tokens_per_step / s.num_devices
    step = tokens_per_device * per_token / (peak * mfu)
    return SpeedEstimate(card, mfu, per_token, step, s.tokens_per_step / step)


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def fits(nbytes: int, gpu: Optional[str]) -> Optional[bool]:
    return None if gpu is None else nbytes <= GPUS[gpu].memory_gib * GiB
