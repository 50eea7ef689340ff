"""Preference pairs (prompt, chosen, rejected): detect the layout, convert, tokenize with the SFT chat template.

Three layouts are accepted (``data.format=auto`` picks one from the columns):

- ``preference``: ``prompt``/``chosen``/``rejected`` strings, one user turn and two candidate answers;
- ``preference_messages``: ``chosen``/``rejected`` message lists sharing a prefix (the prompt), with or without
  a separate ``prompt`` message list (TRL's implicit and explicit layouts);
- ``hh``: Anthropic HH transcripts, ``chosen``/``rejected`` strings of ``\\n\\nHuman: ...\\n\\nAssistant: ...``
  turns; the shared prompt is cut off their common prefix and mapped onto user/assistant roles.

Every pair becomes ``prompt`` messages (ending with a user turn) plus one assistant answer each for chosen and
rejected. Pairs that cannot be used are counted by reason in the ``DataReport`` and never dropped silently.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport, PreparedData
from mistral_tune.data.sources import load_records
from mistral_tune.data.splits import find_duplicates, load_eval_file, split_eval_and_train

log = logging.getLogger(__name__)


PREFERENCE_FORMATS = {
    "preference": "'prompt', 'chosen' and 'rejected' strings",
    "preference_messages": "'chosen'/'rejected' message lists sharing the prompt as prefix, optional 'prompt' list",
    "hh": "Anthropic HH: 'chosen'/'rejected' strings of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
}

# Reasons a pair is not used; the keys of DataReport.dropped.
REASONS = (
    "missing_field",  # a column is absent or of the wrong type
    "empty_field",  # prompt, chosen or rejected is empty or whitespace
    "chosen_equals_rejected",  # nothing to prefer
    "no_shared_prompt",  # chosen and rejected share no prompt (no common prefix ending in a user turn)
    "bad_roles",  # roles do not alternate user/assistant, or an answer is not one assistant turn
    "prompt_too_long",  # the prompt alone fills trainer.max_length
    "too_long",  # over trainer.max_length with trainer.truncation=drop
)

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class BadPair(ValueError):
    """A row that cannot become a preference pair; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PreferencePair:
    """A prompt conversation (ends with a user turn) and the two assistant answers to compare."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def detect_preference_format(rows: list[dict[str, Any]], requested: str = "auto") -> str:
    """The layout of ``rows``: ``requested`` when set, else guessed from the first 100 rows."""
    if requested != "auto":
        return requested
    sample = rows[:100]
    columns = set().union(*(r.keys() for r in sample)) if sample else set()
    if {"chosen", "rejected"} <= columns:
        firsts = [r.get("chosen") for r in sample if r.get("chosen") is not None]
        if firsts and isinstance(firsts[0], list):
            return "preference_messages"
        texts = [str(r.get("prompt") or "") + str(r.get("chosen") or "") for r in sample]
        if any(_HH_TURN.search(t) and "Assistant:" in t for t in texts):
            return "hh"
        if "prompt" in columns:
            return "preference"
    accepted = "; ".join(f"{k}: {v}" for k, v in PREFERENCE_FORMATS.items())
    raise UserError(
        f"Could not detect the preference data format: columns found are {sorted(columns) or 'none'}. "
        f"Accepted formats: {accepted}. Rename the columns or set data.format."
    )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadPair("missing_field")
    if not value.strip():
        raise BadPair("empty_field")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise BadPair("missing_field")
    out = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadPair("missing_field")
        if not content.strip():
            raise BadPair("empty_field")
        out.append({"role": role, "content": content})
    return out


def _check_prompt(prompt: list[dict[str, str]]) -> None:
    """The prompt must be [system] user (assistant user)*: the answers then continue with the assistant."""
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    if not turns:
        raise BadPair("no_shared_prompt")
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)) or turns[-1]["role"] != "user":
        raise BadPair("bad_roles")


def _single_answer(completion: list[dict[str, str]]) -> str:
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise BadPair("bad_roles")
    return completion[0]["content"]


def split_messages(chosen: list[dict[str, str]], rejected: list[dict[str, str]]):
    """TRL's implicit-prompt layout: the prompt is the common prefix of both lists, up to its last user turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):
        raise BadPair("chosen_equals_rejected")
    while k > 0 and chosen[k - 1]["role"] != "user":
        k -= 1
    if k == 0:
        raise BadPair("no_shared_prompt")
    return chosen[:k], chosen[k:], rejected[k:]


def parse_hh(transcript: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: a\\n\\nAssistant: b`` -> user/assistant messages (text before the first marker must be blank)."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise BadPair("bad_roles")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]


def split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Cut the shared prompt off two HH transcripts: it ends at the last ``Assistant:`` of their common prefix."""
    if chosen == rejected:
        raise BadPair("chosen_equals_rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    markers = [m for m in _HH_TURN.finditer(chosen[:n]) if m.group(1) == "Assistant" and m.end() <= n]
    if not markers:
        raise BadPair("no_shared_prompt")
    cut = markers[-1]
    prompt = parse_hh(chosen[: cut.start()])
    if not any(m["role"] == "user" for m in prompt):
        raise BadPair("no_shared_prompt")
    answers = []
    for text in (chosen[cut.end() :], rejected[cut.end() :]):
        if _HH_TURN.search(text):
            raise BadPair("bad_roles")  # the answer runs on into further turns
        if not text.strip():
            raise BadPair("empty_field")
        answers.append(text.strip())
    return prompt, answers[0], answers[1]


def to_pair(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> PreferencePair:
    """Convert one row; raises ``BadPair`` with the reason when it cannot be used."""
    if fmt == "preference":
        prompt = [{"role": "user", "content": _text(row.get("prompt"))}]
        chosen, rejected = _text(row.get("chosen")), _text(row.get("rejected"))
    elif fmt == "preference_messages":
        chosen_msgs, rejected_msgs = _messages(row.get("chosen")), _messages(row.get("rejected"))
        given = row.get("prompt")
        if isinstance(given, list):  # explicit prompt; answers may repeat it (then it is cut off)
            prompt = _messages(given)
            n = len(prompt)
            if chosen_msgs[:n] == prompt and rejected_msgs[:n] == prompt:
                chosen_msgs, rejected_msgs = chosen_msgs[n:], rejected_msgs[n:]
        elif isinstance(given, str) and given.strip() and chosen_msgs and chosen_msgs[0]["role"] == "assistant":
            prompt = [{"role": "user", "content": given}]  # a string prompt with message-list answers
        else:  # implicit prompt: the common prefix (a string prompt is then a copy of it, as in UltraFeedback)
            prompt, chosen_msgs, rejected_msgs = split_messages(chosen_msgs, rejected_msgs)
        chosen, rejected = _single_answer(chosen_msgs), _single_answer(rejected_msgs)
    elif fmt == "hh":
        head = row.get("prompt") or ""
        if not isinstance(head, str):
            raise BadPair("missing_field")
        prompt, chosen, rejected = split_hh(head + _text(row.get("chosen")), head + _text(row.get("rejected")))
    else:
        raise UserError(f"data.format={fmt} is not a preference format ({', '.join(PREFERENCE_FORMATS)}).")
    if chosen.strip() == rejected.strip():
        raise BadPair("chosen_equals_rejected")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    _check_prompt(prompt)
    return PreferencePair(prompt, chosen, rejected)


def tokenize_pair(pair: PreferencePair, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) with the SFT chat template; prompt + answer = the full chat."""
    prompt_ids = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True)
    answers = []
    for answer in (pair.chosen, pair.rejected):
        full = tokenizer.apply_chat_template([*pair.prompt, {"role": "assistant", "content": answer}], False)
        # Mistral templates encode each turn on its own, so the prompt is an exact prefix of the full chat.
        assert full[: len(prompt_ids)] == prompt_ids, "chat template is not prefix-stable"
        answers.append(full[len(prompt_ids) :])
    return prompt_ids, answers[0], answers[1]


def fit_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    truncation_mode: str,
) -> tuple[tuple[list[int], list[int], list[int]], bool]:
    """Apply the length limits; returns ((prompt, chosen, rejected), truncated). Raises BadPair when it cannot fit.

    A long prompt keeps BOS and its end (the turns nearest the answer). Over ``max_length``, ``keep_start`` cuts
    the answers' ends and ``keep_end`` cuts the prompt's start instead, so the answers stay whole.
    """
    truncated = False
    if max_prompt_length and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :], True
    longest = len(prompt) + max(len(chosen), len(rejected))
    if longest <= max_length:
        return (prompt, chosen, rejected), truncated
    if truncation == "drop":
        raise BadPair("too_long")
    if truncation_mode == "keep_end":
        keep = max_length - max(len(chosen), len(rejected))
        if keep < 2:  # BOS plus at least one prompt token
            raise BadPair("too_long")
        return (prompt[:1] + prompt[len(prompt) - keep + 1 :], chosen, rejected), True
    room = max_length - len(prompt)
    if room < 1:
        raise BadPair("prompt_too_long")
    return (prompt, chosen[:room], rejected[:room]), True


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Any, trainer_cfg: Any, report: DataReport) -> list[dict]:
    """Tokenize and fit every pair; rows that cannot fit are counted in ``report``."""
    out = []
    for pair in pairs:
        try:
            ids, truncated = fit_pair(
                *tokenize_pair(pair, tokenizer),
                max_length=trainer_cfg.max_length,
                max_prompt_length=trainer_cfg.max_prompt_length,
                truncation=trainer_cfg.truncation,
                truncation_mode=trainer_cfg.truncation_mode,
            )
        except BadPair as exc:
            report.dropped[exc.reason] += 1
            continue
        report.truncated += truncated
        out.append({"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2]})
    return out


def prepare_preference_data(data_cfg: Any, trainer_cfg: Any, tokenizer: Any) -> PreparedData:
    """Load, convert, split off the holdout and the eval split, tokenize.

    Every row is accounted for: ``read = used + held_out + dropped_total`` (plus the eval split's own
    counts). Held-out pairs are drawn from usable ones; they prompt samples.jsonl. ``data.eval_split``
    (a fraction of data.path, or a file) is evaluated every ``train.eval_steps`` during training.
    """
    from datasets import Dataset

    report = DataReport()
    rows = load_records(data_cfg.path, data_cfg.split, data_cfg.on_error, report)
    report.read += len(rows)
    if not rows:
        raise UserError(f"data.path={data_cfg.path} holds no examples ({dict(report.dropped) or 'empty file'}).")
    fmt = detect_preference_format(rows, data_cfg.format)
    pairs = to_pairs(find_duplicates(rows, data_cfg.dedup, report), fmt, data_cfg.system_prompt, report)
    order = list(range(len(pairs)))
    random.Random(data_cfg.seed).shuffle(order)
    holdout_n = min(data_cfg.holdout, max(len(pairs) - 1, 0))
    holdout, rest = [pairs[i] for i in order[:holdout_n]], order[holdout_n:]
    # A held-out pair that cannot fit max_length is dropped and counted like a training pair.
    holdout = [p for p in holdout if tokenize_pairs([p], tokenizer, trainer_cfg, report)]
    report.truncated = 0  # counted for training pairs only
    report.held_out = len(holdout)
    eval_pairs, train_pairs = split_eval_and_train(data_cfg, pairs, rest, report, "pairs")
    eval_report = DataReport()
    eval_rows = load_eval_file(data_cfg, eval_report)
    if eval_rows is not None:
        eval_report.read += len(eval_rows)
        eval_fmt = detect_preference_format(eval_rows, data_cfg.format)
        eval_pairs = to_pairs(eval_rows, eval_fmt, data_cfg.system_prompt, eval_report)
    examples = tokenize_pairs(train_pairs, tokenizer, trainer_cfg, report)
    report.used = len(examples)
    report.log_losses("pair(s)", trainer_cfg.max_length, data_cfg.dedup)
    if not examples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise UserError(
            f"No preference pairs left after filtering the {report.read} rows of {data_cfg.path} "
            f"({report.held_out} held out; dropped: {reasons or 'none'})."
        )
    eval_ds = None
    if eval_pairs or eval_report.read:
        eval_examples = tokenize_pairs(eval_pairs, tokenizer, trainer_cfg, eval_report)
        report.eval_read = len(eval_pairs) if eval_rows is None else eval_report.read
        report.eval_used, report.eval_dropped = len(eval_examples), eval_report.dropped
        for reason, n in sorted(eval_report.dropped.items()):
            log.warning("data: dropped %d evaluation pair(s): %s", n, reason)
        if not eval_examples:
            raise UserError(f"No evaluation pairs left after filtering data.eval_split={data_cfg.eval_split}.")
        eval_ds = Dataset.from_list(eval_examples)
    log.info(
        "data: %s format, %d read, %d training pairs, %d held out%s",
        fmt,
        report.read,
        report.used,
        report.held_out,
        f", {report.eval_used} for evaluation" if eval_ds is not None else "",
    )
    return PreparedData(train=Dataset.from_list(examples), eval=eval_ds, holdout=holdout, format=fmt, report=report)


def to_pairs(rows: list[dict[str, Any]], fmt: str, system_prompt: str | None, report: DataReport) -> list:
    """Convert rows to PreferencePairs; the unusable ones are counted in ``report`` by reason."""
    pairs = []
    for row in rows:
        try:
            pairs.append(to_pair(row, fmt, system_prompt))
        except BadPair as exc:
            report.dropped[exc.reason] += 1
    return pairs
