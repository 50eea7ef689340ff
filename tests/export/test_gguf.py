"""GGUF export: the file llama.cpp reads (metadata, tokenizer, tensors) and its verification in llama.cpp
itself (xllamacpp) against the merged model in transformers."""

from __future__ import annotations

import json
import logging

import pytest

from mistral_tune.core.files import OWNER_MARKER
from mistral_tune.core.run_lock import LOCK_NAME
from mistral_tune.export import gguf_file
from mistral_tune.export.gguf_verify import GGUFMismatch, verify_gguf
from mistral_tune.export.pipeline import export_gguf
from tests.helpers import TINY_CONFIG

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("single_thread")


def save_tiny(directory, **config):
    """The tiny preset's architecture (seed 0, float32) saved as a merged checkpoint would be."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, **config}))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def merged_v1(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("merged-v1"))


@pytest.fixture(scope="module")
def v3_tokenizer():
    from mistral_tune.models.tokenizer import MistralTokenizer

    return MistralTokenizer.from_version("v3", chat_template="v3")


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return reader, fields


def test_rotary_reorder_moves_each_heads_halves_to_adjacent_pairs():
    import torch

    heads, head_dim = 2, 8
    rows = torch.arange(heads * head_dim).float()[:, None]  # row r holds r
    out = gguf_file.rotary_to_interleaved(rows, heads)[:, 0].long().tolist()
    # per head: HF rotates (i, i + d/2) together; llama.cpp (2i, 2i + 1)
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_the_f32_file_holds_the_models_metadata_tokenizer_and_exact_tensors(tmp_path, merged_v1, tiny_tokenizer):
    from safetensors.torch import load_file

    info = gguf_file.write_gguf(merged_v1, tmp_path / "m-f32.gguf", tiny_tokenizer, "f32", name="m")
    reader, fields = read(tmp_path / "m-f32.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "m"
    assert fields["llama.block_count"] == TINY_CONFIG["num_hidden_layers"]
    assert fields["llama.embedding_length"] == TINY_CONFIG["hidden_size"]
    assert fields["llama.attention.head_count_kv"] == TINY_CONFIG["num_key_value_heads"]
    assert not any("sliding_window" in k for k in fields)  # llama.cpp's llama architecture has none
    assert info["sliding_window"] == TINY_CONFIG["sliding_window"]
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [tiny_tokenizer.id_to_piece(i) for i in range(32000)]
    assert fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_id
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tiny_tokenizer.jinja_chat_template
    tensors = {t.name: t for t in reader.tensors}
    state = load_file(str(merged_v1 / "model.safetensors"))
    assert len(tensors) == len(state) == info["tensors"]
    import numpy as np

    np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.1.ffn_down.weight"].data, state["model.layers.1.mlp.down_proj.weight"].numpy()
    )
    q = state["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        tensors["blk.0.attn_q.weight"].data,
        gguf_file.rotary_to_interleaved(q, TINY_CONFIG["num_attention_heads"]).numpy(),
    )
    assert not np.array_equal(tensors["blk.0.attn_q.weight"].data, q.numpy())


def test_quantized_files_keep_norms_in_f32_and_q4_0_keeps_the_output_in_q8_0(tmp_path, merged_v1, tiny_tokenizer):
    types = {}
    for kind in ("q8_0", "q4_0", "bf16"):
        gguf_file.write_gguf(merged_v1, tmp_path / f"m-{kind}.gguf", tiny_tokenizer, kind, name="m")
        reader, _ = read(tmp_path / f"m-{kind}.gguf")
        types[kind] = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["q8_0"]["blk.0.attn_norm.weight"] == "F32" and types["q8_0"]["blk.0.attn_q.weight"] == "Q8_0"
    assert types["q4_0"]["blk.0.ffn_up.weight"] == "Q4_0" and types["q4_0"]["output.weight"] == "Q8_0"
    assert types["bf16"]["token_embd.weight"] == "BF16"
    sizes = {k: (tmp_path / f"m-{k}.gguf").stat().st_size for k in types}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["bf16"]


def test_gguf_py_q4_0_matches_ggmls_reference_rounding():
    """q4_0 per ggml's reference quantizer: scale = the block's largest-magnitude value / -8, codes
    trunc(x / scale + 8.5) clipped to 15; written out here independently of gguf-py."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0)
    blocks = x.reshape(-1, 32)
    peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    d = (peak / -8).astype(np.float16).astype(np.float32)
    codes = np.clip(np.trunc(blocks / (peak / -8)[:, None] + 8.5), 0, 15)
    np.testing.assert_allclose(back.reshape(-1, 32), (codes - 8) * d[:, None], rtol=0, atol=1e-6)


def test_a_non_sentencepiece_tokenizer_or_a_vocab_mismatch_is_refused(tmp_path, merged_v1, v3_tokenizer):
    from mistral_tune.core.errors import UserError

    with pytest.raises(UserError, match="vocab_size 32000 differs from the tokenizer's 32768"):
        gguf_file.write_gguf(merged_v1, tmp_path / "x.gguf", v3_tokenizer, "f32", name="x")
    with pytest.raises(UserError, match="SentencePiece and Tekken"):
        gguf_file.tokenizer_metadata(None, object())


# ---- verification in llama.cpp ----------------------------------------------------------------------

xllamacpp = pytest.importorskip("xllamacpp")


def test_f32_and_q8_0_exports_verify_in_llama_cpp_with_the_window_warning(tmp_path, merged_v1, tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        result = export_gguf(merged_v1, tmp_path / "gguf", tiny_tokenizer, ["f32", "q8_0"], name="tiny")
    assert result["verified"] and result["sliding_window_honoured"] is False
    assert "sliding-window attention (32 tokens)" in result["sliding_window_note"]
    assert "sliding-window attention (32 tokens)" in caplog.text
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [OWNER_MARKER, "tiny-f32.gguf", "tiny-q8_0.gguf"]
    for f in result["files"]:
        check = f["verification"]
        assert check["prompt_tokens_equal"]
        assert check["greedy_tokens"] == check["greedy_tokens_expected"] >= 55  # 3 prompts x 20, less byte pieces
        assert check["max_abs_logprob_diff"] <= check["tolerance"]
    f32, q8 = (f["verification"] for f in result["files"])
    assert f32["tolerance"] == 1e-4 and f32["rounding_max_abs_logprob_shift"] == 0.0
    assert q8["rounding_max_abs_logprob_shift"] > 0  # the rounded reference differs from the exact one


@pytest.mark.parametrize("preset", ["mistral_0.3_tiny", "mistral_nemo_tiny"])
def test_the_tiny_presets_of_the_other_families_verify_in_llama_cpp(tmp_path, preset):
    """v3 SentencePiece (mistral_0.3_tiny) and Tekken with head_dim != hidden/heads (mistral_nemo_tiny),
    as a run builds them (random init from the seed); f32 verifies to 1e-4, prompt counts included."""
    from mistral_tune.export.pipeline import materialize_base
    from mistral_tune.models.tokenizer import load_tokenizer

    base, source = materialize_base({"name": preset, "path": None, "seed": 0}, tmp_path / "base")
    tokenizer = load_tokenizer(source)
    result = export_gguf(base, tmp_path / "gguf", tokenizer, ["f32"], name=preset)
    _, fields = read(tmp_path / "gguf" / f"{preset}-f32.gguf")
    assert fields["tokenizer.ggml.model"] == ("gpt2" if tokenizer.kind == "tekken" else "llama")
    assert fields["tokenizer.ggml.pre"] == ("tekken" if tokenizer.kind == "tekken" else "default")
    assert result["sliding_window_honoured"] is True and "sliding_window_note" not in result
    check = result["files"][0]["verification"]
    assert check["prompt_tokens_equal"] and check["max_abs_logprob_diff"] <= check["tolerance"] == 1e-4
    assert check["greedy_tokens"] == check["greedy_tokens_expected"] >= 55


@pytest.mark.parametrize("model_type", ["mixtral", "ministral"])
def test_architectures_llama_cpp_would_run_differently_are_refused(tmp_path, tiny_tokenizer, model_type):
    from mistral_tune.core.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 32000}))
    with pytest.raises(UserError, match="GGUF export writes Mistral causal LMs"):
        gguf_file.write_gguf(tmp_path, tmp_path / "x.gguf", tiny_tokenizer, "f32", name="x")


def test_a_wrong_file_fails_verification(tmp_path, merged_v1, tiny_tokenizer, monkeypatch):
    """Without the rotary reorder the file loads but computes something else: verification must say so."""
    monkeypatch.setattr(gguf_file, "rotary_to_interleaved", lambda weight, n_heads: weight)
    gguf_file.write_gguf(merged_v1, tmp_path / "bad.gguf", tiny_tokenizer, "f32", name="bad")
    with pytest.raises(GGUFMismatch, match="log-prob diff"):
        verify_gguf(tmp_path / "bad.gguf", merged_v1, tiny_tokenizer, "f32")


def test_without_xllamacpp_the_export_is_written_and_marked_unverified(
    tmp_path, merged_v1, tiny_tokenizer, monkeypatch
):
    import mistral_tune.export.gguf_verify as gguf_verify

    monkeypatch.setattr(gguf_verify, "xllamacpp_available", lambda: False)
    result = export_gguf(merged_v1, tmp_path / "gguf", tiny_tokenizer, ["q8_0"], name="tiny")
    assert result["verified"] is False and "mistral-tune[gguf]" in result["unverified_reason"]
    assert result["files"][0]["verification"] is None
    assert (tmp_path / "gguf" / "tiny-q8_0.gguf").stat().st_size == result["files"][0]["bytes"]
    json.dumps(result)  # summary.json-ready


@pytest.mark.slow
def test_a_run_with_export_gguf_and_the_standalone_command_record_verified_files(tmp_path):
    from mistral_tune import cli
    from mistral_tune.config.compose import compose
    from mistral_tune.pipeline.run import run

    from .test_export_pipeline import SHORT

    run_dir = tmp_path / "run"
    summary = run(compose("sft_lora", [*SHORT, "export=gguf", f"output_dir={run_dir}"]))
    gguf_summary = summary["gguf"]
    assert gguf_summary["verified"] and gguf_summary["sliding_window_honoured"] is False
    (entry,) = gguf_summary["files"]
    assert entry["path"] == str(run_dir / "gguf" / "run-q8_0.gguf") and (run_dir / "gguf" / "run-q8_0.gguf").is_file()
    assert entry["verification"]["max_abs_logprob_diff"] <= entry["verification"]["tolerance"]
    assert json.loads((run_dir / "summary.json").read_text())["gguf"] == gguf_summary
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "## GGUF (llama.cpp)" in card and "sliding-window attention (32 tokens)" in card
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME], "no temporary export"
    # later, another type from the run's adapter alone (no merged/ written: a hidden one is used and removed)
    assert cli.main(["export", f"run_dir={run_dir}", "formats=[gguf]", "gguf_types=[f32]"]) == 0
    recorded = json.loads((run_dir / "summary.json").read_text())["gguf"]
    assert [f["type"] for f in recorded["files"]] == ["f32"] and recorded["files"][0]["verification"][
        "tolerance"
    ] == 1e-4
    assert sorted(p.name for p in (run_dir / "gguf").iterdir()) == [OWNER_MARKER, "run-f32.gguf"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
