"""What a job on several machines needs beyond one machine: every machine must see the same run
directory, a lost machine must be named, and the topology and each machine's throughput reported.

The processes talk through torchrun's rendezvous store: the TCPStore that the launching agent of
machine 0 hosts at MASTER_ADDR:MASTER_PORT, which the workers' own process group also joins as clients
(TORCHELASTIC_USE_AGENT_STORE). It is up before any model or process group exists, and stays up as
long as machine 0's launcher does, so it can also tell which ranks still answer after a collective
failed. Outside a torchrun launch (one process, or a launcher without the agent store) every function
here answers for this process alone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.core.process import machine_rank, num_machines, rank, world_size

# How long the ranks that survived a failed collective get to say so, before the others count as lost.
ANSWER_SECONDS = 10.0

_store: Any = None
_ranks: list[dict] = []  # every rank's {rank, machine_rank, host}, from register()


def rendezvous_store(timeout: float) -> Any:
    """A client of torchrun's store, or None outside a multi-process torchrun launch."""
    global _store
    if world_size() == 1:
        return None
    if _store is None:
        from mistral_tune.compat.torch_elastic import agent_store

        client = agent_store(timeout)
        if client is None:
            return None
        from torch.distributed import PrefixStore

        # a torchrun restart reuses the agent's store: keep each attempt's keys apart
        _store = PrefixStore(f"mistral_tune/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    return _store


def _all(store: Any, prefix: str) -> list[dict]:
    keys = [f"{prefix}/{r}" for r in range(world_size())]
    store.wait(keys)
    return [json.loads(store.get(k)) for k in keys]


def register(timeout: float) -> list[dict]:
    """Every rank says where it runs; returns all ranks' ``{rank, machine_rank, host}`` (rank order)."""
    global _ranks
    me = {"rank": rank(), "machine_rank": machine_rank(), "host": socket.gethostname()}
    store = rendezvous_store(timeout)
    if store is not None:
        store.set(f"ranks/{rank()}", json.dumps(me))
    _ranks = _all(store, "ranks") if store is not None else [me]
    return _ranks


def topology(per_device_batch: int, accumulation: int) -> str:
    """``2 machines x 1 process, global batch 4 (2 per device x 2 accumulation steps x 1 process)``."""
    machines, world = num_machines(), world_size()
    per_machine = world // machines
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"  # noqa: E731
    return (
        f"{plural(machines, 'machine')} x {plural(per_machine, 'process')}, global batch "
        f"{per_device_batch * accumulation * world} ({per_device_batch} per device x "
        f"{plural(accumulation, 'accumulation step')} x {plural(world, 'process')})"
    )


def check_shared_directories(dirs: dict[str, Path], timeout: float) -> None:
    """Fail on every rank, with one message, when a machine does not see what machine 0 wrote in ``dirs``.

    ``dirs`` maps a config key (``output_dir``) to its directory. Rank 0 writes a token file with a
    fresh random name into each; every rank looks for it. A node-local directory (each machine its own
    ``/scratch/run``) passes every other check and would fail later, or worse, not at all: each machine
    would keep half of the checkpoints.
    """
    store = rendezvous_store(timeout)
    if store is None or num_machines() == 1:
        return
    token_name = f".mistral-tune-shared-{uuid.uuid4().hex}" if rank() == 0 else None
    if rank() == 0:
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
            (path / token_name).write_text(token_name, encoding="utf-8")
        store.set("shared/token", token_name)
    token_name = store.get("shared/token").decode()
    missing = [key for key, path in dirs.items() if not (path / token_name).is_file()]
    store.set(f"shared/seen/{rank()}", json.dumps({"machine_rank": machine_rank(), "host": socket.gethostname(),
                                                   "missing": missing}))  # fmt: skip
    answers = _all(store, "shared/seen")
    if rank() == 0:
        for path in dirs.values():
            (path / token_name).unlink(missing_ok=True)
    blind: dict[str, set[str]] = {}
    for answer in answers:
        for key in answer["missing"]:
            blind.setdefault(key, set()).add(f"machine {answer['machine_rank']} ({answer['host']})")
    if blind:
        where = "; ".join(f"{key}={dirs[key]}: not seen by {', '.join(sorted(m))}" for key, m in blind.items())
        raise UserError(
            f"This job spans {num_machines()} machines, but they do not share its directories: {where}. "
            "Machine 0 wrote a file there that the others cannot see, so each machine has its own local "
            "directory and the run's checkpoints and outputs would be split between them. Point these "
            "paths at a filesystem every machine mounts at the same path (NFS, Lustre, ...)."
        )


def is_collective_failure(exc: BaseException) -> bool:
    """A failure of communication between processes (a peer died, hung or became unreachable)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
               "timed out", "NCCL communicator was aborted", "Socket Timeout")  # fmt: skip
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)


class LostRanks(RuntimeError):
    """Raised in place of a collective failure once the ranks that stopped answering are known."""


def name_lost_ranks(exc: BaseException, step: int, timeout: float) -> BaseException:
    """After a collective failed: every surviving rank answers through the store; the silent ones are lost.

    Returns a ``LostRanks`` error naming them (or ``exc`` itself when every rank answered, i.e. the
    failure began in some process's own error, which that process reports).
    """
    store = rendezvous_store(timeout)
    if store is None:
        return exc
    try:
        store.set(f"alive/{rank()}", "1")
        deadline = time.monotonic() + ANSWER_SECONDS
        lost = [r for r in _ranks if r["rank"] != rank()]
        while lost and time.monotonic() < deadline:
            lost = [r for r in lost if not store.check([f"alive/{r['rank']}"])]
            time.sleep(0.2)
    except Exception as store_exc:  # noqa: BLE001 - machine 0's launcher itself is gone: say so, keep the cause
        return LostRanks(f"lost contact with machine 0's launcher (the rendezvous store): {store_exc}; cause: {exc}")
    if not lost:
        return exc
    names = ", ".join(f"rank {r['rank']} (machine {r['machine_rank']}, host {r['host']})" for r in lost)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LostRanks(
        f"lost {names} after step {step}: it stopped answering (its process or machine died, or the network "
        f"to it failed), and rank {rank()} gave up after at most train.ddp_timeout={int(timeout)} s. "
        f"Rerun the same command with resume=auto on every machine to continue from the last complete "
        f"checkpoint. Cause: {first_line}"
    )


def machine_throughput(tokens: int, seconds: float, timeout: float) -> list[dict] | None:
    """Tokens and tokens/s of each machine (its processes' tokens over its slowest process's time).

    A collective over the store: every rank must call it. Rank 0 gets the list, the others None.
    """
    mine = {"machine_rank": machine_rank(), "host": socket.gethostname(), "tokens": tokens, "seconds": seconds}
    store = rendezvous_store(timeout)
    if store is not None:
        store.set(f"throughput/{rank()}", json.dumps(mine))
        if rank() != 0:
            return None
    answers = _all(store, "throughput") if store is not None else [mine]
    machines: dict[int, dict] = {}
    for a in answers:
        m = machines.setdefault(a["machine_rank"], {"machine_rank": a["machine_rank"], "host": a["host"],
                                                    "processes": 0, "tokens_seen": 0, "seconds": 0.0})  # fmt: skip
        m["processes"] += 1
        m["tokens_seen"] += a["tokens"]
        m["seconds"] = max(m["seconds"], a["seconds"])
    out = []
    for m in sorted(machines.values(), key=lambda m: m["machine_rank"]):
        seconds = m.pop("seconds")
        m["tokens_per_second"] = round(m["tokens_seen"] / max(seconds, 1e-9), 1)
        out.append(m)
    return out
