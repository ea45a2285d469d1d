"""Who may feed the HEP collector: hep.allow_from, hep.auth_key, and TCP slots that tricklers cannot hold.

Everything goes through real sockets into the real agent. Linux accepts any 127.x.y.z as a source
on loopback, so "another sender" is a socket bound to 127.0.0.2 (or 127.1.x.y). The TCP deadlines
run on the event loop's own clock (asyncio cannot take an injected one), so those tests use a
short hep.packet_timeout and wait for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest

from hepsub_apiban.core.config import ConfigError, HepSettings
from hepsub_apiban.formats.hep import build_hep2, build_hep3
from hepsub_apiban.ingest.collector import HepCollector, exposure_warning
from hepsub_apiban.keys import COLLECTOR, REFUSALS

from .conftest import AgentFactory
from .test_collector import Client, Connections, decoded, hep_agent, sightings, sip_packet, until
from .test_metrics import samples

KEY = "hep-SECRET-key-5d1e"  # what a test sender is configured with; must reach no log, status or metric


def keyed(src: str, key: str | None = KEY) -> bytes:
    """A SIP packet from ``src`` whose chunk 0x000e holds ``key`` (None: no such chunk)."""
    return build_hep3(dataclasses.replace(sip_packet(src), auth_key=None if key is None else key.encode()))


def udp_from(client: Client, host: str, *datagrams: bytes) -> None:
    address = client.app[COLLECTOR].udp_address()
    assert address is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        for datagram in datagrams:
            sock.sendto(datagram, address)


class Senders(Connections):
    """TCP connections from chosen loopback addresses, all closed at the end of the test."""

    async def open_from(self, client: Client, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        address = client.app[COLLECTOR].tcp_address()
        assert address is not None
        reader, writer = await asyncio.open_connection(*address, local_addr=(host, 0))
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def tcp() -> AsyncIterator[Senders]:
    senders = Senders()
    yield senders
    await senders.close()


async def closed_by_agent(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True once the agent closed the connection (EOF or reset), False if it stays open ``within``."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def refused(client: Client, channel: str, reason: str) -> int:
    return client.app[REFUSALS].counts[(channel, reason)]


async def metric(client: Client, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


# --- hep.allow_from -----------------------------------------------------------------------------


async def test_udp_from_outside_allow_from_changes_no_sighting(agent: AgentFactory) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_ALLOW_FROM="127.0.0.2/32, 192.0.2.0/24")
    forged, real = build_hep3(sip_packet("45.10.0.1")), build_hep3(sip_packet("45.10.0.2"))
    udp_from(client, "127.0.0.1", forged, b"not even HEP")  # refused before decoding: not "bad"
    udp_from(client, "127.0.0.2", real)
    await until(lambda: decoded(client, "udp") == 1, "the allowed sender's packet")
    await until(lambda: refused(client, "hep_udp", "not in hep.allow_from") == 2, "2 refusals")
    seen = await sightings(client)
    assert "45.10.0.2" in seen
    assert "45.10.0.1" not in seen
    assert client.app[COLLECTOR].stats.bad == {}
    name = "hepsub_apiban_refused_total"
    assert await metric(client, name, channel="hep_udp", reason="not in hep.allow_from") == 2
    status = await (await client.get("/api/v1/status")).json()
    assert status["refusals"]["hep_udp"] == {"not in hep.allow_from": 2}
    assert status["hep"]["allow_from"] == ["127.0.0.2/32", "192.0.2.0/24"]


async def test_tcp_from_outside_allow_from_is_closed_at_accept(agent: AgentFactory, tcp: Senders) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_ALLOW_FROM="127.0.0.2")
    reader, writer = await tcp.open_from(client, "127.0.0.1")
    with contextlib.suppress(ConnectionError):
        writer.write(build_hep3(sip_packet("45.11.0.1")))
        await writer.drain()
    assert await closed_by_agent(reader)
    good_reader, good_writer = await tcp.open_from(client, "127.0.0.2")
    good_writer.write(build_hep3(sip_packet("45.11.0.2")))
    await good_writer.drain()
    await until(lambda: decoded(client, "tcp") == 1, "the allowed sender's packet")
    seen = await sightings(client)
    assert "45.11.0.2" in seen
    assert "45.11.0.1" not in seen
    assert refused(client, "hep_tcp", "not in hep.allow_from") == 1
    stats = client.app[COLLECTOR].stats
    assert (stats.tcp_accepted, stats.tcp_open) == (1, 1)
    assert not await closed_by_agent(good_reader, within=0.2)


async def test_ipv4_allow_list_on_a_dual_stack_listener(agent: AgentFactory, tcp: Senders) -> None:
    """On [::] the kernel reports IPv4 peers as ::ffff:a.b.c.d; an IPv4 allow-list still applies."""
    try:
        client = await hep_agent(
            agent, HEPSUB_HEP_UDP="[::]:0", HEPSUB_HEP_TCP="[::]:0", HEPSUB_HEP_ALLOW_FROM="127.0.0.2"
        )
    except ConfigError as error:  # no IPv6 on this host
        pytest.skip(f"cannot listen on [::]: {error}")
    udp_port = client.app[COLLECTOR].udp_address()[1]  # type: ignore[index]
    for host, src in (("127.0.0.1", "45.20.0.1"), ("127.0.0.2", "45.20.0.2")):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            sock.sendto(build_hep3(sip_packet(src)), ("127.0.0.1", udp_port))
    await until(lambda: decoded(client, "udp") == 1, "the allowed sender's datagram")
    await until(lambda: refused(client, "hep_udp", "not in hep.allow_from") == 1, "the refusal")
    tcp_port = client.app[COLLECTOR].tcp_address()[1]  # type: ignore[index]
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port, local_addr=("127.0.0.1", 0))
    tcp.writers.append(writer)  # closed by the fixture
    assert await closed_by_agent(reader)
    assert refused(client, "hep_tcp", "not in hep.allow_from") == 1
    assert set(await sightings(client)) == {"45.20.0.2", "198.51.100.1"}


# --- hep.auth_key -------------------------------------------------------------------------------


async def test_auth_key_refuses_wrong_missing_and_keyless_versions_on_udp(
    agent: AgentFactory, no_secret_in_logs: logging.Handler
) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_AUTH_KEY=KEY)
    udp_send = [
        keyed("45.12.0.1"),  # the right key
        keyed("45.12.0.2", key="hep-SECRET-key-5d1f"),  # one byte off
        keyed("45.12.0.3", key=KEY[:-1]),  # a prefix
        keyed("45.12.0.4", key=None),  # no 0x000e chunk
        keyed("45.12.0.5", key=""),  # the empty chunk senders without a key write
        build_hep2(sip_packet("45.12.0.6"), version=1),
        build_hep2(sip_packet("45.12.0.7"), version=2),
    ]
    udp_from(client, "127.0.0.1", *udp_send)
    await until(lambda: decoded(client, "udp") == 1, "the keyed packet")
    await until(lambda: client.app[REFUSALS].total("hep_udp") == 6, "6 refusals")
    assert set(await sightings(client)) == {"45.12.0.1", "198.51.100.1"}
    name = "hepsub_apiban_refused_total"
    assert await metric(client, name, channel="hep_udp", reason="wrong auth key") == 2
    assert await metric(client, name, channel="hep_udp", reason="no auth key") == 2
    keyless = "HEPv1/v2 while hep.auth_key is set"
    assert await metric(client, name, channel="hep_udp", reason=keyless) == 2
    status = await (await client.get("/api/v1/status")).text()
    assert '"auth_key_required":true' in status
    assert KEY not in status
    assert KEY not in await (await client.get("/metrics")).text()
    lines = no_secret_in_logs.lines  # type: ignore[attr-defined]
    assert any("wrong auth key" in line for line in lines)  # the refusal is logged ...
    assert not [line for line in lines if KEY in line]  # ... and the key never is


async def test_wrong_key_on_tcp_closes_that_connection(agent: AgentFactory, tcp: Senders) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_AUTH_KEY=KEY)
    bad_reader, bad_writer = await tcp.open(client)
    good_reader, good_writer = await tcp.open(client)
    bad_writer.write(keyed("45.13.0.1") + keyed("45.13.0.2", key="guess") + keyed("45.13.0.3"))
    await bad_writer.drain()
    assert await closed_by_agent(bad_reader)
    good_writer.write(keyed("45.13.0.4"))
    await good_writer.drain()
    await until(lambda: decoded(client, "tcp") == 2, "the keyed packets")
    seen = await sightings(client)
    assert {"45.13.0.1", "45.13.0.4"} <= set(seen)
    assert "45.13.0.2" not in seen
    assert "45.13.0.3" not in seen  # after the wrong key, nothing more is read from that sender
    assert refused(client, "hep_tcp", "wrong auth key") == 1
    assert not await closed_by_agent(good_reader, within=0.2)


async def test_allow_list_and_key_together(agent: AgentFactory) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_ALLOW_FROM="127.0.0.2", HEPSUB_HEP_AUTH_KEY=KEY)
    udp_from(client, "127.0.0.1", keyed("45.14.0.1"))  # the right key from the wrong place
    udp_from(client, "127.0.0.2", keyed("45.14.0.2", key="nope"), keyed("45.14.0.3"))
    await until(lambda: client.app[REFUSALS].total("hep_udp") == 2, "2 refusals")
    await until(lambda: decoded(client, "udp") == 1, "the keyed packet from the allowed sender")
    assert set(await sightings(client)) == {"45.14.0.3", "198.51.100.1"}
    assert refused(client, "hep_udp", "not in hep.allow_from") == 1
    assert refused(client, "hep_udp", "wrong auth key") == 1


# --- TCP slots ----------------------------------------------------------------------------------


async def test_per_sender_cap_refuses_the_17th_connection(agent: AgentFactory, tcp: Senders) -> None:
    client = await hep_agent(agent)
    for _ in range(16):
        await tcp.open_from(client, "127.0.0.3")
    await until(lambda: client.app[COLLECTOR].stats.tcp_open == 16, "16 open connections")
    reader, _ = await tcp.open_from(client, "127.0.0.3")
    assert await closed_by_agent(reader)
    _, other = await tcp.open_from(client, "127.0.0.4")  # another sender still finds room
    other.write(build_hep3(sip_packet("45.15.0.1")))
    await until(lambda: decoded(client, "tcp") == 1, "the other sender's packet")
    assert refused(client, "hep_tcp", "over the per-sender cap") == 1
    assert client.app[COLLECTOR].stats.tcp_open == 17
    status = await (await client.get("/api/v1/status")).json()
    assert status["hep"]["tcp_connections"]["max_per_sender"] == 16


async def test_at_the_cap_the_oldest_connection_without_a_packet_makes_room(
    agent: AgentFactory, tcp: Senders
) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_MAX_CONNECTIONS="3")
    stats = client.app[COLLECTOR].stats
    a, b, c = [await tcp.open_from(client, f"127.0.1.{n}") for n in (1, 2, 3)]
    a[1].write(build_hep3(sip_packet("45.16.0.1")))  # a delivers: it keeps its slot
    await until(lambda: decoded(client, "tcp") == 1 and stats.tcp_open == 3, "a's packet, 3 open")
    d = await tcp.open_from(client, "127.0.1.4")
    assert await closed_by_agent(b[0])  # b: the oldest without a packet
    assert not await closed_by_agent(c[0], within=0.1)
    e = await tcp.open_from(client, "127.0.1.5")
    assert await closed_by_agent(c[0])
    for n, (_, writer) in enumerate((d, e)):
        writer.write(build_hep3(sip_packet(f"45.16.1.{n}")))
    await until(lambda: decoded(client, "tcp") == 3, "d's and e's packets")
    f = await tcp.open_from(client, "127.0.1.6")  # every slot has delivered: the newcomer is refused
    assert await closed_by_agent(f[0])
    for reader, _ in (a, d, e):
        assert not await closed_by_agent(reader, within=0.05)
    assert (stats.tcp_evicted, stats.tcp_refused, stats.tcp_open) == (2, 1, 3)
    assert refused(client, "hep_tcp", "closed at the connection cap: no packet yet") == 2
    assert refused(client, "hep_tcp", "over the connection cap") == 1


async def test_a_packet_is_owed_within_packet_timeout(agent: AgentFactory, tcp: Senders) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_PACKET_TIMEOUT="1", HEPSUB_HEP_IDLE_TIMEOUT="5")
    packet = build_hep3(sip_packet("45.17.0.1"))
    started = time.monotonic()
    silent, _ = await tcp.open(client)  # owes nothing before its first byte: only the idle timeout
    trickler, trickle = await tcp.open(client)
    worker, work = await tcp.open(client)
    work.write(packet)  # delivers at once, then starts a second packet and stalls
    work.write(packet[:10])

    async def dribble() -> None:  # a byte every 0.2 s: the packet is never complete
        with contextlib.suppress(ConnectionError):
            for byte in packet:
                trickle.write(bytes([byte]))
                await trickle.drain()
                await asyncio.sleep(0.2)

    task = asyncio.create_task(dribble())
    try:
        for reader in (trickler, worker):
            assert await closed_by_agent(reader, within=4)
    finally:
        task.cancel()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3.5, elapsed  # 1 s from the first byte of the unfinished packet
    assert not silent.at_eof()
    assert decoded(client, "tcp") == 1
    stats = client.app[COLLECTOR].stats
    assert (stats.tcp_packet_timeouts, stats.tcp_idle_closed, stats.tcp_open) == (2, 0, 1)
    assert refused(client, "hep_tcp", "no complete packet in time") == 2
    name = "hepsub_apiban_hep_tcp_closed_total"
    assert await metric(client, name, reason="no complete packet in time") == 2
    assert await closed_by_agent(silent, within=5)  # the idle timeout, 5 s after it connected
    assert 4.5 < time.monotonic() - started < 8.0
    assert (stats.tcp_idle_closed, stats.tcp_open) == (1, 0)


async def test_a_steady_sender_is_not_cut_off_by_the_packet_timeout(
    agent: AgentFactory, tcp: Senders
) -> None:
    """Packets that each take a while to arrive are fine: the deadline restarts with every packet."""
    client = await hep_agent(agent, HEPSUB_HEP_PACKET_TIMEOUT="1")
    reader, writer = await tcp.open(client)
    for n in range(5):  # 2.5 s in all, each packet split over 0.5 s
        packet = build_hep3(sip_packet(f"45.18.0.{n}"))
        writer.write(packet[:30])
        await asyncio.sleep(0.25)
        writer.write(packet[30:])
        await asyncio.sleep(0.25)
    await until(lambda: decoded(client, "tcp") == 5, "5 packets")
    assert not await closed_by_agent(reader, within=0.1)
    assert client.app[COLLECTOR].stats.tcp_packet_timeouts == 0


@dataclasses.dataclass
class Attack:
    """Tricklers: each holds a connection by sending a real packet one byte at a time, and
    reconnects (after ``pause``) whenever the agent closes it."""

    address: tuple[str, int]
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    connects: int = 0
    lifetimes: list[float] = dataclasses.field(default_factory=list)
    pause: float = 0.1

    async def trickler(self, host: str) -> None:
        packet = build_hep3(sip_packet("45.66.6.6"))  # if it were ever complete, it would be sighted
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*self.address, local_addr=(host, 0))
            except OSError:
                await asyncio.sleep(self.pause)
                continue
            self.connects += 1
            opened = time.monotonic()
            try:
                for byte in packet:
                    writer.write(bytes([byte]))
                    if await closed_by_agent(reader, within=0.3) or self.stop.is_set():
                        break
            except ConnectionError:
                pass
            finally:
                if not self.stop.is_set():
                    self.lifetimes.append(time.monotonic() - opened)
                writer.close()
            await asyncio.sleep(self.pause)


async def test_real_sender_gets_in_while_300_tricklers_try_to_hold_every_slot(
    agent: AgentFactory, tcp: Senders
) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_PACKET_TIMEOUT="1")  # cap 256, 16 per sender
    collector: HepCollector = client.app[COLLECTOR]
    address = collector.tcp_address()
    assert address is not None
    attack = Attack(address)
    hosts = [f"127.1.{n // 200}.{n % 200 + 1}" for n in range(140) for _ in range(2)]
    hosts += ["127.2.0.1"] * 20  # one address trying for more than its 16
    tasks = [asyncio.create_task(attack.trickler(host)) for host in hosts]
    highest_open = 0
    try:
        await until(lambda: collector.stats.tcp_open == 256, "the tricklers to fill every slot")
        reader, writer = await tcp.open_from(client, "127.0.0.9")
        second = None
        for n in range(25):  # 2.5 s of real traffic
            writer.write(build_hep3(sip_packet(f"45.19.0.{n}")))
            if n == 12:  # a second connection of the real sender, opened mid-attack, gets in too
                second = await tcp.open_from(client, "127.0.0.10")
            if second is not None:
                second[1].write(build_hep3(sip_packet(f"45.19.1.{n}")))
            highest_open = max(highest_open, collector.stats.tcp_open)
            await asyncio.sleep(0.1)
        await until(lambda: decoded(client, "tcp") == 25 + 13, "every real packet")
        assert not await closed_by_agent(reader, within=0.05)
        assert second is not None
        assert not await closed_by_agent(second[0], within=0.05)
    finally:
        attack.stop.set()
        await asyncio.gather(*tasks)
    seen = await sightings(client)
    assert all(f"45.19.0.{n}" in seen for n in range(25))
    assert all(f"45.19.1.{n}" in seen for n in range(12, 25))
    assert "45.66.6.6" not in seen
    assert highest_open <= 256
    assert attack.connects > 300  # the attackers kept coming back
    assert attack.lifetimes
    assert max(attack.lifetimes) < 2.5  # none held a slot past ~1 s + slack
    assert refused(client, "hep_tcp", "over the per-sender cap") > 0
    turned_out = refused(client, "hep_tcp", "closed at the connection cap: no packet yet")
    timed_out = refused(client, "hep_tcp", "no complete packet in time")
    assert turned_out + timed_out > 0


# --- start-up warning ---------------------------------------------------------------------------


async def test_startup_warning_for_an_open_listener(
    agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.collector"):
        await hep_agent(agent, HEPSUB_HEP_UDP="0.0.0.0:0", HEPSUB_HEP_TCP="127.0.0.1:0")
    warnings = [r.getMessage() for r in caplog.records if "is open" in r.getMessage()]
    assert len(warnings) == 1
    assert "udp 0.0.0.0:" in warnings[0]
    assert "tcp" not in warnings[0].split(" is open")[0]  # the loopback listener is not named
    assert "hep.allow_from is empty" in warnings[0]
    assert "hep.auth_key is empty" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.collector"):
        await hep_agent(agent)  # 127.0.0.1 only
    assert not [r for r in caplog.records if "is open" in r.getMessage()]


def test_startup_warning_names_what_is_missing() -> None:
    open_udp = ("0.0.0.0", 9060)
    neither = HepSettings()
    listed = HepSettings(allow_from=(ipaddress.ip_network("192.0.2.0/24"),))
    both = HepSettings(allow_from=listed.allow_from, auth_key=KEY)
    assert "hep.allow_from is empty" in exposure_warning(neither, open_udp, None)
    only_key = exposure_warning(listed, open_udp, None)
    assert "hep.auth_key is empty" in only_key
    assert "allow_from is empty" not in only_key
    assert exposure_warning(both, open_udp, None) == ""
    assert exposure_warning(neither, ("127.0.0.1", 9060), ("::1", 9060)) == ""
    assert "tcp [::]:9060 is open" in exposure_warning(neither, None, ("::", 9060))
    assert KEY not in exposure_warning(HepSettings(auth_key=KEY), open_udp, None)
