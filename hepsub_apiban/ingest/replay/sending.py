"""Sending HEP packets to a collector over UDP or TCP, at a given rate or as fast as it takes them.

``parse_target`` reads ``udp:HOST:PORT``/``tcp:HOST:PORT``; ``send`` resolves, connects (trying
each address over TCP), paces against a monotonic clock without drift, and turns every failure
(a refusal, ICMP port unreachable, a lost connection) into a ``ReplayError`` that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

from .base import _HEP3, ReplayError

CONNECT_TIMEOUT = 10.0
LATE_REFUSAL_WAIT = 0.25  # seconds: an ICMP port unreachable comes back within a round trip


_TARGET = re.compile(
    r"(?P<proto>udp|tcp):(?:\[(?P<ipv6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})"
)
_MIN_SLEEP = 0.002  # below this, sending a little early beats a sleep the event loop cannot honour anyway


def parse_target(target: str) -> tuple[str, str, int]:
    """``udp:HOST:PORT`` or ``tcp:HOST:PORT`` (IPv6 in brackets) -> (transport, host, port)."""
    match = _TARGET.fullmatch(target)
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise ReplayError(
            f"bad target {target!r}: expected udp:HOST:PORT or tcp:HOST:PORT (IPv6: udp:[::1]:9060)"
        )
    return match["proto"], match["ipv6"] or match["host"], port


def _check_rate(rate: float | None) -> None:
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ReplayError(f"bad rate {rate}: give a positive number of packets per second")


class _Pacer:
    """Spreads packets at ``rate`` per second against a monotonic clock.

    Each packet has a due time from the start, so sleeping late never accumulates drift; at high
    rates several packets go out between sleeps, because one sleep per packet cannot keep up.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float]) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._start = 0.0

    async def wait(self, number: int) -> None:
        if not self._interval:
            return
        if number == 0:
            self._start = self._clock()  # the connection setup is not part of the schedule
            return
        delay = self._start + number * self._interval - self._clock()
        if delay >= _MIN_SLEEP:
            await asyncio.sleep(delay)


async def send(packets: Sequence[bytes], target: str, rate: float | None) -> int:
    """Sends ``packets`` to ``target``; returns how many were sent."""
    transport, host, port = parse_target(target)
    _check_rate(rate)
    pacer = _Pacer(rate, asyncio.get_running_loop().time)
    if transport == "tcp":
        return await _send_tcp(packets, host, port, target, pacer)
    return await _send_udp(packets, host, port, target, pacer)


_SocketAddress = tuple[Any, ...]  # what getaddrinfo gives and connect takes: 2-tuple IPv4, 4-tuple IPv6


async def _resolve(host: str, port: int, kind: int, target: str) -> list[tuple[int, _SocketAddress]]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
    except OSError as exc:
        raise ReplayError(f"cannot resolve {host!r} in {target}: {exc.strerror or exc}") from None
    return [(family, tuple(address)) for family, _, _, _, address in infos]


async def _send_udp(packets: Sequence[bytes], host: str, port: int, target: str, pacer: _Pacer) -> int:
    loop = asyncio.get_running_loop()
    addresses = await _resolve(host, port, socket.SOCK_DGRAM, target)
    # UDP cannot try one address and fall back; collectors mostly listen on IPv4 (0.0.0.0:9060),
    # so "localhost" goes to 127.0.0.1 rather than ::1. Literal addresses are unaffected.
    family, address = min(addresses, key=lambda item: item[0] != socket.AF_INET)
    refused = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            # Connected, so the kernel reports an ICMP port unreachable on a later send.
            sock.connect(address)
        except OSError as exc:
            raise ReplayError(f"cannot send to {target}: {exc.strerror or exc}") from None
        for number, packet in enumerate(packets):
            await pacer.wait(number)
            try:
                await loop.sock_sendall(sock, packet)
            except ConnectionRefusedError:
                refused += 1  # that datagram was not sent; the error belongs to an earlier one
            except OSError as exc:
                what = f"packet {number + 1} ({len(packet)} bytes)"
                raise ReplayError(f"cannot send {what} to {target}: {exc.strerror or exc}") from None
        if not refused:
            refused += await _late_refusal(sock)
    if refused:
        raise ReplayError(
            f"{target} refused the packets (ICMP port unreachable {refused} times while sending "
            f"{len(packets)}): is a HEP collector listening there?"
        )
    return len(packets)


async def _late_refusal(sock: socket.socket) -> int:
    """1 if the kernel reports a refusal of the last datagrams within a moment, else 0.

    A refusal is reported on the socket's next operation: without this wait a file of one packet
    sent to a port where nothing listens would count as sent.
    """
    try:
        async with asyncio.timeout(LATE_REFUSAL_WAIT):
            await asyncio.get_running_loop().sock_recv(sock, 1)
    except ConnectionRefusedError:
        return 1
    except (TimeoutError, OSError):
        pass
    return 0


async def _send_tcp(packets: Sequence[bytes], host: str, port: int, target: str, pacer: _Pacer) -> int:
    legacy = next((number for number, packet in enumerate(packets) if not packet.startswith(_HEP3)), None)
    if legacy is not None:
        raise ReplayError(
            f"packet {legacy + 1} is not HEPv3, and HEPv1/v2 only work over UDP; use udp:HOST:PORT"
        )
    addresses = await _resolve(host, port, socket.SOCK_STREAM, target)
    writer = await _connect(addresses, target)
    sent = 0
    try:
        for number, packet in enumerate(packets):
            await pacer.wait(number)
            writer.write(packet)
            await writer.drain()  # keeps the buffer bounded when the collector reads slowly
            sent += 1
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except OSError as exc:
        raise ReplayError(
            f"connection to {target} lost after {sent} packets: {exc.strerror or exc}"
        ) from None
    finally:
        writer.close()
        # Everything was handed over already, or the error above says what went wrong.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return sent


async def _connect(addresses: list[tuple[int, _SocketAddress]], target: str) -> asyncio.StreamWriter:
    """Tries each resolved address in turn, so "localhost" works whichever of ::1/127.0.0.1 listens."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, address)
        except OSError as exc:  # TimeoutError is an OSError too
            sock.close()
            errors.append(exc)
            continue
        _, writer = await asyncio.open_connection(sock=sock)
        return writer
    raise ReplayError(f"cannot connect to {target}: {_connect_failure(errors)}")


def _connect_failure(errors: list[OSError]) -> str:
    if errors and all(isinstance(exc, ConnectionRefusedError) for exc in errors):
        return "connection refused (is a HEP collector listening there?)"
    if any(isinstance(exc, TimeoutError) for exc in errors):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    last = errors[-1] if errors else None
    return (last.strerror or str(last)) if last else "no address"
