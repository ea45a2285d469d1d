"""What every part of ``replay`` shares: its error, the HEP3 framing constants, big-endian reads.

``ReplayError`` is a problem the user can fix and becomes one line on stderr and exit status 2.
Replay needs only the HEP framing, not the codec: it must keep working on captures the codec
would reject, since replaying broken packets at a collector is a legitimate test.
"""

from __future__ import annotations

_HEP3 = b"HEP3"
_HEP3_HEADER = 6


class ReplayError(Exception):
    """A problem the user can fix: unreadable file, bad target, refused connection."""


def _u16(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "big")


def _u32(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")
