"""Framing HEPv3 on a TCP/TLS byte stream: ``HepStream`` cuts it into packets for ``decode``.

A stream has no datagram boundaries, so each packet is found from its header's length; a bad
header ends the stream (the collector then closes the connection), a bad packet with a good
header is one ``BadPacket`` and the stream goes on. At most one incomplete packet is buffered.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .decoder import decode
from .models import MAGIC, BadPacket, HepPacket


class HepStream:
    """Splits a TCP/TLS byte stream into back-to-back HEPv3 packets (docs/peers/hep.md#transports).

    A bad packet *header* (magic, length < 6, or a v1/v2 first byte: v1/v2 has no length and can't
    be framed) makes the stream unrecoverable: ``broken`` is set with ``broken_reason`` and later
    data is ignored, and the collector closes the connection. A packet whose header is fine but
    whose chunks are bad is a BadPacket and the stream goes on: its framing is known. At most one
    incomplete packet (< 65535 bytes) stays buffered between feeds.
    """

    __slots__ = ("_buf", "_clock", "broken", "broken_reason")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._buf = bytearray()
        self._clock = clock
        self.broken = False
        self.broken_reason = ""

    @property
    def pending(self) -> int:
        """Bytes buffered for an incomplete packet."""
        return len(self._buf)

    def feed(
        self, data: bytes | bytearray | memoryview, received_at: float | None = None
    ) -> list[HepPacket | BadPacket]:
        """The packets completed by ``data``, in order. ``received_at`` defaults to the clock."""
        if self.broken:
            return []
        when = self._clock() if received_at is None else received_at
        buf = self._buf
        buf += data
        out: list[HepPacket | BadPacket] = []
        off, size = 0, len(buf)
        with memoryview(buf) as view:
            while off < size:
                reason = _check_header(view, off, size)
                if reason:
                    self._break(reason)
                    return out
                if size - off < 6:
                    break
                length = view[off + 4] << 8 | view[off + 5]
                if size - off < length:
                    break
                out.append(decode(bytes(view[off : off + length]), when))
                off += length
        del buf[:off]  # one move per feed, not per packet
        return out

    def _break(self, reason: str) -> None:
        self.broken = True
        self.broken_reason = reason
        self._buf = bytearray()  # release it: the connection is done


def _check_header(view: memoryview, off: int, size: int) -> str:
    """Why the (possibly partial) header at ``off`` can't start a HEPv3 packet, or ''."""
    have = min(size - off, 6)
    if view[off] in (1, 2):
        return "HEPv1/v2 on a stream"
    if view[off : off + min(have, 4)] != MAGIC[: min(have, 4)]:
        return "bad magic"
    if have == 6 and (view[off + 4] << 8 | view[off + 5]) < 6:
        return "header length < 6"
    return ""
