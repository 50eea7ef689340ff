"""Hostile inputs: malformed lines, bad bytes, missing/extra/empty fields, long and duplicate rows, bad paths."""

from __future__ import annotations

import json

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.data.sources import load_records, read_jsonl, resolve_local_path
from tests.helpers import good_rows, hostile_file, write_lines


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


def test_malformed_line_fails_with_file_and_line(tmp_path):
    path = hostile_file(tmp_path)
    with pytest.raises(UserError, match=rf"{path}:21: malformed JSON.*data.on_error=skip"):
        read_jsonl(path)


def test_non_utf8_line_fails_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [*good_rows(3), b'{"text": "caf\xe9"}'])
    with pytest.raises(UserError, match=rf"{path}:4: not valid UTF-8"):
        read_jsonl(path)


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
