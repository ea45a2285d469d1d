"""HEP collector: UDP and TCP listeners that feed decoded SIP packets into the sightings.

Whatever a sender does, the collector only counts: a bad datagram is counted and dropped, a
bad TCP stream closes that connection only, and TCP connections are bounded in number and time
(``hep_tcp``). The UDP socket asks for a large receive buffer because the kernel drops
datagrams silently once it is full; what the kernel granted is logged, and its drop counter is
read at scrape time where Linux reports it.

Who may send: ``hep.allow_from`` is checked on a datagram's source address before it is decoded,
and on a TCP peer at accept. ``hep.auth_key``, when set, must be in a HEPv3 packet's chunk
0x000e (compared in constant time); HEPv1/v2 cannot carry it and are refused. A refused packet
changes no sighting; it is counted in ``Refusals`` (channels ``hep_udp``, ``hep_tcp``). With
neither setting, the UDP path is the one the ingest benchmark measures, without a single check.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..core.access import Refusals, SourceFilter
from ..core.config import Address, ConfigError, HepSettings
from ..detection.detector import Detector
from ..formats.hep import BadPacket, HepPacket, decode
from ..formats.sip import parse_sip
from .hep_tcp import CHANNEL as TCP_CHANNEL
from .hep_tcp import NOT_ALLOWED, HepTcpListener, TcpStats
from .sightings import Sightings

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.collector")
SIP = 1
UDP_CHANNEL = "hep_udp"
CHANNELS = {"udp": UDP_CHANNEL, "tcp": TCP_CHANNEL}  # transport -> refusal channel
NO_KEY = "no auth key"
WRONG_KEY = "wrong auth key"
KEYLESS_VERSION = "HEPv1/v2 while hep.auth_key is set"


@dataclass(slots=True)
class CollectorStats(TcpStats):
    packets: Counter[str] = field(default_factory=Counter)  # transport -> packets decoded
    by_version: Counter[tuple[str, int]] = field(default_factory=Counter)  # (transport, HEP version)
    bad: Counter[str] = field(default_factory=Counter)  # reason -> packets dropped
    non_sip: Counter[int] = field(default_factory=Counter)  # HEP protocol type -> packets
    unparsable_sip: int = 0
    rcvbuf_granted: int | None = None


class EvidenceSink(Protocol):
    """Where the packets of protected addresses go: ``Evidence`` in the agent, a batch bound for
    the main process in a HEP worker (``hep_worker``)."""

    @property
    def protected(self) -> Container[str]: ...

    def keep(self, packet: HepPacket) -> None: ...


def key_refusal(packet: HepPacket, key: bytes) -> str:
    """Why ``packet`` does not carry ``key`` (empty: it does). Constant time in the key's bytes."""
    if packet.version != 3:
        return KEYLESS_VERSION
    if not packet.auth_key:  # absent, or the empty chunk senders without a key write
        return NO_KEY
    if not hmac.compare_digest(packet.auth_key, key):
        return WRONG_KEY
    return ""


class HepCollector:
    """The HEP listeners of a one-process agent: every packet from socket to sightings, detection, evidence.

    Owns the UDP endpoint and the TCP listener (``hep_tcp``), its counters (``stats``) and the
    refusals of the HEP channels. Built by ``create_app`` with the ``Sightings``, the ``Detector`` and
    the ``Evidence`` it feeds; read by /api/v1/status and /metrics. ``WorkerPool`` takes its place when
    ``hep.workers`` > 1, and a HEP worker runs a subclass of it on the same code.

    ``handle`` runs on the event loop once per packet, so it must never await, never make an upstream
    request (a new address's /check is the sightings' background task), never raise on what a sender
    sent (a bad packet is counted and dropped), and stay a few dict probes for a packet nobody watches.
    """

    def __init__(
        self,
        sightings: Sightings,
        settings: HepSettings,
        clock: Callable[[], float] = time.time,
        refusals: Refusals | None = None,
        detector: Detector | None = None,
        evidence: EvidenceSink | None = None,
    ) -> None:
        self.sightings = sightings  # a HEP worker swaps in a fresh one for each batch it sends
        self._detector = detector
        self._evidence = evidence
        self._settings = settings
        self._clock = clock
        self.refusals = refusals if refusals is not None else Refusals()
        self.allowed = SourceFilter(settings.allow_from)
        self._key = settings.auth_key.encode() if settings.auth_key else None
        self.stats = CollectorStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: HepTcpListener | None = None

    # ---------------------------------------------------------------- packets

    def handle(self, result: HepPacket | BadPacket, transport: str, sender: str = "") -> None:
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
        self.sightings.record(result.src_ip, result.dst_ip, sip, result.ts_sec + result.ts_usec / 1e6)
        detector = self._detector
        if detector is not None:
            # The receive time, not the packet's own: a sender's clock cannot stretch a detection.
            if sender:
                detector.hep_sender(sender)
            detector.observe(result.src_ip, result.dst_ip, sip, result.ip_proto, self._clock())
        evidence = self._evidence
        # Last, so the packet that got its address listed or detected is kept too; two hash probes
        # are all an ordinary packet pays.
        if evidence is not None:
            protected = evidence.protected
            if result.src_ip in protected or result.dst_ip in protected:
                evidence.keep(result)

    def receive(self, result: HepPacket | BadPacket, transport: str, peer: str) -> bool:
        """``handle`` behind the key check; False (and counted) when the packet was refused."""
        if self._key is not None and type(result) is HepPacket:
            reason = key_refusal(result, self._key)
            if reason:
                self.refusals.refuse(CHANNELS[transport], reason, peer)
                return False
        self.handle(result, transport, peer)
        return True

    # ---------------------------------------------------------------- listeners

    async def start(self) -> None:
        if self._settings.udp is not None:
            await self._start_udp(udp_socket(self._settings, self._settings.udp))
        if self._settings.tcp is not None:
            await self._start_tcp(bind_listener(self._settings.tcp, socket.SOCK_STREAM, "hep.tcp"))
        warning = exposure_warning(self._settings, self.udp_address(), self.tcp_address())
        if warning:
            log.warning("%s", warning)

    async def listen(self, udp: socket.socket | None, tcp: socket.socket | None) -> None:
        """Serve sockets bound by another process (a HEP worker's, bound by the agent)."""
        if udp is not None:
            await self._start_udp(udp, announce=False)
        if tcp is not None:
            await self._start_tcp(tcp, announce=False)

    async def _start_udp(self, sock: socket.socket, announce: bool = True) -> None:
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.stats.rcvbuf_granted = granted
        if announce:
            rcvbuf_warning(self._settings, granted)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(self.udp_protocol, sock=sock)
        self._udp = transport
        if announce:
            log.info("HEP over UDP on %s:%s (receive buffer %d bytes)", *sock.getsockname()[:2], granted)

    def udp_protocol(self) -> asyncio.DatagramProtocol:
        """The datagram handler for this configuration: it checks only what is configured."""
        guarded = self.allowed.active or self._key is not None
        return (_GuardedUdpProtocol if guarded else _UdpProtocol)(self, self._clock)

    async def _start_tcp(self, sock: socket.socket, announce: bool = True) -> None:
        listener = HepTcpListener(
            self._settings,
            lambda result, peer: self.receive(result, "tcp", peer),
            self.stats,
            self.refusals,
            self.allowed,
            self._clock,
        )
        await listener.start(sock)
        self._tcp = listener
        if announce:
            log.info("HEP over TCP on %s:%s", *sock.getsockname()[:2])

    def udp_address(self) -> tuple[str, int] | None:
        return None if self._udp is None else self._udp.get_extra_info("sockname")[:2]

    def tcp_address(self) -> tuple[str, int] | None:
        return None if self._tcp is None else self._tcp.address()

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on our UDP socket (Linux /proc/net/udp*), if it says."""
        if self._udp is None or self._udp.is_closing():
            return None
        sock = self._udp.get_extra_info("socket")
        return _proc_udp_drops(sock.fileno(), sock.family) if sock is not None else None

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            await self._tcp.stop()


class _UdpProtocol(asyncio.DatagramProtocol):
    """Neither an allow-list nor a key: every datagram is decoded and handled, nothing else."""

    def __init__(self, collector: HepCollector, clock: Callable[[], float]) -> None:
        self._collector = collector
        self._clock = clock

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._collector.handle(decode(data, self._clock()), "udp", str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("HEP UDP socket error: %s", exc)


class _GuardedUdpProtocol(_UdpProtocol):
    """The source address is checked before decoding; the key after it (it is inside the packet)."""

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        peer = str(addr[0])
        collector = self._collector
        if not collector.allowed.allows(peer):
            collector.refusals.refuse(UDP_CHANNEL, NOT_ALLOWED, peer)
            return
        collector.receive(decode(data, self._clock()), "udp", peer)


def exposure_warning(settings: HepSettings, udp: tuple[str, int] | None, tcp: tuple[str, int] | None) -> str:
    """The start-up warning for HEP listeners that anyone on the network may feed ('' if none)."""
    bound = [(name, address) for name, address in (("udp", udp), ("tcp", tcp)) if address is not None]
    exposed = [f"{name} {Address(host, port)}" for name, (host, port) in bound if not _loopback(host)]
    missing = []
    if not settings.allow_from:
        missing.append("hep.allow_from is empty, so any address may send")
    if not settings.auth_key:
        missing.append("hep.auth_key is empty, so no key is asked for")
    if not exposed or not missing:
        return ""
    return (
        f"HEP listener on {', '.join(exposed)} is open: {'; '.join(missing)}. Forged packets can put "
        "invented activity on any address: set hep.allow_from to the senders' networks and "
        "hep.auth_key to the key they send (heplify -hp, Kamailio siptrace auth_key)"
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def udp_socket(settings: HepSettings, address: Address, reuse_port: bool = False) -> socket.socket:
    """The HEP UDP socket, bound, with the receive buffer hep.rcvbuf asks for."""
    sock = bind_listener(address, socket.SOCK_DGRAM, "hep.udp", reuse_port=reuse_port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.rcvbuf)
    return sock


def rcvbuf_warning(settings: HepSettings, granted: int) -> None:
    # Linux doubles the request and caps it at net.core.rmem_max; say what we really got.
    if granted < settings.rcvbuf:
        log.warning(
            "HEP UDP receive buffer: asked for %d bytes, the kernel granted %d "
            "(raise net.core.rmem_max to avoid drops under load)",
            settings.rcvbuf,
            granted,
        )


def bind_listener(
    address: Address, kind: int, setting: str, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A socket bound to ``address`` (a TCP one listening unless ``listen`` is False); a failure is
    a ConfigError naming ``setting``. ``reuse_port``: one of the HEP workers' sockets on one port."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM and listen:
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
