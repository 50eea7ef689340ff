"""Function-calling rows and per-turn weights in the data pipeline: reading (mistral-finetune and
OpenAI layouts), tool-call ids (checked, or generated with data.fix_tool_call_ids), the loss mask through
truncation and a real packed batch, the report's counts, and the data check's file:line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from datasets import Dataset

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.data.messages import BadRow, read_messages
from mistral_tune.data.packing import PackedRowsCollator, pack_examples
from mistral_tune.data.preflight import check_data
from mistral_tune.data.report import DataReport
from mistral_tune.data.sft import prepare_sft_data, to_messages, tokenize_rows
from mistral_tune.data.tools import check_tool_call_ids, check_tool_conversation, fix_tool_call_ids, read_tools
from mistral_tune.models.tokenizer import MistralTokenizer
from tests.helpers import read_jsonl, write_jsonl

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "tools_sample.jsonl"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def row(call_id="call_1", result_id="call_1", weight=None, arguments='{"city": "Paris"}'):
    """A mistral-finetune row: arguments as a JSON string, an id the v3 validator refuses by default."""
    first = {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                  "function": {"name": "get_weather", "arguments": arguments}}]}  # fmt: skip
    if weight is not None:
        first["weight"] = weight
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            first,
            {"role": "tool", "tool_call_id": result_id, "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        "tools": TOOLS,
    }


@pytest.fixture(scope="module")
def v3():
    return MistralTokenizer.from_preset("mistral_0.3_tiny")


def options(**kw):
    return dict(max_length=kw.pop("max_length", 1024), truncation="truncate", system_prompt=None, **kw)


# ---- data/tools.py ----------------------------------------------------------------------------------


def test_fix_tool_call_ids_generates_valid_deterministic_ids_and_updates_results():
    messages = row()["messages"] + [
        {"role": "user", "content": "Two more"},
        {"role": "assistant", "tool_calls": [
            {"id": "abc123XYZ", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},  # no id at all
        ]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "cold"},
        {"role": "tool", "content": "warm"},  # no tool_call_id: paired with the unanswered call, in order
        {"role": "assistant", "content": "Oslo is cold, Rome warm."},
    ]  # fmt: skip
    before = copy.deepcopy(messages)
    with pytest.raises(BadRow) as err:
        check_tool_call_ids(messages)
    assert err.value.reason == "bad_tool_call_id" and "messages[1].tool_calls[0].id='call_1'" in err.value.detail
    fixed, changed = fix_tool_call_ids(messages)
    assert messages == before  # the input is not modified
    assert changed == 4  # call_1 and its result, the missing id and its result's missing tool_call_id
    first, second = fixed[1]["tool_calls"][0]["id"], fixed[5]["tool_calls"][1]["id"]
    assert fixed[2]["tool_call_id"] == first and fixed[7]["tool_call_id"] == second
    assert fixed[5]["tool_calls"][0]["id"] == fixed[6]["tool_call_id"] == "abc123XYZ"  # valid ids are kept
    for new in (first, second):
        assert len(new) == 9 and new.isalnum()
    check_tool_conversation(fixed)
    assert fix_tool_call_ids(messages) == (fixed, 4)  # the same data gets the same ids
    assert fix_tool_call_ids(fixed) == (fixed, 0)


@pytest.mark.parametrize(
    "bad, detail",
    [
        (row(call_id="short"), "tool_calls[0].id='short' must be exactly 9"),
        (row(call_id="abc123XYZ", result_id="zzz123XYZ"), "tool_call_id='zzz123XYZ' answers no tool call"),
    ],
)
def test_bad_ids_are_bad_rows(bad, detail):
    with pytest.raises(BadRow) as err:
        to_messages(bad, "messages", None)
    assert err.value.reason == "bad_tool_call_id" and detail in err.value.detail
    messages = to_messages(bad, "messages", None, fix_tool_call_ids=True)
    check_tool_conversation(messages)


def test_reading_the_openai_and_mistral_finetune_layouts():
    from_string = to_messages(row(call_id="abc123XYZ", result_id="abc123XYZ"), "messages", None)
    from_object = to_messages(row(call_id="abc123XYZ", result_id="abc123XYZ", arguments={"city": "Paris"}),
                              "messages", None)  # fmt: skip
    assert from_string == from_object
    assert from_string[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    assert read_tools(TOOLS) == [{"type": "function", "function": {"name": "get_weather", "description": "",
                                                                    "parameters": {"type": "object"}}}]  # fmt: skip
    for bad, reason in [
        (row(arguments="{not json"), "bad_tool_call"),
        (row(arguments="[1, 2]"), "bad_tool_call"),
        ({**row(), "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "bad_tools"),
        (row(weight=0.5), "bad_weight"),
        (row(weight=True), "bad_weight"),
    ]:
        with pytest.raises(BadRow) as err:
            to_messages(bad, "messages", None, fix_tool_call_ids=True)
        assert err.value.reason == reason, bad


def test_weight_is_read_on_plain_assistant_turns():
    messages = read_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}])
    assert messages[1] == {"role": "assistant", "content": "a", "weight": 0}
    sharegpt = read_messages([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0}], "c", True)
    assert sharegpt[1] == {"role": "assistant", "content": "a", "weight": 0}
    with pytest.raises(BadRow, match="bad_weight"):
        read_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}])


# ---- tokenizing: masks, truncation, packing, the report ---------------------------------------------


def test_weight_zero_turns_are_not_trained_and_are_counted(v3):
    rows = [row(call_id="abc123XYZ", result_id="abc123XYZ", weight=w) for w in (0, 1, None)]
    report = DataReport()
    out = tokenize_rows(rows, "messages", v3, report=report, **options())
    trained = [[t for t in ex["labels"] if t != -100] for ex in out]
    answer = [*v3.encode("It is 21 degrees in Paris.", add_bos=False), v3.eos_id]
    call = v3.encode_chat(to_messages(rows[1], "messages", None), tools=TOOLS)[0]
    call_segment = call[call.index(v3.control_id("[TOOL_CALLS]")) : call.index(v3.eos_id) + 1]
    assert trained[0] == answer  # weight 0: the call is context only
    assert trained[1] == trained[2] == call_segment + answer
    assert (report.assistant_turns, report.skipped_turns, report.tool_rows) == (6, 1, 3)
    d = report.as_dict()
    assert d["assistant_turns_skipped"] == 1 and d["tool_call_ids_fixed"] == 0


def test_bad_ids_are_dropped_or_fixed_when_tokenizing(v3):
    report = DataReport()
    assert tokenize_rows([row()], "messages", v3, report=report, **options()) == []
    assert report.dropped == {"bad_tool_call_id": 1}
    report = DataReport()
    (ex,) = tokenize_rows([row()], "messages", v3, report=report, **options(fix_tool_call_ids=True))
    assert report.tool_call_ids_fixed == 2 and not report.dropped
    assert "call_1" not in v3.decode(ex["input_ids"])


def test_v1_model_refuses_tool_data_with_one_error(chat_tokenizer):
    with pytest.raises(UserError, match="chat format 'v1' has no tool calls.*mistral_0.3_tiny"):
        tokenize_rows([row(call_id="abc123XYZ", result_id="abc123XYZ")], "messages", chat_tokenizer,
                      report=DataReport(), **options())  # fmt: skip


def test_truncation_keeps_the_mask_a_prefix(v3):
    rows = read_jsonl(SAMPLE)
    whole = tokenize_rows(rows, "messages", v3, report=DataReport(), **options())
    report = DataReport()
    cut = tokenize_rows(rows, "messages", v3, report=report, **options(max_length=260))
    assert report.truncated > 0 and len(cut) + report.dropped.get("no_loss_tokens", 0) == len(whole)
    by_prefix = {tuple(ex["input_ids"][:260]): ex for ex in whole}
    for ex in cut:
        full = by_prefix[tuple(ex["input_ids"])]
        assert ex["labels"] == full["labels"][: len(ex["labels"])]


def test_packed_batch_keeps_every_example_mask(v3):
    """The sample (weights 0 included) packed into rows by TRL's packer and collated as training does:
    each example's labels come out unchanged (its first token aside), so weight-0 turns stay untrained."""
    rows = read_jsonl(SAMPLE)
    report = DataReport()
    examples = tokenize_rows(rows, "messages", v3, report=report, **options(max_length=1024))
    assert report.skipped_turns == 8 and len(examples) == len(rows)
    packed, info = pack_examples(Dataset.from_list(examples), 1024)
    assert info.rows < len(examples)  # several conversations share a row
    batch = PackedRowsCollator(pad_token_id=v3.pad_id)(list(packed))
    by_ids = {tuple(ex["input_ids"]): ex["labels"] for ex in examples}
    seen = 0
    for r, packed_row in enumerate(packed):
        start = 0
        for length in packed_row["seq_lengths"]:
            ids = batch["input_ids"][r, start : start + length].tolist()
            labels = batch["labels"][r, start : start + length].tolist()
            assert batch["position_ids"][r, start : start + length].tolist() == list(range(length))
            assert labels == [-100, *by_ids[tuple(ids)][1:]]
            start, seen = start + length, seen + 1
    assert seen == len(examples)
    # the weight-0 answers of the sample (its two-turn conversations) are nowhere in the trained tokens
    skipped = [m["content"] for r in rows for m in r["messages"] if m.get("weight") == 0 and m.get("content")]
    trained = v3.decode([t for t in batch["labels"].flatten().tolist() if t != -100])
    assert skipped and not any(text in trained for text in skipped)


def test_prepare_reports_turns_and_tool_rows(v3, tmp_path):
    cfg = compose("sft_lora", ["data=tools_sample", "model=mistral_0.3_tiny", "trainer.max_length=1024"])
    prepared = prepare_sft_data(cfg.data, cfg.trainer, v3)
    d = prepared.report.as_dict()
    assert d["used"] + d["held_out"] == 32 and d["extra_fields"] == 0 and d["duplicates"] == 0
    assert d["tool_rows"] == d["used"]  # every sample row lists its tools
    assert d["assistant_turns"] > d["used"] and 0 < d["assistant_turns_skipped"] <= 8


# ---- the data check before the model loads ----------------------------------------------------------


def test_data_check_names_file_and_line_of_a_bad_id(tmp_path):
    good = row(call_id="abc123XYZ", result_id="abc123XYZ")
    path = tmp_path / "calls.jsonl"
    path.write_text(f"{json.dumps(good)}\n\n{json.dumps(good)}\n{json.dumps(row())}\n", encoding="utf-8")
    cfg = compose("sft_lora", [f"data.path={path}"])
    with pytest.raises(UserError) as err:
        check_data(cfg.data, preference=False)
    message = str(err.value)
    assert message.startswith(f"{path}:4: messages[1].tool_calls[0].id='call_1' must be exactly 9")
    assert "data.fix_tool_call_ids=true" in message and "data.on_error=skip" in message
    fixed = check_data(compose("sft_lora", [f"data.path={path}", "data.fix_tool_call_ids=true"]).data, False)
    assert fixed["usable"] == 3
    skipped = check_data(compose("sft_lora", [f"data.path={path}", "data.on_error=skip"]).data, False)
    assert skipped["usable"] == 2 and skipped["rows"] == 3
    with pytest.raises(UserError, match=r"calls2.jsonl:1: messages\[1\].weight=0.5"):
        check_data(compose("sft_lora", [f"data.path={write_jsonl(tmp_path / 'calls2.jsonl', [row(weight=0.5)])}",
                                        "data.fix_tool_call_ids=true"]).data, False)  # fmt: skip
