"""trainer.completion_only_loss (TRL SFTConfig's name) is read: true masks everything but the assistant
turns, false trains on every token of the conversation."""

import json

import pytest

from mistral_tune.data.sft import prepare_sft_data
from mistral_tune.models.tokenizer import MistralTokenizer


@pytest.fixture(scope="module")
def tok():
    return MistralTokenizer.from_version("v1", chat_template="v1")


def test_completion_only_loss_switches_the_mask(compose, tok, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(6)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"data.path={path}", "data.holdout=0"]
    masked = prepare_sft_data(*_groups(compose("sft_lora", base)), tok).train
    full = prepare_sft_data(*_groups(compose("sft_lora", [*base, "trainer.completion_only_loss=false"])), tok).train
    assert len(masked) == len(full) == 6
    for m, f in zip(masked, full):
        assert m["input_ids"] == f["input_ids"]
        assert f["labels"] == f["input_ids"]  # every token counts
        learned = [t for t in m["labels"] if t != -100]
        assert 0 < len(learned) < len(m["input_ids"])
        assert tok.decode(learned).startswith("answer")  # only the assistant turn (and EOS)


def _groups(cfg):
    return cfg.data, cfg.trainer
