"""Canaries for mistral_tune/compat/bitsandbytes.py: telling 4-bit layers and weights apart, on CPU."""

from __future__ import annotations

import pytest
import torch

from mistral_tune.compat import bitsandbytes as compat
from mistral_tune.compat import broken

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 32, bias=False)
    quant = bnb.nn.Linear4bit(16, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    quant.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return dense, quant.to("cpu")


def test_4bit_layers_and_weights_are_recognised(layer):
    dense, quant = layer
    assert compat.is_linear4bit(quant) and not compat.is_linear4bit(dense), broken(
        "bitsandbytes", "bitsandbytes.nn.Linear4bit", "is not what a 4-bit layer is an instance of"
    )
    assert compat.is_params4bit(quant.weight) and not compat.is_params4bit(dense.weight), broken(
        "bitsandbytes", "bitsandbytes.nn.Params4bit", "is not what a 4-bit weight is an instance of"
    )


def test_peft_lora_wrapper_of_the_same_name_is_not_a_4bit_layer():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT picks its bnb wrapper from it

        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Tiny().to("cpu"), LoraConfig(r=2, target_modules=["proj"]))
    wrapper = model.base_model.model.proj
    assert type(wrapper).__name__ == "Linear4bit" and type(wrapper).__module__.startswith(
        "peft"
    )  # why a name check fails
    assert not compat.is_linear4bit(wrapper), broken(
        "bitsandbytes", "bitsandbytes.nn.Linear4bit", "now includes PEFT's LoRA wrapper"
    )
    assert compat.is_linear4bit(wrapper.base_layer), broken(
        "bitsandbytes", "bitsandbytes.nn.Linear4bit", "no longer what PEFT wraps"
    )


def test_dequantize_gives_what_the_forward_pass_computes_with(layer):
    dense, quant = layer
    weight = compat.dequantize(quant.weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(quant(x), x @ weight.T.float(), atol=1e-5), broken(
            "bitsandbytes", "bitsandbytes.functional.dequantize_4bit", "differs from Linear4bit's forward"
        )
        assert (weight.float() - dense.weight).abs().max() < 0.2  # NF4 rounding of the original


def test_linear4bit_settings_and_matmul_4bit(layer):
    """What Mixtral's 4-bit experts copy from the model's Linear4bit layers, and the matmul they run."""
    dense, quant = layer

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = quant

    settings, compute_dtype = compat.linear4bit_settings(Holder())
    assert settings == {
        "quant_type": "nf4",
        "blocksize": 64,
        "compress_statistics": True,
        "quant_storage": torch.uint8,
    }, broken("bitsandbytes", "Params4bit", f"settings read back as {settings}")
    assert compute_dtype == torch.float32
    assert compat.linear4bit_settings(torch.nn.Linear(2, 2)) == (None, None)
    again = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, **settings).to("cpu")
    assert torch.equal(compat.dequantize(again), compat.dequantize(quant.weight))
    x = torch.randn(3, 16, requires_grad=True)
    out = compat.matmul_4bit(x, quant.weight)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, compat.dequantize(quant.weight)), rtol=0, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(x.grad, compat.dequantize(quant.weight).sum(0).expand(3, -1), rtol=0, atol=1e-6)
