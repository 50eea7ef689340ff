from __future__ import annotations

import pytest
import torch

from mistral_tune import MistralBackbone, MistralCausalLM, MistralTokenizer
from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import PRESETS, parameter_count

pytestmark = pytest.mark.usefixtures("single_thread")


# The five Mistral 7B checkpoints (every other family is checked in tests/models/test_presets.py).
SEVEN_B = [p for p in PRESETS if p.startswith("mistral_") and p.endswith("7b_en")]


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
