from __future__ import annotations

from types import SimpleNamespace

import pytest

from mistral_tune.benchmark import flops
from mistral_tune.models.presets import PRESETS


def test_mistral_7b_matmul_parameters_match_the_issue():
    n = flops.matmul_parameters(SimpleNamespace(**PRESETS["mistral_7b_en"].config))
    assert n == 7_110_393_856  # 32 layers x 218.1M (attention + SwiGLU) + 131M LM head; embeddings excluded


def test_attended_pairs_and_attention_flops():
    assert flops.attended_pairs(4, None) == 10  # 1 + 2 + 3 + 4
    assert flops.attended_pairs(5, 2) == 3 + 3 * 2  # 1 + 2, then 2 keys for each of the 3 later queries
    assert flops.attended_pairs(2048, 4096) == 2048 * 2049 // 2
    cfg = SimpleNamespace(**PRESETS["mistral_7b_en"].config)
    per_token = flops.step_flops(cfg, [2048], frozen_base=True) / 2048
    attention = 12 * 32 * 4096 * 2049 / 2
    assert per_token == pytest.approx(4 * 7_110_393_856 + attention)
    assert flops.step_flops(cfg, [2048], frozen_base=False) > flops.step_flops(cfg, [2048], frozen_base=True)


def test_peak_tflops_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("Some CPU") is None
    assert flops.mfu(494.7e12, 989.4) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None
