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
from mistral_tune.data.messages import BadRow, read_messages
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
    "too_long",  # over trainer.max_length or trainer.max_prompt_length with trainer.truncation=drop
)

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class BadPair(BadRow):
    """A row that cannot become a preference pair; ``reason`` is one of ``REASONS``, ``detail`` names the field."""


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


def _text(value: Any, name: str) -> str:
    if value is None:
        raise BadPair("missing_field", f"no '{name}'")
    if not isinstance(value, str):
        raise BadPair("missing_field", f"'{name}' is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadPair("empty_field", f"'{name}' is empty")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    try:
        return read_messages(value, name)
    except BadRow as exc:
        raise BadPair(exc.reason, exc.detail) from None


def _check_prompt(prompt: list[dict[str, str]]) -> None:
    """The prompt must be [system] user (assistant user)*: the answers then continue with the assistant."""
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    if not turns:
        raise BadPair("no_shared_prompt", "the prompt has no user turn")
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)) or turns[-1]["role"] != "user":
        raise BadPair(
            "bad_roles", "prompt roles are not [system] user (assistant user)*: " + ", ".join(m["role"] for m in prompt)
        )


def _single_answer(completion: list[dict[str, str]]) -> str:
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise BadPair(
            "bad_roles",
            f"the answer is {len(completion)} turn(s) ({', '.join(m['role'] for m in completion)}), not one assistant turn",
        )
    return completion[0]["content"]


def split_messages(chosen: list[dict[str, str]], rejected: list[dict[str, str]]):
    """TRL's implicit-prompt layout: the prompt is the common prefix of both lists, up to its last user turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):
        raise BadPair("chosen_equals_rejected", "'chosen' and 'rejected' are the same")
    while k > 0 and chosen[k - 1]["role"] != "user":
        k -= 1
    if k == 0:
        raise BadPair("no_shared_prompt", "'chosen' and 'rejected' share no prefix ending in a user turn")
    return chosen[:k], chosen[k:], rejected[k:]


def parse_hh(transcript: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: a\\n\\nAssistant: b`` -> user/assistant messages (text before the first marker must be blank)."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise BadPair("bad_roles", "text before the first 'Human:' or 'Assistant:' marker")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]


def split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Cut the shared prompt off two HH transcripts: it ends at the last ``Assistant:`` of their common prefix."""
    if chosen == rejected:
        raise BadPair("chosen_equals_rejected", "'chosen' and 'rejected' are the same")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    markers = [m for m in _HH_TURN.finditer(chosen[:n]) if m.group(1) == "Assistant" and m.end() <= n]
    if not markers:
        raise BadPair("no_shared_prompt", "'chosen' and 'rejected' share no prefix ending in 'Assistant:'")
    cut = markers[-1]
    prompt = parse_hh(chosen[: cut.start()])
    if not any(m["role"] == "user" for m in prompt):
        raise BadPair("no_shared_prompt", "the shared prefix has no 'Human:' turn")
    answers = []
    for text in (chosen[cut.end() :], rejected[cut.end() :]):
        if _HH_TURN.search(text):
            raise BadPair("bad_roles", "an answer runs on into further Human:/Assistant: turns")
        if not text.strip():
            raise BadPair("empty_field", "an answer after the last 'Assistant:' is empty")
        answers.append(text.strip())
    return prompt, answers[0], answers[1]


def to_pair(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> PreferencePair:
    """Convert one row; raises ``BadPair`` with the reason when it cannot be used."""
    if fmt == "preference":
        prompt = [{"role": "user", "content": _text(row.get("prompt"), "prompt")}]
        chosen, rejected = _text(row.get("chosen"), "chosen"), _text(row.get("rejected"), "rejected")
    elif fmt == "preference_messages":
        chosen_msgs, rejected_msgs = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        given = row.get("prompt")
        if isinstance(given, list):  # explicit prompt; answers may repeat it (then it is cut off)
            prompt = _messages(given, "prompt")
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
            raise BadPair("missing_field", f"'prompt' is a {type(head).__name__}, not a string")
        chosen, rejected = _text(row.get("chosen"), "chosen"), _text(row.get("rejected"), "rejected")
        prompt, chosen, rejected = split_hh(head + chosen, head + rejected)
    else:
        raise UserError(f"data.format={fmt} is not a preference format ({', '.join(PREFERENCE_FORMATS)}).")
    if chosen.strip() == rejected.strip():
        raise BadPair("chosen_equals_rejected", "the chosen and rejected answers are the same")
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
) -> tuple[tuple[list[int], list[int], list[int]], set[str]]:
    """Apply the length limits; returns ((prompt, chosen, rejected), the parts cut: "prompt" and/or "answers").

    ``truncation=truncate`` never drops a pair for its length. A prompt is cut from the left (BOS and the turns
    nearest the answer stay): first to ``max_prompt_length``, then as far as the answers need. ``keep_start``
    gives the answers at least half of ``max_length`` (or all they need, when less) and cuts their ends past
    that; ``keep_end`` cuts the prompt down to BOS plus one token before it cuts the answers' ends.
    ``truncation=drop`` raises ``BadPair("too_long")`` for a pair over either limit instead.
    """
    longest = max(len(chosen), len(rejected))
    over_prompt = bool(max_prompt_length) and len(prompt) > max_prompt_length
    if truncation == "drop":
        if over_prompt or len(prompt) + longest > max_length:
            raise BadPair("too_long", f"{len(prompt)} prompt + {longest} answer tokens, over the limits")
        return (prompt, chosen, rejected), set()
    if max_length < 3:  # BOS, one prompt token and one answer token
        raise BadPair("too_long", f"trainer.max_length={max_length} leaves no room for a prompt and an answer")
    cut: set[str] = set()
    if over_prompt:
        prompt, cut = _keep_prompt_end(prompt, max_prompt_length), {"prompt"}
    if len(prompt) + longest <= max_length:
        return (prompt, chosen, rejected), cut
    # The answers' share: what is left beside the prompt, but at least all they need (keep_end) or half of
    # max_length (keep_start), and never so much that the prompt loses its BOS and last token.
    share = max_length if truncation_mode == "keep_end" else max_length // 2
    answer_room = max(max_length - len(prompt), min(longest, share))
    answer_room = min(answer_room, max_length - min(len(prompt), 2))
    if len(prompt) > max_length - answer_room:
        prompt = _keep_prompt_end(prompt, max_length - answer_room)
        cut.add("prompt")
    if longest > answer_room:
        chosen, rejected = chosen[:answer_room], rejected[:answer_room]
        cut.add("answers")
    return (prompt, chosen, rejected), cut


def _keep_prompt_end(prompt: list[int], limit: int) -> list[int]:
    """BOS and the last ``limit - 1`` tokens: the start of a long conversation goes, the question stays."""
    return prompt[:1] + prompt[len(prompt) - limit + 1 :]


def tokenize_pairs(pairs: list[PreferencePair], tokenizer: Any, trainer_cfg: Any, report: DataReport) -> list[dict]:
    """Tokenize and fit every pair; what was cut, and pairs that cannot fit, are counted in ``report``."""
    out = []
    for pair in pairs:
        prompt, chosen, rejected = tokenize_pair(pair, tokenizer)
        report.lengths.append(len(prompt) + max(len(chosen), len(rejected)))
        report.prompt_lengths.append(len(prompt))
        try:
            ids, cut = fit_pair(
                prompt,
                chosen,
                rejected,
                max_length=trainer_cfg.max_length,
                max_prompt_length=trainer_cfg.max_prompt_length,
                truncation=trainer_cfg.truncation,
                truncation_mode=trainer_cfg.truncation_mode,
            )
        except BadPair as exc:
            report.drop(exc.reason, exc.detail)
            continue
        report.truncated += bool(cut)
        report.truncated_parts.update(cut)
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
    # Row numbers in drop examples are file rows, unless data.dedup removed rows before them.
    pairs = to_pairs(find_duplicates(rows, data_cfg.dedup, report), fmt, data_cfg.system_prompt, report)
    order = list(range(len(pairs)))
    random.Random(data_cfg.seed).shuffle(order)
    wanted = min(data_cfg.holdout, max(len(pairs) - 1, 0))
    # Held-out pairs are drawn from those that fit the length limits, so data.holdout=N holds out N; one that
    # cannot fit (truncation=drop) stays with the training pairs and is counted there, once.
    holdout, rest = [], []
    for i in order:
        if len(holdout) < wanted and tokenize_pairs([pairs[i]], tokenizer, trainer_cfg, DataReport()):
            holdout.append(pairs[i])
        else:
            rest.append(i)
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
    report.check_lengths("pairs", trainer_cfg.max_length, trainer_cfg.max_prompt_length)
    report.log_losses("pair(s)", trainer_cfg.max_length, data_cfg.dedup)
    if not examples:
        hint = " or raise trainer.max_length" if report.dropped.get("too_long") else ""
        raise UserError(
            f"No preference pairs left after filtering the {report.read} rows of {data_cfg.path} "
            f"({report.held_out} held out; dropped: {report.describe_drops()}). Fix those fields{hint}."
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
    for i, row in enumerate(rows, 1):
        try:
            pairs.append(to_pair(row, fmt, system_prompt))
        except BadPair as exc:
            report.drop(exc.reason, f"row {i}: {exc.detail}" if exc.detail else "")
    return pairs
