"""``hepsub-apiban replay``: send HEP packets from files to a HEP collector.

Input files are recognised by their content, not their name: classic pcap (microsecond or
nanosecond, either byte order, optionally gzip-compressed), pcapng, or a hex dump of one packet
(the format of the test fixtures): ``capture`` reads them, ``link`` takes frames to IP. From a
capture, HEP is taken out of UDP datagrams (HEPv3 and HEPv1/v2) and out of reassembled TCP streams
(back-to-back HEPv3) by ``network`` and ``streams``; everything else is skipped, so a capture taken
with a loose filter still replays only HEP. IP fragments are reassembled because large SIP messages
sent as HEP over UDP rely on IP fragmentation. ``sending`` sends, ``command`` is the command.

This package does not use the HEP codec: it only needs the framing, and it must keep working on
captures the codec would reject (replaying broken packets at a collector is a legitimate test).
"""

from __future__ import annotations

from .base import ReplayError
from .capture import read_packets
from .command import EXIT_USAGE, main
from .sending import parse_target, send

__all__ = ["EXIT_USAGE", "ReplayError", "main", "parse_target", "read_packets", "send"]
