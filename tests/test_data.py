"""Data loading, format detection, templating and loss masks."""

import json

import pytest

import mistral_tune.data.sft as data
from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.data.sources import load_records
from mistral_tune.models.tokenizer import MistralTokenizer


@pytest.fixture(scope="module")
def tok():
    return MistralTokenizer.from_version("v1", chat_template="v1")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


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
    }


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_and_parquet_files(tmp_path, suffix):
    rows = [{"text": "a b"}, {"text": "c d"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(str(path)) == rows


def test_missing_dir_and_glob_paths(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="directory"):
        load_records(str(tmp_path))
    with pytest.raises(UserError, match="glob"):
        load_records(str(tmp_path / "*.jsonl"))


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_records(str(p))


def test_hub_dataset_offline_fails_fast():
    with pytest.raises(UserError, match="offline"):
        load_records("someorg/somedataset")


def test_bundled_sample_data_is_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_records("data/sft_sample.jsonl")) == 400
