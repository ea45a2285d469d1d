"""hep.workers > 1: HEP ingest in several processes on the same ports, merged by the agent.

Real processes, real sockets: the agent (in the test's event loop, or the real console program)
starts its workers, HEP goes to the shared ports from many sender sockets (the kernel spreads
senders, not packets, over the workers), and what the agent serves must be what one process
would have served: every packet counted once, sightings, enrichment, detections and evidence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import ConfigError, load_settings
from hepsub_apiban.formats.hep import HepPacket, build_hep3
from hepsub_apiban.formats.sip import parse_sip
from hepsub_apiban.ingest import worker_packets
from hepsub_apiban.ingest.evidence import PER_ADDRESS
from hepsub_apiban.ingest.hep_worker import FRAME, Worker, evidence_packets, read_report, report
from hepsub_apiban.ingest.sightings import Sightings
from hepsub_apiban.ingest.workers import WorkerPool
from hepsub_apiban.keys import COLLECTOR, DETECTIONS, EVIDENCE, SIGHTINGS

from .conftest import APIBAN_KEY, HOMER_TOKEN, AgentFactory, ApibanPeer, HomerPeer, agent_env
from .test_cli import assert_one_line_error, free_port, get_json, run, running, serve_env
from .test_collector import Client, hep_agent, sip_packet
from .test_detect_real_tools import eventually
from .test_detection_agent import ATTACKER, scan
from .test_shared_sightings import stored, total

SERVER = "198.51.100.1"
UDP_SENDERS, UDP_EACH = 24, 5  # 24 source ports: all on one worker has a chance of 2 in 2^24
TCP_SENDERS, TCP_EACH = 4, 5


def pool(client: Client) -> WorkerPool:
    collector = client.app[COLLECTOR]
    assert isinstance(collector, WorkerPool)
    return collector


def source(n: int) -> str:
    return f"45.0.{n // 200}.{n % 200 + 1}"


def registers(first: int, count: int) -> list[bytes]:
    return [
        build_hep3(sip_packet(source(n), SERVER, ua="Yealink SIP-T46U", call_id=f"reg-{n}"))
        for n in range(first, first + count)
    ]


def send_udp(address: tuple[str, int], senders: int, each: int, first: int = 0) -> int:
    """``senders`` sockets (one source port each), ``each`` packets from distinct SIP sources."""
    sent = 0
    for n in range(senders):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in registers(first + n * each, each):
                sock.sendto(datagram, address)
                sent += 1
    return sent


async def send_tcp(address: tuple[str, int], senders: int, each: int, first: int) -> int:
    sent = 0
    for n in range(senders):
        _reader, writer = await asyncio.open_connection(*address)
        writer.write(b"".join(registers(first + n * each, each)))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        sent += each
    return sent


async def status(client: Client) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/api/v1/status")).json()
    return body


async def all_sightings(client: Client) -> dict[str, dict[str, Any]]:
    body = await (await client.get("/api/v1/sightings?limit=10000")).json()
    return {s["ip"]: s for s in body["sightings"]}


def pids(body: dict[str, Any]) -> list[int]:
    return [p["pid"] for p in body["hep"]["workers"]["processes"] if p["pid"] is not None]


def environment_and_arguments(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def workers_agent(agent: AgentFactory, **env: str) -> Client:
    client = await hep_agent(agent, HEPSUB_HEP_WORKERS="2", **env)
    assert pool(client).up() == 2
    return client


# ------------------------------------------------------------------------------- the setting


def test_hep_workers_is_one_by_default_and_range_checked(tmp_path: Path) -> None:
    assert load_settings(None, agent_env(tmp_path)).hep.workers == 1
    assert load_settings(None, agent_env(tmp_path, HEPSUB_HEP_WORKERS="8")).hep.workers == 8
    for bad in ("0", "65", "two", "-1"):
        with pytest.raises(ConfigError, match=r"^hep\.workers: "):
            load_settings(None, agent_env(tmp_path, HEPSUB_HEP_WORKERS=bad))


async def test_one_worker_is_the_single_process_collector(agent: AgentFactory) -> None:
    client = await hep_agent(agent)
    assert type(client.app[COLLECTOR]) is not WorkerPool
    body = await status(client)
    assert body["hep"]["workers"] is None
    assert await (await client.get("/readyz")).json() == {"ready": True}


@pytest.mark.parametrize("value", ["0", "100", "many"])
async def test_a_bad_hep_workers_exits_2_naming_it(tmp_path: Path, value: str) -> None:
    result = await run(["serve"], agent_env(tmp_path, HEPSUB_HEP_WORKERS=value), tmp_path, within=10.0)
    assert_one_line_error(result, "hep.workers")


async def test_a_hep_port_in_use_exits_2_with_workers_too(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    """Held by anything, even another agent's workers (SO_REUSEPORT would let them share it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = serve_env(tmp_path, apiban, homer, free_port())
        env.update(HEPSUB_HEP_UDP="127.0.0.1:0", HEPSUB_HEP_TCP=f"127.0.0.1:{port}", HEPSUB_HEP_WORKERS="2")
        result = await run(["serve"], env, tmp_path, within=15.0)
    assert_one_line_error(result, "hep.tcp")
    assert str(port) in result.stderr
    assert homer.fake.subscriptions == []


# ------------------------------------------------------------------------------- merging


def test_a_workers_batch_adds_up_to_what_one_process_records() -> None:
    """The same packets, recorded by one ``Sightings`` or tallied in a worker in two batches and
    added to the agent's: the same counts, samples and times."""
    settings = load_settings(None, {"HEPSUB_HEP_UDP": "", "HEPSUB_HEP_TCP": ""})
    packets = [
        sip_packet(source(n % 7), SERVER, method=method, ua=f"ua-{n % 3}", call_id=f"c-{n}")
        for n, method in enumerate(["REGISTER", "INVITE", "OPTIONS", "BYE"] * 9)
    ]
    packets.append(
        dataclasses.replace(packets[0], src_ip=SERVER, dst_ip=source(0), payload=b"SIP/2.0 401 x\r\n\r\n")
    )
    one = Sightings(LookupService(None, NetworkSet()))
    merged = Sightings(LookupService(None, NetworkSet()))
    worker = Worker(settings, 1)
    for half in (packets[:20], packets[20:]):
        for packet in half:
            worker.collector.handle(packet, "udp", "127.0.0.1")
            sip = parse_sip(packet.payload)
            assert sip is not None
            one.record(packet.src_ip, packet.dst_ip, sip, packet.ts_sec)
        for row in over_the_wire(worker)[0]["rows"]:
            merged.add(*row)
    expected = {s.ip: s.to_json() for s in one.values()}
    assert {s.ip: s.to_json() for s in merged.values()} == expected
    assert sum(s.packets for s in merged.values()) == 2 * len(packets)


async def test_a_worker_reads_its_udp_socket_in_bounded_bursts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every datagram waiting is handled, at most MAX_BURST in one turn of the event loop; the
    kernel's drop counter is read from the socket until the worker stops, which closes it."""
    monkeypatch.setattr(worker_packets, "MAX_BURST", 8)
    worker = Worker(load_settings(None, {"HEPSUB_HEP_UDP": "", "HEPSUB_HEP_TCP": ""}), 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    await worker.collector.listen(sock, None)
    stats, sent = worker.collector.stats, 50
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for data in registers(0, sent):  # all waiting before the worker's loop runs again
            sender.sendto(data, sock.getsockname())
    loop, handled = asyncio.get_running_loop(), [0]

    def each_turn() -> None:  # one call per turn: what was handled meanwhile came in one burst
        handled.append(stats.packets["udp"])
        if handled[-1] < sent:
            loop.call_soon(each_turn)

    loop.call_soon(each_turn)
    await eventually(lambda: handled[-1] == sent, "every datagram handled")
    bursts = [after - before for before, after in itertools.pairwise(handled) if after > before]
    assert max(bursts) == 8
    assert worker.collector.kernel_drops() == 0
    await worker.collector.stop()
    assert worker.collector.kernel_drops() is None
    assert sock.fileno() == -1


def over_the_wire(worker: Worker, room: bool = True) -> tuple[dict[str, Any], bytes]:
    """A worker's batch as the agent reads it."""
    return read_report(report(*worker.batch(room))[FRAME.size :])


def test_evidence_crosses_to_the_agent_whole() -> None:
    """The packets of protected addresses, the last PER_ADDRESS of each, each once, byte for byte."""
    settings = load_settings(None, {"HEPSUB_HEP_UDP": "", "HEPSUB_HEP_TCP": ""})
    worker = Worker(settings, 1)
    worker.protect([ATTACKER, "2001:db8::7"])
    big = b"OPTIONS sip:x SIP/2.0\r\n" + bytes(range(256)) * 40  # any bytes, past 4 KiB
    packets = [
        dataclasses.replace(sip_packet(ATTACKER, SERVER, call_id=f"p{n}"), ts_usec=n)
        for n in range(PER_ADDRESS + 5)
    ]
    packets.append(dataclasses.replace(sip_packet("2001:db8::7", "2001:db8::8"), family=10, payload=big))
    packets.append(sip_packet("45.1.1.1", SERVER))  # not protected: not kept
    packets.append(sip_packet("2001:db8::7", ATTACKER))  # both protected: kept once
    for packet in packets:
        worker.collector.handle(packet, "udp", "127.0.0.1")
    message, records = over_the_wire(worker)
    assert "evidence" not in message
    received = list(evidence_packets(records))
    # The attacker's ring: its last PER_ADDRESS packets, the one to it from 2001:db8::7 included.
    expected = [*packets[6 : PER_ADDRESS + 5], packets[-3], packets[-1]]
    assert sorted(map(kept, received)) == sorted(map(kept, expected))


def kept(packet: HepPacket) -> tuple[object, ...]:
    """What evidence keeps of a packet."""
    fields = ("ts_sec", "ts_usec", "src_ip", "dst_ip", "src_port", "dst_port", "ip_proto", "payload")
    return tuple(getattr(packet, name) for name in fields)


def test_a_batch_with_no_room_is_dropped_and_counted_its_counters_kept() -> None:
    settings = load_settings(None, {"HEPSUB_HEP_UDP": "", "HEPSUB_HEP_TCP": ""})
    worker = Worker(settings, 1)
    for n in range(5):
        worker.collector.handle(sip_packet(source(n), SERVER), "udp", "127.0.0.1")
    dropped, _ = over_the_wire(worker, room=False)
    assert "rows" not in dropped
    counts = {tuple(item[:-1]): item[-1] for item in dropped["counts"]}
    assert counts[("packets", "udp")] == 5
    assert counts[("dropped", "sightings")] == 6  # five senders and the server
    assert counts[("dropped", "batches")] == 1
    assert over_the_wire(worker)[0]["rows"] == []  # what was dropped is not sent later


# ------------------------------------------------------------------------------- the agent


async def test_hep_from_many_senders_reaches_the_agent_once_each(agent: AgentFactory) -> None:
    client = await workers_agent(agent)
    collector = pool(client)
    udp, tcp = collector.udp_address(), collector.tcp_address()
    assert udp is not None
    assert tcp is not None
    sent_udp = send_udp(udp, UDP_SENDERS, UDP_EACH)
    sent_tcp = await send_tcp(tcp, TCP_SENDERS, TCP_EACH, first=sent_udp)
    total = sent_udp + sent_tcp

    await eventually(lambda: collector.stats.packets == {"udp": sent_udp, "tcp": sent_tcp}, "all packets")
    seen = await eventually(lambda: _all_seen(client, total), "every sender in the sightings")
    assert {ip: s["packets"] for ip, s in seen.items() if ip != SERVER} == {
        source(n): 1 for n in range(total)
    }
    assert seen[SERVER]["packets"] == total  # the receiver of every packet, counted once per packet

    body = await status(client)
    workers = body["hep"]["workers"]
    assert workers["configured"] == 2
    assert workers["up"] == 2
    assert sum(p["packets"] for p in workers["processes"]) == total
    assert all(p["packets"] for p in workers["processes"]), "the kernel spread the senders"
    assert body["hep"]["packets"] == {"udp": sent_udp, "tcp": sent_tcp}
    assert body["hep"]["tcp_connections"]["accepted"] == TCP_SENDERS
    assert await (await client.get("/readyz")).json() == {
        "ready": True,
        "hep_workers": {"up": 2, "configured": 2},
    }
    metrics = await (await client.get("/metrics")).text()
    assert f'hepsub_apiban_hep_packets_total{{transport="udp",version="3"}} {float(sent_udp)}' in metrics
    assert "hepsub_apiban_hep_workers_up 2.0" in metrics

    request = {"data": {"sid": ["call-1"], "source_ip": [source(3), "8.8.4.4"]}, "fromts": 1, "tots": 2}
    answer = orjson.loads(await (await client.post("/get/cdr", data=orjson.dumps(request))).read())
    assert answer[source(3)]["seen"]["packets"] == 1
    assert answer[source(3)]["seen"]["methods"] == {"REGISTER": 1}


async def _all_seen(client: Client, total: int) -> dict[str, dict[str, Any]] | None:
    seen = await all_sightings(client)
    return seen if len(seen) == total + 1 and seen[SERVER]["packets"] == total else None


async def test_a_scan_found_in_a_worker_is_detected_served_and_kept(agent: AgentFactory) -> None:
    client = await workers_agent(agent)
    udp = pool(client).udp_address()
    assert udp is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in scan():
            sock.sendto(datagram, udp)

    async def detected() -> list[dict[str, Any]]:
        body = await (await client.get("/api/v1/detections")).json()
        return body["detections"]  # type: ignore[no-any-return]

    found = await eventually(detected, "the detection")
    assert [d["ip"] for d in found] == [ATTACKER]
    assert found[0]["action"] == "serve"
    assert {"scanner-ua", "user-enumeration"} <= set(found[0]["rules"])
    assert client.app[DETECTIONS].holds(ATTACKER)
    await eventually(lambda: client.app[SIGHTINGS].get(ATTACKER), "the attacker's sighting")
    assert client.app[SIGHTINGS].get(ATTACKER).flagged  # type: ignore[union-attr]
    # The worker kept the packets that followed its own finding, before the agent said so.
    kept = await eventually(lambda: client.app[EVIDENCE].packets([ATTACKER]), "evidence")
    assert all(ATTACKER in (p.src_ip, p.dst_ip) for p in kept)
    assert b"friendly-scanner" in kept[-1].payload or b"404 Not Found" in kept[-1].payload
    body = await status(client)
    assert body["detection"]["tracked"] >= 1
    assert body["hep"]["workers"]["dropped"] == {
        "sightings": 0,
        "findings": 0,
        "evidence": 0,
        "batches": 0,
    }


async def test_a_killed_worker_comes_back_and_nothing_is_counted_twice(agent: AgentFactory) -> None:
    client = await workers_agent(agent)
    collector = pool(client)
    udp = collector.udp_address()
    assert udp is not None
    first = send_udp(udp, UDP_SENDERS, 2)
    await eventually(lambda: collector.stats.packets["udp"] == first, "the first packets")
    before = pids(await status(client))
    os.kill(before[0], signal.SIGKILL)

    async def back() -> list[int] | None:
        body = await status(client)
        now = pids(body)
        return now if body["hep"]["workers"]["up"] == 2 and before[0] not in now else None

    after = await eventually(back, "the worker started again")
    assert before[1] in after
    body = await status(client)
    assert body["hep"]["workers"]["restarts"] == 1
    assert (await client.get("/readyz")).status == 200
    second = send_udp(udp, UDP_SENDERS, 2, first=first)
    await eventually(
        lambda: collector.stats.packets["udp"] == first + second, "the packets after the restart"
    )
    seen = await eventually(lambda: _all_seen(client, first + second), "every sender once")
    assert all(s["packets"] == 1 for ip, s in seen.items() if ip != SERVER)


async def test_stopping_the_agent_stops_every_worker(agent: AgentFactory) -> None:
    client = await workers_agent(agent)
    running_pids = pids(await status(client))
    assert len(running_pids) == 2
    assert not any(gone(pid) for pid in running_pids)
    await client.close()
    assert all(gone(pid) for pid in running_pids)


# ------------------------------------------------------------------------------- the program


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
async def test_serve_stops_its_workers_and_they_never_outlive_it(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer, stop: signal.Signals
) -> None:
    port = free_port()
    env = {
        **serve_env(tmp_path, apiban, homer, port),
        "HEPSUB_HEP_UDP": "127.0.0.1:0",
        "HEPSUB_HEP_TCP": "127.0.0.1:0",
        "HEPSUB_HEP_WORKERS": "2",
    }

    async def two_up() -> list[int] | None:
        answer = await get_json(f"http://127.0.0.1:{port}/api/v1/status")
        if answer is None or answer[0] != 200:
            return None
        found = pids(answer[1])
        return found if len(found) == 2 else None

    async with running(["serve"], env, tmp_path) as child:
        workers = await child.until(two_up, within=30.0)
        for pid in workers:  # the settings came in the first message, without the agent's secrets
            seen = environment_and_arguments(pid)
            assert APIBAN_KEY.encode() not in seen
            assert HOMER_TOKEN.encode() not in seen
        child.proc.send_signal(stop)
        result = await child.finish(within=15.0)
    if stop == signal.SIGTERM:
        assert result.code == 0, result.stderr
        result.assert_clean()
        assert all(gone(pid) for pid in workers)
    else:  # the agent could not stop them: they see their control socket close and stop
        await eventually(lambda: all(gone(pid) for pid in workers), "workers gone", deadline=10.0)


async def test_a_listed_address_is_pushed_to_the_workers_and_its_packets_kept(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    listed = "45.9.9.9"
    apiban.fake.add(listed)
    client = await workers_agent(agent)
    collector = pool(client)
    assert collector.workers_settings.secrets() == ()  # the APIBAN key stays in the agent
    udp = collector.udp_address()
    assert udp is not None
    first = build_hep3(sip_packet(listed, SERVER, call_id="before"))
    later = build_hep3(sip_packet(listed, SERVER, call_id="after-the-push"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(first, udp)
        # Check mode: the agent asks APIBAN about the new address, finds it listed, protects it,
        # and tells the workers with its next push.
        await eventually(lambda: listed in collector.pushed, "the listed address pushed")
        sock.sendto(later, udp)
    kept = await eventually(lambda: client.app[EVIDENCE].packets([listed]), "the packet after the push")
    assert [b"after-the-push" in p.payload for p in kept] == [True]
    assert client.app[SIGHTINGS].get(listed).packets == 2  # type: ignore[union-attr]


async def test_hep_refused_in_a_worker_is_counted_by_the_agent(agent: AgentFactory) -> None:
    """Also: workers with UDP alone and detection off."""
    client = await workers_agent(
        agent, HEPSUB_HEP_ALLOW_FROM="127.0.0.2/32", HEPSUB_HEP_TCP="", HEPSUB_DETECT_ENABLED="false"
    )
    collector = pool(client)
    udp = collector.udp_address()
    assert udp is not None
    assert collector.tcp_address() is None
    for host, count in (("127.0.0.1", 3), ("127.0.0.2", 2)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            for datagram in registers(0, count):
                sock.sendto(datagram, udp)

    async def counted() -> dict[str, Any] | None:
        body = await status(client)
        refused = body["refusals"].get("hep_udp") == {"not in hep.allow_from": 3}
        return body if refused and body["hep"]["packets"].get("udp") == 2 else None

    body = await eventually(counted, "two packets counted and three refused")
    assert body["detection"] == {"enabled": False}
    assert body["hep"]["tcp_listen"] is None
    assert set(await all_sightings(client)) == {source(0), source(1), SERVER}


async def test_with_a_store_the_agent_writes_what_all_workers_counted(
    agent: AgentFactory, store_url: str
) -> None:
    client = await workers_agent(agent, HEPSUB_STORE_URL=store_url)
    udp = pool(client).udp_address()
    assert udp is not None
    sent = send_udp(udp, UDP_SENDERS, 2)

    async def written() -> bool:
        return total(await stored(store_url, SERVER)) == sent

    await eventually(written, "the merged totals in the store")
    rows = await stored(store_url, SERVER)
    assert len(rows) == 1  # one writer: the agent, not one per worker
    assert [total(await stored(store_url, source(n))) for n in range(sent)] == [1] * sent


async def test_a_stuck_worker_is_replaced(agent: AgentFactory) -> None:
    client = await workers_agent(agent)
    collector = pool(client)
    collector.stall_timeout = 1.5  # waited for from each worker's next batch on
    merged = [slot.batches for slot in collector.slots]
    await eventually(
        lambda: all(slot.batches > n for slot, n in zip(collector.slots, merged, strict=True)), "a batch each"
    )
    stuck = pids(await status(client))[0]
    os.kill(stuck, signal.SIGSTOP)  # alive, silent: as a worker caught in a loop

    async def replaced() -> bool:
        body = await status(client)
        return body["hep"]["workers"]["up"] == 2 and stuck not in pids(body)

    await eventually(replaced, "the stuck worker replaced", deadline=15.0)
    assert gone(stuck)
    assert collector.restarts == 1


async def test_readyz_stays_ready_and_says_so_while_no_worker_runs(agent: AgentFactory) -> None:
    # homer-app must still reach the agent: enrichment answers from memory meanwhile.
    client = await workers_agent(agent)
    slots = pool(client).slots
    for slot in slots:  # as between the deaths of both and the first restart
        slot.up = False
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "ready": True,
        "hep": "no HEP worker process is running: restarting them",
        "hep_workers": {"up": 0, "configured": 2},
    }
    for slot in slots:
        slot.up = True
