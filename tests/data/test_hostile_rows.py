"""Hostile rows: every row is used or counted with a reason (data.on_error=skip), or stops the run with
``file:line`` (fail); nothing reaches the tokenizer or the model that would crash it.

The last test is property-style: a seeded generator writes files of random hostile JSON lines (wrong
types, empty lists, lone surrogates, deep nesting, huge lines, BOMs, bad bytes) and feeds them through
the SFT and DPO loaders with the real tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.data.preference import prepare_preference_data
from mistral_tune.data.sft import prepare_sft_data
from tests.helpers import chat, good_rows, write_lines

DEEP = "[" * 200_000 + "]" * 200_000  # deeper than the JSON parser's recursion limit
SURROGATE = '{"messages": [{"role": "user", "content": "x \\ud800"}, {"role": "assistant", "content": "y"}]}'


def sft_cfg(path: Path, *overrides: str):
    return compose("sft_lora", [f"data.path={path}", "data.holdout=0", "trainer.max_length=64", *overrides])


def dpo_cfg(path: Path, *overrides: str):
    return compose("dpo_lora", [f"data.path={path}", "data.holdout=0", "trainer.max_length=64", *overrides])


def prepare_sft(cfg, tokenizer):
    return prepare_sft_data(cfg.data, cfg.trainer, tokenizer)


def prepare_dpo(cfg, tokenizer):
    return prepare_preference_data(cfg.data, cfg.trainer, tokenizer)


def pair(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def balanced(report: dict) -> bool:
    return report["read"] == report["used"] + report["held_out"] + report["dropped_total"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def test_empty_messages_list_is_a_counted_drop_in_train_and_eval(tmp_path, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [*good_rows(6), '{"messages": []}'])
    evals = write_lines(tmp_path / "eval.jsonl", [*good_rows(3), '{"messages": []}'])
    prepared = prepare_sft(sft_cfg(train, f"data.eval_split={evals}"), tokenizer)
    report = prepared.report.as_dict()
    assert report["dropped"] == {"no_assistant_turn": 1} and report["used"] == 6 and balanced(report)
    assert report["eval_used"] == 3 and report["eval_dropped"] == {"no_assistant_turn": 1}


@pytest.mark.parametrize("prepare,cfg,good", [(prepare_sft, sft_cfg, None), (prepare_dpo, dpo_cfg, "pair")])
def test_lone_surrogate_is_counted_as_invalid_utf8(tmp_path, tokenizer, prepare, cfg, good):
    rows = good_rows(6) if good is None else [pair(f"q{i}", f"good {i}", f"bad {i}") for i in range(6)]
    hostile = SURROGATE if good is None else '{"prompt": "x \\ud800", "chosen": "a", "rejected": "b"}'
    path = write_lines(tmp_path / "s.jsonl", [*rows, hostile])
    report = prepare(cfg(path, "data.on_error=skip"), tokenizer).report.as_dict()
    assert report["dropped"] == {"invalid_utf8": 1} and report["used"] == 6 and balanced(report)
    assert report["bad_lines"] == [f"{path}:7: not valid UTF-8 (lone surrogate '\\ud800')"]
    with pytest.raises(UserError, match=r"s\.jsonl:7: not valid UTF-8 \(lone surrogate"):
        prepare(cfg(path), tokenizer)


def test_deeply_nested_line_is_counted_or_named(tmp_path, tokenizer):
    path = write_lines(tmp_path / "deep.jsonl", [*good_rows(4), DEEP, *good_rows(2)])
    report = prepare_sft(sft_cfg(path, "data.on_error=skip"), tokenizer).report.as_dict()
    assert report["dropped"] == {"malformed_json": 1} and report["used"] == 6 and balanced(report)
    with pytest.raises(UserError, match=r"deep\.jsonl:5: malformed JSON \(nested too deeply\)"):
        prepare_sft(sft_cfg(path), tokenizer)


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet at all", b"PAR1\x00\x00\x00\x00PAR1"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_unreadable_parquet_is_one_clear_error(tmp_path, tokenizer, content, on_error):
    path = tmp_path / "bad.parquet"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable parquet file"):
        prepare_sft(sft_cfg(path, f"data.on_error={on_error}"), tokenizer)


def test_bom_then_blank_first_line_is_tolerated(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf", *good_rows(3)])
    report = prepare_sft(sft_cfg(path), tokenizer).report.as_dict()
    assert report["used"] == 3 and report["dropped_total"] == 0


def test_wrong_typed_content_is_a_missing_field(tmp_path, tokenizer):
    wrong = json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]})
    path = write_lines(tmp_path / "t.jsonl", [*good_rows(3), wrong, chat("   ", "blank user turn")])
    report = prepare_sft(sft_cfg(path), tokenizer).report.as_dict()
    assert report["dropped"] == {"missing_field": 1, "empty_field": 1}


# ---- property-style: random hostile files ----------------------------------------------------------------

WRONG = [None, 0, -1, 3.5, True, "", "   ", [], {}, [[]], {"a": 1}, "\ud800", "\udfff x", "\u0000", "x" * 3]


def hostile_value(rng: random.Random):
    return rng.choice([*WRONG, "fine text", rng.choice(WRONG)])


def hostile_message(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return hostile_value(rng)
    role = rng.choice(["user", "assistant", "system", "tool", "", None, 7, "\ud800"])
    content = rng.choice(["hello", "", " ", None, 3, ["a"], {"b": 1}, "x \ud800 y", "z" * rng.randrange(1, 3000)])
    message = {"role": role, "content": content}
    if kind == 1:
        message.pop(rng.choice(["role", "content"]))
    return message


def hostile_sft_line(rng: random.Random) -> str | bytes:
    kind = rng.randrange(12)
    if kind == 0:
        return chat(f"question {rng.random()}", f"answer {rng.random()}")
    if kind == 1:
        return json.dumps({"messages": [hostile_message(rng) for _ in range(rng.randrange(0, 4))]})
    if kind == 2:
        return json.dumps({"messages": hostile_value(rng)})
    if kind == 3:
        return json.dumps({"text": hostile_value(rng)})
    if kind == 4:
        depth = rng.choice([10, 900, 5000, 100_000])
        return '{"messages": ' + "[" * depth + "]" * depth + "}"
    if kind == 5:
        return rng.choice([b"\xff\xfe{}", b'{"text": "caf\xe9"}', b"\xc3", b"\xed\xa0\x80"])  # bad UTF-8
    if kind == 6:
        return rng.choice(["[1, 2]", "null", "42", '"a string"', "{", '{"messages": [}', "\ufeff{}", "\x00"])
    if kind == 7:
        return chat("huge " * rng.randrange(2000, 20000), "still an answer")
    if kind == 8:
        return json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\ud83d"}]})
    if kind == 9:
        return chat("same question", "same answer")  # duplicates
    if kind == 10:
        return json.dumps({"instruction": hostile_value(rng), "output": hostile_value(rng), "messages": None})
    key = hostile_value(rng)
    return json.dumps({key if isinstance(key, str) else "k": hostile_value(rng)})  # odd keys, no format field


def hostile_dpo_line(rng: random.Random) -> str | bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return pair(f"q {rng.random()}", "good", "bad")
    if kind == 1:
        return json.dumps(
            {k: hostile_value(rng) for k in rng.sample(["prompt", "chosen", "rejected"], rng.randrange(4))}
        )
    if kind == 2:
        msgs = [[hostile_message(rng) for _ in range(rng.randrange(0, 3))] for _ in range(2)]
        return json.dumps({"prompt": "p", "chosen": msgs[0], "rejected": msgs[1]})
    if kind == 3:
        return '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}"
    if kind == 4:
        return pair("x \ud800", "a", "b")
    if kind == 5:
        return rng.choice([b"\xff", "[]", "{", "\ufeff{}"])
    if kind == 6:
        return pair("long " * 3000, "c", "r")
    return pair("same", "same good", "same bad")


def write_hostile(path: Path, rng: random.Random, line, n: int, good: list) -> Path:
    lines = [line(rng) for _ in range(n)] + good
    rng.shuffle(lines)
    if rng.random() < 0.5:
        first = lines[0] if isinstance(lines[0], bytes) else lines[0].encode("utf-8", "surrogatepass")
        lines[0] = b"\xef\xbb\xbf" + first  # a BOM on the first line
    with path.open("wb") as f:
        for item in lines:
            raw = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
            f.write(raw.replace(b"\n", b" ") + b"\n")
    return path


def nonblank_lines(path: Path) -> int:
    lines = path.read_bytes().split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for line in lines if line.strip())


@pytest.mark.parametrize("seed", range(4))
def test_random_hostile_files_every_row_used_or_counted(tmp_path, tokenizer, seed):
    rng = random.Random(seed)
    cases = [
        (sft_cfg, prepare_sft, hostile_sft_line, [chat(f"good {i}", f"reply {i}") for i in range(4)]),
        (dpo_cfg, prepare_dpo, hostile_dpo_line, [pair(f"good {i}", f"yes {i}", f"no {i}") for i in range(4)]),
    ]
    for cfg, prepare, line, good in cases:
        path = write_hostile(tmp_path / f"{line.__name__}.jsonl", rng, line, 60, good)
        extra = [
            f"data.dedup={rng.choice(['true', 'false'])}",
            f"trainer.truncation={rng.choice(['drop', 'truncate'])}",
        ]
        prepared = prepare(cfg(path, "data.on_error=skip", f"data.holdout={rng.randrange(3)}", *extra), tokenizer)
        report = prepared.report.as_dict()
        assert report["read"] == nonblank_lines(path), f"seed {seed}: a line was neither used nor counted"
        assert balanced(report), report
        assert report["used"] == len(prepared.train) >= 4 and report["held_out"] == len(prepared.holdout)
        assert all(n > 0 for n in report["dropped"].values())
