"""Built-in model presets as plain data (no torch import).

Architectures are copied from the ``config.json`` of the Hugging Face repo each preset names. The
parameter counts are computed from these numbers (see ``parameter_count``) and checked on the meta
device in the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

# Mistral 7B v0.1 (https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json).
_MISTRAL_7B_V01 = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# v0.2 dropped the sliding window and raised RoPE theta to 1e6 for its 32k context.
_MISTRAL_7B_V02 = {**_MISTRAL_7B_V01, "rope_theta": 1000000.0, "sliding_window": None}

# v0.3 extended the vocabulary to 32768 pieces (control tokens for [INST], tools, ...).
_MISTRAL_7B_V03 = {**_MISTRAL_7B_V02, "vocab_size": 32768}

# The embedded default: the Mistral architecture (GQA with 4 query and 2 key/value heads, RoPE, RMSNorm,
# SwiGLU) at a size that trains in well under a minute on 2 CPU cores, with the real 32000-piece
# tokenizer. sliding_window=32 is shorter than the recipes' sequences, so the window is exercised.
# initializer_range is 0.1 rather than Mistral's 0.02: a frozen *random* base needs logits with
# enough range for a q/v LoRA adapter to make learning visible (at 0.02 the loss barely moves).
_MISTRAL_TINY = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=32,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class Preset:
    """One built-in preset: where it comes from, its architecture and its tokenizer."""

    id: str
    description: str
    hf_repo: Optional[str]  # None: embedded, random init, nothing to download
    config: dict[str, Any] = field(repr=False)
    tokenizer: str = "v1"  # mistral-common tokenizer file version
    chat_template: Optional[str] = "v1"  # instruct format used for chat data and generation

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.config)


PRESETS: dict[str, Preset] = {
    p.id: p
    for p in [
        Preset(
            "mistral_tiny",
            "Tiny random-init Mistral (2 layers, hidden 256, sliding window 32) with the real "
            "Mistral 7B v0.1 tokenizer. Offline default for trying recipes and for tests.",
            None,
            _MISTRAL_TINY,
        ),
        Preset(
            "mistral_7b_en",
            "Mistral 7B v0.1 base model, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-v0.1",
            _MISTRAL_7B_V01,
        ),
        Preset(
            "mistral_instruct_7b_en",
            "Mistral 7B Instruct v0.1, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-Instruct-v0.1",
            _MISTRAL_7B_V01,
        ),
        Preset(
            "mistral_0.2_instruct_7b_en",
            "Mistral 7B Instruct v0.2, 32 layers, 32k context without sliding window.",
            "mistralai/Mistral-7B-Instruct-v0.2",
            _MISTRAL_7B_V02,
        ),
        Preset(
            "mistral_0.3_7b_en",
            "Mistral 7B v0.3 base model, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-v0.3",
            _MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
        ),
        Preset(
            "mistral_0.3_instruct_7b_en",
            "Mistral 7B Instruct v0.3, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-Instruct-v0.3",
            _MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
        ),
    ]
}


def parameter_count(c: dict[str, Any]) -> int:
    """Parameters of a Mistral causal LM, written out so a reader can check the arithmetic."""
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = h * c["num_attention_heads"] * head_dim
    kv = 2 * h * c["num_key_value_heads"] * head_dim
    o = c["num_attention_heads"] * head_dim * h
    mlp = 3 * h * inter  # gate, up, down (SwiGLU)
    norms = 2 * h
    embed_and_head = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return layers * (q + kv + o + mlp + norms) + h + embed_and_head  # + final norm


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """True for an ``org/name`` Hugging Face id; rejects '..' and other path tricks."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def format_params(n: int) -> str:
    # Truncated, not rounded, as keras-hub lists them (7,248,023,552 -> "7.24B").
    return f"{int(n / 1e7) / 100:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# keras-hub's MistralBackbone argument names -> transformers' MistralConfig names.
KERAS_TO_HF = {
    "vocabulary_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "num_query_heads": "num_attention_heads",
    "hidden_dim": "hidden_size",
    "intermediate_dim": "intermediate_size",
    "num_key_value_heads": "num_key_value_heads",
    "rope_max_wavelength": "rope_theta",
    "layer_norm_epsilon": "rms_norm_eps",
    "sliding_window": "sliding_window",
    "dropout": "attention_dropout",
    "head_dim": "head_dim",
}

# Keys keras-hub writes into a backbone config that have no architectural meaning here.
_KERAS_IGNORED = {"name", "trainable", "dtype", "rope_scaling_factor"}


def config_from_keras(args: dict[str, Any]) -> dict[str, Any]:
    """MistralConfig kwargs for keras-hub MistralBackbone arguments (as in a keras-hub config.json).

    keras-hub's ``rope_scaling_factor`` divides positions, which is transformers' "linear" RoPE type;
    ``head_dim`` (keras-hub 0.32 writes it, None meaning ``hidden_dim // num_query_heads``) is
    written out either way.
    """
    unknown = set(args) - set(KERAS_TO_HF) - _KERAS_IGNORED
    if unknown:
        raise ValueError(f"unknown MistralBackbone arguments: {sorted(unknown)}; known: {sorted(KERAS_TO_HF)}")
    out = {KERAS_TO_HF[k]: v for k, v in args.items() if k in KERAS_TO_HF}
    out["head_dim"] = args.get("head_dim") or args["hidden_dim"] // args["num_query_heads"]
    out["tie_word_embeddings"] = False  # keras-hub Mistral has a separate output projection
    theta = float(out.pop("rope_theta", 10000.0))
    factor = float(args.get("rope_scaling_factor", 1.0))
    out["rope_parameters"] = (
        {"rope_type": "default", "rope_theta": theta}
        if factor == 1.0
        else {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    )
    return out


def preset_table() -> dict[str, dict[str, Any]]:
    """keras-hub's ``presets`` shape: id -> {"metadata": {description, params, ...}, handle}."""
    return {
        p.id: {
            "metadata": {
                "description": p.description,
                "params": p.parameter_count,
                "params_human": format_params(p.parameter_count),
                "official_name": "Mistral",
                "path": "mistral",
            },
            "handle": f"hf://{p.hf_repo}" if p.hf_repo else "embedded",
        }
        for p in PRESETS.values()
    }
