"""Load a dataset, detect its format, apply the chat template and tokenize with loss masks.

Every example that does not make it into training is counted in a ``DataReport`` with its reason;
nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from typing import Any, Iterable, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.data.messages import BadRow, read_messages
from mistral_tune.data.mixture import SOURCE_COLUMN, add_into
from mistral_tune.data.report import DataReport, PreparedData
from mistral_tune.data.sources import SourceSpec, read_source, resolve_sources, source_format
from mistral_tune.data.splits import find_duplicates, load_eval_file, split_eval_and_train
from mistral_tune.data.tools import check_tool_conversation, read_tools
from mistral_tune.data.tools import fix_tool_call_ids as fix_ids

log = logging.getLogger(__name__)


FORMATS = {
    "messages": "a 'messages' list of {role, content} (chat)",
    "sharegpt": "a 'conversations' list of {from, value} (ShareGPT; from: human, gpt, system)",
    "alpaca": "'instruction', optional 'input', and 'output' (Alpaca)",
    "text": "a 'text' string (plain language-model text)",
}

FORMAT_FIELDS = {
    "messages": {"messages", "tools"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "input", "output"},
    "text": {"text"},
}


def detect_format(rows: list[dict[str, Any]], requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    columns = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    accepted = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise UserError(
        f"Could not detect the data format: columns found are {sorted(columns) or 'none'}. "
        f"Accepted formats: {accepted}. Rename the columns or set data.format."
    )


def to_messages(
    row: dict[str, Any], fmt: str, system_prompt: Optional[str], fix_tool_call_ids: bool = False
) -> Optional[list[dict[str, Any]]]:
    """Chat messages for a row, or None for plain text; raises ``BadRow`` (naming the field) on unusable rows.

    Function-calling rows (``tool_calls``, ``tool`` messages) are checked here (mistral_tune.data.tools):
    bad tool-call ids are generated with ``fix_tool_call_ids``, else the row is a ``bad_tool_call_id``."""
    return conversation(row, fmt, system_prompt, fix_tool_call_ids)[0]


def conversation(
    row: dict[str, Any], fmt: str, system_prompt: Optional[str], fix_tool_call_ids: bool = False
) -> tuple[Optional[list[dict[str, Any]]], list[dict[str, Any]], int]:
    """(messages or None for text, the row's tools, how many tool-call ids were generated)."""
    if fmt == "messages":
        tools = read_tools(row.get("tools"))
        messages = read_messages(row.get("messages"), "messages")
        fixed = 0
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            if fix_tool_call_ids:
                messages, fixed = fix_ids(messages)
            check_tool_conversation(messages)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return messages, tools, fixed
    return _plain_messages(row, fmt, system_prompt), [], 0


def _plain_messages(row: dict[str, Any], fmt: str, system_prompt: Optional[str]) -> Optional[list[dict[str, str]]]:
    if fmt == "text":
        return None
    if fmt == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if not isinstance(value, str):
                raise BadRow("missing_field", f"'{name}' is a {type(value).__name__}, not a string")
        for name, value in (("instruction", instruction), ("output", output)):
            if not value.strip():
                raise BadRow("empty_field", f"'{name}' is empty")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "sharegpt":
        messages = read_messages(row.get("conversations"), "conversations", sharegpt=True)
    else:
        messages = read_messages(row.get("messages"), "messages")
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def tokenize_rows(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str,
    system_prompt: Optional[str],
    report: DataReport,
    completion_only_loss: bool = True,
    fix_tool_call_ids: bool = False,
) -> list[dict[str, list[int]]]:
    """Rows to ``input_ids`` + ``labels``: -100 outside the assistant turns for chat data (and on turns with
    ``"weight": 0``), unless ``completion_only_loss`` is false (TRL SFTConfig's name): then every token of the
    conversation counts."""
    out = []
    for row in rows:
        try:
            messages, tools, fixed = conversation(row, fmt, system_prompt, fix_tool_call_ids)
            check_messages(messages, row)
            ids, mask = encode_messages(row, messages, tools, tokenizer)
        except BadRow as exc:  # rows arrive split and shuffled: the data check before this names their file line
            report.drop(exc.reason, exc.detail)
            continue
        except ValueError as exc:  # the chat template's own checks: roles that do not alternate
            report.drop("bad_roles", str(exc))
            continue
        if not completion_only_loss:
            mask = [1] * len(ids)
        report.lengths.append(len(ids))
        truncated = len(ids) > max_length
        if truncated:
            if truncation == "drop":
                report.dropped["too_long"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            report.dropped["no_loss_tokens"] += 1  # truncation cut every trained token (or all turns have weight 0)
            continue
        report.truncated += truncated  # counts kept examples only; a dropped one is counted above
        if messages is not None:  # turns, weights and tool use of the kept examples
            answers = [m for m in messages if m["role"] == "assistant"]
            report.assistant_turns += len(answers)
            if completion_only_loss:  # else every token is trained, weights included
                report.skipped_turns += sum(1 for m in answers if m.get("weight") == 0)
            report.tool_call_ids_fixed += fixed
            report.tool_rows += bool(tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages))
        # labels[i] is the token at i; the model shifts internally. The first token never counts.
        out.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out


def check_row(
    row: dict[str, Any], fmt: str, system_prompt: Optional[str] = None, fix_tool_call_ids: bool = False
) -> Optional[list[dict[str, Any]]]:
    """The row's messages (None for text); raises ``BadRow`` when it cannot become an example. Needs no
    tokenizer, so the data preflight runs it on every row before the model loads."""
    messages = to_messages(row, fmt, system_prompt, fix_tool_call_ids)
    check_messages(messages, row)
    return messages


def check_messages(messages: Optional[list[dict[str, Any]]], row: Optional[dict[str, Any]] = None) -> None:
    """``BadRow`` for a text row without text, or a conversation that does not end with an assistant turn."""
    if messages is None:
        if row is None:
            return
        text = row.get("text")
        if not isinstance(text, str):
            raise BadRow("missing_field", "no 'text'" if text is None else f"'text' is a {type(text).__name__}")
        if not text.strip():
            raise BadRow("empty_field", "'text' is empty")
    elif messages[-1]["role"] != "assistant":
        raise BadRow("no_assistant_turn", f"the last message is {messages[-1]['role']!r}, not 'assistant'")


def encode_row(row: dict[str, Any], fmt: str, tokenizer: Any, system_prompt: Optional[str]):
    """(ids, loss mask) of one row; raises ``BadRow``, or ``ValueError`` from the chat template."""
    messages, tools, _ = conversation(row, fmt, system_prompt)
    check_messages(messages, row)
    return encode_messages(row, messages, tools, tokenizer)


def encode_messages(row: dict[str, Any], messages: Optional[list], tools: list, tokenizer: Any):
    """(ids, loss mask): the text row's tokens, or the conversation through the tokenizer's chat format.

    Tool data on a tokenizer whose format has no tools (v1) stops the run with one error: every such
    row would be lost, and the cure is a different model, not different rows."""
    if messages is None:
        ids = tokenizer.encode(row["text"], add_bos=True, add_eos=True)
        return ids, [1] * len(ids)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        if not getattr(tokenizer, "supports_tools", False):
            raise UserError(
                f"This data has function calling (tools, tool_calls, tool messages), but the model's chat format "
                f"{getattr(tokenizer, 'chat_format', '?')!r} has no tool calls. Use a preset with the v3 tokenizer "
                "or later (e.g. model=mistral_0.3_tiny, mistral_nemo_tiny, mistral_0.3_instruct_7b_en)."
            )
        return tokenizer.encode_chat(messages, tools=tools or None)
    return tokenizer.encode_chat(messages)


def tokenize_options(data_cfg: Any, trainer_cfg: Any) -> dict[str, Any]:
    """The keyword arguments of ``tokenize_rows`` a run's config gives (training and validate-data alike)."""
    return dict(
        max_length=trainer_cfg.max_length,
        truncation=trainer_cfg.truncation,
        system_prompt=data_cfg.system_prompt,
        completion_only_loss=trainer_cfg.completion_only_loss,
        fix_tool_call_ids=getattr(data_cfg, "fix_tool_call_ids", False),
    )


def prepare_sft_data(data_cfg: Any, trainer_cfg: Any, tokenizer: Any) -> PreparedData:
    """Load, split off the holdout and the eval split, tokenize; every lost row is counted.

    Several sources (``data.sources``, ``data.path="a.jsonl:5,b.jsonl:1"``) are prepared each on its own and
    interleaved by weight (``prepare_mixture``; the sampling rules are in mistral_tune.data.mixture)."""
    from datasets import Dataset

    specs = resolve_sources(data_cfg)
    if len(specs) > 1:
        return prepare_mixture(specs, data_cfg, trainer_cfg, tokenizer)
    spec = specs[0]
    report = DataReport()
    rows = read_source(spec, data_cfg.split, data_cfg.on_error, report)
    report.read += len(rows)
    if not rows:
        raise UserError(f"{spec.key}={spec.name} holds no examples ({dict(report.dropped) or 'empty file'}).")
    fmt = detect_format(rows, source_format(spec, data_cfg))
    rows = find_duplicates(rows, data_cfg.dedup, report)
    fields = FORMAT_FIELDS[fmt]  # rows lacking them are counted as missing_field below, not here
    report.extra_fields = sum(1 for r in rows if set(r) & fields and set(r) - fields)
    order = list(range(len(rows)))
    random.Random(data_cfg.seed).shuffle(order)
    holdout_n = min(data_cfg.holdout, max(len(rows) - 1, 0))
    holdout, rest = [rows[i] for i in order[:holdout_n]], order[holdout_n:]
    # Held-out rows prompt samples.jsonl, so they must be usable too; unusable ones are dropped and counted.
    options = tokenize_options(data_cfg, trainer_cfg)
    holdout = [r for r in holdout if tokenize_rows([r], fmt, tokenizer, report=report, **options)]
    report.reset_length_counts()  # counted for training examples only
    holdout_n = report.held_out = len(holdout)
    eval_rows, train_rows = split_eval_and_train(data_cfg, rows, rest, report, "rows")
    eval_fmt, eval_report = fmt, DataReport()
    eval_file_rows = load_eval_file(data_cfg, eval_report)
    if eval_file_rows is not None:
        eval_rows, eval_fmt = eval_file_rows, detect_format(eval_file_rows, data_cfg.format)
    examples = tokenize_rows(train_rows, fmt, tokenizer, report=report, **options)
    report.used = len(examples)
    report.check_lengths("examples", trainer_cfg.max_length)
    report.log_losses("example(s)", trainer_cfg.max_length, data_cfg.dedup)
    if report.extra_fields:
        log.info(
            "data: %d row(s) have fields the %s format does not use; those fields are ignored", report.extra_fields, fmt
        )
    if not examples:
        hint = ", or raise trainer.max_length" if report.dropped.get("too_long") else ""
        raise UserError(
            f"No training examples left after filtering the {report.read} rows of {spec.name} "
            f"({holdout_n} held out; dropped: {report.describe_drops()}). Fix those fields{hint}."
        )
    eval_ds = None
    if eval_rows:
        eval_examples = tokenize_rows(eval_rows, eval_fmt, tokenizer, report=eval_report, **options)
        report.eval_read = eval_report.read + len(eval_rows)  # skipped bad lines (on_error=skip) + rows
        report.eval_dropped = eval_report.dropped
        eval_ds = eval_dataset(report, eval_examples)
    log.info(
        "data: %s format, %d read, %d training examples, %d held out%s",
        fmt,
        report.read,
        report.used,
        holdout_n,
        f", {report.eval_used} for evaluation" if eval_ds is not None else "",
    )
    return PreparedData(Dataset.from_list(examples), eval_ds, holdout, fmt, report)


def eval_dataset(report: DataReport, examples: list[dict[str, Any]]) -> Any:
    """The tokenized evaluation split as a Dataset; its drops are logged, and an empty split is an error."""
    from datasets import Dataset

    report.eval_used = len(examples)
    for reason, n in sorted(report.eval_dropped.items()):
        log.warning("data: dropped %d evaluation example(s): %s", n, reason)
    if not examples:
        raise UserError(f"No evaluation examples left after filtering the {report.eval_read} rows of data.eval_split.")
    return Dataset.from_list(examples)


def prepare_mixture(specs: list[SourceSpec], data_cfg: Any, trainer_cfg: Any, tokenizer: Any) -> PreparedData:
    """Tokenize every source and interleave them by weight; returns the mixture as ``PreparedData``.

    The holdout rows (samples.jsonl) come from the first source with chat data (the first source when all are
    text), whose format becomes the run's ``data_format``. ``data.eval_split`` as a fraction takes that share of
    every source; as a file, it is read as usual.
    """
    from datasets import Dataset, interleave_datasets

    options = tokenize_options(data_cfg, trainer_cfg)
    loaded = []
    for spec in specs:
        report = DataReport()
        rows = read_source(spec, data_cfg.split, data_cfg.on_error, report)
        report.read += len(rows)
        if not rows:
            raise UserError(f"{spec.key}={spec.name} holds no examples ({dict(report.dropped) or 'empty file'}).")
        loaded.append((spec, report, rows, detect_format(rows, source_format(spec, data_cfg))))
    primary = next((k for k, item in enumerate(loaded) if item[3] != "text"), 0)

    total = DataReport()
    datasets, eval_examples, holdout, per_source = [], [], [], []
    for k, (spec, report, rows, fmt) in enumerate(loaded):
        rows = find_duplicates(rows, data_cfg.dedup, report)
        fields = FORMAT_FIELDS[fmt]
        report.extra_fields = sum(1 for r in rows if set(r) & fields and set(r) - fields)
        order = list(range(len(rows)))
        random.Random(data_cfg.seed * 1_000_003 + k).shuffle(order)
        holdout_n = min(data_cfg.holdout, max(len(rows) - 1, 0)) if k == primary else 0
        kept, rest = [rows[i] for i in order[:holdout_n]], order[holdout_n:]
        kept = [r for r in kept if tokenize_rows([r], fmt, tokenizer, report=report, **options)]
        report.reset_length_counts()
        report.held_out = len(kept)
        holdout.extend(kept)
        eval_rows, train_rows = split_eval_and_train(data_cfg, rows, rest, report, f"rows of {spec.key}")
        if eval_rows:
            eval_report = DataReport()
            eval_examples += tokenize_rows(eval_rows, fmt, tokenizer, report=eval_report, **options)
            total.eval_read += len(eval_rows)
            total.eval_dropped.update(eval_report.dropped)
        examples = tokenize_rows(train_rows, fmt, tokenizer, report=report, **options)
        report.used = len(examples)
        if not examples:
            hint = ", or raise trainer.max_length" if report.dropped.get("too_long") else ""
            raise UserError(
                f"{spec.key}={spec.name}: no training examples left after filtering its {report.read} rows "
                f"(dropped: {report.describe_drops()}). Fix those fields{hint}, or remove the source."
            )
        for ex in examples:
            ex[SOURCE_COLUMN] = [k] * len(ex["input_ids"])
        datasets.append(Dataset.from_list(examples))
        add_into(total, report, spec)
        per_source.append({
            "name": spec.name, "key": spec.key, "files": len(spec.files), "format": fmt, "weight": spec.weight,
            "read": report.read, "used": report.used, "held_out": report.held_out,
            "dropped": dict(report.dropped), "dropped_total": sum(report.dropped.values()),
            "truncated": report.truncated, "tokens": sum(len(ex["input_ids"]) for ex in examples),
        })  # fmt: skip

    weights = [spec.weight for spec in specs]
    probabilities = [w / sum(weights) for w in weights]
    mixed = interleave_datasets(
        datasets, probabilities=probabilities, seed=data_cfg.seed, stopping_strategy=data_cfg.stopping_strategy
    )
    drawn = Counter(ids[0] for ids in mixed[SOURCE_COLUMN])
    for k, source in enumerate(per_source):
        source["share"] = round(probabilities[k], 6)
        source["in_one_pass"] = drawn.get(k, 0)  # examples of this source in one pass over the mixture
        source["epochs_per_pass"] = round(drawn.get(k, 0) / source["used"], 4)
    total.sources = per_source
    total.mixture = {"sources": len(specs), "stopping_strategy": data_cfg.stopping_strategy,
                     "seed": data_cfg.seed, "examples_per_pass": len(mixed)}  # fmt: skip
    total.check_lengths("examples", trainer_cfg.max_length)
    total.log_losses("example(s)", trainer_cfg.max_length, data_cfg.dedup)
    for source in per_source:
        log.info(
            "data: source %s (%s, weight %g = %.1f%%): %d read, %d used, %d per pass over the mixture (%.2f epochs)",
            source["name"], source["format"], source["weight"], 100 * source["share"], source["read"],
            source["used"], source["in_one_pass"], source["epochs_per_pass"],
        )  # fmt: skip

    eval_ds = None
    eval_file_rows = load_eval_file(data_cfg, eval_report := DataReport())
    if eval_file_rows is not None:
        eval_fmt = detect_format(eval_file_rows, data_cfg.format)
        eval_examples = tokenize_rows(eval_file_rows, eval_fmt, tokenizer, report=eval_report, **options)
        total.eval_read = eval_report.read + len(eval_file_rows)
        total.eval_dropped = eval_report.dropped
    if total.eval_read:
        eval_ds = eval_dataset(total, eval_examples)
    fmt = loaded[primary][3]
    log.info(
        "data: mixture of %d sources (%s), %d read, %d training examples, %d per pass (stopping_strategy=%s), "
        "%d held out%s",
        len(specs), "+".join(dict.fromkeys(item[3] for item in loaded)), total.read, total.used, len(mixed),
        data_cfg.stopping_strategy, total.held_out, f", {total.eval_used} for evaluation" if eval_ds else "",
    )  # fmt: skip
    return PreparedData(mixed, eval_ds, holdout, fmt, total)


def prompt_and_reference(row: dict[str, Any], fmt: str, system_prompt: Optional[str]):
    """Split a held-out row into the conversation to prompt with and the reference answer."""
    messages = to_messages(row, fmt, system_prompt)
    if messages is None:
        words = row["text"].split()
        half = max(1, len(words) // 2)
        return " ".join(words[:half]), " ".join(words[half:])
    last = messages[-1]
    if last.get("tool_calls") and not last["content"]:  # the reference is the call itself
        return messages[:-1], json.dumps([c["function"] for c in last["tool_calls"]], ensure_ascii=False)
    return messages[:-1], last["content"]
