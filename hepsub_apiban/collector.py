"""HEP collector: UDP and TCP listeners that feed decoded SIP packets into the sightings.

Whatever a sender does, the collector only counts: a bad datagram is counted and dropped, a
bad TCP stream closes that connection only, idle connections time out, and the number of TCP
connections is capped. The UDP socket asks for a large receive buffer because the kernel drops
datagrams silently once it is full; what the kernel granted is logged, and its drop counter is
read at scrape time where Linux reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import Address, ConfigError, HepSettings
from .hep import BadPacket, HepPacket, HepStream, decode
from .sightings import Sightings
from .sip import parse_sip

log = logging.getLogger(__name__)

SIP = 1
READ_SIZE = 65536


@dataclass(slots=True)
class CollectorStats:
    packets: Counter[str] = field(default_factory=Counter)  # transport -> packets decoded
    by_version: Counter[tuple[str, int]] = field(default_factory=Counter)  # (transport, HEP version)
    bad: Counter[str] = field(default_factory=Counter)  # reason -> packets dropped
    non_sip: Counter[int] = field(default_factory=Counter)  # HEP protocol type -> packets
    unparsable_sip: int = 0
    tcp_open: int = 0
    tcp_accepted: int = 0
    tcp_refused: int = 0
    tcp_closed_bad: int = 0
    tcp_idle_closed: int = 0
    rcvbuf_granted: int | None = None


class HepCollector:
    def __init__(
        self, sightings: Sightings, settings: HepSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self._sightings = sightings
        self._settings = settings
        self._clock = clock
        self.stats = CollectorStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- packets

    def handle(self, result: HepPacket | BadPacket, transport: str) -> None:
        if isinstance(result, BadPacket):
            self.stats.bad[result.reason] += 1
            return
        self.stats.packets[transport] += 1
        self.stats.by_version[(transport, result.version)] += 1
        if result.proto_type != SIP:
            self.stats.non_sip[result.proto_type] += 1
            return
        sip = parse_sip(result.payload)
        if sip is None:
            self.stats.unparsable_sip += 1
            return
        self._sightings.record(result.src_ip, result.dst_ip, sip, result.ts_sec + result.ts_usec / 1e6)

    # ---------------------------------------------------------------- listeners

    async def start(self) -> None:
        if self._settings.udp is not None:
            await self._start_udp(self._settings.udp)
        if self._settings.tcp is not None:
            await self._start_tcp(self._settings.tcp)

    async def _start_udp(self, address: Address) -> None:
        sock = _bind(address, socket.SOCK_DGRAM, "hep.udp")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._settings.rcvbuf)
        # Linux doubles the request and caps it at net.core.rmem_max; say what we really got.
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.stats.rcvbuf_granted = granted
        if granted < self._settings.rcvbuf:
            log.warning(
                "HEP UDP receive buffer: asked for %d bytes, the kernel granted %d "
                "(raise net.core.rmem_max to avoid drops under load)",
                self._settings.rcvbuf,
                granted,
            )
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self, self._clock), sock=sock)
        self._udp = transport
        log.info("HEP over UDP on %s:%s (receive buffer %d bytes)", *sock.getsockname()[:2], granted)

    async def _start_tcp(self, address: Address) -> None:
        sock = _bind(address, socket.SOCK_STREAM, "hep.tcp")
        self._tcp = await asyncio.start_server(self._accept, sock=sock, limit=READ_SIZE)
        log.info("HEP over TCP on %s:%s", *sock.getsockname()[:2])

    def udp_address(self) -> tuple[str, int] | None:
        return None if self._udp is None else self._udp.get_extra_info("sockname")[:2]

    def tcp_address(self) -> tuple[str, int] | None:
        if self._tcp is None or not self._tcp.sockets:
            return None
        host, port = self._tcp.sockets[0].getsockname()[:2]
        return host, port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.tcp_open >= self._settings.max_connections:
            self.stats.tcp_refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.stats.tcp_open += 1
        self.stats.tcp_accepted += 1
        try:
            await self._read_stream(reader)
        finally:
            self.stats.tcp_open -= 1
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_stream(self, reader: asyncio.StreamReader) -> None:
        stream = HepStream()
        while True:
            try:
                async with asyncio.timeout(self._settings.idle_timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                self.stats.tcp_idle_closed += 1
                return
            except (ConnectionError, OSError):
                return
            if not data:
                return
            for result in stream.feed(data, self._clock()):
                self.handle(result, "tcp")
            if stream.broken:
                self.stats.tcp_closed_bad += 1
                self.stats.bad[f"tcp stream: {stream.broken_reason}"] += 1
                return

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on our UDP socket (Linux /proc/net/udp*), if it says."""
        if self._udp is None:
            return None
        sock = self._udp.get_extra_info("socket")
        return _proc_udp_drops(sock.fileno(), sock.family) if sock is not None else None

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, collector: HepCollector, clock: Callable[[], float]) -> None:
        self._collector = collector
        self._clock = clock

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._collector.handle(decode(data, self._clock()), "udp")

    def error_received(self, exc: Exception) -> None:
        log.debug("HEP UDP socket error: %s", exc)


def _bind(address: Address, kind: int, setting: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(setting, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def _proc_udp_drops(fd: int, family: int) -> int | None:
    inode = str(os.fstat(fd).st_ino)
    table = Path("/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp")
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 13 and fields[9] == inode:
            return int(fields[-1])
    return None
