"""Canaries for the PEFT internals in mistral_tune/compat/peft.py, on a real tiny PEFT LoRA/DoRA model.

Each fails naming peft, its installed version and the symbol when an upgrade changes it.
"""

from __future__ import annotations

import pytest
import torch

from mistral_tune.compat import broken
from mistral_tune.compat import peft as compat


def tiny_base():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return MistralForCausalLM(config)


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "dora"])
def saved_adapter(request, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=request.param,
        rank_pattern={"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 3}, alpha_pattern={"v_proj": 8},
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(tiny_base(), config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return model, out, request.param


def test_saved_keys_have_the_layout_we_parse(saved_adapter):
    from safetensors.torch import load_file

    _, out, dora = saved_adapter
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    base_params = set(dict(tiny_base().named_parameters()))
    odd = [k for k in keys if not k.startswith(compat.ADAPTER_KEY_PREFIX)]
    assert not odd, broken("peft", "adapter_model.safetensors keys", f"lack {compat.ADAPTER_KEY_PREFIX!r}: {odd[:3]}")
    suffixes = (compat.LORA_A_SUFFIX, compat.LORA_B_SUFFIX) + ((compat.DORA_MAGNITUDE_SUFFIX,) if dora else ())
    modules: dict[str, set[str]] = {}
    for key in keys:
        name = compat.adapter_key_to_base(key)
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        assert suffix is not None, broken(
            "peft", "adapter_model.safetensors keys", f"has {key!r}, not one of {suffixes}"
        )
        modules.setdefault(name[: -len(suffix)], set()).add(suffix)
    assert len(modules) == 2 * 3 and all(found == set(suffixes) for found in modules.values()), broken(
        "peft", "adapter_model.safetensors keys", f"group per module as {modules}"
    )
    missing = sorted(m + ".weight" for m in modules if m + ".weight" not in base_params)
    assert not missing, broken("peft", "adapter_model.safetensors keys", f"name modules the base lacks: {missing}")


def test_pattern_lookup_gives_the_rank_and_alpha_peft_applied(saved_adapter):
    model, _, _ = saved_adapter
    config = model.peft_config["default"]
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        base = compat.base_module_name(name)
        rank = compat.pattern_value(config.rank_pattern, base, config.r)
        alpha = compat.pattern_value(config.alpha_pattern, base, config.lora_alpha)
        assert module.lora_A["default"].weight.shape[0] == rank, broken(
            "peft", "peft.utils.other.get_pattern_key", f"gives rank {rank} for {base}, PEFT used {module.r['default']}"
        )
        assert module.scaling["default"] == pytest.approx(alpha / rank), broken(
            "peft", "peft.utils.other.get_pattern_key", f"gives alpha {alpha} for {base}"
        )
        checked += 1
    assert checked == 6


def test_base_module_names_are_the_plain_models(saved_adapter):
    model, _, _ = saved_adapter
    plain = set(dict(tiny_base().named_modules()))
    wrapped = [compat.base_module_name(n) for n, _ in model.named_modules() if n.endswith(compat.BASE_LAYER)]
    assert wrapped and set(wrapped) <= plain, broken(
        "peft", f"PeftModel module names (base_model.model., {compat.BASE_LAYER})", f"map to {sorted(wrapped)[:3]}"
    )


@pytest.fixture(scope="module")
def expert_adapter(tmp_path_factory):
    """LoRA on a tiny Mixtral's 3D expert parameters (target_parameters), saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        lora_dropout=0.0, init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(MixtralForCausalLM(config), lora)
    out = tmp_path_factory.mktemp("experts")
    model.save_pretrained(out)
    return model, out


def test_expert_lora_saves_under_the_experts_module_with_stacked_factors(expert_adapter):
    from safetensors.torch import load_file

    model, out = expert_adapter
    saved = {compat.adapter_key_to_base(k): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    expert_keys = sorted(k for k in saved if ".experts." in k)
    modules = {compat.parameter_adapter_module(k.rsplit(".lora_", 1)[0]) for k in expert_keys}
    assert modules == {f"model.layers.{i}.mlp.experts" for i in range(2)}, broken(
        "peft", "target_parameters adapter keys", f"are {expert_keys}"
    )
    # Each expert's delta from the saved factors equals PEFT's own ParamWrapper.get_delta_weight.
    checked = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        prefix = compat.base_module_name(name)  # model.layers.0.mlp.experts(.base_layer)
        key = next(k for k in saved if k.startswith(name.removeprefix(compat.ADAPTER_KEY_PREFIX) + ".lora_A"))
        a, b = saved[key], saved[key.replace("lora_A", "lora_B")]
        theirs = module.get_delta_weight("default")  # (experts, out, in) as Mixtral stores its parameters
        assert theirs.shape == module.get_param().shape, broken(
            "peft", "ParamWrapper.get_delta_weight", f"has shape {tuple(theirs.shape)} for {prefix}"
        )
        for e in range(3):
            ours = compat.expert_delta(a, b, 3, e) * module.scaling["default"]
            assert torch.allclose(ours, theirs[e], atol=1e-6), broken(
                "peft", "target_parameters lora_A/lora_B layout", f"gives another delta for expert {e} of {prefix}"
            )
        checked += 1
    assert checked == 4, broken("peft", "ParamWrapper", f"wraps {checked} expert parameters, expected 4")
