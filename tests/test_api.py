"""The keras-hub-style Python API: backbone, from_preset handles, presets, LoRA, save_to_preset, scoring."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import types

import pytest
import torch

from mistral_tune import MistralBackbone, MistralCausalLM, MistralTokenizer
from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import PRESETS, parameter_count
from mistral_tune.models.tokenizer import tokenizer_file

pytestmark = pytest.mark.usefixtures("single_thread")

SEVEN_B = [p for p in PRESETS if p != "mistral_tiny"]


@pytest.fixture(scope="module")
def lm():
    return MistralCausalLM.from_preset("mistral_tiny")


@pytest.fixture(scope="module")
def saved_preset(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "tiny"
    lm.save_to_preset(path, provenance={"recipe": "test", "steps": 0})
    return path


def test_import_stays_cheap():
    code = (
        "import sys, mistral_tune; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'MistralCausalLM' in dir(mistral_tune)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backbone_takes_keras_hub_arguments():
    torch.manual_seed(0)
    bb = MistralBackbone(
        vocabulary_size=10,
        num_layers=2,
        num_query_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        num_key_value_heads=2,
        rope_max_wavelength=500,
        rope_scaling_factor=2.0,
        layer_norm_epsilon=1e-5,
        sliding_window=8,
        dropout=0.1,
        dtype="float32",
        attn_implementation="eager",
    )
    c = bb.config
    assert (c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (10, 2, 4, 16)
    assert (c.intermediate_size, c.num_key_value_heads, c.head_dim, c.sliding_window) == (32, 2, 4, 8)
    assert c.rms_norm_eps == 1e-5 and c.attention_dropout == 0.1
    assert c.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    assert (bb.vocabulary_size, bb.num_layers, bb.hidden_dim) == (10, 2, 16)
    assert tuple(bb.token_embedding.weight.shape) == (10, 16)
    no_head = parameter_count(dict(c.to_dict(), tie_word_embeddings=True))  # embeddings counted once
    assert bb.count_params() == no_head
    bb.eval()
    out = bb({"token_ids": [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], "padding_mask": [[0, 0, 1, 1, 1], [1] * 5]})
    assert out.shape == (2, 5, 16)
    alone = bb(token_ids=torch.tensor([[5, 6, 7]]))
    assert torch.allclose(out[0, 2:], alone[0], atol=1e-5)  # left padding changes nothing
    with pytest.raises(UserError, match="must divide"):
        MistralBackbone(10, 1, 3, 16, 32, 1)


@pytest.mark.parametrize("preset", SEVEN_B)
def test_seven_b_presets_build_on_meta_without_weights(preset):
    with torch.device("meta"):
        model = MistralCausalLM.from_preset(preset, load_weights=False)
        backbone = MistralBackbone.from_preset(preset, load_weights=False)
    expected = PRESETS[preset].parameter_count
    assert model.count_params() == expected
    assert backbone.count_params() == expected - 4096 * PRESETS[preset].config["vocab_size"]  # no lm_head
    assert all(p.is_meta for p in model.parameters())
    c = model.hf_model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads) == (32, 4096, 8)
    v3 = "0.3" in preset
    assert c.sliding_window == (4096 if preset in ("mistral_7b_en", "mistral_instruct_7b_en") else None)
    assert model.tokenizer.vocabulary_size == c.vocab_size == (32768 if v3 else 32000)
    assert model.tokenizer.chat_template == ("v3" if v3 else "v1")


def test_presets_listing():
    presets = MistralCausalLM.presets
    assert set(presets) == set(PRESETS)
    for pid in SEVEN_B:
        meta = presets[pid]["metadata"]
        assert meta["params_human"] == "7.24B" and meta["params"] == PRESETS[pid].parameter_count
        assert meta["description"] and presets[pid]["handle"].startswith("hf://mistralai/")
    assert presets["mistral_7b_en"]["metadata"]["params"] == 7_241_732_096  # keras-hub's count


@pytest.mark.parametrize(
    "preset,version,template",
    [
        ("mistral_7b_en", "v1", "v1"),
        ("mistral_instruct_7b_en", "v1", "v1"),
        ("mistral_0.2_instruct_7b_en", "v1", "v1"),
        ("mistral_0.3_7b_en", "v3", "v3"),
        ("mistral_0.3_instruct_7b_en", "v3", "v3"),
    ],
)
def test_tokenizer_from_preset_is_offline_mistral_common(preset, version, template):
    tok = MistralTokenizer.from_preset(preset)
    assert tok.model_file == tokenizer_file(version) and tok.chat_template == template


def test_unknown_and_unreachable_handles_fail_clearly(monkeypatch):
    with pytest.raises(UserError, match="neither a built-in preset"):
        MistralCausalLM.from_preset("mistral_8b_en")
    with pytest.raises(UserError, match="not a valid Hugging Face repo id"):
        MistralCausalLM.from_preset("hf://a/b/c")
    # The network cannot be relied on: put the hub client in offline mode.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline"):
        MistralCausalLM.from_preset("hf://someone/some-model", load_weights=False)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # not installed
    with pytest.raises(UserError, match="pip install 'mistral-tune\\[kaggle\\]'"):
        MistralCausalLM.from_preset("kaggle://keras/mistral/keras/mistral_7b_en")
    with pytest.raises(UserError, match="not a Kaggle model handle"):
        MistralCausalLM.from_preset("kaggle://mistral")


def test_kaggle_handle_goes_through_kagglehub(monkeypatch, saved_preset, lm):
    calls = []

    def model_download(handle):  # kagglehub without the network: hand back a local copy
        calls.append(handle)
        return str(saved_preset)

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(model_download=model_download))
    loaded = MistralCausalLM.from_preset("kaggle://me/mistral/transformers/tiny/1")
    assert calls == ["me/mistral/transformers/tiny/1"]
    ids = [[1, 415, 5565, 302, 4843]]
    assert torch.allclose(loaded(token_ids=ids), lm(token_ids=ids), atol=1e-5)


def test_keras_hub_layout_gives_architecture_and_tokenizer(tmp_path):
    args = dict(
        vocabulary_size=32000,
        num_layers=1,
        num_query_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        num_key_value_heads=2,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        sliding_window=16,
        dropout=0,
        name="mistral_backbone",
        trainable=True,
        dtype="float32",
    )
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "MistralBackbone", "config": args}))
    (tmp_path / "assets" / "tokenizer").mkdir(parents=True)
    shutil.copy(tokenizer_file("v1"), tmp_path / "assets" / "tokenizer" / "vocabulary.spm")
    model = MistralCausalLM.from_preset(str(tmp_path), load_weights=False)
    c = model.hf_model.config
    assert (c.hidden_size, c.num_hidden_layers, c.sliding_window, c.head_dim) == (64, 1, 16, 16)
    assert model.tokenizer.encode("hello") == MistralTokenizer.from_version("v1").encode("hello")
    with pytest.raises(UserError, match="Keras-format"):
        MistralCausalLM.from_preset(str(tmp_path))


def test_save_to_preset_loads_in_both(lm, saved_preset):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in saved_preset.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "generation_config.json",
        "metadata.json",
    } <= names
    assert not list(saved_preset.parent.glob(".tiny.tmp-*"))  # the temporary copy was renamed away
    meta = json.loads((saved_preset / "metadata.json").read_text())
    assert meta["parameter_count"] == PRESETS["mistral_tiny"].parameter_count
    assert meta["base_preset"] == "mistral_tiny" and meta["tasks"] == ["CausalLM"]
    assert meta["provenance"] == {"recipe": "test", "steps": 0} and meta["mistral_tune_version"]
    assert meta["date_saved"]
    ids = torch.tensor([[1, 415, 5565, 302, 4843, 349]])
    expected = lm(token_ids=ids)
    again = MistralCausalLM.from_preset(str(saved_preset))
    assert again.base_preset == "mistral_tiny" and again.metadata["provenance"]["recipe"] == "test"
    assert MistralTokenizer.from_preset(str(saved_preset)).chat_template == "v1"
    assert torch.allclose(again(token_ids=ids), expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(saved_preset)
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def test_save_to_preset_refuses_to_replace_other_data(lm, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a mistral-tune preset directory"):
        lm.save_to_preset(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_enable_lora_trains_q_v_only_and_saves_merged(tmp_path):
    model = MistralCausalLM.from_preset("mistral_tiny")
    model.backbone.enable_lora(rank=4)
    trainable = {n: p.numel() for n, p in model.hf_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    # per layer: q 4*256 + 256*4, v 4*256 + 128*4 -> 3584; 2 layers
    assert sum(trainable.values()) == 2 * 3584
    frozen = {n: p.detach().clone() for n, p in model.hf_model.named_parameters() if not p.requires_grad}
    ids = torch.tensor([[1, 415, 5565, 302, 4843, 349, 272]])
    model.hf_model.train()
    opt = torch.optim.SGD([p for p in model.hf_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model.hf_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.hf_model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.hf_model.named_parameters() if n in frozen)
    with_lora = model(token_ids=ids)
    base = MistralCausalLM.from_preset("mistral_tiny")(token_ids=ids)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter is active in the causal LM
    out = model.save_to_preset(tmp_path / "p")
    assert model.backbone.lora_enabled and any(p.requires_grad for p in model.hf_model.parameters())
    reloaded = MistralCausalLM.from_preset(str(out))
    assert not any(".lora_" in n for n, _ in reloaded.hf_model.named_parameters())
    assert torch.allclose(reloaded(token_ids=ids), with_lora, atol=1e-4)


def test_score_per_token_and_padding(lm):
    texts = ["The capital of France is Paris.", "Sliding windows keep attention local, even for long inputs."]
    ll = lm.score(texts)
    loss = lm.score(texts, scoring_mode="loss")
    assert torch.equal(loss, -ll)
    for row, text in zip(ll, texts):
        ids = lm.tokenizer.encode(text)
        alone = lm.score([ids])[0]
        assert torch.allclose(row[-len(ids) :], alone, atol=1e-5)
        assert (row[: len(row) - len(ids) + 1] == 0).all()  # padding and the first token carry no score
        ref = lm.hf_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        assert math.isclose(-alone.sum().item() / (len(ids) - 1), ref.item(), rel_tol=1e-5)
    logits = lm.score(texts, scoring_mode="logits")
    assert logits.shape[:2] == ll.shape and logits.shape[2] == 32000
    with pytest.raises(UserError, match="scoring_mode"):
        lm.score(texts, scoring_mode="ppl")


def test_perplexity_over_a_dataset(lm):
    from datasets import Dataset

    texts = ["one two three four", "", "Mistral uses grouped-query attention and a sliding window. " * 3, "hi"]
    result = lm.perplexity(Dataset.from_dict({"text": texts}), batch_size=2, max_length=16)
    assert (result["sequences"], result["empty"], result["truncated"]) == (4, 1, 1)
    nll = tokens = 0.0
    for text in texts:
        ids = lm.tokenizer.encode(text)[:16]
        if len(ids) < 2:
            continue
        n = len(ids) - 1
        nll += lm.hf_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * n
        tokens += n
    assert result["tokens"] == tokens
    assert math.isclose(result["perplexity"], math.exp(nll / tokens), rel_tol=1e-4)
    with pytest.raises(UserError, match="no text"):
        lm.perplexity([{"body": "x"}])


def test_causal_lm_from_a_keras_style_backbone(tmp_path):
    torch.manual_seed(0)
    bb = MistralBackbone(
        vocabulary_size=32000,
        num_layers=1,
        num_query_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        num_key_value_heads=2,
        sliding_window=8,
    )
    bare = MistralCausalLM(bb)
    assert bare.backbone.model is bb.model  # the decoder is shared, only the head is new
    assert bare.count_params() == bb.count_params() + 32000 * 32
    assert bare(token_ids=[[1, 2, 3]]).shape == (1, 3, 32000)
    with pytest.raises(UserError, match="no tokenizer"):
        bare.generate("hi")
    lm = MistralCausalLM(bb, MistralTokenizer.from_version("v1"))
    lm.compile(sampler="greedy")
    assert isinstance(lm.generate("hi", max_length=8), str)
    lm.save_to_preset(tmp_path / "p")
    assert MistralCausalLM.from_preset(str(tmp_path / "p")).hf_model.config.sliding_window == 8
    with pytest.raises(UserError, match="do not belong together"):
        MistralCausalLM(MistralBackbone(10, 1, 4, 16, 32, 2), MistralTokenizer.from_version("v1"))
