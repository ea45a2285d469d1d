"""The HEP collector through real UDP and TCP sockets, into sightings and the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.formats.hep import HepPacket, build_hep3
from hepsub_apiban.keys import COLLECTOR, SIGHTINGS

from . import HEP_FIXTURES
from .conftest import AgentFactory, ApibanPeer
from .kamailio import kamailio, kamailio_available, sip_exchange

FIXTURES = HEP_FIXTURES
Client = TestClient[web.Request, web.Application]


def sip_packet(
    src: str,
    dst: str = "198.51.100.1",
    *,
    method: str = "REGISTER",
    ua: str = "friendly-scanner",
    call_id: str = "scan-1",
    proto_type: int = 1,
) -> HepPacket:
    payload = (
        f"{method} sip:{dst} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-1;rport\r\n"
        f"From: <sip:100@{dst}>;tag=1\r\nTo: <sip:100@{dst}>\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n"
        f"User-Agent: {ua}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    family = 10 if ":" in src else 2
    return HepPacket(
        version=3,
        family=family,
        ip_proto=17,
        src_ip=src,
        dst_ip=dst,
        src_port=5060,
        dst_port=5060,
        ts_sec=1_700_000_000,
        ts_usec=0,
        proto_type=proto_type,
        capture_id=1,
        payload=payload,
    )


async def until(probe: Callable[[], bool], what: str) -> None:
    """Bounded wait for packets that travel through the kernel to be handled."""
    for _ in range(500):
        if probe():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def hep_agent(agent: AgentFactory, **env: str) -> Client:
    settings = {"HEPSUB_HEP_UDP": "127.0.0.1:0", "HEPSUB_HEP_TCP": "127.0.0.1:0", **env}
    return await agent(**settings)


def udp_send(client: Client, *datagrams: bytes) -> None:
    address = client.app[COLLECTOR].udp_address()
    assert address is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, address)


def decoded(client: Client, transport: str) -> int:
    return client.app[COLLECTOR].stats.packets[transport]


async def sightings(client: Client, query: str = "") -> dict[str, dict[str, Any]]:
    body = await (await client.get(f"/api/v1/sightings{query}")).json()
    return {s["ip"]: s for s in body["sightings"]}


async def test_udp_fixtures_and_built_packets_become_sightings(agent: AgentFactory) -> None:
    client = await hep_agent(agent)
    fixtures = [bytes.fromhex(p.read_text()) for p in sorted(FIXTURES.glob("*.hex"))]
    udp_send(client, *fixtures, build_hep3(sip_packet("45.1.2.3")), build_hep3(sip_packet("2a01:4f8::7")))
    await until(lambda: decoded(client, "udp") == 5, "5 decoded packets")
    store = client.app[SIGHTINGS]
    await until(lambda: (s := store.get("45.1.2.3")) is not None and s.listed is not None, "the verdict")
    seen = await sightings(client)
    assert seen["212.202.0.1"]["methods"] == {"INVITE": 1}  # the spec example's truncated INVITE
    assert seen["192.168.247.250"]["methods"] == {"200": 1}  # heplify's 200 OK to OPTIONS
    assert seen["10.0.1.100"]["methods"] == {"200": 1}  # the HEPv1 fixture
    assert seen["10.0.1.100"]["user_agents"] == ["SpeedTouch 780"]
    scanner = seen["45.1.2.3"]
    assert scanner["methods"] == {"REGISTER": 1}
    assert scanner["user_agents"] == ["friendly-scanner"]
    assert scanner["call_ids"] == ["scan-1"]
    assert scanner["packets"] == 1
    assert scanner["listed"] is False  # not listed by the APIBAN fake, looked up once in check mode
    assert seen["2a01:4f8::7"]["methods"] == {"REGISTER": 1}
    assert seen["198.51.100.1"]["packets"] == 2  # the receiver of both REGISTERs
    assert seen["198.51.100.1"]["methods"] == {}


async def test_listed_sender_is_flagged_logged_and_shown_in_enrichment(
    agent: AgentFactory, apiban: ApibanPeer, caplog: pytest.LogCaptureFixture
) -> None:
    apiban.fake.add("45.9.9.9")
    client = await hep_agent(agent)
    udp_send(client, *(build_hep3(sip_packet("45.9.9.9", call_id=f"c{n}")) for n in range(3)))
    await until(lambda: decoded(client, "udp") == 3, "3 decoded packets")
    await until(lambda: bool((s := client.app[SIGHTINGS].get("45.9.9.9")) and s.listed), "the verdict")
    udp_send(client, build_hep3(sip_packet("45.9.9.9", method="INVITE", call_id="c3")))
    await until(lambda: decoded(client, "udp") == 4, "the 4th packet")
    listed = await sightings(client, "?listed=true")
    assert list(listed) == ["45.9.9.9"]
    assert listed["45.9.9.9"]["methods"] == {"REGISTER": 3, "INVITE": 1}
    assert listed["45.9.9.9"]["call_ids"] == ["c0", "c1", "c2", "c3"]
    assert apiban.fake.request_count("check") == 1  # once for the sender; the receiver is non-routable
    warnings = [r.getMessage() for r in caplog.records if "APIBAN-listed 45.9.9.9" in r.getMessage()]
    assert len(warnings) == 1  # once per period, not once per packet
    body = {"data": {"sid": ["c1"], "source_ip": ["45.9.9.9"]}, "fromts": 1_700_000_000_000}
    answer = await (await client.post("/get/cdr", json=body)).json()
    assert answer["45.9.9.9"]["listed"] is True
    assert answer["45.9.9.9"]["seen"]["methods"] == {"REGISTER": 3, "INVITE": 1}


async def test_bad_datagrams_are_counted_and_dropped(agent: AgentFactory) -> None:
    client = await hep_agent(agent)
    good = build_hep3(sip_packet("45.1.1.1"))
    udp_send(client, b"", b"garbage", good[:20], b"HEP3\x00\x06", b"\x1f\x8b" + good, good)
    await until(lambda: decoded(client, "udp") == 1, "the good packet")
    await until(lambda: sum(client.app[COLLECTOR].stats.bad.values()) == 5, "5 bad packets counted")
    status = await (await client.get("/api/v1/status")).json()
    assert sum(status["hep"]["bad_packets"].values()) == 5
    assert (await client.get("/healthz")).status == 200


async def test_non_sip_types_are_counted_not_sighted(agent: AgentFactory) -> None:
    client = await hep_agent(agent)
    udp_send(
        client,
        build_hep3(sip_packet("45.1.1.2", proto_type=100)),
        build_hep3(sip_packet("45.1.1.3", proto_type=5)),
    )
    await until(lambda: decoded(client, "udp") == 2, "2 packets")
    assert dict(client.app[COLLECTOR].stats.non_sip) == {100: 1, 5: 1}
    assert await sightings(client) == {}


class Connections:
    """TCP connections to the collector, all closed at the end of the test."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        address = client.app[COLLECTOR].tcp_address()
        assert address is not None
        reader, writer = await asyncio.open_connection(*address)
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def tcp() -> AsyncIterator[Connections]:
    connections = Connections()
    yield connections
    await connections.close()


async def test_tcp_stream_split_anywhere(agent: AgentFactory, tcp: Connections) -> None:
    client = await hep_agent(agent)
    stream = b"".join(build_hep3(sip_packet(f"45.2.0.{n}", call_id=f"t{n}")) for n in range(5))
    _, writer = await tcp.open(client)
    for cut in (3, 7, 130, 131, len(stream) - 1):  # mid-header, mid-chunk, last byte alone
        writer.write(stream[:cut])
        await writer.drain()
        stream = stream[cut:]
    writer.write(stream)
    await writer.drain()
    await until(lambda: decoded(client, "tcp") == 5, "5 packets over TCP")
    seen = await sightings(client)
    assert all(seen[f"45.2.0.{n}"]["call_ids"] == [f"t{n}"] for n in range(5))


async def test_bad_tcp_stream_closes_that_connection_only(agent: AgentFactory, tcp: Connections) -> None:
    client = await hep_agent(agent)
    good_reader, good_writer = await tcp.open(client)
    bad_reader, bad_writer = await tcp.open(client)
    bad_writer.write(build_hep3(sip_packet("45.3.0.1")) + b"NOT-HEP-AT-ALL")
    await bad_writer.drain()
    async with asyncio.timeout(5):
        assert await bad_reader.read() == b""  # the agent closed it
    good_writer.write(build_hep3(sip_packet("45.3.0.2")))
    await good_writer.drain()
    await until(lambda: decoded(client, "tcp") == 2, "packets on both connections")
    stats = client.app[COLLECTOR].stats
    assert stats.tcp_closed_bad == 1
    assert stats.tcp_open == 1
    assert not good_reader.at_eof()


async def test_tcp_connection_cap_and_idle_timeout(agent: AgentFactory, tcp: Connections) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_MAX_CONNECTIONS="2", HEPSUB_HEP_IDLE_TIMEOUT="1")
    first = await tcp.open(client)
    second = await tcp.open(client)
    for n, (_, writer) in enumerate((first, second)):
        # A connection that delivered a packet is never closed to make room for a newcomer.
        writer.write(build_hep3(sip_packet(f"45.4.0.{n}")))
        await writer.drain()
    await until(lambda: decoded(client, "tcp") == 2, "a packet on each connection")
    third_reader, _ = await tcp.open(client)
    async with asyncio.timeout(5):
        assert await third_reader.read() == b""  # refused over the cap
    async with asyncio.timeout(5):  # idle for longer than 1 s: closed by the agent
        assert await first[0].read() == b""
        assert await second[0].read() == b""
    stats = client.app[COLLECTOR].stats
    assert (stats.tcp_refused, stats.tcp_idle_closed, stats.tcp_open) == (1, 2, 0)


async def test_flood_of_spoofed_sources_keeps_sightings_bounded(
    agent: AgentFactory, tcp: Connections
) -> None:
    client = await hep_agent(agent, HEPSUB_SIGHTINGS_MAX="100", HEPSUB_APIBAN_MODE="mirror")
    packets = [build_hep3(sip_packet(f"45.{n >> 8}.{n & 255}.1")) for n in range(600)]
    _, writer = await tcp.open(client)  # TCP: no datagram may be lost, so the count is exact
    writer.write(b"".join(packets))
    await writer.drain()
    await until(lambda: decoded(client, "tcp") == 600, "600 packets")
    store = client.app[SIGHTINGS]
    assert len(store) == 100
    assert store.evicted == 501  # 600 senders + 1 receiver, 100 kept
    assert store.get("45.2.87.1") is not None  # the most recent sender is kept
    assert store.get("45.0.0.1") is None


kamailio_reason = kamailio_available()


@pytest.mark.skipif(kamailio_reason is not None, reason=f"Kamailio not usable: {kamailio_reason}")
@pytest.mark.parametrize("hep_version", [3, 1])
async def test_kamailio_siptrace_feeds_the_agent(agent: AgentFactory, hep_version: int) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_TCP="")
    hep_port = client.app[COLLECTOR].udp_address()[1]  # type: ignore[index]
    scan = ["OPTIONS"] * 3 + ["REGISTER"] * 2 + ["INVITE"]
    async with kamailio(hep_port=hep_port, hep_version=hep_version) as k:
        for n, method in enumerate(scan):
            await sip_exchange(
                k.sip_port, method, from_user="100", user_agent="friendly-scanner", call_id=f"k{n}"
            )
        await until(lambda: decoded(client, "udp") == 12, "6 requests and 6 replies from Kamailio")
    seen = await sightings(client)
    # The client and Kamailio share 127.0.0.1: its sighting holds the scan and the replies to it.
    assert seen["127.0.0.1"]["methods"] == {
        "OPTIONS": 3,
        "REGISTER": 2,
        "INVITE": 1,
        "200": 3,
        "401": 2,
        "403": 1,
    }
    assert seen["127.0.0.1"]["user_agents"] == ["friendly-scanner"]
    assert seen["127.0.0.1"]["call_ids"] == [f"k{n}" for n in range(6)]
    assert seen["127.0.0.1"]["listed"] is False
    assert client.app[COLLECTOR].stats.bad == {}


async def test_ipv4_mapped_sender_is_the_same_sighting(agent: AgentFactory, tcp: Connections) -> None:
    client = await hep_agent(agent)
    _, writer = await tcp.open(client)
    writer.write(
        build_hep3(sip_packet("45.7.7.7")) + build_hep3(sip_packet("::ffff:45.7.7.7", dst="2a01:4f8::1"))
    )
    await writer.drain()
    await until(lambda: decoded(client, "tcp") == 2, "2 packets")
    seen = await sightings(client)
    assert seen["45.7.7.7"]["packets"] == 2
    assert "::ffff:45.7.7.7" not in seen
