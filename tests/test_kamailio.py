"""Real HEP from a real sender: Kamailio's siptrace mirrors a scanner's SIP traffic to our UDP port.

The receiving side here is a plain asyncio datagram endpoint, and the packets are checked
against docs/peers/hep.md#hepv3 and #hepv1-and-hepv2 with a few lines of test-local parsing.
When ``hepsub_apiban.formats.hep.decode`` exists, every packet also goes through it and the addresses it
reports are checked. The last tests
configure siptrace's ``auth_key``: what it puts on the wire, and that the agent with
``hep.auth_key`` lets in Kamailio with the right key and nothing from one with a wrong or no key.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from hepsub_apiban.keys import COLLECTOR, REFUSALS

from .conftest import AgentFactory
from .kamailio import HOST, SipExchange, free_udp_port, kamailio, kamailio_available, sip_exchange
from .test_collector import Client, decoded, hep_agent, sightings, until

_reason = kamailio_available()
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"Kamailio not usable: {_reason}")

CAPTURE_ID = 4242
# 3 OPTIONS, 2 REGISTER, 1 INVITE, and what the route answers to each.
SCAN = [
    ("OPTIONS", 200),
    ("OPTIONS", 200),
    ("OPTIONS", 200),
    ("REGISTER", 401),
    ("REGISTER", 401),
    ("INVITE", 403),
]


def _hep_decode() -> Callable[..., Any] | None:
    """``hepsub_apiban.formats.hep.decode`` once that module has landed, else None."""
    try:
        module = importlib.import_module("hepsub_apiban.formats.hep")
    except ImportError:
        return None
    decode = getattr(module, "decode", None)
    return decode if callable(decode) else None


@dataclass
class Datagram:
    data: bytes
    received_at: float


class HepSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[Datagram] = []
        self._arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams.append(Datagram(data, time.time()))
        self._arrived.set()

    async def wait_for(self, count: int, deadline: float = 5.0) -> list[Datagram]:
        async with asyncio.timeout(deadline):
            while len(self.datagrams) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.datagrams


@pytest.fixture
async def hep_sink() -> AsyncIterator[tuple[HepSink, int]]:
    transport, sink = await asyncio.get_running_loop().create_datagram_endpoint(HepSink, local_addr=(HOST, 0))
    try:
        yield sink, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


@dataclass
class Hep:
    """What a packet says, parsed here from the bytes (docs/peers/hep.md#hepv3, #chunks, #hepv1-and-hepv2)."""

    version: int
    family: int
    ip_proto: int
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes
    capture_id: int | None
    timestamp: float | None
    chunk_types: list[int]


def v3_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each chunk of a HEPv3 packet, in wire order; all must be generic (vendor 0)."""
    assert data[:4] == b"HEP3"
    (total,) = struct.unpack_from("!H", data, 4)
    assert total == len(data)
    chunks: list[tuple[int, bytes]] = []
    offset = 6
    while offset < total:
        vendor, kind, length = struct.unpack_from("!HHH", data, offset)
        assert vendor == 0
        assert 6 <= length <= total - offset
        chunks.append((kind, data[offset + 6 : offset + length]))
        offset += length
    return chunks


def parse_hep(data: bytes) -> Hep:
    if data[:4] == b"HEP3":
        order = v3_chunks(data)
        chunks = dict(order)
        return Hep(
            version=3,
            family=chunks[1][0],
            ip_proto=chunks[2][0],
            src=(str(ipaddress.IPv4Address(chunks[3])), struct.unpack("!H", chunks[7])[0]),
            dst=(str(ipaddress.IPv4Address(chunks[4])), struct.unpack("!H", chunks[8])[0]),
            payload=chunks[15],
            capture_id=struct.unpack("!I", chunks[12])[0],
            timestamp=struct.unpack("!I", chunks[9])[0] + struct.unpack("!I", chunks[10])[0] / 1e6,
            chunk_types=[kind for kind, _ in order],
        )
    version, _hp_l, family, ip_proto, sport, dport = struct.unpack_from("!BBBBHH", data, 0)
    assert version in (1, 2)
    assert family == 2  # AF_INET: the 4-byte address layout below
    src, dst = str(ipaddress.IPv4Address(data[8:12])), str(ipaddress.IPv4Address(data[12:16]))
    capture_id = timestamp = None
    offset = 16
    if version == 2:
        # Host (little-endian) order, struct padded to 12 bytes (docs/peers/hep.md#hepv1-and-hepv2).
        sec, usec, capture_id = struct.unpack_from("<IIH", data, offset)
        assert data[offset + 10 : offset + 12] == b"\0\0"
        timestamp = sec + usec / 1e6
        offset += 12
    return Hep(
        version, family, ip_proto, (src, sport), (dst, dport), data[offset:], capture_id, timestamp, []
    )


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)


@pytest.mark.parametrize("hep_version", [3, 2, 1])
async def test_siptrace_mirrors_a_scan_as_hep(hep_sink: tuple[HepSink, int], hep_version: int) -> None:
    sink, hep_port = hep_sink
    async with kamailio(hep_port=hep_port, hep_version=hep_version, capture_id=CAPTURE_ID) as k:
        source_port = free_udp_port()
        exchanges: list[SipExchange] = []
        for index, (method, status) in enumerate(SCAN):
            exchange = await sip_exchange(
                k.sip_port,
                method,
                from_user=f"10{index}",
                user_agent="friendly-scanner",
                call_id=f"scan-{hep_version}-{index}-{method.lower()}@{HOST}",
                source_port=source_port,
            )
            assert exchange.status == status, exchange.reply
            exchanges.append(exchange)
        # One packet per request (sip_trace) and one per stateless reply (siptrace's sl callback).
        datagrams = await sink.wait_for(2 * len(SCAN))
        assert k.log().count("ERROR") == 0, k.log()

    assert len(datagrams) == 2 * len(SCAN)
    magic = b"HEP3" if hep_version == 3 else bytes([hep_version])
    assert all(d.data.startswith(magic) for d in datagrams)
    parsed = [parse_hep(d.data) for d in datagrams]
    now = time.time()

    for exchange in exchanges:
        request_line = exchange.request.split(b" ", 1)[0] + b" sip:"
        call_id = f"Call-ID: {exchange.call_id}".encode()
        requests = [p for p in parsed if p.payload.startswith(request_line) and call_id in p.payload]
        replies = [p for p in parsed if p.payload.startswith(b"SIP/2.0 ") and call_id in p.payload]
        assert len(requests) == 1
        assert len(replies) == 1
        request, reply = requests[0], replies[0]
        # The request is traced as received, byte for byte; the reply as sent.
        assert request.payload == exchange.request
        assert reply.payload == exchange.reply
        assert b"User-Agent: friendly-scanner" in request.payload
        assert request.src == (HOST, source_port)
        assert request.dst == (HOST, k.sip_port)
        assert reply.src == (HOST, k.sip_port)
        assert reply.dst == (HOST, source_port)
        for packet in (request, reply):
            assert packet.family == 2
            assert packet.ip_proto == 17
            if hep_version >= 2:
                assert packet.capture_id == CAPTURE_ID
                assert packet.timestamp is not None
                assert abs(packet.timestamp - now) < 60
            if hep_version == 3:
                # siptrace's chunk set, in this order; no 0x0011 unless sip_trace() gets a correlation id.
                assert packet.chunk_types == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 15]

    decode = _hep_decode()
    if decode is None:
        return
    for datagram, packet in zip(datagrams, parsed, strict=True):
        decoded = decode(datagram.data, datagram.received_at)
        assert hasattr(decoded, "src_ip"), f"decode() rejected a Kamailio packet: {decoded!r}"
        assert _text(decoded.src_ip) == HOST
        assert _text(decoded.dst_ip) == HOST
        assert int(decoded.src_port) == packet.src[1]
        assert int(decoded.dst_port) == packet.dst[1]
        payload = decoded.payload
        assert (payload if isinstance(payload, bytes) else _text(payload).encode()) == packet.payload
        if not packet.payload.startswith(b"SIP/2.0 "):
            assert int(decoded.src_port) == source_port
        # Fields beyond the brief's minimum, checked where the decoder has them.
        if hasattr(decoded, "version"):
            assert decoded.version == hep_version
        if hasattr(decoded, "capture_id") and hep_version >= 2:
            assert decoded.capture_id == CAPTURE_ID
        if hasattr(decoded, "ts_sec") and hasattr(decoded, "ts_usec"):
            expected = packet.timestamp if packet.timestamp is not None else datagram.received_at
            assert abs(decoded.ts_sec + decoded.ts_usec / 1e6 - expected) < 1e-5


async def test_correlation_id_chunk_on_traced_requests(hep_sink: tuple[HepSink, int]) -> None:
    """``sip_trace(uri, "$ci")`` adds chunk 0x0011 (the Call-ID) to requests, not to sl replies."""
    sink, hep_port = hep_sink
    async with kamailio(hep_port=hep_port, hep_version=3, correlation_id=True) as k:
        exchange = await sip_exchange(k.sip_port, "REGISTER", call_id=f"corr-1@{HOST}")
        assert exchange.status == 401
        datagrams = await sink.wait_for(2)

    by_kind: dict[str, dict[int, bytes]] = {}
    for datagram in datagrams:
        chunks = dict(v3_chunks(datagram.data))
        by_kind["reply" if chunks[15].startswith(b"SIP/2.0 ") else "request"] = chunks
    assert by_kind["request"][0x11] == f"corr-1@{HOST}".encode()
    assert 0x11 not in by_kind["reply"]

    decode = _hep_decode()
    if decode is not None:
        decoded = [decode(d.data, d.received_at) for d in datagrams]
        correlation = {getattr(p, "correlation_id", "absent") for p in decoded}
        assert correlation in ({f"corr-1@{HOST}".encode(), None}, {"absent"})


# --- siptrace auth_key: what Kamailio sends, and what the agent lets in --------------------------

SIPTRACE_KEY = "kamailio-SECRET-hep-key-91c2"


@pytest.mark.parametrize(
    ("hep_version", "key"), [(3, SIPTRACE_KEY), (3, ""), (2, SIPTRACE_KEY), (1, SIPTRACE_KEY)]
)
async def test_siptrace_auth_key_is_chunk_0x000e_of_every_hepv3_packet(
    hep_sink: tuple[HepSink, int], hep_version: int, key: str
) -> None:
    """``modparam("siptrace", "auth_key", K)``: K's bytes as they are (no NUL) in 0x000e, on requests
    and on sl replies alike; an empty K, no 0x000e chunk at all. HEPv1/v2 have nowhere to put it."""
    sink, hep_port = hep_sink
    async with kamailio(hep_port=hep_port, hep_version=hep_version, auth_key=key) as k:
        await sip_exchange(k.sip_port, "REGISTER")
        await sip_exchange(k.sip_port, "OPTIONS")
        datagrams = await sink.wait_for(4)
    for datagram in datagrams:
        if hep_version == 3:
            chunks = v3_chunks(datagram.data)
            with_key = [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 14, 15]
            assert [kind for kind, _ in chunks] == (with_key if key else [t for t in with_key if t != 14])
            assert dict(chunks).get(14) == (key.encode() or None)
        else:
            assert SIPTRACE_KEY.encode() not in datagram.data


async def scan_through_kamailio(
    agent: AgentFactory, auth_key: str, hep_version: int = 3, **env: str
) -> Client:
    """An agent (UDP only, ``env``) fed by a Kamailio with ``auth_key``, after a 3-request scan:
    3 requests and 3 replies, each either let in or refused."""
    client = await hep_agent(agent, HEPSUB_HEP_TCP="", **env)
    address = client.app[COLLECTOR].udp_address()
    assert address is not None
    refusals = client.app[REFUSALS]
    async with kamailio(hep_port=address[1], hep_version=hep_version, auth_key=auth_key) as k:
        for n, method in enumerate(["OPTIONS", "REGISTER", "INVITE"]):
            await sip_exchange(k.sip_port, method, user_agent="keyed-scanner", call_id=f"key-{n}@{HOST}")
        await until(lambda: decoded(client, "udp") + refusals.total("hep_udp") == 6, "6 packets")
    return client


async def test_agent_lets_in_kamailio_with_the_right_key(agent: AgentFactory) -> None:
    client = await scan_through_kamailio(agent, SIPTRACE_KEY, HEPSUB_HEP_AUTH_KEY=SIPTRACE_KEY)
    assert decoded(client, "udp") == 6
    assert client.app[REFUSALS].total() == 0
    seen = await sightings(client)
    assert seen[HOST]["methods"] == {"OPTIONS": 1, "REGISTER": 1, "INVITE": 1, "200": 1, "401": 1, "403": 1}
    assert seen[HOST]["user_agents"] == ["keyed-scanner"]


@pytest.mark.parametrize(
    ("kamailio_key", "hep_version", "reason"),
    [
        ("kamailio-SECRET-hep-key-91c3", 3, "wrong auth key"),
        ("", 3, "no auth key"),  # an empty auth_key: Kamailio writes no 0x000e chunk at all
        (SIPTRACE_KEY, 1, "HEPv1/v2 while hep.auth_key is set"),
    ],
    ids=["wrong-key", "empty-key", "hepv1-with-key"],
)
async def test_agent_refuses_kamailio_without_the_right_key(
    agent: AgentFactory, kamailio_key: str, hep_version: int, reason: str
) -> None:
    client = await scan_through_kamailio(agent, kamailio_key, hep_version, HEPSUB_HEP_AUTH_KEY=SIPTRACE_KEY)
    assert decoded(client, "udp") == 0
    assert await sightings(client) == {}
    assert dict(client.app[REFUSALS].counts) == {("hep_udp", reason): 6}
    metrics = await (await client.get("/metrics")).text()
    assert f'hepsub_apiban_refused_total{{channel="hep_udp",reason="{reason}"}} 6.0' in metrics
