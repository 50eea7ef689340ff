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


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """mixtral_tiny and ministral_tiny as a run builds them (random init from seed 0), with their tokenizers."""
    from mistral_tune.export.pipeline import materialize_base
    from mistral_tune.models.tokenizer import load_tokenizer

    bases = {}
    for preset in ("mixtral_tiny", "ministral_tiny"):
        base, source = materialize_base({"name": preset, "path": None, "seed": 0}, tmp_path_factory.mktemp(preset))
        bases[preset] = (base, load_tokenizer(source))
    return bases


def test_mixtral_experts_are_stacked_per_layer_with_the_router_in_f32(tmp_path, tiny_bases):
    import numpy as np
    from safetensors.torch import load_file

    base, tokenizer = tiny_bases["mixtral_tiny"]
    config = json.loads((base / "config.json").read_text())
    experts = config["num_local_experts"]
    gguf_file.write_gguf(base, tmp_path / "x-f32.gguf", tokenizer, "f32", name="x")
    reader, fields = read(tmp_path / "x-f32.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == experts and fields["llama.expert_used_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    state = load_file(str(base / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):
        for kind, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            stacked = np.stack(
                [state[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"].numpy() for e in range(experts)]
            )
            np.testing.assert_array_equal(tensors[f"blk.{layer}.ffn_{kind}_exps.weight"].data, stacked)
        router = state[f"model.layers.{layer}.block_sparse_moe.gate.weight"].numpy()
        np.testing.assert_array_equal(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data, router)
    assert not any(name.startswith("blk.0.ffn_gate.") for name in tensors)  # no dense MLP
    gguf_file.write_gguf(base, tmp_path / "x-q4_0.gguf", tokenizer, "q4_0", name="x")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "x-q4_0.gguf")).tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.ffn_down_exps.weight"] == "Q4_0"
    assert types["output.weight"] == "Q8_0"


def test_transformers_5s_fused_expert_layout_writes_the_same_file(tmp_path, tiny_bases):
    """gate_up_proj [experts, 2*ff, hidden] (gate rows first) and down_proj [experts, hidden, ff], as
    transformers 5 holds Mixtral in memory, give the file the per-expert w1/w3/w2 checkpoint gives."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base, tokenizer = tiny_bases["mixtral_tiny"]
    config = json.loads((base / "config.json").read_text())
    experts = config["num_local_experts"]
    state = load_file(str(base / "model.safetensors"))
    fused = {}
    for name, tensor in state.items():
        if ".experts." in name:
            continue
        fused[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        gate = torch.stack([state[f"{prefix}.{e}.w1.weight"] for e in range(experts)])
        up = torch.stack([state[f"{prefix}.{e}.w3.weight"] for e in range(experts)])
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [state[f"{prefix}.{e}.w2.weight"] for e in range(experts)]
        )
    (tmp_path / "fused").mkdir()
    shutil.copy(base / "config.json", tmp_path / "fused" / "config.json")
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    gguf_file.write_gguf(base, tmp_path / "a.gguf", tokenizer, "q8_0", name="x")
    gguf_file.write_gguf(tmp_path / "fused", tmp_path / "b.gguf", tokenizer, "q8_0", name="x")
    a = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and bytes(a[name].data) == bytes(b[name].data), name


def test_a_mixtral_checkpoint_missing_an_expert_is_refused(tmp_path, tiny_bases):
    import shutil

    from safetensors.torch import load_file, save_file

    from mistral_tune.core.errors import UserError

    base, tokenizer = tiny_bases["mixtral_tiny"]
    state = load_file(str(base / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (tmp_path / "m").mkdir()
    shutil.copy(base / "config.json", tmp_path / "m" / "config.json")
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError, match=r"layer 1 .* has w2 for experts \[0, 1, 2\]; .*num_local_experts=4"):
        gguf_file.write_gguf(tmp_path / "m", tmp_path / "x.gguf", tokenizer, "f32", name="x")


def test_ministral_is_written_with_its_per_layer_windows_as_granite_swa(tmp_path, tiny_bases):
    import numpy as np

    base, tokenizer = tiny_bases["ministral_tiny"]
    info = gguf_file.write_gguf(base, tmp_path / "x-f32.gguf", tokenizer, "f32", name="x")
    assert info["architecture"] == "granite_swa" and info["sliding_window"] is None  # carried, not dropped
    reader, fields = read(tmp_path / "x-f32.gguf")
    assert fields["general.architecture"] == "granite_swa"
    assert fields["granite_swa.attention.sliding_window"] == 16
    assert fields["granite_swa.attention.sliding_window_pattern"] == [False, True, True, True]
    assert fields["granite_swa.logit_scale"] == 1.0 and fields["granite_swa.residual_scale"] == 1.0
    assert fields["granite_swa.embedding_scale"] == 1.0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "tekken"
    tensors = {t.name: t for t in reader.tensors}
    assert info["tensors"] == len(tensors)
    for layer in range(4):
        sinks = tensors[f"blk.{layer}.attn_sinks.weight"]
        assert sinks.tensor_type.name == "F32" and np.all(np.isneginf(sinks.data)) and sinks.data.size == 4


def test_a_ministral_config_without_a_pattern_per_layer_is_refused(tmp_path, tiny_bases):
    from mistral_tune.core.errors import UserError

    base, _ = tiny_bases["ministral_tiny"]
    config = json.loads((base / "config.json").read_text())
    with pytest.raises(UserError, match="must name each of the 4 layers"):  # 2 entries for 4 layers
        gguf_file.layer_windows({**config, "layer_types": ["full_attention", "sliding_attention"]})
    assert gguf_file.layer_windows({**config, "layer_types": ["full_attention"] * 4}) is None
    assert gguf_file.architecture({**config, "layer_types": ["full_attention"] * 4}) == "llama"
    assert gguf_file.sliding_window({**config, "layer_types": ["full_attention"] * 4}) is None  # no windowed layer
    # Ministral 8B's window equals its configured context; llama.cpp runs longer ones, so it is still written
    assert gguf_file.layer_windows({**config, "sliding_window": 2048}) == [False, True, True, True]


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


@pytest.mark.parametrize("preset", ["mistral_0.3_tiny", "mistral_nemo_tiny", "mixtral_tiny", "ministral_tiny"])
def test_the_tiny_presets_of_the_other_families_verify_in_llama_cpp(tmp_path, preset):
    """v3 SentencePiece (mistral_0.3_tiny), Tekken with head_dim != hidden/heads (mistral_nemo_tiny),
    experts (mixtral_tiny, v1) and interleaved sliding windows with Tekken (ministral_tiny: window 16, and
    every verified sequence is longer), as a run builds them (random init from the seed); f32 verifies
    to 1e-4, prompt counts included."""
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


@pytest.mark.parametrize(
    "config",
    [{"model_type": "gemma2"}, {"model_type": "mistral", "architectures": ["MistralForSequenceClassification"]}],
)
def test_architectures_the_writer_does_not_know_are_refused(tmp_path, tiny_tokenizer, config):
    from mistral_tune.core.errors import UserError

    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    with pytest.raises(UserError, match="GGUF export writes Mistral, Mixtral and Ministral causal LMs"):
        gguf_file.write_gguf(tmp_path, tmp_path / "x.gguf", tiny_tokenizer, "f32", name="x")


def test_ministral_with_the_windows_on_the_wrong_layers_fails_verification(tmp_path, tiny_bases, monkeypatch):
    """The dense-last pattern (llama.cpp's own convention for Gemma-style models) instead of Ministral's
    dense-first loads and runs, but past the 16-token window it computes something else."""
    base, tokenizer = tiny_bases["ministral_tiny"]
    right = gguf_file.swa_metadata
    monkeypatch.setattr(
        gguf_file, "swa_metadata", lambda w, config, pattern: right(w, config, pattern[1:] + pattern[:1])
    )
    gguf_file.write_gguf(base, tmp_path / "bad.gguf", tokenizer, "f32", name="bad")
    _, fields = read(tmp_path / "bad.gguf")
    assert fields["granite_swa.attention.sliding_window_pattern"] == [True, True, True, False]
    with pytest.raises(GGUFMismatch, match="log-prob diff"):
        verify_gguf(tmp_path / "bad.gguf", base, tokenizer, "f32")


def test_mixtral_q8_0_verifies_and_swapped_expert_matrices_fail(tmp_path, tiny_bases, monkeypatch):
    base, tokenizer = tiny_bases["mixtral_tiny"]
    result = export_gguf(base, tmp_path / "gguf", tokenizer, ["q8_0"], name="mixtral")
    check = result["files"][0]["verification"]
    assert check["tolerance"] == 1.5 and check["max_abs_logprob_diff"] <= 1.5 and check["prompt_tokens_equal"]
    assert check["greedy_tokens"] == check["greedy_tokens_expected"] >= 55
    # the experts' gate (w1) and up (w3) matrices swapped: silu(up) * gate instead of silu(gate) * up
    monkeypatch.setitem(gguf_file._EXPERT_GGUF, "w1", "ffn_up_exps")
    monkeypatch.setitem(gguf_file._EXPERT_GGUF, "w3", "ffn_gate_exps")
    gguf_file.write_gguf(base, tmp_path / "bad.gguf", tokenizer, "f32", name="bad")
    with pytest.raises(GGUFMismatch, match="log-prob diff"):
        verify_gguf(tmp_path / "bad.gguf", base, tokenizer, "f32")


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


def test_the_model_card_says_a_ministral_file_is_written_as_granite_swa():
    from mistral_tune.export.model_card import gguf_lines

    entry = {"type": "f32", "path": "/r/gguf/r-f32.gguf", "bytes": 1, "verification": None}
    ministral = {"files": [{**entry, "architecture": "granite_swa"}], "sliding_window_honoured": True}
    assert any("`granite_swa`" in line and "sliding windows" in line for line in gguf_lines(ministral))
    mistral = {"files": [{**entry, "architecture": "llama"}], "sliding_window_honoured": True}
    assert not any("granite_swa" in line for line in gguf_lines(mistral))
