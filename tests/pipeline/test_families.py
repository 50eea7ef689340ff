"""Every model family's tiny random-weight preset through the whole pipeline, as CI runs it.

For each family (v3 SentencePiece; Tekken with NeMo's head_dim; Ministral's interleaved sliding/full
layers on Tekken; Mixtral MoE on v1), each with its real tokenizer:
train a few steps with sft_lora, sft_qlora and dpo_lora, write the merged export (verified logit for
logit by the pipeline itself), reload it with plain transformers, and generate greedily with the same
tokens as transformers' own ``generate``. Shapes and steps are small: the module took 85 s on the
2-core dev machine (12 runs), and 5 minutes while other jobs loaded it (load average 8-11).
"""

from __future__ import annotations

import json

import pytest
import torch

from mistral_tune.models.presets import PRESETS
from tests.helpers import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

FAMILIES = ["mistral_0.3_tiny", "mistral_nemo_tiny", "ministral_tiny", "mixtral_tiny"]
RECIPES = ["sft_lora", "sft_qlora", "dpo_lora"]

FAST = [
    "train.max_steps=3",
    "train.per_device_train_batch_size=2",
    "train.logging_steps=1",
    "train.save_steps=1000",
    "trainer.max_length=96",
    "export.num_samples=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(family, recipe) -> run directory, each trained and exported in this process."""
    from mistral_tune.config.compose import compose
    from mistral_tune.pipeline.run import run

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        for recipe in RECIPES:
            run_dir = root / f"{family}-{recipe}"
            run(compose(recipe, [f"model={family}", f"output_dir={run_dir}", *FAST]))
            out[family, recipe] = run_dir
    return out


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_and_writes_a_verified_merged_export(runs, family, recipe):
    run_dir = runs[family, recipe]
    summary = json.loads((run_dir / "summary.json").read_text())
    merged = summary["merged"]
    assert merged["verified"] and merged["max_abs_logit_diff"] <= merged["tolerance"]
    # the check can tell the fine-tune from the base: the adapter moved the logits well past the tolerance
    assert merged["fine_tune_max_abs_logit_shift"] > 10 * merged["tolerance"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    config = json.loads((run_dir / "merged" / "config.json").read_text())
    assert config["architectures"] == [PRESETS[family].architecture]
    if PRESETS[family].is_moe:
        # the router's load-balancing loss was in the training loss, and logged (TRL's name for DPO too)
        assert all(r["aux_loss"] > 0 for r in records if "loss" in r)
        assert config["num_local_experts"] == 4 and config["output_router_logits"] is False
    if recipe == "sft_qlora":
        assert merged["reference"] == "dequantized 4-bit base + adapter"
        record = json.loads((run_dir / "adapter" / "mistral_tune_adapter.json").read_text())["quantization"]
        experts = [m for m in record["modules"] if ".block_sparse_moe.experts." in m]
        # Mixtral's experts were trained in NF4 (4 experts x w1/w3/w2 x 2 layers) and merged as such
        assert len(experts) == (24 if PRESETS[family].is_moe else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_reloads_in_transformers_and_generates_as_its_generate(runs, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mistral_tune import MistralCausalLM

    merged_dir = runs[family, "sft_lora"] / "merged"
    hf_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert type(hf_model).__name__ == PRESETS[family].architecture
    assert hf_tok.pad_token_id != hf_tok.eos_token_id

    lm = MistralCausalLM.from_preset(str(merged_dir))
    lm.compile(sampler="greedy")
    conversation = [{"role": "user", "content": "Name three colours."}]
    prompt = lm.tokenizer.apply_chat_template(conversation)
    assert prompt == hf_tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
    new_tokens = 24
    ours = lm.generate(conversation, max_length=len(prompt) + new_tokens, stop_token_ids=None, strip_prompt=True)
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )[0, len(prompt) :]
    assert len(theirs) == new_tokens
    assert ours == lm.tokenizer.decode(theirs.tolist())


def test_mixtral_qlora_through_the_cli_trains_with_4bit_experts(tmp_path, caplog):
    """recipe=sft_qlora model=mixtral_tiny from the command line: the experts are stored in NF4, the loss on
    the same two examples falls step after step, and the merged export verifies against the 4-bit model."""
    from mistral_tune import cli

    run_dir = tmp_path / "run"
    args = [
        "recipe=sft_qlora",
        "model=mixtral_tiny",
        f"output_dir={run_dir}",
        "train.max_steps=5",
        "train.per_device_train_batch_size=2",
        "data.max_samples=2",
        "train.warmup_steps=0",
        "train.logging_steps=1",
        "train.save_steps=1000",
        "trainer.max_length=48",
        "export.num_samples=0",
    ]
    with caplog.at_level("INFO"):
        assert cli.main(args) == 0
    assert "experts of 2 MoE layers stored in 4-bit nf4" in caplog.text
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    merged = json.loads((run_dir / "summary.json").read_text())["merged"]
    assert merged["verified"] and merged["max_abs_logit_diff"] <= merged["tolerance"]
    assert merged["dequantized_vs_4bit_max_abs_logit_diff"] < 1e-4
