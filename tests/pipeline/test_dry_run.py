"""`mistral-tune recipe=... dry_run=true`: sizes and estimates without weights, downloads or a run directory."""

import re

import pytest

from mistral_tune import cli
from mistral_tune.models.presets import PRESETS

QLORA_7B = [
    "recipe=sft_lora",
    "model=mistral_7b_en",
    "adapter.name=qlora",
    "trainer.max_length=2048",
    "train.per_device_train_batch_size=1",
    "train.gradient_checkpointing=true",
    "dry_run=true",
]


def test_dry_run_7b_qlora_prints_sizes_and_estimates(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # conftest points HF_ENDPOINT at an unroutable address: any download attempt would fail the run.
    assert cli.main([*QLORA_7B, "dry_run_gpu=A100"]) == 0
    out = capsys.readouterr().out
    lora = 32 * 8 * ((4096 + 4096) + (4096 + 1024))  # r * (in + out) for q_proj and v_proj, 32 layers
    assert f"{PRESETS['mistral_7b_en'].parameter_count + lora:,} total, {lora:,} trainable" in out
    assert "tokens/step  up to 2,048 = batch 1 x accumulation 1 x 1 device(s) x max_length 2048" in out
    for term in ("weights", "adapter + grads + optimizer", "activations", "recompute or logits peak", "peak"):
        assert re.search(rf"^  {re.escape(term)}\s+\d+\.\d\d GiB", out, re.M), term
    peak = float(re.search(r"^  peak\s+(\d+\.\d+) GiB", out, re.M).group(1))
    assert 4.5 <= peak <= 7.5
    assert "A100 SXM 80GB at 40% FLOPs utilization" in out
    assert "note: bitsandbytes" not in out  # dense: every linear layer is 4-bit
    assert re.search(r"s per optimizer step, [\d,]+ tokens/s", out)
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_returns_numbers_for_the_default_recipe(compose):
    from mistral_tune.pipeline.dry_run import dry_run

    cfg = compose("sft_lora", ["dry_run=true", "dry_run_gpu=L4", "dry_run_mfu=0.3"])
    result = dry_run(cfg)
    lora = 2 * 8 * ((256 + 256) + (256 + 128))  # 2 layers, r=8, q_proj 256->256 and v_proj 256->128
    assert result["parameters"] == {"trainable": lora, "total": PRESETS["mistral_tiny"].parameter_count + lora}
    assert result["tokens_per_step"] == 8 * 128  # batch 8 x max_length 128 in the recipe
    assert result["peak_memory_bytes"] == sum(result["memory_bytes"].values())  # the printed terms add up
    assert result["step_seconds"] > 0


def test_dry_run_rejects_a_max_length_beyond_the_model(capsys):
    assert cli.main(["recipe=sft_lora", "dry_run=true", "trainer.max_length=4096"]) == 2
    err = capsys.readouterr().err
    assert "max_position_embeddings=2048" in err and "Traceback" not in err


def test_dry_run_gpu_must_be_known(capsys):
    assert cli.main(["recipe=sft_lora", "dry_run=true", "dry_run_gpu=V100"]) == 2
    assert "dry_run_gpu='V100' is not one of H100, H200, A100, L4" in capsys.readouterr().err


def test_dry_run_checks_the_data_against_a_real_preset_limits(capsys, tmp_path, monkeypatch):
    """Long HH pairs on a 7B config: every row tokenized with the preset's tokenizer, offline; >= 95% kept."""
    from pathlib import Path

    hh = Path(__file__).resolve().parents[1] / "data" / "hh_long.jsonl"
    monkeypatch.chdir(tmp_path)
    for recipe in ("dpo_lora", "reward_lora"):
        args = [f"recipe={recipe}", "model=mistral_7b_en", f"data.path={hh}", "dry_run=true"]
        assert cli.main(args) == 0
        out = capsys.readouterr().out
        kept = re.search(r"^  (\d+) for training, (\d+) held out, 0 for evaluation; (\d+) truncated", out, re.M)
        used, held_out, truncated = map(int, kept.groups())
        assert used + held_out >= 0.95 * 80 and "dropped: none" in out and truncated <= used
        assert "at trainer.max_length=1024" in out
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


QLORA_2048 = [
    "recipe=sft_qlora",
    "trainer.max_length=2048",
    "train.per_device_train_batch_size=1",
    "train.gradient_checkpointing=true",
    "dry_run=true",
]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_dry_runs_offline(preset, compose):
    """Each built-in preset sizes up (QLoRA, seq 2048, H100) from its data alone: no hub, no weights."""
    from mistral_tune.pipeline.dry_run import dry_run

    p = PRESETS[preset]
    cfg = compose("sft_qlora", [f"model={preset}", *QLORA_2048[1:-1], "dry_run=true", "dry_run_gpu=H100"])
    result = dry_run(cfg)
    trainable, total = result["parameters"]["trainable"], result["parameters"]["total"]
    assert total == p.parameter_count + trainable and trainable > 0
    assert result["peak_memory_bytes"] > result["memory_bytes"]["weights"] > 0
    assert result["step_seconds"] > 0


def test_mixtral_qlora_dry_run_counts_the_experts_in_nf4(capsys):
    assert cli.main([*QLORA_2048, "model=mixtral_8x7b_en", "dry_run_gpu=H100"]) == 0
    out = capsys.readouterr().out
    # all-linear on a MoE model is the attention projections: 4 modules x 32 layers, r=16
    lora = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096))
    assert f"{46_702_792_704 + lora:,} total, {lora:,} trainable" in out
    assert "46.44B params in NF4 (4.127 bits) + 263M in fp32 (router, embeddings, norms, lm_head)" in out
    assert "fits one H100 SXM 80GB: yes" in out
    assert "note: the experts (3D tensors in transformers 5, not nn.Linear) are stored in NF4" in out
    # LoRA on the experts keeps them 16-bit (PEFT's LoRA on parameters), and the estimate says so
    args = [*QLORA_2048, "model=mixtral_8x7b_en", "dry_run_gpu=H100", "adapter.lora_dropout=0"]
    assert cli.main([*args, "adapter.target_modules=[q_proj,experts.down_proj]"]) == 0
    out = capsys.readouterr().out
    assert "in fp32 (experts (LoRA on them keeps them 16-bit), router, embeddings, norms, lm_head)" in out
    assert "fits one H100 SXM 80GB: no" in out and "note: LoRA on the experts keeps them unquantized" in out
