"""Built-in model presets as plain data (no torch import).

Architectures live in ``architectures.py``, each copied from the ``config.json`` of the Hugging Face
repo its preset names (the URL is in the comment above it). ``parameter_count`` computes the size from these numbers; the tests
build every preset on the meta device and check it against both that arithmetic and
``published_parameters``, the safetensors total the Hugging Face hub reports for the checkpoint.

Three transformers architectures are covered, named by ``Preset.model_type``: ``mistral`` (dense),
``ministral`` (dense, interleaved full and sliding-window layers, ``layer_types``) and ``mixtral``
(sparse mixture of experts: ``num_local_experts`` SwiGLU experts per layer, ``num_experts_per_tok``
of them run for each token).

Ids ending in ``_tiny`` are random-weight test models (no hub repo): recipes give them their demo
learning rates (``${by_model:...}`` in config/schema.py reads the suffix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from mistral_tune.models import architectures as arch

# Mistral Small 3's tokenizer ("tokenizer: hub"): the tekken.json of the preset's own hub repo, since
# mistral-common does not ship it. Every other preset names a file of models/tokenizer/files.py.
HUB_TOKENIZER = ("tekken.json", "tekken")

# model_type -> the transformers causal-LM class it builds.
ARCHITECTURES = {
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


@dataclass(frozen=True)
class Preset:
    """One built-in preset: where it comes from, its architecture and its tokenizer."""

    id: str
    description: str
    hf_repo: Optional[str]  # None: embedded, random init, nothing to download
    config: dict[str, Any] = field(repr=False)  # transformers config kwargs of model_type's class
    tokenizer: str = "v1"  # a version of models/tokenizer/files.py TOKENIZER_FILES, or "hub" (HUB_TOKENIZER)
    chat_template: Optional[str] = "v1"  # instruct format used for chat data and generation
    model_type: str = "mistral"  # mistral | ministral | mixtral (ARCHITECTURES)
    published_parameters: Optional[int] = None  # the hub's safetensors total for hf_repo

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.config)

    @property
    def tokenizer_file(self) -> str:
        """The tokenizer's file name: in mistral-common's package data, or (``hub``) in the hub repo."""
        from mistral_tune.models.tokenizer.files import TOKENIZER_FILES

        return HUB_TOKENIZER[0] if self.tokenizer == "hub" else TOKENIZER_FILES[self.tokenizer].filename

    @property
    def tokenizer_kind(self) -> str:
        """``sentencepiece`` or ``tekken``."""
        from mistral_tune.models.tokenizer.files import TOKENIZER_FILES

        return HUB_TOKENIZER[1] if self.tokenizer == "hub" else TOKENIZER_FILES[self.tokenizer].kind

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return is_moe(self.config)

    @property
    def hf_config(self) -> dict[str, Any]:
        """The config as a ``config.json`` holds it: ``model_type`` included."""
        return {"model_type": self.model_type, **self.config}


PRESETS: dict[str, Preset] = {
    p.id: p
    for p in [
        Preset(
            "mistral_tiny",
            "Tiny random-init Mistral (2 layers, hidden 256, sliding window 32) with the real "
            "Mistral 7B v0.1 tokenizer. Offline default for trying recipes and for tests.",
            None,
            arch.MISTRAL_TINY,
        ),
        Preset(
            "mistral_0.3_tiny",
            "Tiny random-init Mistral (2 layers, hidden 64) with the real v3 tokenizer (32768 pieces) and "
            "chat format, for tests of the v3 family.",
            None,
            arch.MISTRAL_V3_TINY,
            tokenizer="v3",
            chat_template="v3",
        ),
        Preset(
            "mistral_nemo_tiny",
            "Tiny random-init model of Mistral NeMo's shape (head_dim 32 x 4 heads on hidden 64) with the "
            "real Tekken tokenizer (131072 pieces), for tests of the Tekken family.",
            None,
            arch.NEMO_TINY,
            tokenizer="tekken_240718",
            chat_template="tekken",
        ),
        Preset(
            "ministral_tiny",
            "Tiny random-init Ministral (4 layers: full, sliding, sliding, sliding; window 16) with the "
            "real Ministral Tekken tokenizer, for tests of interleaved attention.",
            None,
            arch.MINISTRAL_TINY,
            tokenizer="tekken_240911",
            chat_template="tekken",
            model_type="ministral",
        ),
        Preset(
            "mixtral_tiny",
            "Tiny random-init Mixtral (2 layers, 4 experts, 2 active per token) with the real Mixtral "
            "8x7B tokenizer (v1), for tests of mixture-of-experts training and export.",
            None,
            arch.MIXTRAL_TINY,
            model_type="mixtral",
        ),
        Preset(
            "mistral_7b_en",
            "Mistral 7B v0.1 base model, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-v0.1",
            arch.MISTRAL_7B_V01,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_instruct_7b_en",
            "Mistral 7B Instruct v0.1, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-Instruct-v0.1",
            arch.MISTRAL_7B_V01,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_0.2_instruct_7b_en",
            "Mistral 7B Instruct v0.2, 32 layers, 32k context without sliding window.",
            "mistralai/Mistral-7B-Instruct-v0.2",
            arch.MISTRAL_7B_V02,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_0.3_7b_en",
            "Mistral 7B v0.3 base model, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-v0.3",
            arch.MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "mistral_0.3_instruct_7b_en",
            "Mistral 7B Instruct v0.3, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-Instruct-v0.3",
            arch.MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "mathstral_7b_en",
            "Mathstral 7B v0.1: Mistral 7B v0.3 trained further for math and reasoning, v3 chat format.",
            "mistralai/Mathstral-7B-v0.1",
            arch.MATHSTRAL_7B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "ministral_instruct_8b_en",
            "Ministral 8B Instruct 2410: 36 layers interleaving full and 32k sliding-window attention, Tekken.",
            "mistralai/Ministral-8B-Instruct-2410",
            arch.MINISTRAL_8B,
            tokenizer="tekken_240911",
            chat_template="tekken",
            model_type="ministral",
            published_parameters=8_019_808_256,
        ),
        Preset(
            "mistral_nemo_12b_en",
            "Mistral NeMo 12B base 2407 (with NVIDIA): 40 layers, head_dim 128 on hidden 5120, Tekken.",
            "mistralai/Mistral-Nemo-Base-2407",
            arch.NEMO_12B,
            tokenizer="tekken_240718",
            chat_template="tekken",
            published_parameters=12_247_782_400,
        ),
        Preset(
            "mistral_nemo_instruct_12b_en",
            "Mistral NeMo 12B Instruct 2407: 128k context, Tekken tokenizer and chat format.",
            "mistralai/Mistral-Nemo-Instruct-2407",
            arch.NEMO_12B_INSTRUCT,
            tokenizer="tekken_240718",
            chat_template="tekken",
            published_parameters=12_247_782_400,
        ),
        Preset(
            "mistral_small_instruct_22b_en",
            "Mistral Small Instruct 2409 (22B): 56 layers, hidden 6144, v3 tokenizer, 32k context.",
            "mistralai/Mistral-Small-Instruct-2409",
            arch.SMALL_22B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=22_247_282_688,
        ),
        Preset(
            "codestral_22b_en",
            "Codestral 22B v0.1: Mistral's code model (80+ languages, fill-in-the-middle), v3 tokenizer.",
            "mistralai/Codestral-22B-v0.1",
            arch.CODESTRAL_22B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=22_247_282_688,
        ),
        Preset(
            "mistral_small_3_24b_en",
            "Mistral Small 3 base 2501 (24B): 40 layers, MLP 32768, Tekken v7 tokenizer from the hub repo.",
            "mistralai/Mistral-Small-24B-Base-2501",
            arch.SMALL_24B,
            tokenizer="hub",
            chat_template="v7",
            published_parameters=23_572_403_200,
        ),
        Preset(
            "mistral_small_3_instruct_24b_en",
            "Mistral Small 3 Instruct 2501 (24B): v7 chat format (system prompt), Tekken tokenizer from the hub repo.",
            "mistralai/Mistral-Small-24B-Instruct-2501",
            arch.SMALL_24B,
            tokenizer="hub",
            chat_template="v7",
            published_parameters=23_572_403_200,
        ),
        Preset(
            "mixtral_8x7b_en",
            "Mixtral 8x7B v0.1 base: sparse mixture of 8 experts, 2 active per token (12.9B active), v1 tokenizer.",
            "mistralai/Mixtral-8x7B-v0.1",
            arch.MIXTRAL_8X7B,
            model_type="mixtral",
            published_parameters=46_702_792_704,
        ),
        Preset(
            "mixtral_instruct_8x7b_en",
            "Mixtral 8x7B Instruct v0.1: 8 experts, 2 active per token, v1 chat format.",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            arch.MIXTRAL_8X7B,
            model_type="mixtral",
            published_parameters=46_702_792_704,
        ),
        Preset(
            "mixtral_8x22b_en",
            "Mixtral 8x22B v0.1 base: 56 layers of 8 experts, 2 active per token (39B active), 64k context.",
            "mistralai/Mixtral-8x22B-v0.1",
            arch.MIXTRAL_8X22B,
            model_type="mixtral",
            published_parameters=140_620_634_112,
        ),
        Preset(
            "mixtral_instruct_8x22b_en",
            "Mixtral 8x22B Instruct v0.1: 8 experts, 2 active per token, v3 tokenizer and chat format.",
            "mistralai/Mixtral-8x22B-Instruct-v0.1",
            arch.MIXTRAL_8X22B_INSTRUCT,
            tokenizer="v3",
            chat_template="v3",
            model_type="mixtral",
            published_parameters=140_630_071_296,
        ),
    ]
}


def is_moe(c: dict[str, Any]) -> bool:
    """True for a mixture-of-experts config (Mixtral's ``num_local_experts``)."""
    return bool(c.get("num_local_experts"))


def parameter_count(c: dict[str, Any], *, active: bool = False) -> int:
    """Parameters of a Mistral-family causal LM, written out so a reader can check the arithmetic.

    ``active=True`` counts only the experts a token runs through (``num_experts_per_tok``), as
    "12.9B active" is quoted for Mixtral 8x7B; dense models are all active.
    """
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    q = h * c["num_attention_heads"] * head_dim
    kv = 2 * h * c["num_key_value_heads"] * head_dim
    o = c["num_attention_heads"] * head_dim * h
    mlp = 3 * h * inter  # gate, up, down (SwiGLU)
    if is_moe(c):
        experts = c["num_experts_per_tok"] if active else c["num_local_experts"]
        mlp = experts * mlp + h * c["num_local_experts"]  # + the router (hidden -> one logit per expert)
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
                "official_name": {"mixtral": "Mixtral", "ministral": "Ministral"}.get(p.model_type, "Mistral"),
                "path": p.model_type,
                "architecture": p.architecture,
                "tokenizer": p.tokenizer_file,
                "chat_template": p.chat_template,
            },
            "handle": f"hf://{p.hf_repo}" if p.hf_repo else "embedded",
        }
        for p in PRESETS.values()
    }
