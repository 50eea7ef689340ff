"""torch.distributed.elastic internals: the rendezvous store that torchrun's agent hosts for its workers.

torchrun (and so ``accelerate launch``) starts, on machine 0, a TCPStore at MASTER_ADDR:MASTER_PORT and tells
its workers to join it as clients with ``TORCHELASTIC_USE_AGENT_STORE=True`` (set in
``torch.distributed.elastic.agent.server.local_elastic_agent``, read in ``torch.distributed.rendezvous``).
That contract between torch's own modules is not public API; tests/compat/test_compat_torch_elastic.py checks it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def agent_store(timeout: float) -> Any:
    """A new client of the store torchrun's agent hosts, or None when no torchrun agent shares one."""
    if os.environ.get(AGENT_STORE_ENV) != "True":
        return None
    from torch.distributed import TCPStore

    return TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout),
    )
