"""The ``replay`` command: read every file, send the packets, print one summary line.

A ``ReplayError`` from any step is one line on stderr and exit status 2; a file without HEP is a
warning while the others are still sent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .base import ReplayError
from .capture import read_packets
from .sending import _check_rate, parse_target, send

# Its name before the split and the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.replay")
EXIT_USAGE = 2


def main(files: Sequence[str], to: str, rate: float | None, out: TextIO) -> int:
    """The ``replay`` command: read every file, send, print one summary line."""
    try:
        parse_target(to)  # a typo in the target should not wait for a big capture to load
        _check_rate(rate)
        if not files:
            raise ReplayError("no input files")
        packets = _read_all(files)
        started = time.monotonic()
        sent = asyncio.run(send(packets, to, rate))
        elapsed = time.monotonic() - started
    except ReplayError as exc:
        print(f"hepsub-apiban: {exc}", file=sys.stderr)
        return EXIT_USAGE
    noun = "file" if len(files) == 1 else "files"
    print(f"sent {sent} HEP packets from {len(files)} {noun} to {to} in {elapsed:.2f} s", file=out)
    return 0


def _read_all(files: Sequence[str]) -> list[bytes]:
    packets: list[bytes] = []
    empty: list[str] = []
    for name in files:
        found = read_packets(Path(name))
        packets.extend(found)
        if not found:
            empty.append(name)
    if not packets:
        raise ReplayError(f"no HEP packets found in {', '.join(files)}")
    for name in empty:  # worth a word, but the other files are still worth sending
        log.warning("%s: no HEP packets found", name)
    return packets
