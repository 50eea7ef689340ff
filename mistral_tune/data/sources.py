"""Read rows from a local .jsonl/.json/.parquet file, a directory of .jsonl files, the bundled samples or a
hub dataset; a bad line is reported with ``file:line`` and either fails the run or is counted and skipped
(``data.on_error``).

Sources (one or a weighted mixture) are described by ``SourceSpec``; ``resolve_sources(data_cfg)`` turns the
``data`` config group (``data.sources``, or ``data.path`` with its ``a.jsonl:5,b.jsonl:1`` shorthand) into
them, and ``read_source_rows(spec, ...)`` reads one source's rows with where each came from.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

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


def read_jsonl(path: Path, on_error: str = "fail", report: Optional[DataReport] = None) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, on_error, report)]


def iter_jsonl(
    path: Path, on_error: str = "fail", report: Optional[DataReport] = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(f"{path}:{line}", row)`` for every usable line; bad lines go to ``_bad_row`` (fail or count)."""
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
            yield where, row


def load_records(
    path: str, split: str = "train", on_error: str = "fail", report: Optional[DataReport] = None
) -> list[dict[str, Any]]:
    local = resolve_local_path(path)
    if local is None:
        return load_hub_dataset(path, split)
    return [row for _, row in iter_file(local, on_error, report)]


def iter_file(
    local: Path, on_error: str = "fail", report: Optional[DataReport] = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every usable row of one local file: ``where`` is ``file:line`` (.jsonl),
    ``file[index]`` (.json, a list) or ``file#row`` (.parquet, 1-based)."""
    if local.suffix == ".jsonl":
        yield from iter_jsonl(local, on_error, report)
        return
    if local.suffix == ".parquet":
        for i, row in enumerate(read_parquet(local), 1):
            yield f"{local}#row{i}", row
        return
    if local.suffix == ".json":
        try:
            data = parse_json_row(local.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{local}: not valid UTF-8 JSON ({exc}); a .json file must parse as a whole.") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{local}: expected a JSON list of objects.")
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
                yield f"{local}[{i}]", row


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


# ---- sources: one, or a weighted mixture (data.sources, or data.path="a.jsonl:5,b.jsonl:1") ----


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a run.

    - ``name``: the path or hub dataset name as the user wrote it (``data/x.jsonl``, ``shards/``, ``org/set``);
    - ``key``: where it was configured, for messages (``data.path``, ``data.path[2]``, ``data.sources[1]``);
    - ``files``: the local files read in order (a directory: its ``*.jsonl`` files, sorted by name); ``()`` for
      a hub dataset;
    - ``format``: ``auto`` (detect from the rows) or a format name; a source's ``auto`` falls back to
      ``data.format``;
    - ``weight``: the sampling weight (> 0), relative to the other sources' (1.0 for a single source).
    """

    name: str
    key: str
    files: tuple[Path, ...]
    format: str = "auto"
    weight: float = 1.0

    @property
    def hub(self) -> bool:
        return not self.files


def resolve_source_files(path: str, key: str = "data.path") -> tuple[Path, ...]:
    """The local files of one source: a file (as ``resolve_local_path``), or a directory's ``*.jsonl`` files
    sorted by name; ``()`` for a hub dataset name. Raises ``UserError`` for anything else."""
    if not path.strip():
        raise UserError(f"{key} is empty; give a file, a directory of .jsonl files or a hub dataset name.")
    p = Path(path).expanduser()
    if p.is_dir():
        files = tuple(sorted(f for f in p.iterdir() if f.suffix == ".jsonl" and f.is_file()))
        if not files:
            others = sorted(f.name for f in p.iterdir())[:5]
            raise UserError(
                f"{key}={path} is a directory with no .jsonl file in it"
                + (f" (found: {', '.join(others)})" if others else " (it is empty)")
                + "; a directory source reads every *.jsonl file directly inside it."
            )
        return files
    try:
        local = resolve_local_path(path)
    except UserError as exc:
        raise UserError(str(exc).replace("data.path=", f"{key}=", 1)) from None
    return (local,) if local is not None else ()


def parse_weighted_paths(text: str) -> list[tuple[str, Optional[float], str]]:
    """``"a.jsonl:5,b.jsonl:1"`` -> ``[("a.jsonl", 5.0, "data.path[0]"), ("b.jsonl", 1.0, "data.path[1]")]``.

    An entry without ``:weight`` gets weight None (meaning 1). ``path:`` followed by something that is not a
    number is refused unless that whole entry is an existing file. A plain ``data.path`` (no comma, no
    ``:weight``) gives one entry keyed ``data.path``.
    """
    parts = [part.strip() for part in text.split(",")]
    several = len(parts) > 1
    out = []
    for i, part in enumerate(parts):
        key = f"data.path[{i}]" if several else "data.path"
        if not part:
            raise UserError(
                f"data.path={text!r}: entry {i + 1} is empty (expected PATH or PATH:WEIGHT, comma-separated)."
            )
        path, weight = part, None
        if ":" in part and not Path(part).expanduser().exists():
            head, tail = part.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                raise UserError(
                    f"{key}={part!r}: the weight {tail!r} after ':' is not a number "
                    '(expected PATH:WEIGHT, e.g. data.path="a.jsonl:5,b.jsonl:1").'
                ) from None
            path = head.strip()
            if not path:
                raise UserError(f"{key}={part!r} has a weight but no path.")
        out.append((path, weight, key))
    return out


def _check_weight(key: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UserError(f"{key}.weight={weight!r} is not a number; weights are positive numbers (e.g. 5, 1, 0.5).")
    weight = float(weight)
    if not weight > 0 or math.isinf(weight):  # `not >` also catches nan
        raise UserError(f"{key} weight={weight:g} must be a finite number > 0 (a source you do not want: remove it).")
    return weight


def resolve_sources(data_cfg: Any) -> list[SourceSpec]:
    """The data sources of ``data_cfg`` (the ``data`` config group), in the order given.

    ``data.sources`` (a list of ``{path, format, weight}``) wins when it is non-empty; otherwise ``data.path``,
    either one path or the weighted shorthand ``"a.jsonl:5,b.jsonl:1"``. Every entry is checked (the file or
    directory exists, weights are positive numbers, formats are known) without importing torch; all problems
    are reported in one ``UserError``. Hub dataset names are not contacted here.
    """
    from mistral_tune.config.schema import SFT_DATA_FORMATS

    entries: list[tuple[str, Any, str, str]] = []  # (path, weight, format, key)
    sources = list(getattr(data_cfg, "sources", None) or [])
    if sources:
        for i, src in enumerate(sources):
            key = f"data.sources[{i}]"
            get = src.get if hasattr(src, "get") else (lambda k, d=None, s=src: getattr(s, k, d))
            path = get("path")
            if not isinstance(path, str):
                raise UserError(f"{key}.path is missing; every source needs a path (file, directory or hub name).")
            weight = get("weight", 1.0)
            entries.append((path, 1.0 if weight is None else weight, get("format", "auto") or "auto", key))
    else:
        for path, weight, key in parse_weighted_paths(str(data_cfg.path)):
            entries.append((path, 1.0 if weight is None else weight, "auto", key))
    problems, specs = [], []
    for path, weight, fmt, key in entries:
        try:
            weight = _check_weight(key, weight)
            if fmt not in ("auto", *SFT_DATA_FORMATS):
                raise UserError(f"{key}.format={fmt!r} is not one of auto, {', '.join(SFT_DATA_FORMATS)}")
            specs.append(
                SourceSpec(name=path, key=key, files=resolve_source_files(path, key), format=fmt, weight=weight)
            )
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        head = "The data sources have problems:\n  - " if len(problems) > 1 else ""
        raise UserError(head + "\n  - ".join(problems))
    return specs


def is_mixture(data_cfg: Any) -> bool:
    """True when the config names more than one source (``data.sources`` or a comma in ``data.path``)."""
    return bool(list(getattr(data_cfg, "sources", None) or [])) or "," in str(data_cfg.path)


def read_source_rows(
    spec: SourceSpec, split: str = "train", on_error: str = "fail", report: Optional[DataReport] = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of one source, files in order: ``where`` is ``file:line`` for .jsonl,
    ``file[i]`` for .json, ``file#rowN`` for .parquet and ``name[i]`` for a hub dataset. A bad line fails
    with ``file:line`` (``on_error="fail"``) or is counted in ``report`` (``"skip"``), as ``load_records``."""
    if spec.hub:
        return [(f"{spec.name}[{i}]", row) for i, row in enumerate(load_hub_dataset(spec.name, split))]
    out = []
    for path in spec.files:
        out.extend(iter_file(path, on_error, report))
    return out


def read_source(
    spec: SourceSpec, split: str = "train", on_error: str = "fail", report: Optional[DataReport] = None
) -> list[dict[str, Any]]:
    """The rows of one source (``read_source_rows`` without the locations)."""
    return [row for _, row in read_source_rows(spec, split, on_error, report)]


def source_format(spec: Optional[SourceSpec], data_cfg: Any) -> str:
    """The format asked for a source: its own ``format``, else ``data.format`` (``auto``: detect from its rows)."""
    return spec.format if spec is not None and spec.format != "auto" else data_cfg.format
