"""Enrichment throughput and latency: the agent against a bare aiohttp handler, same run, same way.

    python bench/enrichment.py [--duration 8] [--rounds 3] [--concurrency 1,16,64] [--listed 20000]

Four servers run pinned to core 0, each on uvloop as the agent is; wrk, the load generator, runs
pinned to core 1 and posts homer-app's body with 10 IPs (5 listed, 5 not), 200 bodies in turn:

- bare: an aiohttp app that answers a constant JSON body without reading the request's;
- minimal: reads and parses the body with orjson, 10 dict lookups, answers with orjson;
- hollow agent: ``hepsub-apiban serve`` with the enrichment work taken out (its
  ``answer_enrichment`` answers a constant body, the real agent's answer to such a request, of the
  same size): the agent's HTTP stack alone (aiohttp, the middleware, reading the body, the
  metrics, the connection cap), so that the table separates what aiohttp costs from what the
  enrichment costs;
- agent: ``hepsub-apiban serve``, mirror mode, a 20,000-entry list loaded from a snapshot.

Each round measures them back to back at each concurrency; the tables show the medians, the ratios
to bare (the figures that matter on a shared, noisy machine) and the cost of one request in
microseconds of the server's core (1 / req/s: each server keeps its core busy under this load).
Beside them, the enrichment work measured in process on core 0, before the servers start: the
real application (``create_app`` from the same snapshot), ``web.answer_enrichment`` on the same
200 bodies, best of 7. Needs wrk (Debian: ``apt-get install wrk``) and Linux ``taskset``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from common import BENCH_KEY, PYTHON, agent_env, free_port, machine, pinned, public_ips, table, write_snapshot

from hepsub_apiban.app import create_app
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.homer.enrichment import build_answer, parse_request
from hepsub_apiban.keys import LOOKUPS, SETTINGS
from hepsub_apiban.web import _known as known_of
from hepsub_apiban.web import answer_enrichment

SERVER_CORE, LOAD_CORE = 0, 1
IPS_PER_REQUEST = 10
BODIES = 200

# The baselines run on uvloop, as the agent does (cli.run): the loop is not what is compared.
BARE_SERVER = """
import sys
import uvloop
from aiohttp import web
BODY = b'{"ok":true}'
async def handler(request):
    return web.Response(body=BODY, content_type="application/json")
app = web.Application()
app.router.add_post("/get/{type}", handler)
web.run_app(
    app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop()
)
"""

# The floor for any agent: read and parse the body, 10 dict lookups, answer JSON (the issue's
# "parsing the body with orjson and doing 10 dict lookups").
MINIMAL_SERVER = """
import sys
import orjson
import uvloop
from aiohttp import web
LISTED = dict.fromkeys(orjson.loads(open(sys.argv[2], "rb").read()), True)
async def handler(request):
    body = orjson.loads(await request.read())
    ips = body["data"]["source_ip"]
    answer = {ip: LISTED.get(ip, False) for ip in ips}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
app = web.Application()
app.router.add_post("/get/{type}", handler)
web.run_app(
    app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop()
)
"""

# The agent with its enrichment work taken out: everything else as ``serve`` runs it.
HOLLOW_AGENT = """
import sys
from aiohttp import web
import hepsub_apiban.web_enrichment as agent_web  # where enrich() looks it up
from hepsub_apiban.cli import main
ANSWER = open(sys.argv[1], "rb").read()
async def answer_enrichment(app, raw):
    return web.Response(body=ANSWER, content_type="application/json"), "ok"
agent_web.answer_enrichment = answer_enrichment
sys.exit(main(["serve"]))
"""
SERVERS = ("bare", "minimal", "hollow agent", "agent")


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float


def wrk_script(listed: list[str], clean: list[str], path: Path) -> list[bytes]:
    """The lua script that posts the bench's bodies in turn; returns the bodies."""
    rng = random.Random(7)
    bodies = []
    for n in range(BODIES):
        ips = rng.sample(listed, IPS_PER_REQUEST // 2) + rng.sample(clean, IPS_PER_REQUEST // 2)
        rng.shuffle(ips)
        body = {
            "data": {"sid": [f"call-{n}@bench"], "source_ip": ips},
            "fromts": 1669986139000,
            "tots": 1669987239000,
        }
        bodies.append(orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode())
    lua = "bodies = {\n" + ",\n".join(f"[[{b}]]" for b in bodies) + "\n}\n"
    lua += """
local n = 0
local headers = {["Content-Type"] = "application/json", ["User-Agent"] = "Go-http-client/1.1"}
request = function()
  n = n % #bodies + 1
  return wrk.format("POST", "/get/cdr", headers, bodies[n])
end
"""
    path.write_text(lua)
    return [body.encode() for body in bodies]


def parse_wrk(output: str) -> Result:
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if found is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    rps = float(found.group(1))

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", output).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return Result(rps, percentile("50"), percentile("99"))


async def run_wrk(url: str, script: Path, connections: int, duration: float) -> Result:
    argv = pinned(
        LOAD_CORE,
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", "-s", str(script), url],
    )
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return parse_wrk(out.decode())


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as response:
                    if response.status in (200, 405):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


async def check_agent(agent: str, listed: list[str], clean: list[str]) -> bytes:
    """The benchmark measures real answers: 5 of 10 addresses listed, from the mirror. Returns the
    answer's bytes (the hollow agent's constant answer)."""
    body = {"data": {"sid": ["check@bench"], "source_ip": listed[:5] + clean[:5]}, "fromts": 1669986139000}
    async with aiohttp.ClientSession() as session, session.post(f"{agent}/get/cdr", json=body) as response:
        raw = await response.read()
    answer = orjson.loads(raw)
    assert sorted(answer["check@bench"]["listed"]) == sorted(listed[:5]), answer
    assert {answer[ip]["source"] for ip in listed[:5] + clean[:5]} == {"mirror"}, answer
    return raw


async def in_process(feed_url: str, state: Path, bodies: list[bytes]) -> dict[str, float]:
    """Seconds per body of ``answer_enrichment`` and of each of its steps, on the servers' core:
    best of 7 passes over the bodies each."""
    app = create_app(load_settings(None, agent_env(feed_url, state, free_port())))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()  # the lookups from the snapshot
    settings, lookups = app[SETTINGS], app[LOOKUPS]
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CORE})
    try:
        for raw in bodies:  # warm-up, and the check
            _response, outcome = await answer_enrichment(app, raw)
            assert outcome == "ok", outcome
        parsed = [parse_request(raw, settings.enrichment) for raw in bodies]
        verdicts = [await lookups.lookup_many(p.addresses, settings.agent.deadline) for p in parsed]
        ips = [[v.ip for v in call] for call in verdicts]
        known = [known_of(app, call) for call in ips]
        calls = list(zip(parsed, verdicts, known, strict=True))

        async def whole() -> None:
            for raw in bodies:
                await answer_enrichment(app, raw)

        async def look_up() -> None:
            for request in parsed:
                await lookups.lookup_many(request.addresses, settings.agent.deadline)

        async def steps(step: Callable[[], object]) -> None:
            step()

        phases: dict[str, Callable[[], Awaitable[None]]] = {
            "the body decoded and read (orjson, addresses)": lambda: steps(
                lambda: [parse_request(raw, settings.enrichment) for raw in bodies]
            ),
            "lookups": look_up,
            "what the capture saw (sightings, detections)": lambda: steps(
                lambda: [known_of(app, call) for call in ips]
            ),
            "the answer (words, JSON)": lambda: steps(lambda: [build_answer(*call) for call in calls]),
            "answer_enrichment, whole": whole,
        }
        best = {}
        for name, phase in phases.items():
            passes = []
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(5):
                    await phase()
                passes.append((time.perf_counter() - started) / (5 * len(bodies)))
            best[name] = min(passes)
        return best
    finally:
        os.sched_setaffinity(0, affinity)
        await runner.cleanup()


async def main(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed as the load generator: apt-get install wrk")
    listed = public_ips(args.listed + 1000, seed=1)
    listed, clean = listed[: args.listed], listed[args.listed :]
    feed = FakeApiban(keys=[BENCH_KEY])
    runner = web.AppRunner(feed.app(), access_log=None)
    await runner.setup()
    feed_port = free_port()
    ports = {name: free_port() for name in SERVERS}
    await web.TCPSite(runner, "127.0.0.1", feed_port).start()
    feed_url = f"http://127.0.0.1:{feed_port}"
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        state = Path(tmp) / "state"
        write_snapshot(state, feed_url, listed, time.time())
        script = Path(tmp) / "post.lua"
        bodies = wrk_script(listed, clean, script)
        work = await in_process(feed_url, state, bodies)
        listed_file = Path(tmp) / "listed.json"
        listed_file.write_bytes(orjson.dumps(listed))
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}

        async def start(argv: list[str], env: dict[str, str] | None = None) -> None:
            processes.append(await asyncio.create_subprocess_exec(*pinned(SERVER_CORE, argv), env=env))

        try:
            await start([PYTHON, "-m", "hepsub_apiban", "serve"], agent_env(feed_url, state, ports["agent"]))
            await start([PYTHON, "-c", BARE_SERVER, str(ports["bare"])])
            await start([PYTHON, "-c", MINIMAL_SERVER, str(ports["minimal"]), str(listed_file)])
            await wait_ready(f"{urls['agent']}/readyz")
            answer_file = Path(tmp) / "answer.json"
            answer_file.write_bytes(await check_agent(urls["agent"], listed, clean))
            hollow_env = agent_env(feed_url, state, ports["hollow agent"])
            await start([PYTHON, "-c", HOLLOW_AGENT, str(answer_file)], hollow_env)
            await wait_ready(f"{urls['hollow agent']}/readyz")
            await wait_ready(f"{urls['bare']}/get/cdr")
            await wait_ready(f"{urls['minimal']}/get/cdr")
            await measure(args, urls, script, work, answer_file.stat().st_size)
        finally:
            for process in processes:
                process.terminate()
                await process.wait()
            await runner.cleanup()


async def measure(
    args: argparse.Namespace, urls: dict[str, str], script: Path, work: dict[str, float], answer_bytes: int
) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[Result]] = {}
    for connections in levels:  # warm-up: caches, sockets and the allocator settle
        for url in urls.values():
            await run_wrk(url, script, connections, 1)
    for _ in range(args.rounds):
        for connections in levels:
            for name in SERVERS:
                result = await run_wrk(urls[name], script, connections, args.duration)
                results.setdefault((name, connections), []).append(result)
    rows, costs = [], []
    for c in levels:
        bare, minimal, hollow, agent = (_median(results[(name, c)]) for name in SERVERS)
        rows.append(
            [
                c,
                f"{bare.rps:,.0f}",
                f"{minimal.rps:,.0f} ({minimal.rps / bare.rps:.2f})",
                f"{hollow.rps:,.0f} ({hollow.rps / bare.rps:.2f})",
                f"{agent.rps:,.0f}",
                f"{agent.rps / bare.rps:.2f}",
                f"{bare.p50_ms:.2f} / {bare.p99_ms:.2f}",
                f"{agent.p50_ms:.2f} / {agent.p99_ms:.2f}",
                f"{agent.p99_ms / bare.p99_ms:.2f}",
            ]
        )
        per = {name: 1e6 / _median(results[(name, c)]).rps for name in SERVERS}
        costs.append(
            [c, *(f"{per[name]:.1f}" for name in SERVERS), f"{per['agent'] - per['hollow agent']:.1f}"]
        )
    print(f"machine: {machine()}")
    print(
        f"POST /get/cdr, {IPS_PER_REQUEST} IPs per request (5 listed), {args.listed:,} listed IPs in the "
        f"mirror; servers on core {SERVER_CORE}, wrk on core {LOAD_CORE}; "
        f"median of {args.rounds} rounds of {args.duration} s"
    )
    headers = [
        "concurrency",
        "bare req/s",
        "minimal req/s (/bare)",
        "hollow agent req/s (/bare)",
        "agent req/s",
        "agent/bare",
        "bare p50/p99 ms",
        "agent p50/p99 ms",
        "agent/bare p99",
    ]
    print(table(headers, rows))
    print(f"\nus of core 0 per request (1 / req/s); the agent's answer: {answer_bytes:,} bytes")
    headers = ["concurrency", *SERVERS, "agent - hollow agent"]
    print(table(headers, costs))
    print("\nin process, on core 0: the enrichment work of one request, by step (best of 7)")
    rows = [[name, f"{seconds * 1e6:.1f}"] for name, seconds in work.items()]
    print(table(["step", "us per request"], rows))


def _median(results: list[Result]) -> Result:
    return Result(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--listed", type=int, default=20_000)
    asyncio.run(main(parser.parse_args()))
