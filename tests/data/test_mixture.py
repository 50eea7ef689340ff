"""Weighted mixtures of data sources: the shorthand, directories, per-source formats, the weights, and
per-source counts (the end-to-end runs and the resume are in tests/pipeline/test_mixture_runs.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.data.mixture import COUNTS_KEY, SOURCE_COLUMN, SourceCountingCollator
from mistral_tune.data.sft import prepare_sft_data
from mistral_tune.data.sources import parse_weighted_paths, read_source_rows, resolve_sources
from tests.helpers import write_jsonl, write_lines


def data_cfg(path="data/sft_sample.jsonl", sources=(), **overrides):
    base = dict(path=path, sources=list(sources), format="auto", split="train", max_samples=None, holdout=0,
                system_prompt=None, seed=0, on_error="fail", dedup=False, eval_split=None,
                stopping_strategy="all_exhausted")  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


TRAINER = SimpleNamespace(max_length=128, truncation="truncate", completion_only_loss=True)


def chat_rows(n, tag="q"):
    return [{"messages": [{"role": "user", "content": f"{tag} {i}?"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(n)]  # fmt: skip


def text_rows(n):
    return [{"text": f"plain text number {i} for the language model"} for i in range(n)]


def test_shorthand_parsing():
    assert parse_weighted_paths("a.jsonl:5,b.jsonl:1") == [
        ("a.jsonl", 5.0, "data.path[0]"),
        ("b.jsonl", 1.0, "data.path[1]"),
    ]
    assert parse_weighted_paths("a.jsonl") == [("a.jsonl", None, "data.path")]
    assert parse_weighted_paths(" a.jsonl:0.5 , org/set ") == [
        ("a.jsonl", 0.5, "data.path[0]"),
        ("org/set", None, "data.path[1]"),
    ]
    with pytest.raises(UserError, match=r"data.path\[1\]='b.jsonl:x': the weight 'x' after ':' is not a number"):
        parse_weighted_paths("a.jsonl:1,b.jsonl:x")
    with pytest.raises(UserError, match="entry 2 is empty"):
        parse_weighted_paths("a.jsonl,")


def test_resolve_sources_from_path_and_from_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(3), as_str=True)
    b = write_jsonl(tmp_path / "b.jsonl", text_rows(3), as_str=True)
    specs = resolve_sources(data_cfg(f"{a}:5,{b}:1"))
    assert [(s.name, s.weight, s.key, s.format) for s in specs] == [
        (a, 5.0, "data.path[0]", "auto"), (b, 1.0, "data.path[1]", "auto")]  # fmt: skip
    # data.sources wins over data.path, keeps per-source formats; a single plain path is one source of weight 1
    specs = resolve_sources(data_cfg("unused.jsonl", [{"path": b, "format": "text", "weight": 2}, {"path": a}]))
    assert [(s.name, s.format, s.weight) for s in specs] == [(b, "text", 2.0), (a, "auto", 1.0)]
    assert [(s.name, s.weight, s.hub) for s in resolve_sources(data_cfg(a))] == [(a, 1.0, False)]
    assert resolve_sources(data_cfg("someorg/somedataset"))[0].hub


def test_every_bad_entry_in_one_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(3), as_str=True)
    (tmp_path / "empty").mkdir()
    bad = [{"path": a, "weight": 0}, {"path": a, "weight": -2}, {"path": a, "weight": float("nan")},
           {"path": a, "weight": "x"}, {"path": str(tmp_path / "nope.jsonl")}, {"path": str(tmp_path / "empty")},
           {"path": a, "format": "csv"}, {"path": a, "weight": True}]  # fmt: skip
    with pytest.raises(UserError) as info:
        resolve_sources(data_cfg(sources=bad))
    message = str(info.value)
    assert message.startswith("The data sources have problems:")
    for i in range(len(bad)):
        assert f"data.sources[{i}]" in message, message
    assert "no such file" in message and "no .jsonl file" in message and "'csv' is not one of" in message


def test_directory_source_reads_every_jsonl_file_with_file_and_line(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "b.jsonl", chat_rows(2, "b"))
    write_lines(shards / "a.jsonl", [json.dumps(chat_rows(1, "a")[0]), "{bad json", json.dumps(chat_rows(1, "a2")[0])])
    (shards / "notes.txt").write_text("not data")
    (spec,) = resolve_sources(data_cfg(str(shards)))
    assert [p.name for p in spec.files] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(UserError, match=rf"{shards / 'a.jsonl'}:2: malformed JSON"):
        read_source_rows(spec)
    from mistral_tune.data.report import DataReport

    report = DataReport()
    rows = read_source_rows(spec, on_error="skip", report=report)
    assert [where for where, _ in rows] == [f"{shards / 'a.jsonl'}:1", f"{shards / 'a.jsonl'}:3",
                                            f"{shards / 'b.jsonl'}:1", f"{shards / 'b.jsonl'}:2"]  # fmt: skip
    assert report.dropped == {"malformed_json": 1}


def test_directory_as_single_data_path_trains_on_all_files(tmp_path, tiny_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "0.jsonl", chat_rows(5, "x"))
    write_jsonl(shards / "1.jsonl", chat_rows(7, "y"))
    prepared = prepare_sft_data(data_cfg(str(shards)), TRAINER, tiny_tokenizer)
    assert prepared.report.read == prepared.report.used == 12 and len(prepared.train) == 12
    assert SOURCE_COLUMN not in prepared.train.column_names and not prepared.report.as_dict().get("sources")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_proportions_follow_the_weights(tmp_path, tiny_tokenizer, seed):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(300, "a"), as_str=True)
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(300, "b"), as_str=True)
    cfg = data_cfg(f"{a}:3,{b}:1", seed=seed)
    prepared = prepare_sft_data(cfg, TRAINER, tiny_tokenizer)
    drawn = Counter(ids[0] for ids in prepared.train[SOURCE_COLUMN])
    n = len(prepared.train)
    # all_exhausted: the pass ends once the weight-1 source has given all of its 300 rows
    assert drawn[1] >= 300 and drawn[0] > 2 * drawn[1]
    share = drawn[0] / n
    assert abs(share - 0.75) < 3 * math.sqrt(0.75 * 0.25 / n) + 1e-3, (share, n)  # within 3 sigma
    sources = prepared.report.as_dict()["sources"]
    assert [s["in_one_pass"] for s in sources] == [drawn[0], drawn[1]]
    assert [s["share"] for s in sources] == [0.75, 0.25] and prepared.report.mixture["examples_per_pass"] == n
    # the same seed gives the same mixture, another seed another one
    again = prepare_sft_data(cfg, TRAINER, tiny_tokenizer)
    assert again.train["input_ids"] == prepared.train["input_ids"]
    other = prepare_sft_data(data_cfg(f"{a}:3,{b}:1", seed=seed + 10), TRAINER, tiny_tokenizer)
    assert other.train["input_ids"] != prepared.train["input_ids"]


def test_first_exhausted_repeats_no_row(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(100, "a"), as_str=True)
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(400, "b"), as_str=True)
    prepared = prepare_sft_data(data_cfg(f"{a}:1,{b}:1", stopping_strategy="first_exhausted"), TRAINER, tiny_tokenizer)
    ids = [tuple(x) for x in prepared.train["input_ids"]]
    assert len(set(ids)) == len(ids)  # no row twice
    drawn = Counter(x[0] for x in prepared.train[SOURCE_COLUMN])
    assert drawn[0] == 100 and 60 <= drawn[1] <= 140  # ends when the 100-row source ran out; b about as often


def test_text_mixes_with_instruction_data(tmp_path, tiny_tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40), as_str=True)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Add {i} and 1.", "output": str(i + 1)}
                                                     for i in range(40)], as_str=True)  # fmt: skip
    text = write_jsonl(tmp_path / "text.jsonl", text_rows(40), as_str=True)
    cfg = data_cfg(sources=[{"path": text, "weight": 1}, {"path": chat, "weight": 1}, {"path": alpaca, "weight": 1}],
                   holdout=2)  # fmt: skip
    prepared = prepare_sft_data(cfg, TRAINER, tiny_tokenizer)
    assert [s["format"] for s in prepared.report.sources] == ["text", "messages", "alpaca"]
    assert prepared.format == "messages" and len(prepared.holdout) == 2  # from the first chat source
    assert all("messages" in r for r in prepared.holdout)
    seen = set()
    for ids, labels, src in zip(prepared.train["input_ids"], prepared.train["labels"], prepared.train[SOURCE_COLUMN]):
        seen.add(src[0])
        if src[0] == 0:  # text: every token is trained
            assert labels == ids
        else:  # chat and alpaca: the user turn is masked, the answer trained
            assert -100 in labels and any(t != -100 for t in labels)
    assert seen == {0, 1, 2}
    report = prepared.report
    assert report.read == 120 and report.used == 118 and report.held_out == 2
    assert [s["used"] for s in report.sources] == [40, 38, 40]


def test_a_source_with_nothing_usable_is_named(tmp_path, tiny_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(5), as_str=True)
    empty_turns = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3,
                              as_str=True)  # fmt: skip
    with pytest.raises(UserError, match=r"data.path\[1\]=.*bad.jsonl: no training examples left.*no_assistant_turn"):
        prepare_sft_data(data_cfg(f"{good}:1,{empty_turns}:1"), TRAINER, tiny_tokenizer)


def test_collator_counts_examples_and_tokens_per_source():
    from mistral_tune.data.packing import PackedRowsCollator

    collate = SourceCountingCollator(PackedRowsCollator(pad_token_id=0), num_sources=3)
    packed = {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [2, 3],
              SOURCE_COLUMN: [2, 2, 0, 0, 0]}  # fmt: skip
    single = {"input_ids": [1, 2, 3], "labels": [1, 2, 3], SOURCE_COLUMN: [0, 0, 0]}
    batch = collate([packed, single])
    assert batch[COUNTS_KEY].tolist() == [[2, 6], [0, 0], [1, 2]]
    assert batch["input_ids"].shape == (2, 5)
    assert COUNTS_KEY not in collate([{"input_ids": [1, 2], "labels": [1, 2]}])  # eval rows: no source column


def test_preference_trainers_refuse_mixtures(compose):
    with pytest.raises(UserError, match="takes one preference source"):
        compose("dpo_lora", ["data.path='a.jsonl:1,b.jsonl:1'"])


def test_schema_checks_source_weights(compose):
    with pytest.raises(UserError, match=r"data.sources\[0\].weight=-1.0 must be a finite number > 0"):
        compose("sft_lora", ["data.sources=[{path: data/sft_sample.jsonl, weight: -1}]"])
    with pytest.raises(UserError, match=r"data.sources\[0\] has no path"):
        compose("sft_lora", ["data.sources=[{weight: 2}]"])
    with pytest.raises(
        UserError, match="Unknown key 'pth' in a data.sources entry .*an entry has path, format, weight"
    ):
        compose("sft_lora", ["data.sources=[{pth: a.jsonl}]"])
    with pytest.raises(UserError, match="Bad value for 'weight' in a data.sources entry"):
        compose("sft_lora", ["data.sources=[{path: a.jsonl, weight: lots}]"])
    with pytest.raises(UserError, match="data.stopping_strategy='sometimes' is not one of"):
        compose("sft_lora", ["data.stopping_strategy=sometimes"])
    cfg = compose(
        "sft_lora", ["data.sources=[{path: data/sft_sample.jsonl, weight: 5}, {path: data/text_sample.jsonl}]"]
    )
    assert [(s.path, s.weight, s.format) for s in cfg.data.sources] == [
        ("data/sft_sample.jsonl", 5.0, "auto"), ("data/text_sample.jsonl", 1.0, "auto")]  # fmt: skip


def test_check_data_reports_each_source(compose):
    from mistral_tune.data.preflight import check_data

    cfg = compose("sft_lora", ["data.path='data/sft_sample.jsonl:3,data/text_sample.jsonl:1'"])
    result = check_data(cfg.data, preference=False)
    assert result["rows"] == 450 and result["format"] == "messages+text"
    assert [(s["name"], s["weight"], s["rows"]) for s in result["sources"]] == [
        ("data/sft_sample.jsonl", 3.0, 400), ("data/text_sample.jsonl", 1.0, 50)]  # fmt: skip


def test_eval_fraction_and_max_samples_apply_per_source(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(40, "a"), as_str=True)
    b = write_jsonl(tmp_path / "b.jsonl", text_rows(20), as_str=True)
    cfg = data_cfg(f"{a}:1,{b}:1", eval_split="0.25", max_samples=25)
    prepared = prepare_sft_data(cfg, TRAINER, tiny_tokenizer)
    report = prepared.report
    assert report.eval_read == 10 + 5 and report.eval_used == len(prepared.eval) == 15
    assert SOURCE_COLUMN not in prepared.eval.column_names  # eval batches are not counted per source
    chat, text = report.sources
    assert (chat["used"], chat["dropped"]) == (25, {"over_max_samples": 5})  # 40 - 10 eval = 30, capped at 25
    assert (text["used"], text["dropped"]) == (15, {})
    train_ids = {tuple(x) for x in prepared.train["input_ids"]}
    assert not train_ids & {tuple(x) for x in prepared.eval["input_ids"]}  # no eval row is trained on


def test_the_resume_fingerprint_covers_the_weights_and_the_sources(tmp_path, tiny_tokenizer):
    from mistral_tune.train.resume import dataset_fingerprint

    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(30, "a"), as_str=True)
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(30, "b"), as_str=True)

    def fingerprint(path, **overrides):
        return dataset_fingerprint(prepare_sft_data(data_cfg(path, **overrides), TRAINER, tiny_tokenizer).train)

    same = fingerprint(f"{a}:2,{b}:1")
    assert fingerprint(f"{a}:2,{b}:1") == same
    assert len({same, fingerprint(f"{a}:3,{b}:1"), fingerprint(f"{b}:2,{a}:1"),
                fingerprint(f"{a}:2,{b}:1", stopping_strategy="first_exhausted")}) == 4  # fmt: skip


def test_data_check_names_file_and_line_inside_a_directory_source(tmp_path):
    from mistral_tune.data.preflight import check_data

    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", chat_rows(3))
    call = {"id": "not-nine!", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    bad = {"messages": [{"role": "user", "content": "call f"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "not-nine!", "content": "1"},
                        {"role": "assistant", "content": "done"}]}  # fmt: skip
    write_jsonl(shards / "b.jsonl", [*chat_rows(2), bad])
    with pytest.raises(UserError, match=rf"^{shards / 'b.jsonl'}:3: .*bad_tool_call_id"):
        check_data(data_cfg(f"{shards}:1,data/text_sample.jsonl:1"), preference=False)
