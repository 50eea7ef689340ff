"""The keras-hub-style Python API: backbone, from_preset handles, presets, LoRA, save_to_preset, scoring."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from mistral_tune import MistralCausalLM, MistralTokenizer
from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved_preset(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "tiny"
    lm.save_to_preset(path, provenance={"recipe": "test", "steps": 0})
    return path


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


def test_score_with_target_ids_is_keras_hubs_loss(lm):
    ids = torch.tensor([[1, 415, 5565, 302, 4843, 349]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    logits = lm.score(ids, mask, scoring_mode="logits")
    target = torch.roll(ids, -1, dims=1)
    loss = lm.score(token_ids=ids, padding_mask=mask, scoring_mode="loss", target_ids=target)
    expected = torch.nn.functional.cross_entropy(logits[0].float(), target[0], reduction="none")
    assert torch.allclose(loss[0], expected, atol=1e-5)
    # Ours without target_ids: the same numbers, one position later (log p(token_t | tokens before t)).
    ll = lm.score(ids, mask)
    assert torch.allclose(-ll[0, 1:], loss[0, :-1], atol=1e-5) and ll[0, 0] == 0
    with pytest.raises(UserError, match="target_ids must have the shape"):
        lm.score(ids, scoring_mode="loss", target_ids=target[:, :3])


def test_score_layer_intercept_fn_sees_and_replaces_activations(lm):
    ids = torch.tensor([[1, 415, 5565, 302]])
    seen = {}

    def capture(x, i):
        seen[i] = x
        return x

    logits = lm.score(ids, scoring_mode="logits", layer_intercept_fn=capture)
    assert sorted(seen) == [-1, 0, 1] and seen[-1].shape == (1, 4, 256)
    assert torch.allclose(logits, lm.score(ids, scoring_mode="logits"), atol=1e-6)
    target = torch.roll(ids, -1, dims=1)
    loss = lm.score(ids, scoring_mode="loss", layer_intercept_fn=capture, target_ids=target)
    (grad,) = torch.autograd.grad(loss.sum(), seen[-1])  # keras-hub's example: gradients w.r.t. embeddings
    assert grad.shape == (1, 4, 256) and grad.abs().sum() > 0
    zeroed = lm.score(ids, scoring_mode="logits", layer_intercept_fn=lambda x, i: x * 0 if i == 1 else x)
    assert not torch.allclose(zeroed, logits)


def test_from_preset_takes_torch_dtype_and_sequence_length():
    half = MistralCausalLM.from_preset("mistral_tiny", dtype=torch.bfloat16, sequence_length=64)
    assert half.hf_model.dtype == torch.bfloat16 and half.preprocessor.sequence_length == 64
    assert half.backbone.head_dim == 64


def test_a_model_without_tokenizer_generates_on_token_ids():
    from mistral_tune import MistralBackbone

    torch.manual_seed(0)
    backbone = MistralBackbone(
        vocabulary_size=50, num_layers=1, num_query_heads=2, hidden_dim=16, intermediate_dim=32, num_key_value_heads=1
    )
    model = MistralCausalLM(backbone)
    model.compile(sampler="greedy")
    x = {"token_ids": [[1, 7, 9, 0, 0, 0]], "padding_mask": [[1, 1, 1, 0, 0, 0]]}
    out = model.generate(x, stop_token_ids=None)
    assert out["padding_mask"].all() and out["token_ids"][0, :3].tolist() == [1, 7, 9]
    logits = model(token_ids=out["token_ids"][:, :5]).detach()
    assert out["token_ids"][0, 5].item() == logits[0, 4].argmax().item()  # greedy: the argmax of the last step
    with pytest.raises(UserError, match="needs a tokenizer"):
        model.generate(x)
