"""HEP (Homer Encapsulation Protocol) codec: HEPv3, legacy HEPv1/v2, and a TCP stream splitter.

The wire format is declared once, with construct (``CHUNK``, ``HEP3``, ``HEP2``, ``BODIES`` in
``declaration``). That declaration builds packets (``build_hep3``, ``build_hep2``: replay, tests,
benchmarks) and is a slow reference decoder (``parse_with_construct``, ~5,000 packets/s). Ingest
uses ``decode`` (``decoder``), a hand-written ``struct`` loop (~3 us a packet, 60x faster), which
reads the layouts senders write most with one compiled pattern and one ``struct`` (about half that);
the tests hold it equal to the declaration on generated and corrupted packets. ``HepStream``
(``stream``) frames HEPv3 on TCP; ``models`` holds the packet types and the rules both decoders
share. Rules for malformed input follow ``docs/peers/hep.md#edge-cases``: a packet is kept or
dropped whole, and ``decode`` never raises, since nothing a sender does may crash the collector.
"""

from __future__ import annotations

from .declaration import BODIES, CHUNK, HEP2, HEP3, build_hep2, build_hep3, parse_with_construct
from .decoder import decode
from .models import MAGIC, MAX_INFLATED, MAX_PACKET, BadPacket, HepPacket
from .stream import HepStream

__all__ = [
    "BODIES",
    "CHUNK",
    "HEP2",
    "HEP3",
    "MAGIC",
    "MAX_INFLATED",
    "MAX_PACKET",
    "BadPacket",
    "HepPacket",
    "HepStream",
    "build_hep2",
    "build_hep3",
    "decode",
    "parse_with_construct",
]
