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


def test_probe_thread_cpu_sees_a_busy_thread():
    import threading
    import time

    probe = load("probe")
    done = threading.Event()

    def burn():
        end = time.process_time() + 10
        while not done.is_set() and time.process_time() < end:
            sum(range(1000))

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        before = probe.thread_cpu()
        key = next(k for k in before if k.endswith(f":{worker.native_id}"))
        deadline = time.time() + 20
        while probe.thread_cpu()[key] - before[key] < 0.2 and time.time() < deadline:
            time.sleep(0.05)
        assert probe.thread_cpu()[key] - before[key] >= 0.2
    finally:
        done.set()
        worker.join()


def test_step_cpu_splits_wall_and_cpu_per_step(tmp_path):
    import json
    import subprocess
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    events = [
        {"event": "on_step_end", "step": 1, "t": 100.0, "thread_cpu_s": {"python:1": 5.0, "python:2": 4.0}},
        {"event": "fwd_bwd", "step": 0, "seconds": 9.0},
        {"event": "fwd_bwd", "step": 1, "seconds": 8.0},
        {
            "event": "on_step_end",
            "step": 2,
            "t": 110.0,
            "thread_cpu_s": {"python:1": 9.0, "python:2": 8.0, "pt:3": 1.0},
        },
        {"event": "fwd_bwd", "step": 2, "seconds": 9.5},
        {
            "event": "on_step_end",
            "step": 3,
            "t": 120.0,
            "thread_cpu_s": {"python:1": 14.0, "python:2": 12.0, "pt:3": 1.0},
        },
    ]
    (runs / "r0-b-x-matched.probe.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    subprocess.run(
        [sys.executable, str(ROOT / "bench/peers/step_cpu.py"), str(tmp_path)], check=True, capture_output=True
    )
    (row,) = json.loads((tmp_path / "step_cpu.json").read_text())
    assert row["steps"] == 2 and row["wall_s"] == 10.0
    assert row["fwd_bwd_s"] == (8.0 + 9.5) / 2 and row["rest_s"] == 10.0 - 8.75
    assert row["cpu_s"] == (9.0 + 9.0) / 2  # step 2: 4 + 4 + 1; step 3: 5 + 4 + 0
    assert row["busy_threads"] == 3


def test_bf16_and_sdpa_variants_reach_every_tool(tmp_path):
    """*_bf16 turns bf16 on in each tool the way its users would (LLaMA-Factory also needs use_cpu on a
    CPU); *_sdpa puts mistral-tune back on transformers' sdpa; axolotl has no bf16 variant (no use_cpu)."""
    import json

    peers = load("run_peers")
    run_dir = tmp_path / "run"
    argv, _ = peers.cmd_mistral_tune("matched_chunked_bf16_sdpa", "b", tmp_path, run_dir)
    assert {"model.dtype=bfloat16", "train.bf16=true", "model.attn_implementation=sdpa"} <= set(argv)
    assert "trainer.loss=plain" not in argv and "trainer.packing=true" in argv
    argv, _ = peers.cmd_mistral_tune("matched", "b", tmp_path, run_dir)
    assert "trainer.loss=plain" in argv and not any(
        a.startswith(("model.dtype", "model.attn", "train.bf16")) for a in argv
    )
    argv, _ = peers.cmd_trl("matched_bf16", "b", tmp_path, run_dir)
    assert argv[argv.index("--bf16") + 1] == "true" and argv[argv.index("--packing") + 1] == "true"
    argv, _ = peers.cmd_llamafactory("matched_bf16", "b", tmp_path, run_dir)
    cfg = json.loads(Path(argv[-1]).read_text())
    assert cfg["bf16"] is True and cfg["use_cpu"] is True and cfg["packing"] is True
    assert "matched_bf16" not in peers.TOOLS["axolotl"][1]
    assert {"matched_sdpa", "matched_chunked_bf16_sdpa"} <= set(peers.TOOLS["mistral-tune"][1])
