"""Several HEP ingest processes on one host (``hep.workers`` > 1), seen from the agent.

``WorkerPool`` takes the collector's place in the agent: the agent keeps the web API, the mirror,
the registration, the sightings, the detections book, the evidence and the store, and the pool
starts ``hep.workers`` processes (``hep_worker``) that serve the HEP ports and do the per-packet
work. For each worker the pool binds one UDP and one TCP socket on the HEP ports with
``SO_REUSEPORT`` and hands them over, so a port in use is the same one-line error as with one
process, and the kernel spreads the packets by HEP sender (address and port: all of one sender's
packets go to one worker).

About twice a second each worker sends a batch; the pool merges it (``worker_merge``): per
address the counts are added to the sightings (which judge them against the list and flag them,
as for a packet), the findings go to the detections book, the packets of protected addresses to
the evidence, and the counters into the collector's own stats and the refusals, so /api/v1/status
and /metrics show the totals of all workers. A big batch is merged in slices, so enrichment keeps
its deadline.

Back to the workers, once a second when it changed: the protected addresses (listed or detected,
at most ``MAX_PROTECTED_PUSHED``, most recent first), whose packets the workers then keep, and the
HEP senders any worker met (capture agents are never attackers, whichever worker sees them).

A worker that dies, or sends no batch for ``STALL_TIMEOUT`` (stuck), is logged and started again,
after 0.5 s, doubling to 30 s while it keeps dying within a minute of its start; what it had not
sent yet is lost, its counters up to its last batch are kept. Stopping the agent stops the workers
(each sends a last batch); a worker whose agent is gone stops by itself (its control socket
closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ..core.access import Refusals
from ..core.config import Address, ConfigError, Settings
from ..detection.detector import Detector, Report
from .collector import bind_listener, exposure_warning, rcvbuf_warning, udp_socket
from .evidence import Evidence
from .sightings import Sightings
from .worker_merge import MAX_SENDERS, MERGE_SLICE, PoolMerge
from .worker_slots import MAX_BEHIND, Key, Slot, WorkerFailed, _probe, _tell, _words, _worker_environment

# What moved to worker_merge and worker_slots, still importable from here.
__all__ = [
    "MAX_BEHIND",
    "MAX_SENDERS",
    "MERGE_SLICE",
    "Key",
    "PoolMerge",
    "Slot",
    "WorkerFailed",
    "WorkerPool",
    "_probe",
    "_tell",
    "_words",
    "_worker_environment",
]
from .worker_wire import (
    DROPPED,
    NO_FD,
    frame,
    read_frame,
    read_report,
)

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.workers")
START_TIMEOUT = 30.0  # seconds a worker may take to start (an interpreter and the package imported)
STOP_TIMEOUT = 5.0  # seconds a worker may take to send its last batch and exit
STALL_TIMEOUT = 15.0  # seconds without a batch (they come twice a second) before a worker is killed
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # seconds before a dead worker is started again
HEALTHY_AFTER = 60.0  # seconds a worker must have run for its next restart to wait BACKOFF_MIN
PUSH_EVERY = 1.0  # seconds between updates of the protected addresses and HEP senders
MAX_PROTECTED_PUSHED = 100_000


class WorkerPool(PoolMerge):
    """The HEP collector of an agent with ``hep.workers`` > 1: the packets are handled in worker processes.

    Owns the worker processes (``slots``), their sockets on the HEP ports and the merge of their batches
    into the agent's ``Sightings``, detection book, ``Evidence``, counters and refusals. Built by
    ``create_app`` in the collector's place; read by /api/v1/status and /metrics as the collector is.

    Never parses what a worker sends beyond its length-prefixed JSON and evidence records, never holds
    the event loop with one big batch (merged in slices), and never lets a worker outlive the agent.
    """

    def __init__(
        self,
        sightings: Sightings,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        refusals: Refusals | None = None,
        detector: Detector | None = None,
        evidence: Evidence | None = None,
        report: Report | None = None,
    ) -> None:
        super().__init__(sightings, settings.hep, clock, refusals, detector, evidence)
        # What a worker uses, and no other secret: a process that parses what anyone may send
        # gets neither the APIBAN key, nor HOMER's credentials, nor the store's password.
        self.workers_settings = Settings(
            hep=settings.hep,
            allow=settings.allow,
            log=settings.log,
            sightings=settings.sightings,
            detect=settings.detect,
        )
        self._report = report
        self._evidence_store = evidence
        self.slots = [Slot(index) for index in range(1, settings.hep.workers + 1)]
        self._udp_at: Address | None = None
        self._tcp_at: Address | None = None
        self.senders: OrderedDict[str, None] = OrderedDict()
        self.pushed: frozenset[str] = frozenset()
        self._senders_version = 0
        self._pushed_senders = 0
        self.restarts = 0
        self.dropped: Counter[str] = Counter(dict.fromkeys(DROPPED, 0))
        self.batches = 0
        self._retired_drops = 0  # kernel drops on the sockets of workers that are gone
        self._stopping = asyncio.Event()
        self.stall_timeout = STALL_TIMEOUT
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- start and stop

    async def start(self) -> None:
        hep = self._settings
        # Bound first without SO_REUSEPORT: a port held by anything, another agent's workers
        # included, is the single-process error; port 0 becomes the port all workers share.
        if hep.udp is not None:
            self._udp_at = _probe(hep.udp, socket.SOCK_DGRAM, "hep.udp")
        if hep.tcp is not None:
            self._tcp_at = _probe(hep.tcp, socket.SOCK_STREAM, "hep.tcp")
        started = await asyncio.gather(*(self._spawn(slot) for slot in self.slots), return_exceptions=True)
        failed = [exc for exc in started if isinstance(exc, BaseException)]
        if failed:
            await self._kill_all()
            if isinstance(failed[0], ConfigError | asyncio.CancelledError):
                raise failed[0]
            # One line and exit 2, as for the ports: out of processes or memory, or a broken install.
            problem = failed[0] if isinstance(failed[0], WorkerFailed) else _words(failed[0])
            raise ConfigError("hep.workers", f"a HEP worker process did not start: {problem}")
        self._tasks = [
            asyncio.create_task(self._supervise(slot), name=f"hep-worker-{slot.index}") for slot in self.slots
        ]
        self._tasks.append(asyncio.create_task(self._push(), name="hep-worker-push"))
        if self.stats.rcvbuf_granted is not None:
            rcvbuf_warning(hep, self.stats.rcvbuf_granted)
        log.info(
            "HEP on %s with %d worker processes (SO_REUSEPORT; the kernel spreads HEP senders over them)",
            ", ".join(
                f"{name} {address}"
                for name, address in (("udp", self._udp_at), ("tcp", self._tcp_at))
                if address
            ),
            len(self.slots),
        )
        warning = exposure_warning(hep, self.udp_address(), self.tcp_address())
        if warning:
            log.warning("%s", warning)

    async def stop(self) -> None:
        self._stopping.set()
        for slot in self.slots:
            _tell(slot, {"stop": True}, urgent=True)
        supervisors = self._tasks[: len(self.slots)]
        if supervisors:
            await asyncio.wait(supervisors, timeout=STOP_TIMEOUT)
        await self._kill_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _kill_all(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    def udp_address(self) -> tuple[str, int] | None:
        return None if self._udp_at is None else (self._udp_at.host, self._udp_at.port)

    def tcp_address(self) -> tuple[str, int] | None:
        return None if self._tcp_at is None else (self._tcp_at.host, self._tcp_at.port)

    def kernel_drops(self) -> int | None:
        if self._udp_at is None:
            return None
        live = [slot.gauges.get("kernel_drops") for slot in self.slots if slot.up]
        return self._retired_drops + sum(int(n) for n in live if n)

    def up(self) -> int:
        return sum(slot.up for slot in self.slots)

    def tracked(self) -> int:
        """Remote addresses the workers' detectors keep counters for."""
        return sum(int(slot.gauges.get("tracked", 0)) for slot in self.slots if slot.up)

    def to_json(self) -> dict[str, Any]:
        return {
            "configured": len(self.slots),
            "up": self.up(),
            "restarts": self.restarts,
            "batches": self.batches,
            "dropped": dict(self.dropped),
            "processes": [slot.to_json() for slot in self.slots],
        }

    # ---------------------------------------------------------------- one worker

    async def _spawn(self, slot: Slot) -> None:
        """Start the worker of ``slot`` and wait until it serves its sockets."""
        udp = udp_socket(self._settings, self._udp_at, reuse_port=True) if self._udp_at else None
        try:
            tcp = (
                bind_listener(self._tcp_at, socket.SOCK_STREAM, "hep.tcp", reuse_port=True)
                if self._tcp_at
                else None
            )
        except ConfigError:
            if udp is not None:
                udp.close()
            raise
        if udp is not None:
            self.stats.rcvbuf_granted = udp.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno(), *(NO_FD if s is None else s.fileno() for s in (udp, tcp))]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hepsub_apiban.ingest.hep_worker",
                *map(str, fds),
                pass_fds=[fd for fd in fds if fd != NO_FD],
                stdin=asyncio.subprocess.DEVNULL,
                env=_worker_environment(),
            )
        except OSError:
            ours.close()
            raise
        finally:
            # The worker holds its own copies: the socket lives as long as it does.
            for sock in (theirs, udp, tcp):
                if sock is not None:
                    sock.close()
        slot.process, slot.started, slot.counts, slot.gauges = process, time.monotonic(), {}, {}
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        slot.reader, slot.writer = reader, writer
        init = {
            "settings": self.workers_settings,
            "index": slot.index,
            "protected": list(self.pushed),
            "senders": list(self.senders),
            "authenticated": list(self._detector.authenticated().items()) if self._detector else [],
        }
        writer.write(frame(pickle.dumps(init)))
        try:
            body = await asyncio.wait_for(read_frame(reader), START_TIMEOUT)
            answer = read_report(body)[0] if body is not None else {"error": "it exited at start"}
        except (TimeoutError, OSError, ValueError, struct.error) as exc:
            answer = {"error": f"no answer ({type(exc).__name__})"}
        if not answer.get("ready"):
            writer.close()
            raise WorkerFailed(f"worker {slot.index}: {answer.get('error', 'no answer')}")
        slot.up = True
        log.info("HEP worker %d started (pid %d)", slot.index, process.pid)

    async def _supervise(self, slot: Slot) -> None:
        """Merge the worker's batches; when it dies, start it again with backoff."""
        backoff = BACKOFF_MIN
        while True:
            if slot.up:
                await self._serve(slot)
                code = await slot.process.wait() if slot.process is not None else None
                self._retire(slot)
                if self._stopping.is_set():
                    return
                ran = time.monotonic() - slot.started
                backoff = BACKOFF_MIN if ran >= HEALTHY_AFTER else backoff
                log.warning(
                    "HEP worker %d (pid %s) exited with %s after %.1f s; starting it again in %.1f s",
                    slot.index,
                    slot.process.pid if slot.process is not None else "?",
                    code,
                    ran,
                    backoff,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                return
            backoff = min(BACKOFF_MAX, backoff * 2)
            slot.restarts += 1
            self.restarts += 1
            try:
                await self._spawn(slot)
            except (WorkerFailed, ConfigError, OSError) as exc:
                await self._kill(slot)
                log.warning("HEP worker %d not started again: %s", slot.index, exc)
            if self._stopping.is_set():  # stopped while it started: it never heard the stop
                await self._kill(slot)
                return

    async def _serve(self, slot: Slot) -> None:
        reader = slot.reader
        assert reader is not None
        try:
            # A worker sends a batch twice a second, with or without traffic: one that has sent
            # nothing for stall_timeout is stuck (or stopped), and is started again.
            while (body := await asyncio.wait_for(read_frame(reader), self.stall_timeout)) is not None:
                await self._merge(slot, *read_report(body))
        except TimeoutError:
            log.error("HEP worker %d sent nothing for %.0f s; stopping it", slot.index, self.stall_timeout)
            await self._kill(slot)
        except (OSError, ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
            if slot.process is not None and slot.process.returncode is None:
                log.error("HEP worker %d: broken batch stream (%s); stopping it", slot.index, exc)
            await self._kill(slot)

    async def _kill(self, slot: Slot) -> None:
        process = slot.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _retire(self, slot: Slot) -> None:
        """The worker is gone: its sockets' drops are final, its connections closed."""
        slot.up = False
        self._retired_drops += int(slot.gauges.get("kernel_drops") or 0)
        slot.gauges = {}
        self._gauges()
        if slot.writer is not None:
            slot.writer.close()
            slot.writer = None

    # ---------------------------------------------------------------- to the workers

    async def _push(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY)
            self.push()

    def push(self) -> None:
        """Tell every worker the protected addresses and the HEP senders, when they changed."""
        message: dict[str, Any] = {}
        if self._evidence_store is not None:
            # Least recently touched first: the newest MAX_PROTECTED_PUSHED.
            protected = frozenset(list(self.sightings.protected_addresses())[-MAX_PROTECTED_PUSHED:])
            if protected != self.pushed:
                self.pushed = protected
                message["protected"] = list(protected)
        if self._senders_version != self._pushed_senders:
            self._pushed_senders = self._senders_version
            message["senders"] = list(self.senders)
        behind = [slot.index for slot in self.slots if message and not _tell(slot, message)]
        if behind:
            # A worker that was not told is told everything again at the next push.
            self.pushed, self._pushed_senders = frozenset(), -1
