"""The data check a run makes first: read ``data.path`` (and an eval file), detect the format and convert every
row, with no tokenizer and no model. A file nothing can be trained on fails here, in about a second, instead of
after minutes of downloading and loading the model; the rows it would drop are counted again, with the same
reasons, when the data is tokenized.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.data.messages import BadRow
from mistral_tune.data.report import DataReport
from mistral_tune.data.sources import SourceSpec, load_records, read_source_rows, resolve_sources, source_format

log = logging.getLogger(__name__)


# Function-calling and weight errors: the line is wrong as written (not merely unusable, as an empty answer is),
# so with data.on_error=fail they stop the run at file:line, like a malformed line; with skip they are counted.
STRICT_REASONS = ("bad_tool_call_id", "bad_tool_call", "bad_tools", "bad_weight")


def row_location(path: str, index: int) -> str:
    """``file:line`` of the ``index``-th row (1-based) of a local .jsonl file read with data.on_error=fail
    (every non-blank line is then a row), ``file[i]`` of a .json list, else ``path row i``."""
    from mistral_tune.data.sources import resolve_local_path

    try:
        local = resolve_local_path(path)
    except UserError:
        local = None
    if local is not None and local.suffix == ".jsonl":
        seen = 0
        with local.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.strip():
                    seen += 1
                    if seen == index:
                        return f"{local}:{lineno}"
    if local is not None and local.suffix == ".json":
        return f"{local}[{index - 1}]"
    return f"{path} row {index}"


def check_data(data_cfg: Any, preference: bool) -> dict[str, Any]:
    """Check every row of ``data.path`` and of an eval file; returns ``{"format", "rows", "usable", "seconds"}``.

    Raises ``UserError`` for an undetectable format, a bad line (``data.on_error=fail``) or a file with no
    usable row, naming the first failing field of each drop reason.
    """
    from mistral_tune.config.schema import eval_fraction

    started = time.perf_counter()
    if preference:
        result = _check_file(data_cfg.path, "data.path", data_cfg, preference)
    else:  # one source, or each source of a weighted mixture (data.sources / "a.jsonl:5,b.jsonl:1")
        specs = resolve_sources(data_cfg)
        if list(getattr(data_cfg, "sources", None) or []):
            log.info("data: data.sources lists %d source(s); data.path=%s is not used", len(specs), data_cfg.path)
        checked = [_check_file(spec.name, spec.key, data_cfg, preference, spec) for spec in specs]
        result = checked[0] if len(checked) == 1 else {
            "format": "+".join(dict.fromkeys(c["format"] for c in checked)),
            "rows": sum(c["rows"] for c in checked),
            "usable": sum(c["usable"] for c in checked),
            "sources": [{"name": s.name, "weight": s.weight, **c} for s, c in zip(specs, checked)],
        }  # fmt: skip
    if data_cfg.eval_split and eval_fraction(data_cfg.eval_split) is None:
        _check_file(data_cfg.eval_split, "data.eval_split", data_cfg, preference)
    result["seconds"] = round(time.perf_counter() - started, 3)
    what = data_cfg.path if "sources" not in result else f"{len(result['sources'])} sources"
    log.info(
        "data: checked %d rows of %s before loading the model: %s format, %d usable (%.2f s)",
        result["rows"], what, result["format"], result["usable"], result["seconds"],
    )  # fmt: skip
    return result


def _check_file(path: str, key: str, data_cfg: Any, preference: bool, spec: SourceSpec | None = None) -> dict[str, Any]:
    report = DataReport()
    wheres: list[str] = []  # file:line of each row, when the source says (a directory's files included)
    if spec is not None:
        located = read_source_rows(spec, data_cfg.split, data_cfg.on_error, report)
        wheres, rows = [where for where, _ in located], [row for _, row in located]
    else:
        rows = load_records(path, data_cfg.split, data_cfg.on_error, report)
    if not rows:
        raise UserError(f"{key}={path} holds no examples ({dict(report.dropped) or 'empty file'}).")
    if preference:
        from mistral_tune.data.preference import detect_preference_format, to_pair

        fmt = detect_preference_format(rows, data_cfg.format)

        def check(row: dict) -> Any:
            return to_pair(row, fmt, data_cfg.system_prompt)
    else:
        from mistral_tune.data.sft import check_row, detect_format

        fmt = detect_format(rows, source_format(spec, data_cfg))

        fix_ids = getattr(data_cfg, "fix_tool_call_ids", False)

        def check(row: dict) -> Any:
            return check_row(row, fmt, data_cfg.system_prompt, fix_ids)

    usable = 0
    for i, row in enumerate(rows, 1):
        try:
            check(row)
            usable += 1
        except BadRow as exc:
            if exc.reason in STRICT_REASONS and data_cfg.on_error != "skip":
                raise UserError(
                    f"{wheres[i - 1] if wheres else row_location(path, i)}: {exc.detail}. Fix the line, or set data.on_error=skip to skip "
                    f"and count such lines ({exc.reason})."
                ) from None
            report.drop(exc.reason, f"row {i}: {exc.detail}")
    if not usable:
        raise UserError(
            f"{key}={path}: none of its {len(rows)} rows can be used as {fmt} data (dropped: "
            f"{report.describe_drops()}). Fix those fields, or set data.format if the format was detected wrongly."
        )
    if report.dropped:
        log.warning("data: %d of %d rows of %s cannot be used: %s", len(rows) - usable, len(rows), path,
                    report.describe_drops())  # fmt: skip
    return {"format": fmt, "rows": len(rows), "usable": usable}
