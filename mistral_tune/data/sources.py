"""Read rows from a local .jsonl/.json/.parquet file, the bundled samples or a hub dataset; a bad line
is reported with ``file:line`` and either fails the run or is counted and skipped (``data.on_error``).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.models.presets import is_hub_id

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

BUNDLED_DIR = Path(__file__).resolve().parent  # sample data inside an installed wheel

SOURCE_DIR = Path(__file__).resolve().parents[2]  # the repository root in a source checkout


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


def lone_surrogate(value: Any) -> Optional[str]:
    """The first string in a parsed JSON value that UTF-8 cannot encode (a lone ``\\ud800`` escape), else None.

    JSON allows such escapes, but the tokenizers cannot encode them. Walked with a stack, not recursion:
    the JSON parser accepts nesting close to the interpreter's recursion limit.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return item[exc.start : exc.end]
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json_row(text: str) -> Any:
    """``json.loads`` with the two failures a hostile line causes besides bad syntax made ValueErrors."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise ValueError("malformed JSON (nested too deeply)") from exc
    return row


def read_jsonl(
    path: Path, on_error: str = "fail", report: Optional[DataReport] = None, positions: Optional[list[str]] = None
) -> list[dict[str, Any]]:
    """The rows of a JSONL file; ``positions``, when given, receives each kept row's ``file:line``."""
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, possibly before a blank first line
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
                row = parse_json_row(text)
            except ValueError as exc:
                _bad_row(where, "malformed_json", str(exc), on_error, report)
                continue
            if not isinstance(row, dict):
                _bad_row(where, "not_an_object", f"expected a JSON object, got {type(row).__name__}", on_error, report)
                continue
            bad = lone_surrogate(row)
            if bad is not None:
                _bad_row(where, "invalid_utf8", f"not valid UTF-8 (lone surrogate {bad!r})", on_error, report)
                continue
            rows.append(row)
            if positions is not None:
                positions.append(where)
    return rows


def load_records(
    path: str,
    split: str = "train",
    on_error: str = "fail",
    report: Optional[DataReport] = None,
    positions: Optional[list[str]] = None,
) -> list[dict[str, Any]]:
    """The rows of ``path``; ``positions``, when given, receives where each kept row came from:
    ``file:line`` for JSONL, ``file[i]`` for a .json list, parquet file or hub dataset."""
    local = resolve_local_path(path)
    if local is None:
        rows = load_hub_dataset(path, split)
        if positions is not None:
            positions.extend(f"{path}[{i}]" for i in range(len(rows)))
        return rows
    if local.suffix == ".jsonl":
        return read_jsonl(local, on_error, report, positions)
    if local.suffix == ".json":
        try:
            data = parse_json_row(local.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{local}: not valid UTF-8 JSON ({exc}); a .json file must parse as a whole.") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{local}: expected a JSON list of objects.")
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                _bad_row(
                    f"{local}[{i}]",
                    "not_an_object",
                    f"expected a JSON object, got {type(row).__name__}",
                    on_error,
                    report,
                )
            elif (bad := lone_surrogate(row)) is not None:
                _bad_row(f"{local}[{i}]", "invalid_utf8", f"not valid UTF-8 (lone surrogate {bad!r})", on_error, report)
            else:
                rows.append(row)
                if positions is not None:
                    positions.append(f"{local}[{i}]")
        return rows
    rows = read_parquet(local)
    if positions is not None:
        positions.extend(f"{local}[{i}]" for i in range(len(rows)))
    return rows


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """All rows of a parquet file; an unreadable one (empty, truncated, not parquet) is one clear error.

    A damaged parquet file cannot be read row by row, so it fails with either ``data.on_error``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}). Re-export it, or convert it to .jsonl."
        ) from exc


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
