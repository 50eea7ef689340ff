"""Hostile inputs: malformed lines, bad bytes, missing/extra/empty fields, long and duplicate rows, bad paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.data.sft import prepare_sft_data
from mistral_tune.data.sources import load_records, read_jsonl, resolve_local_path
from mistral_tune.models.sources import resolve_source
from mistral_tune.models.tokenizer import load_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sft_sample.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_source("mistral_tiny"))


def good_rows(n: int) -> list[str]:
    return SAMPLE.read_text(encoding="utf-8").splitlines()[:n]


def write_lines(path: Path, lines: list) -> Path:
    with path.open("wb") as f:
        for line in lines:
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def chat(user: str, assistant: str, **extra) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}
    )


def hostile_file(tmp_path: Path) -> Path:
    """20 good rows plus one of each kind of trouble, at known line numbers."""
    lines = good_rows(20)
    lines += [
        '{"messages": [{"role": "user", "content": "hi"}',  # line 21: malformed JSON
        b'{"text": "caf\xe9"}',  # line 22: Latin-1 byte, not UTF-8
        "[1, 2, 3]",  # line 23: not an object
        json.dumps({"prompt": "no messages field"}),  # missing field
        chat("", "an empty user turn"),  # empty string
        chat("Say hi.", "Hi.", id=7, source="extra fields are ignored"),  # extra fields, still used
        chat("Repeat this.", "Repeat."),
        chat("Repeat this.", "Repeat."),  # exact duplicate of the line above
        chat("Long " * 200, "too long for max_length=64"),
    ]
    return write_lines(tmp_path / "hostile.jsonl", lines)


def data_cfg(path: Path, **overrides):
    args = [f"data.path={path}", "data.holdout=0", "trainer.max_length=64"]
    return compose("sft_lora", args + [f"{k}={v}" for k, v in overrides.items()])


def test_malformed_line_fails_with_file_and_line(tmp_path):
    path = hostile_file(tmp_path)
    with pytest.raises(UserError, match=rf"{path}:21: malformed JSON.*data.on_error=skip"):
        read_jsonl(path)


def test_non_utf8_line_fails_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [*good_rows(3), b'{"text": "caf\xe9"}'])
    with pytest.raises(UserError, match=rf"{path}:4: not valid UTF-8"):
        read_jsonl(path)


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


def _groups(cfg):
    return cfg.data, cfg.trainer


def test_json_file_with_non_object_elements(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "a b"}, "stray string", {"text": "c d"}]), encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.json\[1\]: expected a JSON object"):
        load_records(str(path))
    report = DataReport()
    assert len(load_records(str(path), on_error="skip", report=report)) == 2
    assert report.dropped["not_an_object"] == 1


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a b"}).encode() + b"\n")
    assert read_jsonl(path) == [{"text": "a b"}]


def test_all_bad_lines_skipped_leaves_clear_error(tmp_path, tokenizer):
    cfg = data_cfg(write_lines(tmp_path / "bad.jsonl", ["{", "nope"]), **{"data.on_error": "skip"})
    with pytest.raises(UserError, match="holds no examples.*malformed_json"):
        prepare_sft_data(cfg.data, cfg.trainer, tokenizer)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: d, "is a directory"),
        (lambda d: d / "*.jsonl", "is a glob pattern"),
        (lambda d: d / "missing.jsonl", "no such file"),
        (lambda d: d / "notes.txt", "unsupported file type"),
    ],
)
def test_bad_data_paths_get_clear_messages(tmp_path, make, pattern):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=pattern):
        resolve_local_path(str(make(tmp_path)))
