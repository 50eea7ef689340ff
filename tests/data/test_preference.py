"""Preference data: format detection, exact prompt/chosen/rejected splits, bad-pair accounting, tokenization."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mistral_tune.config.schema import DataConfig, DPOTrainerConfig
from mistral_tune.core.errors import UserError
from mistral_tune.data.preference import (
    BadPair,
    detect_preference_format,
    fit_pair,
    parse_hh,
    prepare_preference_data,
    to_pair,
    tokenize_pair,
)
from mistral_tune.data.report import DataReport
from mistral_tune.models.tokenizer import MistralTokenizer

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer):
    return chat_tokenizer


def data_cfg(path, **kw):
    """The real schema class, with no holdout unless asked (the recipes hold out 4)."""
    return DataConfig(path=str(path), **{"holdout": 0, **kw})


def trainer_cfg(**kw):
    return DPOTrainerConfig(**{"name": "dpo", **kw})


def test_prompt_chosen_rejected_strings():
    rows = [{"prompt": "What colour is milk?", "chosen": "Milk is white.", "rejected": "I don't know."}]
    assert detect_preference_format(rows) == "preference"
    pair = to_pair(rows[0], "preference")
    assert pair.prompt == [msg(U, "What colour is milk?")]
    assert (pair.chosen, pair.rejected) == ("Milk is white.", "I don't know.")


def test_conversational_explicit_prompt():
    row = {
        "prompt": [msg("system", "Be brief."), msg(U, "Hi"), msg(A, "Hello!"), msg(U, "2+2?")],
        "chosen": [msg(A, "4")],
        "rejected": [msg(A, "5")],
    }
    assert detect_preference_format([row]) == "preference_messages"
    pair = to_pair(row, "preference_messages")
    assert pair.prompt == row["prompt"]
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_conversational_implicit_prompt_is_the_shared_prefix():
    row = {
        "chosen": [msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Capital of Peru?"), msg(A, "Lima.")],
        "rejected": [msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Capital of Peru?"), msg(A, "Quito.")],
    }
    assert detect_preference_format([row]) == "preference_messages"
    pair = to_pair(row, "preference_messages")
    assert pair.prompt == [msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Capital of Peru?")]
    assert (pair.chosen, pair.rejected) == ("Lima.", "Quito.")


def test_conversational_string_prompt_with_full_conversations():
    # UltraFeedback-binarized layout: a string prompt, and chosen/rejected that repeat it as the user turn.
    row = {"prompt": "Name a primary colour.", "chosen": [msg(U, "Name a primary colour."), msg(A, "Red.")]}
    row["rejected"] = [msg(U, "Name a primary colour."), msg(A, "Green.")]
    pair = to_pair(row, detect_preference_format([row]))
    assert pair.prompt == [msg(U, "Name a primary colour.")]
    assert (pair.chosen, pair.rejected) == ("Red.", "Green.")


def test_anthropic_hh_transcripts():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2+2?\n\nAssistant: It is 5.",
    }
    assert detect_preference_format([row]) == "hh"
    pair = to_pair(row, "hh")
    assert pair.prompt == [msg(U, "Hi there"), msg(A, "Hello, how can I help?"), msg(U, "What is 2+2?")]
    # The common prefix runs into the answers ("It is "); the split is still at the last Assistant marker.
    assert (pair.chosen, pair.rejected) == ("It is 4.", "It is 5.")


def test_hh_with_separate_prompt_column():
    row = {"prompt": "\n\nHuman: Say yes.\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}
    assert detect_preference_format([row]) == "hh"
    pair = to_pair(row, "hh")
    assert pair.prompt == [msg(U, "Say yes.")]
    assert (pair.chosen, pair.rejected) == ("Yes.", "No.")


def test_parse_hh_maps_roles():
    assert parse_hh("\n\nHuman: a\nb\n\nAssistant: c") == [msg(U, "a\nb"), msg(A, "c")]


def test_system_prompt_is_added():
    row = {"prompt": "Q", "chosen": "A1", "rejected": "A2"}
    assert to_pair(row, "preference", system_prompt="Sys").prompt == [msg("system", "Sys"), msg(U, "Q")]


def test_undetectable_format_names_the_accepted_ones():
    with pytest.raises(UserError, match="preference_messages") as err:
        detect_preference_format([{"chosen": "a", "rejected": "b"}])  # strings, no prompt, not HH
    assert "'chosen', 'rejected'" in str(err.value)


@pytest.mark.parametrize(
    "row,fmt,reason",
    [
        ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "preference", "chosen_equals_rejected"),
        ({"prompt": "Q", "chosen": " ", "rejected": "b"}, "preference", "empty_field"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "preference", "empty_field"),
        ({"prompt": "Q", "chosen": "a"}, "preference", "missing_field"),
        ({"chosen": [msg(U, "x"), msg(A, "a")], "rejected": [msg(U, "y"), msg(A, "b")]}, "preference_messages",
         "no_shared_prompt"),
        ({"chosen": [msg(U, "x"), msg(A, "a")], "rejected": [msg(U, "x"), msg(A, "a")]}, "preference_messages",
         "chosen_equals_rejected"),
        ({"prompt": [msg(U, "x")], "chosen": [msg(A, "a"), msg(U, "more")], "rejected": [msg(A, "b")]},
         "preference_messages", "bad_roles"),
        ({"prompt": [msg(A, "x")], "chosen": [msg(A, "a")], "rejected": [msg(A, "b")]}, "preference_messages",
         "bad_roles"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}, "hh",
         "no_shared_prompt"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "hh",
         "chosen_equals_rejected"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"}, "hh", "empty_field"),
    ],
)  # fmt: skip
def test_bad_pairs_raise_their_reason(row, fmt, reason):
    with pytest.raises(BadPair) as err:
        to_pair(row, fmt)
    assert err.value.reason == reason


def test_bad_pairs_are_counted_not_dropped_silently(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    rows += [
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": "   "},
        rows[0],  # an exact duplicate
        {"prompt": "Q " * 300, "chosen": "long", "rejected": "prompt"},  # kept: the prompt loses its start
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = data_cfg(path, holdout=1, on_error="skip", dedup=True)
    prepared = prepare_preference_data(cfg, trainer_cfg(max_length=128), tokenizer)
    train, holdout, fmt, report = prepared.train, prepared.holdout, prepared.format, prepared.report
    assert fmt == "preference" and prepared.eval is None
    got = report.as_dict()
    assert got["dropped"] == {"chosen_equals_rejected": 1, "empty_field": 2, "duplicate": 1, "malformed_json": 1}
    assert (got["read"], got["used"], got["held_out"], got["dropped_total"]) == (11, 5, 1, 5)
    assert got["read"] == got["used"] + got["held_out"] + got["dropped_total"]  # every row accounted for
    assert len(train) == 5 and len(holdout) == 1
    assert got["drop_examples"]["empty_field"] == "row 7: 'chosen' is empty"
    assert set(train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}


def test_only_bad_pairs_is_one_clear_error(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "x", "rejected": "x"}) + "\n")
    with pytest.raises(UserError, match="No preference pairs left.*chosen_equals_rejected"):
        prepare_preference_data(data_cfg(path), trainer_cfg(), tokenizer)


def test_json_and_parquet_sources(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.json", "p.parquet"):
        assert len(prepare_preference_data(data_cfg(tmp_path / name), trainer_cfg(), tokenizer).train) == 3


def test_hub_name_offline_fails_fast_and_clearly(tokenizer):
    from mistral_tune.data.sources import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable here; this test is about the offline error")
    start = time.time()
    with pytest.raises(UserError, match="looks offline"):
        prepare_preference_data(data_cfg("someone/not-a-real-preference-set"), trainer_cfg(), tokenizer)
    assert time.time() - start < 10


@pytest.mark.parametrize("template", ["v1", "v3"])
def test_tokens_are_the_sft_chat_template(template):
    tok = MistralTokenizer.from_version("v3" if template == "v3" else "v1", chat_template=template)
    pair = to_pair(
        {"prompt": [msg("system", "S"), msg(U, "Hi"), msg(A, "Yo"), msg(U, "2+2?")], "chosen": [msg(A, "4")],
         "rejected": [msg(A, "five")]},
        "preference_messages",
    )  # fmt: skip
    prompt_ids, chosen_ids, rejected_ids = tokenize_pair(pair, tok)
    for answer, ids in (("4", chosen_ids), ("five", rejected_ids)):
        full, mask = tok.encode_chat([*pair.prompt, msg(A, answer)])
        assert prompt_ids + ids == full
        # The answer tokens are exactly the last assistant turn SFT trains on (content + EOS).
        assert ids == full[len(full) - len(ids) :] and all(mask[len(prompt_ids) :]) and ids[-1] == tok.eos_id
        # The exported Hugging Face tokenizer's chat template renders the same ids.
        hf = tok.to_hf()
        assert hf.apply_chat_template([*pair.prompt, msg(A, answer)], tokenize=True, return_dict=False) == full


def test_fit_pair_truncation_modes():
    prompt, chosen, rejected = [1, 10, 11, 12, 13, 14], [20, 21, 22, 2], [30, 2]
    kw = dict(max_prompt_length=None, truncation="truncate")
    assert fit_pair(prompt, chosen, rejected, max_length=10, truncation_mode="keep_start", **kw) == (
        (prompt, chosen, rejected), set())  # fmt: skip
    # keep_start: the answers keep half of max_length (all they need here), the prompt loses its start (BOS kept)
    assert fit_pair(prompt, chosen, rejected, max_length=8, truncation_mode="keep_start", **kw) == (
        ([1, 12, 13, 14], chosen, rejected), {"prompt"})  # fmt: skip
    # ...and past half, the answers' ends are cut too; a short prompt leaves them all the rest
    assert fit_pair(prompt, [20, 21, 22, 23, 24, 2], rejected, max_length=8, truncation_mode="keep_start", **kw) == (
        ([1, 12, 13, 14], [20, 21, 22, 23], [30, 2]), {"prompt", "answers"})  # fmt: skip
    assert fit_pair([1, 10], [20, 21, 22, 23, 24, 2], rejected, max_length=6, truncation_mode="keep_start", **kw) == (
        ([1, 10], [20, 21, 22, 23], [30, 2]), {"answers"})  # fmt: skip
    assert fit_pair(prompt, [20, 21, 22, 23, 24, 2], rejected, max_length=6, truncation_mode="keep_start", **kw) == (
        ([1, 13, 14], [20, 21, 22], [30, 2]), {"prompt", "answers"})  # fmt: skip
    # keep_end: the prompt's start is cut, BOS kept, answers whole
    assert fit_pair(prompt, chosen, rejected, max_length=8, truncation_mode="keep_end", **kw) == (
        ([1, 12, 13, 14], chosen, rejected), {"prompt"})  # fmt: skip
    # ...down to BOS and one token; only then are the answers' ends cut
    assert fit_pair(prompt, chosen, rejected, max_length=5, truncation_mode="keep_end", **kw) == (
        ([1, 14], [20, 21, 22], [30, 2]), {"prompt", "answers"})  # fmt: skip
    # max_prompt_length keeps BOS and the prompt's end
    got = fit_pair(prompt, chosen, rejected, max_length=64, max_prompt_length=3, truncation="truncate",
                   truncation_mode="keep_start")  # fmt: skip
    assert got == (([1, 13, 14], chosen, rejected), {"prompt"})
    # truncation=drop drops what is over either limit, and cuts nothing
    for limits in (dict(max_length=8, max_prompt_length=None), dict(max_length=64, max_prompt_length=3)):
        with pytest.raises(BadPair, match="too_long"):
            fit_pair(prompt, chosen, rejected, truncation="drop", truncation_mode="keep_start", **limits)
    assert fit_pair(prompt, chosen, rejected, max_length=10, max_prompt_length=6, truncation="drop",
                    truncation_mode="keep_start") == ((prompt, chosen, rejected), set())  # fmt: skip
    # A prompt that fills max_length alone is cut, not dropped (it used to be prompt_too_long)
    got = fit_pair(prompt, chosen, rejected, max_length=6, truncation_mode="keep_start", **kw)
    assert got == (([1, 13, 14], [20, 21, 22], [30, 2]), {"prompt", "answers"})


def test_sample_file_converts_completely(tokenizer):
    cfg = data_cfg("data/preference_sample.jsonl", holdout=8)
    prepared = prepare_preference_data(cfg, trainer_cfg(max_length=64), tokenizer)
    fmt, report = prepared.format, prepared.report
    assert (fmt, report.read, report.used, report.held_out, sum(report.dropped.values()), report.duplicates) == (
        "preference", 200, 192, 8, 0, 0)  # fmt: skip
    assert isinstance(report, DataReport) and report.truncated == 0


def test_eval_split_fraction_and_file_are_accounted_for(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_preference_data(data_cfg(path, holdout=2, eval_split="0.25"), trainer_cfg(), tokenizer)
    got = prepared.report.as_dict()
    assert (got["used"], got["held_out"], got["eval_read"], got["eval_used"]) == (14, 2, 4, 4)
    assert got["read"] == got["used"] + got["held_out"] + got["dropped_total"] + got["eval_read"]
    assert len(prepared.eval) == 4 and set(prepared.eval.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}

    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(
        json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "Q", "chosen": "x", "rejected": "x"}) + "\n"
    )
    prepared = prepare_preference_data(data_cfg(path, eval_split=str(eval_path)), trainer_cfg(), tokenizer)
    got = prepared.report.as_dict()
    assert (got["used"], got["eval_read"], got["eval_used"], got["eval_dropped"]) == (
        20, 2, 1, {"chosen_equals_rejected": 1})  # fmt: skip


HH_LONG = Path(__file__).parent / "hh_long.jsonl"  # 80 HH-shaped pairs, multi-turn, prompts up to ~600 tokens


@pytest.mark.parametrize("recipe", ["dpo_lora", "reward_lora"])
@pytest.mark.parametrize("model,max_length", [(None, 256), ("mistral_7b_en", 1024)])
def test_long_hh_pairs_are_kept_by_default(recipe, model, max_length, compose, tokenizer):
    """The recipes' defaults keep >= 95% of well-formed long pairs: prompts lose their start, nothing is dropped."""
    cfg = compose(recipe, [f"data.path={HH_LONG}", *([f"model={model}"] if model else [])])
    assert cfg.trainer.max_length == max_length  # it follows the base model, like the learning rate
    prepared = prepare_preference_data(cfg.data, cfg.trainer, tokenizer)
    got = prepared.report.as_dict()
    assert got["read"] == 80 and got["held_out"] == 4 and got["dropped_total"] == 0
    assert got["used"] + got["held_out"] >= 0.95 * got["read"]
    assert got["truncated_parts"].get("prompt", 0) == got["truncated"]  # the answers stay whole here
    for row in prepared.train:
        if recipe == "dpo_lora":
            assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
        else:  # reward: the two full chats
            assert max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
    notice = got["length_notice"]
    if model is None:  # a third of the pairs cut on the demo: one line naming the key, recorded for summary.json
        assert got["truncated"] > 0.05 * got["used"]
        assert notice["affected"] == got["truncated"] and notice["of"] == got["used"]
        assert f"were over trainer.max_length={max_length} and were truncated" in notice["message"]
        assert notice["suggested"]["trainer.max_length"] > max_length
    else:  # 1024 tokens hold these prompts whole: nothing to say
        assert notice is None and got["truncated"] <= 0.05 * got["used"]


def test_a_cut_prompt_keeps_its_last_turn(tokenizer):
    rows = [json.loads(line) for line in HH_LONG.read_text().splitlines()]
    pair = max((to_pair(r, "hh") for r in rows), key=lambda p: sum(len(m["content"]) for m in p.prompt))
    ids, cut = fit_pair(*tokenize_pair(pair, tokenizer), max_length=128, max_prompt_length=64, truncation="truncate",
                        truncation_mode="keep_start")  # fmt: skip
    assert cut == {"prompt"} and len(ids[0]) == 64 and ids[0][0] == tokenizer.bos_id
    assert tokenizer.decode(ids[0]).rstrip().endswith(pair.prompt[-1]["content"][-40:] + " [/INST]")


def test_holdout_is_drawn_from_pairs_that_fit(compose, tokenizer):
    """data.holdout=4 holds out 4 even when many pairs are dropped for length (it used to hold out fewer)."""
    cfg = compose("dpo_lora", [f"data.path={HH_LONG}", "trainer.truncation=drop", "data.holdout=4"])
    got = prepare_preference_data(cfg.data, cfg.trainer, tokenizer).report.as_dict()
    assert got["held_out"] == 4 and got["dropped"]["too_long"] > 4
    assert got["read"] == got["used"] + got["held_out"] + got["dropped_total"]
    assert "were dropped" in got["length_notice"]["message"]


def test_length_notice_only_past_a_few_percent():
    report = DataReport()
    report.lengths, report.truncated = [100] * 40, 2  # 5%: quiet
    assert report.check_lengths("pairs", 64) is None
    report.truncated = 3  # 7.5%
    notice = report.check_lengths("pairs", 64)
    assert notice["suggested"] == {"trainer.max_length": 128} and "3 of 40 training pairs (8%)" in notice["message"]


def test_bad_pair_errors_name_the_field(tmp_path, tokenizer):
    rows = [{"chosen": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
             "rejected": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away"}]}]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError) as err:
        prepare_preference_data(data_cfg(path), trainer_cfg(), tokenizer)
    assert "row 1: chosen[0] has no 'role'; found keys from, value" in str(err.value)
    assert "max_length" not in str(err.value)  # no unrelated hint
