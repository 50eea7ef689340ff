import json

import pytest


@pytest.mark.parametrize("split,expected", [("0.1", 0.1), ("data/eval.jsonl", None), (None, None)])
def test_eval_split_is_a_fraction_or_a_file(split, expected):
    from mistral_tune.config.schema import eval_fraction

    assert eval_fraction(split) == expected


def test_eval_split_from_a_file(tmp_path, compose):
    import mistral_tune.data.sft as data
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("sft_lora", [f"data.eval_split={tmp_path / 'eval.jsonl'}"])
    prepared = data.prepare_sft_data(cfg.data, cfg.trainer, load_tokenizer(resolve_source("mistral_tiny")))
    assert len(prepared.eval) == 5 and prepared.report.eval_read == 5 and prepared.format == "messages"
    assert len(prepared.train) == 396  # the file does not take rows from training


def test_eval_fraction_must_be_between_0_and_1(compose):
    from mistral_tune.core.errors import UserError

    with pytest.raises(UserError, match="data.eval_split=1.5 must be a fraction between 0 and 1, or a file"):
        compose("sft_lora", ["data.eval_split=1.5"])
