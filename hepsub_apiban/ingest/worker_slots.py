"""A place of the worker pool and the process in it, and what the pool does for one worker.

``Slot`` is one of the ``hep.workers`` places: the process running in it now, its control
stream, its counters so far and its gauges. ``_tell`` sends a worker a message unless it is
behind by more than ``MAX_BEHIND`` bytes; ``_worker_environment`` is the environment a worker
starts with (no setting, so no secret); ``_probe`` finds a HEP port's real number before the
workers bind it. ``workers.WorkerPool`` uses them; none of them starts or stops a process.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.config import LEGACY_ENV, Address
from .collector import bind_listener
from .worker_wire import frame

MAX_BEHIND = 8 << 20  # bytes a worker may have unread before pushes to it wait

Key = tuple[Any, ...]


class WorkerFailed(Exception):
    pass


@dataclass(slots=True)
class Slot:
    """One of the hep.workers places, and the process in it now."""

    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    up: bool = False
    started: float = 0.0  # time.monotonic() at the current process' start
    restarts: int = 0
    counts: dict[Key, int] = field(default_factory=dict)  # the current process' counters so far
    gauges: dict[str, Any] = field(default_factory=dict)
    packets: int = 0  # HEP packets decoded by this place's processes
    batches: int = 0  # batches merged from them

    def to_json(self) -> dict[str, Any]:
        alive = self.up and self.process is not None
        return {
            "index": self.index,
            "up": self.up,
            "pid": self.process.pid if alive and self.process is not None else None,
            "uptime": round(time.monotonic() - self.started, 3) if alive else None,
            "restarts": self.restarts,
            "packets": self.packets,
            "batches": self.batches,
            "tcp_connections": self.gauges.get("tcp_open", 0) if alive else 0,
        }


def _tell(slot: Slot, message: dict[str, Any], urgent: bool = False) -> bool:
    """Send ``message`` to the worker; False when, not ``urgent``, it was not sent because the
    worker is still behind with earlier ones (a worker not running is told all when it starts)."""
    writer = slot.writer
    if not slot.up or writer is None or writer.is_closing():
        return True
    if not urgent and writer.transport.get_write_buffer_size() > MAX_BEHIND:
        return False
    writer.write(frame(pickle.dumps(message)))
    return True


def _worker_environment() -> dict[str, str]:
    """The agent's environment without its settings: a worker gets what it uses in its first
    message, and so neither a secret set in the environment (HEPSUB_APIBAN_KEY, HOMER_TOKEN...)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HEPSUB_", "HOMER_")) and name not in LEGACY_ENV
    }


def _words(exc: BaseException) -> str:
    return str(exc.strerror) if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _probe(address: Address, kind: int, setting: str) -> Address:
    """``address`` with its real port, checked free for this agent alone."""
    sock = bind_listener(address, kind, setting, listen=False)
    try:
        port: int = sock.getsockname()[1]
    finally:
        sock.close()
    return Address(address.host, port)
