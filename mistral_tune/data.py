"""Load a dataset, detect its format, apply the chat template and tokenize with loss masks.

Every example that does not make it into training is counted in a ``DataReport`` with its reason;
nothing is dropped silently.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import UserError
from .presets import is_hub_id

log = logging.getLogger(__name__)

FORMATS = {
    "messages": "a 'messages' list of {role, content} (chat)",
    "alpaca": "'instruction', optional 'input', and 'output' (Alpaca)",
    "text": "a 'text' string (plain language-model text)",
}
FORMAT_FIELDS = {"messages": {"messages"}, "alpaca": {"instruction", "input", "output"}, "text": {"text"}}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
BUNDLED_DIR = Path(__file__).parent / "data"  # sample data inside an installed wheel
SOURCE_DIR = Path(__file__).parent.parent  # the repository root in a source checkout


@dataclass
class DataReport:
    """What happened to every input example."""

    read: int = 0  # rows and unparseable lines seen: read = used + held_out + dropped_total
    used: int = 0
    held_out: int = 0
    truncated: int = 0
    duplicates: int = 0  # exact duplicate rows found (dropped only with data.dedup=true)
    extra_fields: int = 0  # rows with fields the format does not use (ignored, kept)
    dropped: Counter = field(default_factory=Counter)
    bad_lines: list = field(default_factory=list)  # "file:line: reason" of the first skipped lines
    eval_read: int = 0  # rows of the eval split (data.eval_split); a fraction of data.path counts in read too
    eval_used: int = 0
    eval_dropped: Counter = field(default_factory=Counter)

    MAX_BAD_LINES = 20

    def skip_line(self, where: str, reason: str, detail: str) -> None:
        self.read += 1
        self.dropped[reason] += 1
        if len(self.bad_lines) < self.MAX_BAD_LINES:
            self.bad_lines.append(f"{where}: {detail}")

    def log_losses(self, unit: str, max_length: int, dedup: bool) -> None:
        """Warn about every training example (``unit``: examples, pairs) dropped, skipped, kept twice or cut."""
        for reason, n in sorted(self.dropped.items()):
            log.warning("data: dropped %d %s: %s", n, unit, reason)
        for where in self.bad_lines:
            log.warning("data: skipped %s", where)
        if self.duplicates and not dedup:
            log.warning("data: %d exact duplicate row(s) kept; set data.dedup=true to drop them", self.duplicates)
        if self.truncated:
            log.warning("data: truncated %d %s to trainer.max_length=%d", self.truncated, unit, max_length)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "used": self.used,
            "held_out": self.held_out,
            "truncated": self.truncated,
            "duplicates": self.duplicates,
            "extra_fields": self.extra_fields,
            "dropped": dict(self.dropped),
            "dropped_total": sum(self.dropped.values()),
            "bad_lines": list(self.bad_lines),
            "eval_read": self.eval_read,
            "eval_used": self.eval_used,
            "eval_dropped": dict(self.eval_dropped),
        }


@dataclass
class PreparedData:
    """Everything ``prepare_sft_data`` hands to the run."""

    train: Any  # datasets.Dataset of input_ids + labels
    eval: Any  # the same for data.eval_split, or None
    holdout: list  # raw rows whose prompts feed samples.jsonl
    format: str
    report: DataReport


def resolve_local_path(path: str) -> Optional[Path]:
    """A local file for ``path``: as given, else the bundled sample data; None for a hub name."""
    if any(ch in path for ch in "*?["):
        raise UserError(f"data.path={path} is a glob pattern; pass one file (matches: {len(glob.glob(path))}).")
    p = Path(path).expanduser()
    for candidate in (p, BUNDLED_DIR / p.name, SOURCE_DIR / p) if not p.is_absolute() else (p,):
        if candidate.is_dir():
            raise UserError(f"data.path={path} is a directory; pass one .jsonl, .json or .parquet file in it.")
        if candidate.is_file():
            if candidate.suffix not in LOCAL_SUFFIXES:
                raise UserError(
                    f"data.path={path}: unsupported file type '{candidate.suffix}' (use .jsonl, .json or .parquet)."
                )
            return candidate
    if p.suffix in LOCAL_SUFFIXES or "/" not in path or not is_hub_id(path):
        raise UserError(f"data.path={path}: no such file (looked in {Path.cwd()} and the bundled sample data).")
    return None


def _bad_row(where: str, reason: str, detail: str, on_error: str, report: Optional[DataReport]) -> None:
    """Fail with ``file:line`` (on_error=fail) or count the row as dropped (on_error=skip)."""
    if on_error != "skip" or report is None:
        raise UserError(f"{where}: {detail}. Fix the line, or set data.on_error=skip to skip and count such lines.")
    report.skip_line(where, reason, detail)


def read_jsonl(path: Path, on_error: str = "fail", report: Optional[DataReport] = None) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _bad_row(
                    where,
                    "invalid_utf8",
                    f"not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
                    on_error,
                    report,
                )
                continue
            try:
                row = json.loads(text.lstrip("\ufeff") if lineno == 1 else text)  # tolerate a UTF-8 BOM
            except json.JSONDecodeError as exc:
                _bad_row(where, "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})", on_error, report)
                continue
            if not isinstance(row, dict):
                _bad_row(where, "not_an_object", f"expected a JSON object, got {type(row).__name__}", on_error, report)
                continue
            rows.append(row)
    return rows


def load_records(
    path: str, split: str = "train", on_error: str = "fail", report: Optional[DataReport] = None
) -> list[dict[str, Any]]:
    local = resolve_local_path(path)
    if local is None:
        return load_hub_dataset(path, split)
    if local.suffix == ".jsonl":
        return read_jsonl(local, on_error, report)
    if local.suffix == ".json":
        try:
            data = json.loads(local.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{local}: not valid UTF-8 JSON ({exc}); a .json file must parse as a whole.") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{local}: expected a JSON list of objects.")
        rows = []
        for i, row in enumerate(data):
            if isinstance(row, dict):
                rows.append(row)
            else:
                _bad_row(
                    f"{local}[{i}]",
                    "not_an_object",
                    f"expected a JSON object, got {type(row).__name__}",
                    on_error,
                    report,
                )
        return rows
    import pyarrow.parquet as pq

    return pq.read_table(local).to_pylist()


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub: without it, ``load_dataset`` retries for ~25 s before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    import datasets
    from huggingface_hub import constants

    # In offline mode datasets answers from its cache at once; otherwise fail fast when the hub is unreachable.
    if not (constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE) and not hub_reachable():
        raise UserError(
            f"Could not reach the Hugging Face hub to fetch dataset '{name}'. This machine looks offline. "
            "Download it elsewhere, save it as .jsonl/.json/.parquet, and pass data.path=that/file "
            "(or set HF_DATASETS_OFFLINE=1 to use a copy already in the datasets cache)."
        )
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # offline shows up as ConnectionError or hub-specific types
        text = f"{type(exc).__name__}: {exc}"
        if any(s in text for s in ("Connect", "offline", "Offline", "resolve", "Couldn't reach", "Name or service")):
            raise UserError(
                f"Could not reach the Hugging Face hub to fetch dataset '{name}'. This machine looks offline. "
                "Download it elsewhere, save it as .jsonl/.json/.parquet, and pass data.path=that/file."
            ) from exc
        raise


def detect_format(rows: list[dict[str, Any]], requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    columns = set().union(*(r.keys() for r in rows[:100])) if rows else set()
    if "messages" in columns:
        return "messages"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    accepted = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    raise UserError(
        f"Could not detect the data format: columns found are {sorted(columns) or 'none'}. "
        f"Accepted formats: {accepted}. Rename the columns or set data.format."
    )


def to_messages(row: dict[str, Any], fmt: str, system_prompt: Optional[str]) -> Optional[list[dict[str, str]]]:
    """Chat messages for a row, or None for plain text; raises ValueError on unusable rows."""
    if fmt == "text":
        return None
    if fmt == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise ValueError("missing_field")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("missing_field")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
        raise ValueError("empty_field")
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
) -> list[dict[str, list[int]]]:
    """Rows to ``input_ids`` + ``labels`` (-100 outside the assistant turns for chat data)."""
    out = []
    for row in rows:
        try:
            messages = to_messages(row, fmt, system_prompt)
            if messages is None:
                text = row.get("text")
                if not isinstance(text, str):
                    raise ValueError("missing_field")
                if not text.strip():
                    raise ValueError("empty_field")
                ids = tokenizer.encode(text, add_bos=True, add_eos=True)
                mask = [1] * len(ids)
            else:
                if messages[-1]["role"] != "assistant":
                    raise ValueError("no_assistant_turn")
                ids, mask = tokenizer.encode_chat(messages)
        except ValueError as exc:
            reason = str(exc) if str(exc) in ("missing_field", "empty_field", "no_assistant_turn") else "bad_roles"
            report.dropped[reason] += 1
            continue
        truncated = len(ids) > max_length
        if truncated:
            if truncation == "drop":
                report.dropped["too_long"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            report.dropped["no_loss_tokens"] += 1  # truncation cut every assistant token
            continue
        report.truncated += truncated  # counts kept examples only; a dropped one is counted above
        # labels[i] is the token at i; the model shifts internally. The first token never counts.
        out.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return out


def split_eval_and_train(data_cfg: Any, items: list, rest: list[int], report: DataReport, noun: str):
    """(eval items, training items) from ``rest``, the shuffled indices of ``items`` left after the holdout.

    ``data.eval_split`` as a fraction takes the first of them for eval; the training items keep file
    order and are capped at ``data.max_samples`` (the excess is counted as ``over_max_samples``).
    """
    from .config import eval_fraction

    fraction = eval_fraction(data_cfg.eval_split)
    eval_items = []
    if fraction is not None:
        eval_n = max(1, round(fraction * len(rest)))
        if eval_n >= len(rest):
            raise UserError(
                f"data.eval_split={data_cfg.eval_split} of {len(rest)} {noun} leaves nothing to train on; "
                "use a smaller fraction."
            )
        eval_items, rest = [items[i] for i in rest[:eval_n]], rest[eval_n:]
    train = [items[i] for i in sorted(rest)]
    if data_cfg.max_samples is not None and len(train) > data_cfg.max_samples:
        report.dropped["over_max_samples"] += len(train) - data_cfg.max_samples
        train = train[: data_cfg.max_samples]
    return eval_items, train


def load_eval_file(data_cfg: Any, eval_report: DataReport) -> Optional[list[dict]]:
    """The rows of ``data.eval_split`` when it names a file (None for a fraction or no eval split)."""
    from .config import eval_fraction

    if not data_cfg.eval_split or eval_fraction(data_cfg.eval_split) is not None:
        return None
    rows = load_records(data_cfg.eval_split, data_cfg.split, data_cfg.on_error, eval_report)
    if not rows:
        raise UserError(f"data.eval_split={data_cfg.eval_split} holds no examples.")
    return rows


def prepare_sft_data(data_cfg: Any, trainer_cfg: Any, tokenizer: Any) -> PreparedData:
    """Load, split off the holdout and the eval split, tokenize; every lost row is counted."""
    from datasets import Dataset

    report = DataReport()
    rows = load_records(data_cfg.path, data_cfg.split, data_cfg.on_error, report)
    report.read += len(rows)
    if not rows:
        raise UserError(f"data.path={data_cfg.path} holds no examples ({dict(report.dropped) or 'empty file'}).")
    fmt = detect_format(rows, data_cfg.format)
    rows = find_duplicates(rows, data_cfg.dedup, report)
    fields = FORMAT_FIELDS[fmt]  # rows lacking them are counted as missing_field below, not here
    report.extra_fields = sum(1 for r in rows if set(r) & fields and set(r) - fields)
    order = list(range(len(rows)))
    random.Random(data_cfg.seed).shuffle(order)
    holdout_n = min(data_cfg.holdout, max(len(rows) - 1, 0))
    holdout, rest = [rows[i] for i in order[:holdout_n]], order[holdout_n:]
    # Held-out rows prompt samples.jsonl, so they must be usable too; unusable ones are dropped and counted.
    options = dict(
        max_length=trainer_cfg.max_length, truncation=trainer_cfg.truncation, system_prompt=data_cfg.system_prompt
    )
    holdout = [r for r in holdout if tokenize_rows([r], fmt, tokenizer, report=report, **options)]
    report.truncated = 0  # counted for training examples only
    holdout_n = report.held_out = len(holdout)
    eval_rows, train_rows = split_eval_and_train(data_cfg, rows, rest, report, "rows")
    eval_fmt, eval_report = fmt, DataReport()
    eval_file_rows = load_eval_file(data_cfg, eval_report)
    if eval_file_rows is not None:
        eval_rows, eval_fmt = eval_file_rows, detect_format(eval_file_rows, data_cfg.format)
    examples = tokenize_rows(train_rows, fmt, tokenizer, report=report, **options)
    report.used = len(examples)
    report.log_losses("example(s)", trainer_cfg.max_length, data_cfg.dedup)
    if report.extra_fields:
        log.info(
            "data: %d row(s) have fields the %s format does not use; those fields are ignored", report.extra_fields, fmt
        )
    if not examples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise UserError(
            f"No training examples left after filtering the {report.read} rows of {data_cfg.path} "
            f"({holdout_n} held out; dropped: {reasons or 'none'}). Check the rows' fields, or raise "
            "trainer.max_length if they were too long."
        )
    eval_ds = None
    if eval_rows:
        eval_examples = tokenize_rows(eval_rows, eval_fmt, tokenizer, report=eval_report, **options)
        report.eval_read = eval_report.read + len(eval_rows)  # skipped bad lines (on_error=skip) + rows
        report.eval_used, report.eval_dropped = len(eval_examples), eval_report.dropped
        for reason, n in sorted(eval_report.dropped.items()):
            log.warning("data: dropped %d evaluation example(s): %s", n, reason)
        if not eval_examples:
            raise UserError(
                f"No evaluation examples left after filtering the {len(eval_rows)} rows of data.eval_split."
            )
        eval_ds = Dataset.from_list(eval_examples)
    log.info(
        "data: %s format, %d read, %d training examples, %d held out%s",
        fmt,
        report.read,
        report.used,
        holdout_n,
        f", {report.eval_used} for evaluation" if eval_ds is not None else "",
    )
    return PreparedData(Dataset.from_list(examples), eval_ds, holdout, fmt, report)


def find_duplicates(rows: list[dict[str, Any]], dedup: bool, report: DataReport) -> list[dict[str, Any]]:
    """Count exact duplicate rows (same keys and values); drop all but the first when ``dedup``."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        if key in seen:
            report.duplicates += 1
            if dedup:
                report.dropped["duplicate"] += 1
                continue
        seen.add(key)
        kept.append(row)
    return kept


def prompt_and_reference(row: dict[str, Any], fmt: str, system_prompt: Optional[str]):
    """Split a held-out row into the conversation to prompt with and the reference answer."""
    messages = to_messages(row, fmt, system_prompt)
    if messages is None:
        words = row["text"].split()
        half = max(1, len(words) // 2)
        return " ".join(words[:half]), " ".join(words[half:])
    return messages[:-1], messages[-1]["content"]
