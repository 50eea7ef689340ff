"""Safetensors read and written a tensor (or a block of rows) at a time, with plain file I/O.

``safetensors.safe_open`` memory-maps a shard; every page a merge reads then stays in the process's
resident set (as file-backed RSS) until the shard is closed, so a 5 GB base shard costs 5 GB of RSS.
``ShardReader`` reads the bytes it is asked for with ``os.pread`` instead (the page cache still
holds them, but not this process), and ``PlannedShardWriter`` writes each shard's header first
(names, dtypes and shapes are known in advance) and then each tensor as soon as it exists, so no
output shard is ever buffered. Together they keep a streamed merge or a random-init checkpoint of
any size at about one tensor of memory.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

from mistral_tune.core.errors import UserError

# safetensors dtype name -> torch dtype name
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_NAMES = {v: k for k, v in DTYPES.items()}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (transformers' max_shard_size convention)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"max_shard_size={text!r} is not a size like 500MB or 2GB.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def safetensors_dtype(torch_dtype: Any) -> str:
    return _NAMES[str(torch_dtype).removeprefix("torch.")]


def _element_size(code: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, DTYPES[code])).element_size()


class TensorView:
    """One tensor of a shard: ``view[i:j]`` reads rows i..j (``view[:]`` all of it) from the file."""

    def __init__(self, reader: "ShardReader", name: str, info: dict[str, Any]):
        self.reader, self.name = reader, name
        self.code, self.shape = info["dtype"], list(info["shape"])
        self.begin, self.end = info["data_offsets"]

    def get_dtype(self) -> str:
        return self.code

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, rows: slice):
        import torch

        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("TensorView takes a slice of rows: view[i:j] or view[:]")
        dtype = getattr(torch, DTYPES[self.code])
        if not self.shape:
            i, j, row_bytes = 0, 1, self.end - self.begin
        else:
            i, j, _ = rows.indices(self.shape[0])
            j = max(i, j)
            row_bytes = (self.end - self.begin) // max(1, self.shape[0])
        shape = [j - i, *self.shape[1:]] if self.shape else []
        out = torch.empty(shape, dtype=dtype)
        nbytes = (j - i) * row_bytes
        if nbytes:
            buf = out.view(-1).view(torch.uint8) if out.numel() else out
            offset = self.reader.data_start + self.begin + i * row_bytes
            view = memoryview(buf.numpy()).cast("B")
            done = 0
            while done < nbytes:
                n = os.preadv(self.reader.fd, [view[done:]], offset + done)
                if n <= 0:
                    raise UserError(f"{self.reader.path} ends inside tensor {self.name}: the file is truncated.")
                done += n
        return out


class ShardReader:
    """A safetensors file opened for reads; use as a context manager (closes the descriptor)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, length, 8))
        except (struct.error, ValueError) as e:
            os.close(self.fd)
            raise UserError(f"{self.path} is not a safetensors file ({e}).") from e
        self.data_start = 8 + length
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        size = os.fstat(self.fd).st_size
        if self.data_start + end > size:
            os.close(self.fd)
            raise UserError(
                f"{self.path} is truncated: its header describes {self.data_start + end:,} bytes, the file has {size:,}."
            )

    def keys(self) -> list[str]:
        """Tensor names in file order (the order safetensors' own ``keys()`` returns them)."""
        return sorted(self.header, key=lambda k: self.header[k]["data_offsets"][0])

    def get_slice(self, name: str) -> TensorView:
        return TensorView(self, name, self.header[name])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plan_shards(entries: Iterable[tuple[str, list[int], str]], max_bytes: int) -> list[list[tuple]]:
    """Group (name, shape, safetensors dtype) entries, in order, into shards of at most ``max_bytes``
    (a tensor larger than that gets a shard of its own), as transformers' ``max_shard_size`` does."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for name, shape, code in entries:
        nbytes = _element_size(code)
        for dim in shape:
            nbytes *= dim
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, list(shape), code, nbytes))
        size += nbytes
    return [s for s in shards if s]


class PlannedShardWriter:
    """Writes planned shards; ``add(name, tensor)`` must follow the plan's order, name, shape and dtype.

    Each shard's header is written when its first tensor arrives, each tensor's bytes straight after,
    so memory is one tensor whatever the shard size. ``finish()`` renames to Hugging Face's names
    (``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` and the index).
    """

    def __init__(self, out_dir: Path, plan: list[list[tuple]], metadata: Optional[dict[str, str]] = None):
        self.out_dir, self.plan = Path(out_dir), plan
        self.metadata = {"format": "pt", **(metadata or {})}
        self.queue = [(s, k) for s in range(len(plan)) for k in range(len(plan[s]))]
        self.position = 0
        self.file = None
        self.files: list[Path] = []
        self.total = 0

    def _open(self, shard: int) -> None:
        offsets, header = 0, {}
        for name, shape, code, nbytes in self.plan[shard]:
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offsets, offsets + nbytes]}
            offsets += nbytes
        raw = json.dumps({"__metadata__": self.metadata, **header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        path = self.out_dir / f"part-{shard:05d}.safetensors"
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.files.append(path)

    def add(self, name: str, tensor: Any) -> None:
        if self.position >= len(self.queue):
            raise ValueError(f"tensor {name} is beyond the planned shards")
        shard, k = self.queue[self.position]
        planned, shape, code, nbytes = self.plan[shard][k]
        if (planned, shape, code) != (name, list(tensor.shape), safetensors_dtype(tensor.dtype)):
            raise ValueError(
                f"expected {planned} {shape} {code}, got {name} {list(tensor.shape)} {safetensors_dtype(tensor.dtype)}"
            )
        if k == 0:
            if self.file is not None:
                self.file.close()
            self._open(shard)
        import torch

        data = tensor.detach().contiguous().cpu()
        raw = data.view(-1).view(torch.uint8) if data.numel() and data.dim() else data.reshape(1).view(torch.uint8)
        self.file.write(memoryview(raw.numpy()))
        self.total += nbytes
        self.position += 1

    def finish(self) -> list[str]:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.position != len(self.queue):
            raise ValueError(f"only {self.position} of {len(self.queue)} planned tensors were written")
        n = len(self.files)
        if n == 1:
            self.files[0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, (path, shard) in enumerate(zip(self.files, self.plan), 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            weight_map.update({entry[0]: final for entry in shard})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
