"""Write a GGUF file (llama.cpp's format) from a merged Hugging Face checkpoint, one tensor at a time.

We write with PyPI's ``gguf`` package (pure Python, the writer llama.cpp's own converter uses) rather
than vendoring llama.cpp's ``convert_hf_to_gguf.py``: that script ships only inside the
llama-cpp-python sdist and needs its own, newer copy of ``gguf-py`` (mixing the two fails). Mistral
checkpoints are plain Llama-architecture tensors, so the mapping is short:

- metadata: ``llama.*`` hyperparameters from ``config.json`` (no sliding-window key: llama.cpp's
  ``llama`` architecture has none, so it attends to the whole context; see ``sliding_window_note``);
- tokenizer: SentencePiece pieces, scores and token types (``tokenizer.ggml.model = llama``), or a
  Tekken file's byte-level tokens and merges (``gpt2`` with the ``tekken`` pre-tokenizer); BOS added,
  EOS not; the BOS/EOS/UNK/pad ids, and the chat template;
- tensors: renamed through gguf's ``TensorNameMap``; the query and key projections have their rows
  reordered, because Hugging Face's rotary embedding rotates the two halves of each head while
  llama.cpp's rotates adjacent pairs; 1-D tensors (norms) stay float32, 2-D ones take the file type.

Streaming: the tensor directory (names, shapes, types) comes from the safetensors headers alone, so the
header is written first, then each tensor is read (memory-mapped), converted and written before the
next one is read. Memory: one tensor in float32 plus its converted copy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from mistral_tune.config.registry import GGUF_TYPES
from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)

# GGUF type -> (GGML tensor type of 2-D weights, llama file type); names are gguf's own enums.
_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
assert set(_TYPES) == set(GGUF_TYPES)

# A q4_0 file keeps the output projection (lm_head) in q8_0: it is the one matrix every token's
# logits go through, and 4-bit rounding there costs the most (llama.cpp's own q4_0 recipes also
# keep it at higher precision).
_Q4_OUTPUT = "Q8_0"

# SentencePiece piece kinds -> gguf.TokenType names.
_NORMAL, _UNKNOWN, _CONTROL, _UNUSED, _BYTE = "NORMAL", "UNKNOWN", "CONTROL", "UNUSED", "BYTE"


@dataclass
class PlannedTensor:
    """One tensor of the output: where it comes from and how it is stored."""

    source: str  # safetensors name
    shard: Path
    name: str  # GGUF name
    shape: tuple[int, ...]  # the Hugging Face (row-major) shape
    ggml_type: str  # gguf.GGMLQuantizationType name
    permute_heads: Optional[int] = None  # q/k: the number of heads whose rows are reordered


def gguf_filename(name: str, gguf_type: str) -> str:
    """``<name>-<type>.gguf``, e.g. ``sft_lora-q8_0.gguf``."""
    return f"{name}-{gguf_type}.gguf"


def sliding_window(config: dict[str, Any]) -> Optional[int]:
    """The model's attention window when it is shorter than its context (llama.cpp will ignore it)."""
    window = config.get("sliding_window")
    if window is None or window >= config.get("max_position_embeddings", 0):
        return None
    return int(window)


def sliding_window_note(window: int) -> str:
    """What the missing window means for users, in one sentence (log, summary, model card)."""
    return (
        f"this model was trained with sliding-window attention ({window} tokens) but llama.cpp runs GGUF "
        f"Mistral models as the llama architecture with full attention: outputs agree with the trained model "
        f"for prompts plus generation up to {window} tokens and differ beyond that"
    )


def rope_theta(config: dict[str, Any]) -> float:
    """``rope_theta`` (transformers 5 keeps it in ``rope_parameters``)."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def plan_tensors(model_dir: Path, config: dict[str, Any], gguf_type: str) -> list[PlannedTensor]:
    """Every output tensor from the safetensors headers alone (no weights read)."""
    import gguf
    from safetensors import safe_open

    from mistral_tune.export.stream_merge import base_shards

    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
    weight_type = _TYPES[gguf_type][0]
    planned = []
    for shard in base_shards(Path(model_dir)):
        with safe_open(str(shard), framework="pt") as f:
            for source in f.keys():
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"GGUF export: no llama.cpp name for tensor {source!r} in {shard}")
                shape = tuple(f.get_slice(source).get_shape())
                ggml_type = "F32" if len(shape) == 1 else weight_type
                if gguf_type == "q4_0" and name == "output.weight":
                    ggml_type = _Q4_OUTPUT
                permute = None
                if source.endswith("self_attn.q_proj.weight"):
                    permute = heads
                elif source.endswith("self_attn.k_proj.weight"):
                    permute = kv_heads or heads
                planned.append(PlannedTensor(source, shard, name, shape, ggml_type, permute))
    if not any(t.name == "output.weight" for t in planned):
        log.info("GGUF export: no lm_head tensor (tied embeddings); llama.cpp reuses token_embd")
    return planned


def rotary_to_interleaved(weight: Any, n_heads: int) -> Any:
    """Reorder the rows of a query/key projection from Hugging Face's rotary layout to llama.cpp's.

    Per head, Hugging Face rotates row ``i`` with row ``i + d/2``; llama.cpp rotates rows ``2i`` and
    ``2i + 1``. Row ``(h, half, i)`` therefore moves to ``(h, i, half)``.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def convert(weight: Any, ggml_type: str) -> Any:
    """A float32 torch tensor as the numpy array GGUF stores for ``ggml_type`` (bytes for 16-bit and quants)."""
    import gguf
    import numpy as np
    import torch

    if ggml_type == "F32":
        return weight.to(torch.float32).numpy()
    if ggml_type == "F16":
        return weight.to(torch.float16).numpy()
    if ggml_type == "BF16":  # torch rounds to nearest even, as ggml does; stored as raw bytes
        return weight.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(weight.to(torch.float32).numpy(), gguf.GGMLQuantizationType[ggml_type])


def round_trip(weight: Any, ggml_type: str) -> Any:
    """``weight`` (float32 torch) as llama.cpp will see it: rounded to ``ggml_type`` and back to float32."""
    import gguf
    import torch

    if ggml_type == "F32":
        return weight
    if ggml_type in ("F16", "BF16"):
        return weight.to(getattr(torch, {"F16": "float16", "BF16": "bfloat16"}[ggml_type])).to(torch.float32)
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype), qtype).copy())


def stored_shape(shape: tuple[int, ...], ggml_type: str) -> tuple[tuple[int, ...], int]:
    """(the numpy shape ``convert`` returns, its size in bytes) without converting anything."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    if ggml_type in ("F32", "F16"):
        n = 1
        for d in shape:
            n *= d
        return shape, n * (4 if ggml_type == "F32" else 2)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    n = 1
    for d in byte_shape:
        n *= d
    return tuple(byte_shape), n


def tokenizer_metadata(writer: Any, tokenizer: Any) -> None:
    """The vocabulary, special ids and chat template as llama.cpp reads them: SentencePiece files as its
    ``llama`` tokenizer (pieces, scores, token types), Tekken files as its ``gpt2`` byte-level BPE with
    the ``tekken`` pre-tokenizer (tokens and merges as the Hugging Face export spells them)."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "sentencepiece":
        sentencepiece_vocab(writer, tokenizer)
    elif kind == "tekken":
        tekken_vocab(writer, tokenizer)
    else:
        raise UserError(
            f"GGUF export supports Mistral's SentencePiece and Tekken tokenizers; {type(tokenizer).__name__} is neither."
        )
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.jinja_chat_template)


def sentencepiece_vocab(writer: Any, tokenizer: Any) -> None:
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            kind = _UNKNOWN
        elif sp.is_control(i):
            kind = _CONTROL
        elif sp.is_byte(i):
            kind = _BYTE
        elif sp.is_unused(i):
            kind = _UNUSED
        else:
            kind = _NORMAL
        types.append(gguf.TokenType[kind])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def tekken_vocab(writer: Any, tokenizer: Any) -> None:
    import gguf

    exported = json.loads(tokenizer.to_hf().backend_tokenizer.to_str())
    vocab = exported["model"]["vocab"]
    tokens = [""] * tokenizer.vocabulary_size
    for piece, i in vocab.items():
        tokens[i] = piece
    for added in exported.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
    if not all(tokens):
        raise UserError(f"GGUF export: the Tekken vocabulary of {tokenizer.model_file} has unnamed ids.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in exported["model"]["merges"]]
    types = [gguf.TokenType[_CONTROL if i in tokenizer.special_ids else _NORMAL] for i in range(len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def model_metadata(writer: Any, config: dict[str, Any], name: str, gguf_type: str) -> None:
    import gguf

    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType[_TYPES[gguf_type][1]])
    if gguf_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def read_tensors(planned: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, Any]]:
    """Each planned tensor in float32, one at a time, reading each shard memory-mapped."""
    import torch
    from safetensors import safe_open

    current, handle = None, None
    for t in planned:
        if t.shard != current:
            handle = safe_open(str(t.shard), framework="pt")
            current = t.shard
        yield t, handle.get_tensor(t.source).to(torch.float32)


def write_gguf(model_dir: Path, out_file: Path, tokenizer: Any, gguf_type: str, *, name: str) -> dict[str, Any]:
    """Write ``out_file`` (GGUF ``gguf_type``) from the Hugging Face checkpoint in ``model_dir``.

    Returns what the summary records: the type, the size in bytes, the tensor count and the
    sliding window llama.cpp will not apply (None when the model has none).

    Example::

        write_gguf(Path("runs/x/merged"), Path("runs/x/gguf/x-q8_0.gguf"), tokenizer, "q8_0", name="x")
    """
    import gguf

    if gguf_type not in _TYPES:
        raise UserError(f"GGUF type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ("mistral", "llama") or any(
        a.endswith("ForSequenceClassification") for a in config.get("architectures") or []
    ):
        raise UserError(
            f"GGUF export writes Mistral causal LMs; {model_dir} holds "
            f"{config.get('architectures') or config.get('model_type')} (Mixtral's experts and Ministral's "
            "interleaved sliding window are not written to GGUF yet)."
        )
    if int(config["vocab_size"]) != tokenizer.vocabulary_size:
        raise UserError(
            f"GGUF export: the model's vocab_size {config['vocab_size']} differs from the tokenizer's "
            f"{tokenizer.vocabulary_size} pieces; llama.cpp needs one entry per embedding row."
        )
    planned = plan_tensors(Path(model_dir), config, gguf_type)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        model_metadata(writer, config, name, gguf_type)
        tokenizer_metadata(writer, tokenizer)
        import numpy as np

        for t in planned:
            shape, nbytes = stored_shape(t.shape, t.ggml_type)
            dtype = {"F32": np.float32, "F16": np.float16}.get(t.ggml_type, np.uint8)
            raw = None if t.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[t.ggml_type]
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, weight in read_tensors(planned):
            if t.permute_heads:
                weight = rotary_to_interleaved(weight, t.permute_heads)
            data = convert(weight, t.ggml_type)
            del weight
            writer.write_tensor_data(data)
            del data
    finally:
        writer.close()
    return {
        "type": gguf_type,
        "path": str(out_file),
        "bytes": out_file.stat().st_size,
        "tensors": len(planned),
        "sliding_window": sliding_window(config),
    }
