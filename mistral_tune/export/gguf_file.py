"""Write a GGUF file (llama.cpp's format) from a merged Hugging Face checkpoint, one tensor at a time.

We write with PyPI's ``gguf`` package (pure Python, the writer llama.cpp's own converter uses) rather
than vendoring llama.cpp's ``convert_hf_to_gguf.py``: that script ships only inside the
llama-cpp-python sdist and needs its own, newer copy of ``gguf-py`` (mixing the two fails). Mistral
checkpoints are plain Llama-architecture tensors, so the mapping is short:

- metadata: ``llama.*`` hyperparameters from ``config.json`` (no sliding-window key: llama.cpp's
  ``llama`` architecture has none, so it attends to the whole context; see ``sliding_window_note``);
  Mixtral adds ``expert_count`` / ``expert_used_count``; Ministral's interleaved windows are written
  as llama.cpp's ``granite_swa`` architecture with neutral Granite extras (``swa_metadata``);
- tokenizer: SentencePiece pieces, scores and token types (``tokenizer.ggml.model = llama``), or a
  Tekken file's byte-level tokens and merges (``gpt2`` with the ``tekken`` pre-tokenizer); BOS added,
  EOS not; the BOS/EOS/UNK/pad ids, and the chat template;
- tensors: renamed through gguf's ``TensorNameMap``; the query and key projections have their rows
  reordered, because Hugging Face's rotary embedding rotates the two halves of each head while
  llama.cpp's rotates adjacent pairs; Mixtral's experts stacked into one 3-D tensor per layer and
  kind (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``) and its router as ``ffn_gate_inp``;
  1-D tensors (norms) and the router stay float32, the other matrices take the file type.

Streaming: the tensor directory (names, shapes, types) comes from the safetensors headers alone, so the
header is written first, then each tensor is read (memory-mapped), converted and written before the
next one is read. Memory: one tensor in float32 plus its converted copy (for Mixtral, one layer's
stack of experts of one kind).
"""

from __future__ import annotations

import json
import logging
import re
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

    source: str  # safetensors name (the first expert's, for a stack of experts)
    shard: Path
    name: str  # GGUF name
    shape: tuple[int, ...]  # the Hugging Face (row-major) shape, as written
    ggml_type: str  # gguf.GGMLQuantizationType name
    permute_heads: Optional[int] = None  # q/k: the number of heads whose rows are reordered
    # Mixtral: the per-expert (shard, name) pairs stacked along a new first axis, in expert order
    stack: tuple[tuple[Path, str], ...] = ()
    half: Optional[int] = None  # a fused gate_up_proj: 0 = its gate rows, 1 = its up rows (axis 1)


def gguf_filename(name: str, gguf_type: str) -> str:
    """``<name>-<type>.gguf``, e.g. ``sft_lora-q8_0.gguf``."""
    return f"{name}-{gguf_type}.gguf"


def sliding_window(config: dict[str, Any]) -> Optional[int]:
    """The model's attention window when it is shorter than its context and the GGUF cannot carry it
    (llama.cpp will ignore it): Mistral's, on every layer. Ministral's per-layer windows are written
    (``layer_windows``), so this is None for it."""
    if config.get("model_type") == "ministral":  # windows per layer: written (layer_windows), or none at all
        return None
    window = config.get("sliding_window")
    if window is None or window >= config.get("max_position_embeddings", 0):
        return None
    return int(window)


def layer_windows(config: dict[str, Any]) -> Optional[list[bool]]:
    """Ministral's interleaved attention as llama.cpp's per-layer pattern (True = sliding-window layer),
    or None when no layer has a window. Written even when the window equals ``max_position_embeddings``
    (Ministral 8B: 32768 both): llama.cpp runs contexts longer than that, and the windows then matter."""
    if config.get("model_type") != "ministral":
        return None
    window = config.get("sliding_window")
    types = config.get("layer_types") or []
    if window is None or "sliding_attention" not in types:
        return None
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != int(config["num_hidden_layers"]):
        raise UserError(
            f"GGUF export: Ministral layer_types must name each of the {config['num_hidden_layers']} layers "
            f"'full_attention' or 'sliding_attention'; got {types}"
        )
    return [t == "sliding_attention" for t in types]


def architecture(config: dict[str, Any]) -> str:
    """The llama.cpp architecture the file is written as: ``llama`` (Mistral, Mixtral), or, for
    Ministral's interleaved sliding window, ``granite_swa`` (see ``swa_metadata``)."""
    return "granite_swa" if layer_windows(config) else "llama"


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


# Mixtral's experts, as Mistral's checkpoints and transformers' save_pretrained store them (one matrix
# per expert: w1 = gate, w3 = up, w2 = down) or as transformers 5 holds them in memory (all experts in
# one 3-D parameter; gate and up concatenated along axis 1, gate first).
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_EXPERT_GGUF = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def ggml_type_for(hf_name: str, ndim: int, gguf_type: str) -> str:
    """How a Hugging Face tensor (or model parameter) is stored in a ``gguf_type`` file: 1-D tensors
    (norms) and Mixtral's router stay float32 (the router's few logits decide which experts run, and
    llama.cpp's converter keeps it in f32 too); a q4_0 file keeps lm_head in q8_0; the rest takes the type."""
    if ndim == 1 or _ROUTER.match(hf_name):
        return "F32"
    if gguf_type == "q4_0" and hf_name == "lm_head.weight":
        return _Q4_OUTPUT
    return _TYPES[gguf_type][0]


def plan_tensors(model_dir: Path, config: dict[str, Any], gguf_type: str) -> list[PlannedTensor]:
    """Every output tensor from the safetensors headers alone (no weights read)."""
    import gguf
    from safetensors import safe_open

    from mistral_tune.export.stream_merge import base_shards

    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
    experts = int(config.get("num_local_experts") or 0)
    planned: list[PlannedTensor] = []
    per_expert: dict[tuple[int, str], dict[int, tuple[Path, str, tuple[int, ...]]]] = {}
    for shard in base_shards(Path(model_dir)):
        with safe_open(str(shard), framework="pt") as f:
            for source in f.keys():
                shape = tuple(f.get_slice(source).get_shape())
                if m := _EXPERT.match(source):
                    per_expert.setdefault((int(m[1]), m[3]), {})[int(m[2])] = (shard, source, shape)
                    continue
                if m := _FUSED_EXPERTS.match(source):
                    if len(shape) != 3 or shape[0] != experts:
                        raise UserError(
                            f"GGUF export: {source!r} in {shard} has shape {list(shape)}, not [{experts}, ...]"
                        )
                    kind = ggml_type_for(source, 3, gguf_type)
                    if m[2] == "down_proj":
                        planned.append(PlannedTensor(source, shard, f"blk.{m[1]}.ffn_down_exps.weight", shape, kind))
                    else:
                        half = (shape[0], shape[1] // 2, shape[2])
                        planned.append(
                            PlannedTensor(source, shard, f"blk.{m[1]}.ffn_gate_exps.weight", half, kind, half=0)
                        )
                        planned.append(
                            PlannedTensor(source, shard, f"blk.{m[1]}.ffn_up_exps.weight", half, kind, half=1)
                        )
                    continue
                if m := _ROUTER.match(source):
                    name = f"blk.{m[1]}.ffn_gate_inp.weight"
                else:
                    name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"GGUF export: no llama.cpp name for tensor {source!r} in {shard}")
                permute = None
                if source.endswith("self_attn.q_proj.weight"):
                    permute = heads
                elif source.endswith("self_attn.k_proj.weight"):
                    permute = kv_heads or heads
                planned.append(
                    PlannedTensor(source, shard, name, shape, ggml_type_for(source, len(shape), gguf_type), permute)
                )
    for (layer, w), found in sorted(per_expert.items()):
        if sorted(found) != list(range(experts)):
            raise UserError(
                f"GGUF export: layer {layer} of {model_dir} has {w} for experts {sorted(found)}; "
                f"config.json says num_local_experts={experts}"
            )
        shard, source, shape = found[0]
        if any(found[e][2] != shape for e in found):
            raise UserError(f"GGUF export: layer {layer}'s {w} matrices differ in shape across experts")
        stack = tuple((found[e][0], found[e][1]) for e in range(experts))
        kind = ggml_type_for(source, 3, gguf_type)
        name = f"blk.{layer}.{_EXPERT_GGUF[w]}.weight"
        planned.append(PlannedTensor(source, shard, name, (experts, *shape), kind, stack=stack))
    if experts:
        for layer in range(layers):
            for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp"):
                if not any(t.name == f"blk.{layer}.{kind}.weight" for t in planned):
                    raise UserError(
                        f"GGUF export: {model_dir} has no {kind} tensor for layer {layer} of a Mixtral model"
                    )
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
    if config.get("num_local_experts"):  # Mixtral: llama.cpp's llama graph routes softmax-top-k, renormalized
        writer.add_expert_count(int(config["num_local_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    pattern = layer_windows(config)
    if pattern:
        swa_metadata(writer, config, pattern)


def swa_metadata(writer: Any, config: dict[str, Any], pattern: list[bool]) -> None:
    """Ministral's per-layer windows, for llama.cpp's ``granite_swa`` architecture.

    llama.cpp's ``llama`` (and ``mistral3``) graphs build a KV cache without sliding windows and read
    no window key: a GGUF written as ``llama`` runs every Ministral layer with full attention (measured:
    it matches transformers with the windows off, not the model). ``granite_swa`` is the one graph in
    llama.cpp that is Mistral's (RMSNorm, rotary, GQA, SwiGLU) and reads a per-layer window pattern
    (``attention.sliding_window_pattern``, one bool per layer) with the window size
    (``attention.sliding_window``). Its Granite extras are set to no-ops: logit, residual and embedding
    scales of 1 and an attention sink of -inf per head (``attn_sinks``: adds exp(-inf) = 0 to each
    softmax denominator).
    """
    writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_sliding_window_pattern(pattern)
    writer.add_logit_scale(1.0)
    writer.add_residual_scale(1.0)
    writer.add_embedding_scale(1.0)


def read_tensors(planned: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, Any]]:
    """Each planned tensor in float32, one at a time, reading the shards memory-mapped. A stack of
    experts is read expert by expert into one float32 tensor (Mixtral 8x7B: 1.9 GB at a time)."""
    import torch
    from safetensors import safe_open

    handles: dict[Path, Any] = {}

    def read(shard: Path, name: str) -> Any:
        if shard not in handles:
            handles[shard] = safe_open(str(shard), framework="pt")
        return handles[shard].get_tensor(name)

    for t in planned:
        if t.stack:
            weight = torch.empty(t.shape, dtype=torch.float32)
            for e, (shard, name) in enumerate(t.stack):
                weight[e] = read(shard, name).to(torch.float32)
        else:
            weight = read(t.shard, t.source)
            if t.half is not None:
                weight = weight.chunk(2, dim=1)[t.half]
            weight = weight.to(torch.float32).contiguous()
        yield t, weight


def null_sinks(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``granite_swa`` requires an attention-sink logit per head and layer; -inf makes each one a no-op."""
    import numpy as np

    heads = int(config["num_attention_heads"])
    return [
        (f"blk.{layer}.attn_sinks.weight", np.full((heads,), -np.inf, dtype=np.float32))
        for layer in range(int(config["num_hidden_layers"]))
    ]


def check_writable(config: dict[str, Any], model_dir: Any) -> None:
    """Refuse what llama.cpp would load but compute differently (one clear error)."""
    architectures = config.get("architectures") or []
    if config.get("model_type") not in ("mistral", "llama", "mixtral", "ministral") or any(
        not a.endswith("ForCausalLM") for a in architectures
    ):
        raise UserError(
            f"GGUF export writes Mistral, Mixtral and Ministral causal LMs; {model_dir} holds "
            f"{architectures or config.get('model_type')}."
        )


def write_gguf(model_dir: Path, out_file: Path, tokenizer: Any, gguf_type: str, *, name: str) -> dict[str, Any]:
    """Write ``out_file`` (GGUF ``gguf_type``) from the Hugging Face checkpoint in ``model_dir``.

    Returns what the summary records: the type, the size in bytes, the tensor count, the llama.cpp
    architecture it is written as, and the sliding window llama.cpp will not apply (None when the
    model has none, or when the file carries it: Ministral).

    Example::

        write_gguf(Path("runs/x/merged"), Path("runs/x/gguf/x-q8_0.gguf"), tokenizer, "q8_0", name="x")
    """
    import gguf

    if gguf_type not in _TYPES:
        raise UserError(f"GGUF type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    check_writable(config, model_dir)
    if int(config["vocab_size"]) != tokenizer.vocabulary_size:
        raise UserError(
            f"GGUF export: the model's vocab_size {config['vocab_size']} differs from the tokenizer's "
            f"{tokenizer.vocabulary_size} pieces; llama.cpp needs one entry per embedding row."
        )
    planned = plan_tensors(Path(model_dir), config, gguf_type)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    arch = architecture(config)
    sinks = null_sinks(config) if arch == "granite_swa" else []
    writer = gguf.GGUFWriter(out_file, arch)
    try:
        model_metadata(writer, config, name, gguf_type)
        tokenizer_metadata(writer, tokenizer)
        import numpy as np

        for t in planned:
            shape, nbytes = stored_shape(t.shape, t.ggml_type)
            dtype = {"F32": np.float32, "F16": np.float16}.get(t.ggml_type, np.uint8)
            raw = None if t.ggml_type in ("F32", "F16") else gguf.GGMLQuantizationType[t.ggml_type]
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        for sink_name, sink in sinks:
            writer.add_tensor_info(sink_name, sink.shape, sink.dtype, sink.nbytes)
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
        for _, sink in sinks:
            writer.write_tensor_data(sink)
    finally:
        writer.close()
    return {
        "type": gguf_type,
        "path": str(out_file),
        "bytes": out_file.stat().st_size,
        "tensors": len(planned) + len(sinks),
        "architecture": arch,
        "sliding_window": sliding_window(config),
    }
