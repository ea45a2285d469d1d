"""Worst-case enrichment requests at the limits: how long one request holds the event loop.

    python bench/enrichment_limits.py [--repeat 20] [--posts 5] [--max-call-ids 100] [--max-addresses 500]

Each body is as large as agent.max_body_bytes lets through (1 MiB) and is built to cost the most
of one kind of work: distinct Call-IDs; distinct IPv4 or IPv6 addresses (the first
enrichment.max_addresses of them with HEP sightings at the sightings store's bounds: 20 method
keys, 5 user agents as long as it keeps them, so each address's detail is at its largest); Call-IDs and
addresses together; strings that fail the slowest way to parse as addresses; numbers; lists (the
10,000 a body may hold, and 350,000, which are refused); as many keys as fit under "data".
homer-app's 10-IP body is the baseline.

In process: the real application (``create_app``, mirror mode from a snapshot in which half of
the examined addresses are listed), then ``web.answer_enrichment(app, body)``: JSON decoding,
parsing, lookups, sightings, building and serialising the answer, everything the handler does
once the body is read, and all of it without yielding to the event loop. Median and largest of
``--repeat`` runs.

Through a real server: ``hepsub-apiban serve`` pinned to core 0, its sightings filled over real
HEP (UDP), each body posted ``--posts`` times from core 1 while another process on core 1 sends
``GET /healthz`` back to back on a keep-alive connection: its slowest answer is how long the
server's event loop was held (reading the body, answering, writing), against the same probe with
the server idle.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from common import BENCH_KEY, PYTHON, free_port, machine, pinned, table, write_snapshot

from hepsub_apiban.app import create_app
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.formats.hep import HepPacket, build_hep3
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.ingest.sightings import SAMPLE_BYTES
from hepsub_apiban.keys import SIGHTINGS
from hepsub_apiban.web import answer_enrichment

SERVER_CORE, CLIENT_CORE = 0, 1
BODY_BYTES = 1024 * 1024  # agent.max_body_bytes: aiohttp refuses larger bodies before the handler
FROM_MS = 1669986139000
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK", "SUBSCRIBE", "NOTIFY"]
METHODS += ["PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"]
STATUSES = [100, 180, 200, 401, 403, 404]  # responses count by status: 20 keys with the methods
USER_AGENTS = [f"scanner-{n} " + "x" * (SAMPLE_BYTES - 10) for n in range(5)]  # as long as kept
HEP_TARGET = "198.51.100.1"

PROBE = """
import http.client, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
worst, count, end = 0.0, 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    started = time.perf_counter()
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    worst = max(worst, time.perf_counter() - started)
    count += 1
print(worst, count)
"""


def ipv4(n: int) -> str:
    return f"45.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def ipv6(n: int) -> str:
    # The full, uncompressed spelling: the slowest valid form to parse (ipaddress, not inet_pton).
    return f"2a01:04f8:0000:0000:0000:0000:{n >> 16 & 0xFFFF:04x}:{n & 0xFFFF:04x}"


def not_an_address(n: int) -> str:
    return f"2a01:04f8:0000:0000:0000:{n & 0xFFFF:04x}:0001:000g"  # fails at the last character


def fill(make: Callable[[int], Any], room: int) -> list[Any]:
    """As many ``make(n)`` as fit in ``room`` bytes of a JSON list."""
    items, used = [], 2
    while True:
        item = make(len(items))
        size = len(orjson.dumps(item)) + 1
        if used + size > room:
            return items
        items.append(item)
        used += size


def envelope(data: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {"data": data, "fromts": FROM_MS, "tots": FROM_MS + 1000}, option=orjson.OPT_SORT_KEYS
    )


def room(data: dict[str, Any]) -> int:
    return BODY_BYTES - len(envelope(data)) - 64


def cases() -> dict[str, bytes]:
    call = ["call-1@bench"]
    short_id: Callable[[int], str] = lambda n: f"{n:x}"  # noqa: E731
    half = (BODY_BYTES - 200) // 2
    keys: dict[str, Any] = {"sid": call}
    used = len(envelope(keys))
    while used < BODY_BYTES - 40:
        key = f"k{len(keys):x}"
        keys[key] = 0
        used += len(key) + 5  # ,"key":0
    built = {
        "homer-app, 10 IPs (baseline)": envelope({"sid": call, "source_ip": [ipv4(n) for n in range(10)]}),
        "Call-IDs (distinct)": envelope({"sid": fill(short_id, room({"sid": [], "source_ip": [ipv4(0)]}))}),
        "Call-IDs x IPv4": envelope({"sid": fill(short_id, half), "source_ip": fill(ipv4, half)}),
        "IPv4 (distinct)": envelope(
            {"sid": call, "source_ip": fill(ipv4, room({"sid": call, "source_ip": []}))}
        ),
        "IPv6, full spelling": envelope(
            {"sid": call, "source_ip": fill(ipv6, room({"sid": call, "source_ip": []}))}
        ),
        "not addresses (slowest parse)": envelope(
            {"sid": call, "source_ip": fill(not_an_address, room({"sid": call, "source_ip": []}))}
        ),
        "numbers": envelope(
            {"sid": call, "source_ip": fill(lambda n: n % 10, room({"sid": call, "source_ip": []}))}
        ),
        "9,990 lists, then numbers": envelope(
            {"sid": call, "source_ip": [[]] * 9_990 + fill(lambda n: n % 10, room({"sid": call}) - 30_000)}
        ),
        "350,000 lists (refused)": envelope(
            {"sid": call, "source_ip": fill(lambda _: [], room({"sid": call, "source_ip": []}))}
        ),
        "keys under data": envelope(keys),
    }
    for name, raw in built.items():
        assert len(raw) <= BODY_BYTES, (name, len(raw))
    return built


def sighted(max_addresses: int) -> list[str]:
    """The addresses examined in the bodies above, which get sightings."""
    return [ipv4(n) for n in range(max_addresses)] + [
        str(ipaddress.ip_address(ipv6(n))) for n in range(max_addresses)
    ]


def listed_of(max_addresses: int) -> list[str]:
    return sighted(max_addresses)[::2]


def sip_infos(ip: str) -> list[SipInfo]:
    infos = [
        SipInfo(method=m, call_id=f"{ip}-{n}", user_agent=USER_AGENTS[n % 5], from_user="100")
        for n, m in enumerate(METHODS)
    ]
    infos += [
        SipInfo(method="INVITE", status=s, call_id=f"{ip}-s{s}", user_agent=USER_AGENTS[s % 5])
        for s in STATUSES
    ]
    return infos


def sip_payload(ip: str, info: SipInfo) -> bytes:
    start = f"SIP/2.0 {info.status} X" if info.status else f"{info.method} sip:{HEP_TARGET} SIP/2.0"
    return (
        f"{start}\r\nVia: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-1\r\nFrom: <sip:100@{HEP_TARGET}>;tag=1\r\n"
        f"To: <sip:100@{HEP_TARGET}>\r\nCall-ID: {info.call_id}\r\nCSeq: 1 {info.method}\r\n"
        f"User-Agent: {info.user_agent}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def env_for(
    args: argparse.Namespace, state: Path, feed_url: str, http_port: int, hep_port: int
) -> dict[str, str]:
    return {
        "HEPSUB_APIBAN_URL": feed_url,
        "HEPSUB_APIBAN_KEY": BENCH_KEY,
        "HEPSUB_APIBAN_MODE": "mirror",
        "HEPSUB_STATE_DIR": str(state),
        "HEPSUB_AGENT_BIND": "127.0.0.1",
        "HEPSUB_AGENT_PORT": str(http_port),
        "HEPSUB_HEP_UDP": f"127.0.0.1:{hep_port}" if hep_port else "",
        "HEPSUB_HEP_TCP": "",
        "HEPSUB_LOG_LEVEL": "error",  # not one warning per listed sighting
        "HEPSUB_ENRICHMENT_MAX_CALL_IDS": str(args.max_call_ids),
        "HEPSUB_ENRICHMENT_MAX_ADDRESSES": str(args.max_addresses),
    }


# --------------------------------------------------------------------------- in process


async def in_process(
    args: argparse.Namespace, bodies: dict[str, bytes], state: Path
) -> dict[str, tuple[list[float], int]]:
    settings = load_settings(None, env_for(args, state, "http://127.0.0.1:9", free_port(), 0))
    logging.getLogger("hepsub_apiban").setLevel(logging.ERROR)  # not one warning per listed sighting
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # the cleanup contexts: lookups from the snapshot, the sightings store
    try:
        store = app[SIGHTINGS]
        for ip in sighted(args.max_addresses):
            for info in sip_infos(ip):
                store.record(ip, HEP_TARGET, info, time.time())
        times: dict[str, tuple[list[float], int]] = {}
        for name, raw in bodies.items():
            response, outcome = await answer_enrichment(app, raw)  # warm-up, and the check
            answer_bytes = check_answer(name, response.body, outcome)
            runs = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                await answer_enrichment(app, raw)
                runs.append(time.perf_counter() - started)
            times[name] = (runs, answer_bytes)
        return times
    finally:
        await runner.cleanup()


def check_answer(name: str, body: object, outcome: str) -> int:
    """The benchmark measures real answers: 200 JSON within the cap, with sightings where due."""
    assert isinstance(body, bytes), name
    assert outcome == ("bad_request" if "refused" in name else "ok"), (name, outcome)
    assert len(body) <= 1024 * 1024, (name, len(body))
    answer = orjson.loads(body)
    assert "data" not in answer
    if name.startswith("IPv4"):
        assert answer[ipv4(0)]["seen"]["user_agents"] == USER_AGENTS, name
        assert len(answer[ipv4(0)]["seen"]["methods"]) >= 15, name
        assert answer["call-1@bench"]["listed"], name
    return len(body)


# --------------------------------------------------------------------------- through a server


async def through_server(
    args: argparse.Namespace, bodies: dict[str, bytes], state: Path, feed_url: str
) -> tuple[float, dict[str, tuple[list[float], float]]]:
    http_port, hep_port = free_port(), free_udp_port()
    env = {**os.environ, **env_for(args, state, feed_url, http_port, hep_port)}
    server = await asyncio.create_subprocess_exec(
        *pinned(SERVER_CORE, [PYTHON, "-m", "hepsub_apiban", "serve"]), env=env
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url)
            await send_sightings(session, url, hep_port, args.max_addresses)
            idle = await probe_during(http_port, asyncio.sleep(1.0))  # the probe alone
            results = {}
            for name, raw in bodies.items():
                walls: list[float] = []
                worst = await probe_during(http_port, post(session, url, name, raw, args, walls))
                results[name] = (walls, worst)
            return idle, results
    finally:
        server.terminate()
        await server.wait()


async def post(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    raw: bytes,
    args: argparse.Namespace,
    walls: list[float],
) -> None:
    await asyncio.sleep(0.3)  # the probe is running by then
    for _ in range(args.posts):
        started = time.perf_counter()
        async with session.post(f"{url}/get/cdr", data=raw) as response:
            answer = await response.read()
        walls.append(time.perf_counter() - started)
        assert response.status == 200, response.status
        assert answer.startswith(b"{"), answer[:200]
        assert answer.startswith(b'{"error"') == ("refused" in name), (name, answer[:200])


async def probe_during(port: int, work: Coroutine[Any, Any, None]) -> float:
    """The slowest /healthz answer while ``work`` runs; the probe runs on before and after."""
    started = time.perf_counter()
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)
    seconds = 2.0
    probe = await asyncio.create_subprocess_exec(
        *pinned(CLIENT_CORE, [PYTHON, "-c", PROBE, str(port), str(seconds)]), stdout=asyncio.subprocess.PIPE
    )
    await task
    remaining = seconds - (time.perf_counter() - started)
    if remaining < 0.2:
        raise RuntimeError("the posts took about as long as the probe ran; lower --posts")
    out, _ = await probe.communicate()
    worst, _count = out.split()
    return float(worst)


async def send_sightings(session: aiohttp.ClientSession, url: str, port: int, max_addresses: int) -> None:
    packets = []
    for ip in sighted(max_addresses):
        for info in sip_infos(ip):
            version = 10 if ":" in ip else 2
            hep = HepPacket(
                3, version, 17, ip, HEP_TARGET, 5060, 5060, 1_800_000_000, 0, 1, 2001, sip_payload(ip, info)
            )
            packets.append(build_hep3(hep))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for start in range(0, len(packets), 200):  # paced well below the loss-free rate
            for packet in packets[start : start + 200]:
                sock.sendto(packet, ("127.0.0.1", port))
            await asyncio.sleep(0.01)
    for _ in range(100):
        async with session.get(f"{url}/api/v1/status") as response:
            status = await response.json()
        if status["hep"]["sightings"]["ips"] >= 2 * max_addresses:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the agent did not record the sightings: {status['hep']}")


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the agent did not become ready")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- report


async def main(args: argparse.Namespace) -> None:
    bodies = cases()
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        state = Path(tmp) / "state"
        feed_url = "http://127.0.0.1:9"  # never contacted: the list comes from a fresh snapshot
        write_snapshot(
            state, feed_url, [*listed_of(args.max_addresses), *[ipv4(n) for n in range(5)]], time.time()
        )
        local = await in_process(args, bodies, state)
        idle, served = await through_server(args, bodies, state, feed_url)
    print(f"machine: {machine()}")
    print(
        f"limits: enrichment.max_call_ids {args.max_call_ids}, enrichment.max_addresses "
        f"{args.max_addresses}, enrichment.max_answer_bytes 1,048,576; "
        "bodies up to 1 MiB (agent.max_body_bytes)"
    )
    rows = []
    for name, raw in bodies.items():
        runs, answer_bytes = local[name]
        walls, worst = served[name]
        rows.append(
            [
                name,
                f"{len(raw):,}",
                f"{answer_bytes:,}",
                f"{statistics.median(runs) * 1e3:.2f} / {max(runs) * 1e3:.2f}",
                f"{statistics.median(walls) * 1e3:.1f} / {max(walls) * 1e3:.1f}",
                f"{worst * 1e3:.1f}",
            ]
        )
    headers = [
        "body",
        "bytes",
        "answer bytes",
        f"in process ms, median / max of {args.repeat}",
        f"POST ms, median / max of {args.posts}",
        "slowest /healthz during the POSTs, ms",
    ]
    print(table(headers, rows))
    print(f"slowest /healthz with the server idle: {idle * 1e3:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20, help="in-process runs per body")
    parser.add_argument("--posts", type=int, default=5, help="POSTs per body through the server")
    parser.add_argument("--max-call-ids", type=int, default=100)
    parser.add_argument("--max-addresses", type=int, default=500)
    asyncio.run(main(parser.parse_args()))
