"""bench/peers: the shape-b model really is decoder-dominated, and the probe counts real tokens right."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"peers_{name}", ROOT / "bench" / "peers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shape_b_lm_head_under_a_fifth_of_the_flops():
    prepare = load("prepare")
    base = dict(vocab_size=32000, rope_theta=10000.0)
    config = AutoConfig.for_model("mistral", **base, **prepare.SHAPE_B)
    split = prepare.flops_split(config, 1024)
    assert split["lm_head_share"] < 0.20
    assert split["lm_head_flops_per_token"] == 4 * 1024 * 32000
    # The 8-layer example is over the line, so the check can fail.
    eight = AutoConfig.for_model("mistral", **base, **{**prepare.SHAPE_B, "num_hidden_layers": 8})
    assert prepare.flops_split(eight, 1024)["lm_head_share"] > 0.20


def test_probe_counts_mask_ones_or_all_but_tail_padding():
    probe = load("probe")
    padded = {
        "input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]]),
    }
    assert probe.count_tokens(padded, 0) == (5, 3, [2, 4])
    # Padding-free packed row: two examples (position ids restart) and two pad positions at the end.
    packed = {
        "input_ids": torch.tensor([[1, 5, 6, 1, 7, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 5, 6, -100, 7, -100, -100]]),
    }
    assert probe.count_tokens(packed, 0) == (5, 3, [1, 7])
