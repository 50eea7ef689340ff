"""Data loading, format detection, templating and loss masks."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

import mistral_tune.data.sft as data
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.data.sft import prepare_sft_data
from tests.helpers import chat, good_rows, hostile_file, write_lines
from tests.helpers import write_jsonl as _write_jsonl


@pytest.fixture(scope="module")
def tok(chat_tokenizer):
    return chat_tokenizer


write_jsonl = partial(_write_jsonl, as_str=True)  # this file's copy returned a str


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def data_cfg(path: Path, **overrides):
    args = [f"data.path={path}", "data.holdout=0", "trainer.max_length=64"]
    return compose("sft_lora", args + [f"{k}={v}" for k, v in overrides.items()])


def _groups(cfg):
    return cfg.data, cfg.trainer


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"text": "hello"}, "text"),
    ],
)
def test_detects_formats(row, fmt):
    assert data.detect_format([row]) == fmt


def test_unknown_columns_name_columns_and_formats():
    with pytest.raises(UserError) as err:
        data.detect_format([{"question": "q", "answer": "a"}])
    msg = str(err.value)
    assert "answer" in msg and "question" in msg and "alpaca" in msg and "messages" in msg


def test_alpaca_becomes_one_chat_turn():
    msgs = data.to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", None)
    assert msgs == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]


def test_chat_labels_cover_only_the_answer_and_eos(tok):
    report = DataReport()
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}]
    (ex,) = data.tokenize_rows(
        rows, "messages", tok, max_length=64, truncation="truncate", system_prompt=None, report=report
    )
    ids, labels = ex["input_ids"], ex["labels"]
    # mistral-common encodes the prompt and the answer as separate sentencepiece pieces
    assert ids == tok.encode("[INST] Hi [/INST]") + tok.encode("Hello there.", add_bos=False) + [tok.eos_id]
    learned = [t for t in labels if t != -100]
    assert tok.decode(learned) == "Hello there." and learned[-1] == tok.eos_id


def test_text_rows_learn_every_token_and_end_with_eos(tok):
    report = DataReport()
    (ex,) = data.tokenize_rows(
        [{"text": "one two"}], "text", tok, max_length=64, truncation="truncate", system_prompt=None, report=report
    )
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_id


def test_truncation_and_drops_are_counted(tok):
    long = {"messages": [{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "y " * 50}]}
    bad = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "z"}]}
    report = DataReport()
    out = data.tokenize_rows(
        [long, bad], "messages", tok, max_length=70, truncation="truncate", system_prompt=None, report=report
    )
    assert len(out) == 1 and len(out[0]["input_ids"]) == 70 and report.truncated == 1
    assert report.dropped["empty_field"] == 1
    report = DataReport()
    out = data.tokenize_rows(
        [long], "messages", tok, max_length=70, truncation="drop", system_prompt=None, report=report
    )
    assert out == [] and report.dropped["too_long"] == 1


def test_prepare_holds_out_and_reports(tmp_path, tok, compose):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ]
    cfg = compose("sft_lora", [f"data.path={write_jsonl(tmp_path / 'd.jsonl', rows)}", "data.holdout=3"])
    prepared = data.prepare_sft_data(cfg.data, cfg.trainer, tok)
    ds, holdout, fmt, report = prepared.train, prepared.holdout, prepared.format, prepared.report
    assert fmt == "messages" and len(ds) == 7 and len(holdout) == 3 and prepared.eval is None
    assert report.as_dict() == {
        "read": 10,
        "used": 7,
        "held_out": 3,
        "truncated": 0,
        "duplicates": 0,
        "extra_fields": 0,
        "dropped": {},
        "dropped_total": 0,
        "bad_lines": [],
        "eval_read": 0,
        "eval_used": 0,
        "eval_dropped": {},
        "truncated_parts": {},
        "drop_examples": {},
        "length_notice": None,
        "assistant_turns": 7,
        "assistant_turns_skipped": 0,
        "tool_rows": 0,
        "tool_call_ids_fixed": 0,
    }


def test_on_error_skip_counts_every_bad_line_and_row(tmp_path, tokenizer):
    cfg = data_cfg(hostile_file(tmp_path), **{"data.on_error": "skip", "trainer.truncation": "drop"})
    prepared = prepare_sft_data(cfg.data, cfg.trainer, tokenizer)
    ds, fmt, report = prepared.train, prepared.format, prepared.report
    d = report.as_dict()
    assert fmt == "messages"
    assert d["dropped"] == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "empty_field": 1,
        "too_long": 1,
    }
    assert d["duplicates"] == 1  # counted, kept (dedup is off)
    assert d["extra_fields"] == 1
    assert [b.split(": ")[0].rsplit(":", 1)[1] for b in d["bad_lines"]] == ["21", "22", "23"]
    assert d["used"] == len(ds) == 20 + 1 + 2  # good rows + the extra-field row + both copies of the duplicate
    assert d["read"] == d["used"] + d["held_out"] + d["dropped_total"] == 29


def test_dedup_drops_duplicates_and_counts_them(tmp_path, tokenizer):
    lines = good_rows(10) + good_rows(3)  # three exact duplicates
    cfg = data_cfg(write_lines(tmp_path / "dups.jsonl", lines), **{"data.dedup": "true"})
    prepared = prepare_sft_data(cfg.data, cfg.trainer, tokenizer)
    ds, report = prepared.train, prepared.report
    assert report.duplicates == 3 and report.dropped["duplicate"] == 3
    assert len(ds) == 10


def test_long_samples_truncated_or_dropped_per_config(tmp_path, tokenizer):
    lines = good_rows(5) + [chat("Long " * 200, "answer"), chat("Short question?", "Long answer " * 100)]
    path = write_lines(tmp_path / "long.jsonl", lines)
    prepared = prepare_sft_data(*_groups(data_cfg(path)), tokenizer)
    ds, report = prepared.train, prepared.report
    # Truncation keeps the second one (assistant tokens survive) but must drop the first: its
    # assistant turn is cut off entirely, so no loss token is left.
    assert report.truncated == 1 and report.dropped["no_loss_tokens"] == 1
    assert max(len(x) for x in ds["input_ids"]) == 64
    prepared = prepare_sft_data(*_groups(data_cfg(path, **{"trainer.truncation": "drop"})), tokenizer)
    ds, report = prepared.train, prepared.report
    assert report.truncated == 0 and report.dropped["too_long"] == 2 and len(ds) == 5


def test_all_bad_lines_skipped_leaves_clear_error(tmp_path, tokenizer):
    cfg = data_cfg(write_lines(tmp_path / "bad.jsonl", ["{", "nope"]), **{"data.on_error": "skip"})
    with pytest.raises(UserError, match="holds no examples.*malformed_json"):
        prepare_sft_data(cfg.data, cfg.trainer, tokenizer)


SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                       {"from": "gpt", "value": "Paris."}]},
    {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"},
                       {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "6"}]},
]  # fmt: skip


def test_sharegpt_is_detected_and_reads_like_messages(tmp_path, tok):
    assert data.detect_format(SHAREGPT) == "sharegpt"
    as_messages = [
        {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]}
                      for m in row["conversations"]]}
        for row in SHAREGPT
    ]  # fmt: skip
    cfg = data_cfg(write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT))
    prepared = prepare_sft_data(*_groups(cfg), tok)
    assert prepared.format == "sharegpt" and prepared.report.used == 2 and not prepared.report.dropped
    expected = prepare_sft_data(*_groups(data_cfg(write_jsonl(tmp_path / "m.jsonl", as_messages))), tok)
    assert prepared.train["input_ids"] == expected.train["input_ids"]
    assert prepared.train["labels"] == expected.train["labels"]


@pytest.mark.parametrize(
    "row,detail",
    [
        ({"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
         "messages[0] has no 'role'; found keys from, value (that is ShareGPT's layout"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["Yo"]}]},
         "messages[1].content is a list, not a string"),
        ({"messages": []}, "'messages' is an empty list"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
         "conversations[1].from='bot' is not one of human, user, gpt, assistant, system"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]},
         "conversations[1].value is empty"),
        ({"instruction": "Say hi", "output": 3}, "'output' is a int, not a string"),
    ],
)  # fmt: skip
def test_a_bad_row_error_names_the_field(tmp_path, tok, row, detail):
    from mistral_tune.data.preflight import check_data

    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    cfg = data_cfg(write_jsonl(tmp_path / "bad.jsonl", [good, row, row]))
    # The data check (the run's first step) names the row; tokenizing later counts it with the same detail.
    assert check_data(cfg.data, preference=False)["usable"] == 1
    cfg = data_cfg(write_jsonl(tmp_path / "bad.jsonl", [row]))
    with pytest.raises(UserError) as err:
        check_data(cfg.data, preference=False)
    assert f"(first: row 1: {detail}" in str(err.value) and "max_length" not in str(err.value)
    with pytest.raises(UserError) as err:
        prepare_sft_data(*_groups(cfg), tok)
    assert f"(first: {detail}" in str(err.value)
    assert "max_length" not in str(err.value)  # the old, unrelated hint


ALPACA_5000 = Path("/work/shared/data/alpaca_5000.json")


@pytest.mark.skipif(not ALPACA_5000.is_file(), reason="the real Alpaca 5000 file is not on this machine")
def test_real_alpaca_file_checks_every_row_fast():
    import json

    from mistral_tune.data.preflight import check_data

    rows = json.loads(ALPACA_5000.read_text(encoding="utf-8"))
    blank = sum(1 for r in rows if not r["output"].strip())  # the real file has a few empty answers
    result = check_data(data_cfg(ALPACA_5000).data, preference=False)
    assert result["format"] == "alpaca" and result["rows"] == len(rows) and result["usable"] == len(rows) - blank
    assert result["seconds"] < 5
