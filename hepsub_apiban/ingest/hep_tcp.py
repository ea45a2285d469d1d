"""HEP over TCP: who gets a connection, and how long it may hold one without delivering packets.

A HEP sender connects once and writes packets back to back; a hostile peer connects and holds the
slot. So a connection must earn its slot:

* At accept: the peer must be in ``hep.allow_from``, have fewer than
  ``hep.max_connections_per_sender`` connections open, and find a free slot under
  ``hep.max_connections``. When every slot is taken, the oldest connection that has never
  delivered a packet is closed to make room; only when every open connection has delivered one is
  the newcomer refused. A real sender proves itself with its first packet and is then never pushed
  out; a trickler lives at most ``hep.packet_timeout``.
* While open: a packet, once started, must be complete within ``hep.packet_timeout`` of its first
  byte; bytes that do not complete it do not move that deadline, so a peer sending a byte every few
  seconds holds nothing. A connection with nothing buffered closes after ``hep.idle_timeout``
  without a packet. A fresh connection owes nothing until its first byte: heplify and captagent
  connect at start and stay silent while the site is quiet, and closing them would lose the packet
  they next write into the dead socket. A silent peer cannot hold slots either: at the cap it is the
  first to make room, and per address it is bounded by the per-sender cap.

Bookkeeping is O(1) per event: a set of open connections, an ordered dict of the unproven ones
(oldest first), a count per sender, and one timer per connection that is moved only when its
deadline comes earlier (a later deadline is checked when the timer fires, so a busy connection
costs no timer work per read). A connection is a bare ``asyncio.Protocol`` with a few slots: no
task, no stream reader.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..core.access import Refusals, SourceFilter
from ..core.config import HepSettings
from ..formats.hep import BadPacket, HepPacket, HepStream

CHANNEL = "hep_tcp"
NOT_ALLOWED = "not in hep.allow_from"
OVER_PER_SENDER_CAP = "over the per-sender cap"
OVER_CONNECTION_CAP = "over the connection cap"
CLOSED_FOR_ROOM = "closed at the connection cap: no packet yet"
NO_PACKET_IN_TIME = "no complete packet in time"

# A timer may fire up to the loop's clock resolution early; closer than this counts as due.
_SLACK = 0.005

# (packet or bad packet, peer address) -> False when the packet was refused (its key): close.
Deliver = Callable[[HepPacket | BadPacket, str], bool]


@dataclass(slots=True)
class TcpStats:
    tcp_open: int = 0
    tcp_accepted: int = 0
    tcp_refused: int = 0  # over the global cap with no connection to make room from
    tcp_closed_bad: int = 0  # the stream could not be framed
    tcp_idle_closed: int = 0
    tcp_packet_timeouts: int = 0  # owed a packet past hep.packet_timeout
    tcp_evicted: int = 0  # closed, never having delivered a packet, to make room at the cap


class HepTcpListener:
    """Serves HEP over TCP on a bound socket, handing every framed packet to ``deliver``."""

    def __init__(
        self,
        settings: HepSettings,
        deliver: Deliver,
        stats: TcpStats,
        refusals: Refusals,
        allowed: SourceFilter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.deliver = deliver
        self.stats = stats
        self.refusals = refusals
        self.clock = clock  # capture-time fallback for packets without one
        self._allowed = allowed
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()
        self._unproven: OrderedDict[_Connection, None] = OrderedDict()
        self._per_sender: dict[str, int] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock)

    def address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._open):
            connection.shut()
        await self._server.wait_closed()

    # ---------------------------------------------------------------- bookkeeping

    def admit(self, connection: _Connection) -> bool:
        """Whether a new connection may stay; makes room at the cap if it can."""
        peer, settings = connection.peer, self.settings
        if not self._allowed.allows(peer):
            self.refusals.refuse(CHANNEL, NOT_ALLOWED, peer)
            return False
        if self._per_sender.get(peer, 0) >= settings.max_connections_per_sender:
            self.refusals.refuse(CHANNEL, OVER_PER_SENDER_CAP, peer)
            return False
        if len(self._open) >= settings.max_connections:
            if not self._unproven:
                self.stats.tcp_refused += 1
                self.refusals.refuse(CHANNEL, OVER_CONNECTION_CAP, peer)
                return False
            oldest = next(iter(self._unproven))
            self.stats.tcp_evicted += 1
            self.refusals.refuse(CHANNEL, CLOSED_FOR_ROOM, oldest.peer)
            oldest.shut()
        self._open.add(connection)
        self._unproven[connection] = None
        self._per_sender[peer] = self._per_sender.get(peer, 0) + 1
        self.stats.tcp_open += 1
        self.stats.tcp_accepted += 1
        return True

    def proven(self, connection: _Connection) -> None:
        self._unproven.pop(connection, None)

    def release(self, connection: _Connection) -> None:
        if connection not in self._open:
            return
        self._open.discard(connection)
        self._unproven.pop(connection, None)
        left = self._per_sender[connection.peer] - 1
        if left:
            self._per_sender[connection.peer] = left
        else:
            del self._per_sender[connection.peer]
        self.stats.tcp_open -= 1


class _Connection(asyncio.Protocol):
    """One HEP TCP connection: a stream splitter, two deadlines and one timer."""

    __slots__ = (
        "_closed",
        "_idle_since",
        "_listener",
        "_owed_since",
        "_proven",
        "_stream",
        "_timer",
        "_timer_at",
        "_transport",
        "peer",
    )

    def __init__(self, listener: HepTcpListener) -> None:
        self._listener = listener
        self._transport: asyncio.BaseTransport | None = None
        self.peer = ""
        self._stream = HepStream(listener.clock)
        self._idle_since = 0.0  # loop time of the connect or of the last complete packet
        self._owed_since: float | None = None  # loop time from which a complete packet is owed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._proven = False  # delivered a packet that was accepted
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        if not self._listener.admit(self):
            self._closed = True
            transport.close()
            return
        self._idle_since = self._now()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        listener, stream = self._listener, self._stream
        results = stream.feed(data)
        for result in results:
            if not listener.deliver(result, self.peer):
                self.shut()  # a wrong key: a misconfigured or hostile sender, not worth a slot
                return
            if not self._proven and type(result) is HepPacket:
                self._proven = True
                listener.proven(self)
        if stream.broken:
            listener.stats.tcp_closed_bad += 1
            listener.deliver(BadPacket(f"tcp stream: {stream.broken_reason}"), self.peer)
            self.shut()
            return
        if results:
            now = self._now()
            self._idle_since = now
            self._owed_since = now if stream.pending else None
            self._arm()
        elif self._owed_since is None:  # the first byte of a packet after a quiet spell
            self._owed_since = self._now()
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        self._listener.release(self)

    def shut(self) -> None:
        """Close now; the slot is free at once, not when the transport gets round to it."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timer()
        self._listener.release(self)
        if self._transport is not None:
            self._transport.close()

    # ---------------------------------------------------------------- deadlines

    def _now(self) -> float:
        loop = self._listener.loop
        assert loop is not None
        return loop.time()

    def _deadline(self) -> float:
        settings = self._listener.settings
        deadline = math.inf
        if self._owed_since is not None:
            deadline = self._owed_since + settings.packet_timeout
        if not self._stream.pending:
            deadline = min(deadline, self._idle_since + settings.idle_timeout)
        return deadline

    def _arm(self) -> None:
        """Have the timer fire by the deadline; a later deadline is left to ``_expire``."""
        deadline = self._deadline()
        if deadline >= self._timer_at:
            return
        self._cancel_timer()
        loop = self._listener.loop
        assert loop is not None
        self._timer = loop.call_at(deadline, self._expire)
        self._timer_at = deadline

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self._closed:
            return
        now = self._now()
        if self._deadline() - now > _SLACK:  # the deadline moved on since the timer was set
            self._arm()
            return
        listener = self._listener
        owed = self._owed_since
        if owed is not None and owed + listener.settings.packet_timeout - now <= _SLACK:
            listener.stats.tcp_packet_timeouts += 1
            listener.refusals.refuse(CHANNEL, NO_PACKET_IN_TIME, self.peer)
        else:
            listener.stats.tcp_idle_closed += 1
        self.shut()
