"""keras-hub's task API in a PyTorch shape: fit/evaluate (our trainer), predict, quantize, LoRA files,
export_to_transformers, summary, get_config/from_config, presets, enable_lora(target_layer_names)."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_tune import MistralBackbone, MistralCausalLM, MistralTokenizer
from mistral_tune.core.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

TEXTS = ["The sky is blue and the grass is green.", "Two plus two is four.", "Paris is in France.", "Hello!"]


def test_predict_is_the_logits_of_the_preprocessed_batch(lm):
    logits = lm.predict(TEXTS[:3], batch_size=2)
    x = lm.preprocessor.generate_preprocess(TEXTS[:3])
    assert logits.shape == (3, lm.preprocessor.sequence_length, 32000)
    n = int(x["padding_mask"][1].sum())
    alone = lm(token_ids=x["token_ids"][1:2, :n])
    assert torch.allclose(logits[1, :n], alone[0].detach(), atol=1e-5)


def test_get_config_from_config_round_trip_and_presets(lm):
    config = lm.get_config()
    assert config["backbone"]["num_layers"] == 2 and config["backbone"]["head_dim"] == 64
    assert json.loads(json.dumps(config)) == config  # plain data
    fresh = MistralCausalLM.from_config(config)
    assert fresh.get_config() == config and fresh.count_params() == lm.count_params()
    assert fresh.tokenizer.encode("hi") == lm.tokenizer.encode("hi")
    assert set(MistralBackbone.presets) == set(MistralCausalLM.presets) == set(MistralTokenizer.presets)
    text = lm.summary(print_fn=None)
    assert "model.layers.1" in text and f"Total params: {lm.count_params():,}" in text


def test_enable_lora_target_layer_names_and_lora_files(tmp_path):
    model = MistralCausalLM.from_preset("mistral_tiny")
    with pytest.raises(UserError, match="unknown layer name 'nope'"):
        model.enable_lora(4, target_layer_names=["nope"])
    model.enable_lora(4, target_layer_names=["query", "value", "feedforward_output_dense"])
    trainable = [n for n, p in model.hf_model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    with torch.no_grad():
        for n, p in model.hf_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # a trained adapter: B away from its zero init
    ids = [[1, 415, 5565, 302, 4843]]
    expected = model(token_ids=ids).detach()
    model.save_lora_weights(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    other = MistralCausalLM.from_preset("mistral_tiny")  # the same seeded base
    assert not torch.allclose(other(token_ids=ids), expected, atol=1e-4)
    other.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(other(token_ids=ids), expected, atol=1e-5)
    third = MistralCausalLM.from_preset("mistral_tiny")
    third.enable_lora(8)
    with pytest.raises(UserError, match="rank-4 LoRA weights"):
        third.load_lora_weights(tmp_path / "lora")
    out = model.export_to_transformers(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(plain(input_ids=torch.tensor(ids)).logits, expected, atol=1e-5)  # LoRA merged


def test_quantize_int8_keeps_the_logits_close():
    import bitsandbytes as bnb

    model = MistralCausalLM.from_preset("mistral_tiny")
    ids = [[1, 415, 5565, 302, 4843, 349]]
    before = model(token_ids=ids).detach()
    model.quantize("int8")
    linears = [m for m in model.hf_model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 2 * 7 and type(model.hf_model.lm_head) is torch.nn.Linear
    after = model(token_ids=ids).detach()
    rel = (after - before).norm() / before.norm()
    assert 0 < rel < 0.05, rel
    with pytest.raises(UserError, match="not one of"):
        model.quantize("int3")
    nf4 = MistralCausalLM.from_preset("mistral_tiny")
    nf4.quantize("int4")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.hf_model.modules()) == 2 * 7
    # 4 bits on random weights: coarser than int8, still the same function (unrelated weights give ~1.4)
    assert (nf4(token_ids=ids).detach() - before).norm() / before.norm() < 0.6


def test_fit_runs_our_trainer_and_evaluate_measures_it(tmp_path):
    model = MistralCausalLM.from_preset("mistral_tiny", sequence_length=32)
    model.enable_lora(4)
    before = model.evaluate(TEXTS)
    history = model.fit(
        TEXTS,
        epochs=3,
        batch_size=2,
        overrides=["train.learning_rate=2e-2", "train.logging_steps=1"],
        output_dir=tmp_path / "run",
    )
    assert history["steps"] == 6 and history["examples"] == 4 and len(history["loss"]) == 6
    assert (tmp_path / "run").is_dir()
    after = model.evaluate(TEXTS)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    assert model.fit(chats, epochs=1, batch_size=1)["examples"] == 1
    with pytest.raises(UserError, match="wrap a single string"):
        model.fit("just one string")
