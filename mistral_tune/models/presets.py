"""Built-in model presets as plain data (no torch import).

Architectures are copied from the ``config.json`` of the Hugging Face repo each preset names (the URL
is in the comment above each one). ``parameter_count`` computes the size from these numbers; the tests
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


# Mistral NeMo 12B base (https://huggingface.co/mistralai/Mistral-Nemo-Base-2407/blob/main/config.json):
# head_dim 128 with 32 heads is a 4096-wide attention on a 5120-wide residual stream. The 1,024,000
# max positions are the config's own (the model card promises 128k).
_NEMO_12B = dict(
    vocab_size=131072,
    hidden_size=5120,
    intermediate_size=14336,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=1024000,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Mistral NeMo 12B Instruct (https://huggingface.co/mistralai/Mistral-Nemo-Instruct-2407/blob/main/config.json):
# the same weights' shapes; its config caps positions at the 128k of the model card.
_NEMO_12B_INSTRUCT = {**_NEMO_12B, "max_position_embeddings": 131072}


def interleaved_layer_types(layers: int, period: int = 4) -> list[str]:
    """Ministral's ragged attention: one full-attention layer, then period - 1 sliding-window layers.

    Mistral's params.json writes it as sliding windows (128k, 32k, 32k, 32k) repeated over the layers;
    transformers' MinistralConfig as ``layer_types``.
    """
    return ["full_attention" if i % period == 0 else "sliding_attention" for i in range(layers)]


# Ministral 8B Instruct 2410 (https://huggingface.co/mistralai/Ministral-8B-Instruct-2410/blob/main/config.json;
# the attention pattern "ragged (128k, 32k, 32k, 32k)" is from the model card and params.json).
_MINISTRAL_8B = dict(
    vocab_size=131072,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=100000000.0,
    rms_norm_eps=1e-5,
    sliding_window=32768,
    layer_types=interleaved_layer_types(36),
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Mistral Small Instruct 2409, 22B (https://huggingface.co/mistralai/Mistral-Small-Instruct-2409/blob/main/config.json).
_SMALL_22B = dict(
    vocab_size=32768,
    hidden_size=6144,
    intermediate_size=16384,
    num_hidden_layers=56,
    num_attention_heads=48,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Codestral 22B v0.1 (https://huggingface.co/mistralai/Codestral-22B-v0.1/blob/main/config.json): the
# same architecture as Mistral Small 2409.
_CODESTRAL_22B = dict(_SMALL_22B)

# Mistral Small 3, 24B (https://huggingface.co/mistralai/Mistral-Small-24B-Base-2501/blob/main/config.json
# and .../Mistral-Small-24B-Instruct-2501/blob/main/config.json, identical shapes).
_SMALL_24B = dict(
    vocab_size=131072,
    hidden_size=5120,
    intermediate_size=32768,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=100000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Mathstral 7B v0.1 (https://huggingface.co/mistralai/Mathstral-7B-v0.1/blob/main/config.json): the
# Mistral 7B v0.3 architecture (32768-piece vocabulary, no sliding window).
_MATHSTRAL_7B = dict(_MISTRAL_7B_V03)

# Mixtral 8x7B v0.1 (https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json; the
# Instruct v0.1 config is the same). Eight SwiGLU experts of Mistral 7B's MLP shape per layer, two run
# per token; the router's load-balancing loss is weighted by router_aux_loss_coef when
# output_router_logits is on (mistral-tune turns it on for training: adapter group, router_aux_loss).
_MIXTRAL_8X7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Mixtral 8x22B v0.1 (https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json): 32000
# pieces in the base model's embedding.
_MIXTRAL_8X22B = dict(
    vocab_size=32000,
    hidden_size=6144,
    intermediate_size=16384,
    num_hidden_layers=56,
    num_attention_heads=48,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=65536,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.001,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Mixtral 8x22B Instruct v0.1 (https://huggingface.co/mistralai/Mixtral-8x22B-Instruct-v0.1/blob/main/config.json):
# the v3 tokenizer's 32768 pieces (control tokens for [INST], tools, ...).
_MIXTRAL_8X22B_INSTRUCT = {**_MIXTRAL_8X22B, "vocab_size": 32768}

# Tiny random-weight test models, one per family (keras-hub keeps one next to every model). Each has
# its family's real tokenizer, hence its vocabulary; hidden sizes stay small because Tekken's 131072
# pieces dominate (2 x 131072 x 64 = 16.8M parameters in the embedding and the head alone).
# initializer_range 0.1 as mistral_tiny: a frozen random base needs logits with some range for an
# adapter's learning to show.
_TINY_COMMON = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# v3 (SentencePiece, 32768 pieces; Mistral 7B v0.3, Codestral, Mathstral, Mistral Small 2409).
_MISTRAL_V3_TINY = dict(
    _TINY_COMMON, vocab_size=32768, hidden_size=64, intermediate_size=128, head_dim=16, sliding_window=None
)

# NeMo's shape: attention wider than the residual stream (4 heads x 32 = 128 on hidden 64), Tekken.
_NEMO_TINY = dict(
    _TINY_COMMON, vocab_size=131072, hidden_size=64, intermediate_size=128, head_dim=32, sliding_window=None
)

# Ministral's interleaved attention: full, sliding, sliding, sliding; a window of 16 bites on any real
# example. Tekken (tekken_240911).
_MINISTRAL_TINY = dict(
    _TINY_COMMON,
    vocab_size=131072,
    hidden_size=64,
    intermediate_size=128,
    head_dim=16,
    num_hidden_layers=4,
    sliding_window=16,
    layer_types=interleaved_layer_types(4),
)

# Mixtral with 4 experts, 2 active per token, and Mixtral 8x7B's v1 tokenizer.
_MIXTRAL_TINY = dict(
    _TINY_COMMON,
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    head_dim=16,
    sliding_window=None,
    num_local_experts=4,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
)

# tokenizer version -> (file, kind). Files are mistral-common's package data, except "hub": the
# tokenizer file of the preset's own hub repo (mistral-common does not ship Mistral Small 3's).
TOKENIZERS: dict[str, tuple[str, str]] = {
    "v1": ("tokenizer.model.v1", "sentencepiece"),
    "v2": ("mistral_instruct_tokenizer_240216.model.v2", "sentencepiece"),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3", "sentencepiece"),
    "tekken_240718": ("tekken_240718.json", "tekken"),
    "tekken_240911": ("tekken_240911.json", "tekken"),
    "hub": ("tekken.json", "tekken"),
}

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
    tokenizer: str = "v1"  # key of TOKENIZERS: mistral-common file version, or "hub"
    chat_template: Optional[str] = "v1"  # instruct format used for chat data and generation
    model_type: str = "mistral"  # mistral | ministral | mixtral (ARCHITECTURES)
    published_parameters: Optional[int] = None  # the hub's safetensors total for hf_repo

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.config)

    @property
    def tokenizer_file(self) -> str:
        return TOKENIZERS[self.tokenizer][0]

    @property
    def tokenizer_kind(self) -> str:
        """``sentencepiece`` or ``tekken``."""
        return TOKENIZERS[self.tokenizer][1]

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
            _MISTRAL_TINY,
        ),
        Preset(
            "mistral_0.3_tiny",
            "Tiny random-init Mistral (2 layers, hidden 64) with the real v3 tokenizer (32768 pieces) and "
            "chat format, for tests of the v3 family.",
            None,
            _MISTRAL_V3_TINY,
            tokenizer="v3",
            chat_template="v3",
        ),
        Preset(
            "mistral_nemo_tiny",
            "Tiny random-init model of Mistral NeMo's shape (head_dim 32 x 4 heads on hidden 64) with the "
            "real Tekken tokenizer (131072 pieces), for tests of the Tekken family.",
            None,
            _NEMO_TINY,
            tokenizer="tekken_240718",
            chat_template="tekken",
        ),
        Preset(
            "ministral_tiny",
            "Tiny random-init Ministral (4 layers: full, sliding, sliding, sliding; window 16) with the "
            "real Ministral Tekken tokenizer, for tests of interleaved attention.",
            None,
            _MINISTRAL_TINY,
            tokenizer="tekken_240911",
            chat_template="tekken",
            model_type="ministral",
        ),
        Preset(
            "mixtral_tiny",
            "Tiny random-init Mixtral (2 layers, 4 experts, 2 active per token) with the real Mixtral "
            "8x7B tokenizer (v1), for tests of mixture-of-experts training and export.",
            None,
            _MIXTRAL_TINY,
            model_type="mixtral",
        ),
        Preset(
            "mistral_7b_en",
            "Mistral 7B v0.1 base model, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-v0.1",
            _MISTRAL_7B_V01,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_instruct_7b_en",
            "Mistral 7B Instruct v0.1, 32 layers, sliding-window attention (4096).",
            "mistralai/Mistral-7B-Instruct-v0.1",
            _MISTRAL_7B_V01,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_0.2_instruct_7b_en",
            "Mistral 7B Instruct v0.2, 32 layers, 32k context without sliding window.",
            "mistralai/Mistral-7B-Instruct-v0.2",
            _MISTRAL_7B_V02,
            published_parameters=7_241_732_096,
        ),
        Preset(
            "mistral_0.3_7b_en",
            "Mistral 7B v0.3 base model, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-v0.3",
            _MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "mistral_0.3_instruct_7b_en",
            "Mistral 7B Instruct v0.3, 32768-piece vocabulary, 32k context.",
            "mistralai/Mistral-7B-Instruct-v0.3",
            _MISTRAL_7B_V03,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "mathstral_7b_en",
            "Mathstral 7B v0.1: Mistral 7B v0.3 trained further for math and reasoning, v3 chat format.",
            "mistralai/Mathstral-7B-v0.1",
            _MATHSTRAL_7B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=7_248_023_552,
        ),
        Preset(
            "ministral_instruct_8b_en",
            "Ministral 8B Instruct 2410: 36 layers interleaving full and 32k sliding-window attention, Tekken.",
            "mistralai/Ministral-8B-Instruct-2410",
            _MINISTRAL_8B,
            tokenizer="tekken_240911",
            chat_template="tekken",
            model_type="ministral",
            published_parameters=8_019_808_256,
        ),
        Preset(
            "mistral_nemo_12b_en",
            "Mistral NeMo 12B base 2407 (with NVIDIA): 40 layers, head_dim 128 on hidden 5120, Tekken.",
            "mistralai/Mistral-Nemo-Base-2407",
            _NEMO_12B,
            tokenizer="tekken_240718",
            chat_template="tekken",
            published_parameters=12_247_782_400,
        ),
        Preset(
            "mistral_nemo_instruct_12b_en",
            "Mistral NeMo 12B Instruct 2407: 128k context, Tekken tokenizer and chat format.",
            "mistralai/Mistral-Nemo-Instruct-2407",
            _NEMO_12B_INSTRUCT,
            tokenizer="tekken_240718",
            chat_template="tekken",
            published_parameters=12_247_782_400,
        ),
        Preset(
            "mistral_small_instruct_22b_en",
            "Mistral Small Instruct 2409 (22B): 56 layers, hidden 6144, v3 tokenizer, 32k context.",
            "mistralai/Mistral-Small-Instruct-2409",
            _SMALL_22B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=22_247_282_688,
        ),
        Preset(
            "codestral_22b_en",
            "Codestral 22B v0.1: Mistral's code model (80+ languages, fill-in-the-middle), v3 tokenizer.",
            "mistralai/Codestral-22B-v0.1",
            _CODESTRAL_22B,
            tokenizer="v3",
            chat_template="v3",
            published_parameters=22_247_282_688,
        ),
        Preset(
            "mistral_small_3_24b_en",
            "Mistral Small 3 base 2501 (24B): 40 layers, MLP 32768, Tekken v7 tokenizer from the hub repo.",
            "mistralai/Mistral-Small-24B-Base-2501",
            _SMALL_24B,
            tokenizer="hub",
            chat_template="v7",
            published_parameters=23_572_403_200,
        ),
        Preset(
            "mistral_small_3_instruct_24b_en",
            "Mistral Small 3 Instruct 2501 (24B): v7 chat format (system prompt), Tekken tokenizer from the hub repo.",
            "mistralai/Mistral-Small-24B-Instruct-2501",
            _SMALL_24B,
            tokenizer="hub",
            chat_template="v7",
            published_parameters=23_572_403_200,
        ),
        Preset(
            "mixtral_8x7b_en",
            "Mixtral 8x7B v0.1 base: sparse mixture of 8 experts, 2 active per token (12.9B active), v1 tokenizer.",
            "mistralai/Mixtral-8x7B-v0.1",
            _MIXTRAL_8X7B,
            model_type="mixtral",
            published_parameters=46_702_792_704,
        ),
        Preset(
            "mixtral_instruct_8x7b_en",
            "Mixtral 8x7B Instruct v0.1: 8 experts, 2 active per token, v1 chat format.",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            _MIXTRAL_8X7B,
            model_type="mixtral",
            published_parameters=46_702_792_704,
        ),
        Preset(
            "mixtral_8x22b_en",
            "Mixtral 8x22B v0.1 base: 56 layers of 8 experts, 2 active per token (39B active), 64k context.",
            "mistralai/Mixtral-8x22B-v0.1",
            _MIXTRAL_8X22B,
            model_type="mixtral",
            published_parameters=140_620_634_112,
        ),
        Preset(
            "mixtral_instruct_8x22b_en",
            "Mixtral 8x22B Instruct v0.1: 8 experts, 2 active per token, v3 tokenizer and chat format.",
            "mistralai/Mixtral-8x22B-Instruct-v0.1",
            _MIXTRAL_8X22B_INSTRUCT,
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
}

# Keys keras-hub writes into a backbone config that have no architectural meaning here.
_KERAS_IGNORED = {"name", "trainable", "dtype", "rope_scaling_factor"}


def config_from_keras(args: dict[str, Any]) -> dict[str, Any]:
    """MistralConfig kwargs for keras-hub MistralBackbone arguments (as in a keras-hub config.json).

    keras-hub's ``rope_scaling_factor`` divides positions, which is transformers' "linear" RoPE type;
    the head size is ``hidden_dim // num_query_heads`` in keras-hub, so it is written out here.
    """
    unknown = set(args) - set(KERAS_TO_HF) - _KERAS_IGNORED
    if unknown:
        raise ValueError(f"unknown MistralBackbone arguments: {sorted(unknown)}; known: {sorted(KERAS_TO_HF)}")
    out = {KERAS_TO_HF[k]: v for k, v in args.items() if k in KERAS_TO_HF}
    out["head_dim"] = args["hidden_dim"] // args["num_query_heads"]
    out["tie_word_embeddings"] = False  # keras-hub Mistral has a separate output projection
    theta = float(out.pop("rope_theta", 10000.0))
    factor = float(args.get("rope_scaling_factor", 1.0))
    out["rope_parameters"] = (
        {"rope_type": "default", "rope_theta": theta}
        if factor == 1.0
        else {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    )
    return out
