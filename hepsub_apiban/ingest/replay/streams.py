"""TCP streams: one direction's segments put back in order, and the HEP3 packets cut out of them.

Segments are ordered by sequence number (wrap-around included), retransmitted bytes dropped and
the stream split at holes; a stream captured mid-connection finds its first packet boundary by
checking that a "HEP3" header's length leads to the next one. Each packet keeps the capture
position of the frame that completed it.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from .base import _HEP3, _HEP3_HEADER, _u16


@dataclass(slots=True)
class _Segment:
    seq: int
    data: bytes
    index: int  # capture position of the frame that carried it


@dataclass(slots=True)
class _Flow:
    segments: list[_Segment] = field(default_factory=list)
    syn_seq: int | None = None  # known when the capture saw the connection open


@dataclass(slots=True)
class _Run:
    """Contiguous stream bytes; ``marks`` maps stream offsets to when they were all captured."""

    data: bytearray = field(default_factory=bytearray)
    at_start: bool = False  # begins right after the SYN, so it must begin with a HEP3 header
    marks: list[tuple[int, int]] = field(default_factory=list)  # (bytes so far, last frame index)


def _flow_packets(flow: _Flow) -> tuple[list[tuple[int, bytes]], list[str]]:
    """HEP3 packets of one TCP direction as (completing frame index, packet), and what went wrong."""
    found: list[tuple[int, bytes]] = []
    problems: list[str] = []
    runs = _assemble(flow)
    for number, run in enumerate(runs):
        if number:
            problems.append("TCP stream gaps (segments missing from the capture)")
        start = (0 if run.data.startswith(_HEP3) else None) if run.at_start else _find_sync(run.data)
        if start is None:
            continue
        packets, problem = _split_hep3(run.data, start)
        ends = [end for end, _ in run.marks]
        found.extend((run.marks[bisect_left(ends, end)][1], packet) for end, packet in packets)
        if problem:
            problems.append(problem)
    return found, problems


def _assemble(flow: _Flow) -> list[_Run]:
    """Orders segments by sequence number, drops retransmitted bytes, splits at holes."""
    if not flow.segments:
        return []
    reference = flow.syn_seq + 1 if flow.syn_seq is not None else flow.segments[0].seq

    def relative(seq: int) -> int:  # signed distance modulo 2**32, so wrap-around is harmless
        return (seq - reference + 2**31) % 2**32 - 2**31

    runs: list[_Run] = []
    cursor, latest = 0, 0
    for segment in sorted(flow.segments, key=lambda s: (relative(s.seq), s.index)):
        start = relative(segment.seq)
        if not runs or start > cursor:
            runs.append(_Run(at_start=flow.syn_seq is not None and start == 0))
            cursor, latest = start, 0
        end = start + len(segment.data)
        if end <= cursor:
            continue  # a retransmission of bytes we already have
        run = runs[-1]
        run.data += segment.data[cursor - start :]
        cursor, latest = end, max(latest, segment.index)
        run.marks.append((len(run.data), latest))
    return runs


def _split_hep3(data: bytearray, start: int) -> tuple[list[tuple[int, bytes]], str | None]:
    """Back-to-back HEP3 packets as (end offset, packet), and why the framing stopped, if it did."""
    packets: list[tuple[int, bytes]] = []
    offset = start
    while offset < len(data):
        if len(data) - offset < _HEP3_HEADER:
            return packets, "incomplete HEP3 packets at the end of TCP streams"
        length = _u16(data, offset + 4)
        if data[offset : offset + 4] != _HEP3 or length < _HEP3_HEADER:
            return packets, "TCP streams stopped at bad HEP3 framing"
        if offset + length > len(data):
            return packets, "incomplete HEP3 packets at the end of TCP streams"
        packets.append((offset + length, bytes(data[offset : offset + length])))
        offset += length
    return packets, None


def _find_sync(data: bytearray) -> int | None:
    """Where HEP3 framing starts in a stream captured mid-connection, if anywhere.

    A persistent HEP connection is usually already open when the capture starts. "HEP3" counts
    as a packet start only if its length leads to another "HEP3" (or exactly to the end), which
    makes a false start inside some payload, or inside a non-HEP flow, very unlikely.
    """
    limit = 0x10000 + _HEP3_HEADER  # a real packet boundary comes within one maximum packet
    offset = data.find(_HEP3, 0, limit)
    while offset >= 0:
        length = _u16(data, offset + 4) if offset + _HEP3_HEADER <= len(data) else 0
        end = offset + length
        if length >= _HEP3_HEADER and end <= len(data) and _HEP3.startswith(data[end : end + 4]):
            return offset
        offset = data.find(_HEP3, offset + 1, limit)
    return None
