"""The architectures of the built-in presets: transformers config kwargs, as plain data (no torch import).

Each dict is copied from the ``config.json`` of the Hugging Face repo named in the comment above it
(the model card where the config leaves something out). ``presets.py`` pairs them with hub repos,
tokenizers and published parameter counts.
"""

from __future__ import annotations

# Mistral 7B v0.1 (https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json).
MISTRAL_7B_V01 = dict(
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
MISTRAL_7B_V02 = {**MISTRAL_7B_V01, "rope_theta": 1000000.0, "sliding_window": None}

# v0.3 extended the vocabulary to 32768 pieces (control tokens for [INST], tools, ...).
MISTRAL_7B_V03 = {**MISTRAL_7B_V02, "vocab_size": 32768}

# The embedded default: the Mistral architecture (GQA with 4 query and 2 key/value heads, RoPE, RMSNorm,
# SwiGLU) at a size that trains in well under a minute on 2 CPU cores, with the real 32000-piece
# tokenizer. sliding_window=32 is shorter than the recipes' sequences, so the window is exercised.
# initializer_range is 0.1 rather than Mistral's 0.02: a frozen *random* base needs logits with
# enough range for a q/v LoRA adapter to make learning visible (at 0.02 the loss barely moves).
MISTRAL_TINY = dict(
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
NEMO_12B = dict(
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
NEMO_12B_INSTRUCT = {**NEMO_12B, "max_position_embeddings": 131072}


def interleaved_layer_types(layers: int, period: int = 4) -> list[str]:
    """Ministral's ragged attention: one full-attention layer, then period - 1 sliding-window layers.

    Mistral's params.json writes it as sliding windows (128k, 32k, 32k, 32k) repeated over the layers;
    transformers' MinistralConfig as ``layer_types``.
    """
    return ["full_attention" if i % period == 0 else "sliding_attention" for i in range(layers)]


# Ministral 8B Instruct 2410 (https://huggingface.co/mistralai/Ministral-8B-Instruct-2410/blob/main/config.json;
# the attention pattern "ragged (128k, 32k, 32k, 32k)" is from the model card and params.json).
MINISTRAL_8B = dict(
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
SMALL_22B = dict(
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
CODESTRAL_22B = dict(SMALL_22B)

# Mistral Small 3, 24B (https://huggingface.co/mistralai/Mistral-Small-24B-Base-2501/blob/main/config.json
# and .../Mistral-Small-24B-Instruct-2501/blob/main/config.json, identical shapes).
SMALL_24B = dict(
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
MATHSTRAL_7B = dict(MISTRAL_7B_V03)

# Mixtral 8x7B v0.1 (https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json; the
# Instruct v0.1 config is the same). Eight SwiGLU experts of Mistral 7B's MLP shape per layer, two run
# per token; the router's load-balancing loss is weighted by router_aux_loss_coef when
# output_router_logits is on (mistral-tune turns it on for training: adapter group, router_aux_loss).
MIXTRAL_8X7B = dict(
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
MIXTRAL_8X22B = dict(
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
MIXTRAL_8X22B_INSTRUCT = {**MIXTRAL_8X22B, "vocab_size": 32768}

# Tiny random-weight test models, one per family (keras-hub keeps one next to every model). Each has
# its family's real tokenizer, hence its vocabulary; hidden sizes stay small because Tekken's 131072
# pieces dominate (2 x 131072 x 64 = 16.8M parameters in the embedding and the head alone).
# initializer_range 0.1 as mistral_tiny: a frozen random base needs logits with some range for an
# adapter's learning to show.
TINY_COMMON = dict(
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
MISTRAL_V3_TINY = dict(
    TINY_COMMON, vocab_size=32768, hidden_size=64, intermediate_size=128, head_dim=16, sliding_window=None
)

# NeMo's shape: attention wider than the residual stream (4 heads x 32 = 128 on hidden 64), Tekken.
NEMO_TINY = dict(
    TINY_COMMON, vocab_size=131072, hidden_size=64, intermediate_size=128, head_dim=32, sliding_window=None
)

# Ministral's interleaved attention: full, sliding, sliding, sliding; a window of 16 bites on any real
# example. Tekken (tekken_240911).
MINISTRAL_TINY = dict(
    TINY_COMMON,
    vocab_size=131072,
    hidden_size=64,
    intermediate_size=128,
    head_dim=16,
    num_hidden_layers=4,
    sliding_window=16,
    layer_types=interleaved_layer_types(4),
)

# Mixtral with 4 experts, 2 active per token, and Mixtral 8x7B's v1 tokenizer.
MIXTRAL_TINY = dict(
    TINY_COMMON,
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    head_dim=16,
    sliding_window=None,
    num_local_experts=4,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,
)
