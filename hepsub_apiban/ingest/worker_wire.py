"""The batch wire format between a HEP worker and the agent, shared by both sides.

Frames on a worker's CONTROL socket are a 4-byte length (``FRAME``) and a body, at most
``MAX_FRAME`` bytes. A worker's frame (``report``/``read_report``) is a 4-byte length, a JSON
message, then the evidence packets as binary records (``EVIDENCE``, written by
``evidence_record`` and read back by ``evidence_packets``: JSON would escape every line break of a
SIP message). The names of the counters a batch carries (``DROPPED``, ``TCP_COUNTERS``,
``DETECTOR_COUNTERS``) live here so the worker (``hep_worker``) and the pool (``workers``) agree.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from typing import Any

import orjson

from ..formats.hep import HepPacket

FRAME = struct.Struct("!I")
MAX_FRAME = 512 << 20  # bytes; a longer length is a broken stream, not a batch
NO_FD = -1
# What a worker counts as not handed over: addresses forgotten within a batch, findings and
# evidence over a batch's bounds, and batches dropped whole while the main process lagged.
DROPPED = ("sightings", "findings", "evidence", "batches")

Message = dict[str, Any]


# An evidence record: capture time (s, us), ports, IP protocol, the lengths of the source and
# destination address texts and of the payload; then those three.
EVIDENCE = struct.Struct("!IIHHBBBI")


def frame(body: bytes) -> bytes:
    return FRAME.pack(len(body)) + body


def report(message: Message, evidence: bytes = b"") -> bytes:
    """A frame from a worker: the JSON message, then the evidence records."""
    body = orjson.dumps(message)
    return frame(FRAME.pack(len(body)) + body + evidence)


def read_report(body: bytes) -> tuple[Message, bytes]:
    """The JSON message and the evidence records of a worker's frame."""
    (length,) = FRAME.unpack_from(body)
    message = orjson.loads(body[FRAME.size : FRAME.size + length])
    if not isinstance(message, dict):
        raise ValueError("a worker's message is not a JSON object")
    return message, body[FRAME.size + length :]


def evidence_record(packet: HepPacket) -> bytes:
    src, dst, payload = packet.src_ip.encode(), packet.dst_ip.encode(), packet.payload
    head = EVIDENCE.pack(
        packet.ts_sec, packet.ts_usec, packet.src_port, packet.dst_port, packet.ip_proto,
        len(src), len(dst), len(payload),
    )  # fmt: skip
    return head + src + dst + payload


def evidence_packets(records: bytes) -> Iterator[HepPacket]:
    """The packets of a frame's evidence records (what ``Evidence.keep`` needs of them)."""
    offset, end, unpack, size = 0, len(records), EVIDENCE.unpack_from, EVIDENCE.size
    while offset < end:
        ts_sec, ts_usec, sport, dport, proto, src_len, dst_len, length = unpack(records, offset)
        offset += size
        src = records[offset : offset + src_len].decode()
        offset += src_len
        dst = records[offset : offset + dst_len].decode()
        offset += dst_len
        payload = records[offset : offset + length]
        offset += length
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        yield HepPacket(3, family, proto, src, dst, sport, dport, ts_sec, ts_usec, 1, 0, payload)


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None at a clean end of the stream."""
    try:
        head = await reader.readexactly(FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("the control stream ended inside a frame") from None
        return None
    (length,) = FRAME.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ValueError("the control stream ended inside a frame") from None


TCP_COUNTERS = (
    "tcp_accepted",
    "tcp_refused",
    "tcp_closed_bad",
    "tcp_idle_closed",
    "tcp_packet_timeouts",
    "tcp_evicted",
)
DETECTOR_COUNTERS = ("packets", "tracked_evicted", "idle_forgotten", "retransmissions", "exempted")
