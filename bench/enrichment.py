"""Enrichment throughput and latency: the agent against a bare aiohttp handler, same run, same way.

    python bench/enrichment.py [--duration 8] [--rounds 3] [--concurrency 1,16,64] [--listed 20000]

The agent (``hepsub-apiban serve``, mirror mode, a 20,000-entry list loaded from a snapshot) and
a bare aiohttp app that answers a constant JSON body both run pinned to core 0; wrk, the load
generator, runs pinned to core 1 and posts homer-app's body with 10 IPs (5 listed, 5 not). Each
round measures both servers back to back at each concurrency; the table shows the medians and the
agent/bare ratios, which are the figures that matter on a shared, noisy machine. Needs wrk
(Debian: ``apt-get install wrk``) and Linux ``taskset``.
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from common import BENCH_KEY, PYTHON, free_port, machine, pinned, public_ips, table, write_snapshot

from hepsub_apiban.fakes.apiban import FakeApiban

SERVER_CORE, LOAD_CORE = 0, 1
IPS_PER_REQUEST = 10
BODIES = 200

BARE_SERVER = """
import sys
from aiohttp import web
BODY = b'{"ok":true}'
async def handler(request):
    return web.Response(body=BODY, content_type="application/json")
app = web.Application()
app.router.add_post("/get/{type}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

# The floor for any agent: read and parse the body, 10 dict lookups, answer JSON (the issue's
# "parsing the body with orjson and doing 10 dict lookups").
MINIMAL_SERVER = """
import sys
import orjson
from aiohttp import web
LISTED = dict.fromkeys(orjson.loads(open(sys.argv[2], "rb").read()), True)
async def handler(request):
    body = orjson.loads(await request.read())
    ips = body["data"]["source_ip"]
    answer = {ip: LISTED.get(ip, False) for ip in ips}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
app = web.Application()
app.router.add_post("/get/{type}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float


def wrk_script(listed: list[str], clean: list[str], path: Path) -> None:
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


async def check_agent(agent: str, listed: list[str], clean: list[str]) -> None:
    """The benchmark measures real answers: 5 of 10 addresses listed, from the mirror."""
    body = {"data": {"sid": ["check@bench"], "source_ip": listed[:5] + clean[:5]}, "fromts": 1669986139000}
    async with aiohttp.ClientSession() as session, session.post(f"{agent}/get/cdr", json=body) as response:
        answer = await response.json()
    assert sorted(answer["check@bench"]["listed"]) == sorted(listed[:5]), answer
    assert {answer[ip]["source"] for ip in listed[:5] + clean[:5]} == {"mirror"}, answer


async def main(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed as the load generator: apt-get install wrk")
    listed = public_ips(args.listed + 1000, seed=1)
    listed, clean = listed[: args.listed], listed[args.listed :]
    feed = FakeApiban(keys=[BENCH_KEY])
    runner = web.AppRunner(feed.app(), access_log=None)
    await runner.setup()
    feed_port, agent_port, bare_port, minimal_port = free_port(), free_port(), free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", feed_port).start()
    feed_url = f"http://127.0.0.1:{feed_port}"
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        state = Path(tmp) / "state"
        write_snapshot(state, feed_url, listed, __import__("time").time())
        script = Path(tmp) / "post.lua"
        wrk_script(listed, clean, script)
        env = {
            **os.environ,
            "HEPSUB_APIBAN_URL": feed_url,
            "HEPSUB_APIBAN_KEY": BENCH_KEY,
            "HEPSUB_STATE_DIR": str(state),
            "HEPSUB_AGENT_BIND": "127.0.0.1",
            "HEPSUB_AGENT_PORT": str(agent_port),
            "HEPSUB_HEP_UDP": "",
            "HEPSUB_HEP_TCP": "",
            "HEPSUB_LOG_LEVEL": "warning",
        }
        agent = await asyncio.create_subprocess_exec(
            *pinned(SERVER_CORE, [PYTHON, "-m", "hepsub_apiban", "serve"]), env=env
        )
        bare = await asyncio.create_subprocess_exec(
            *pinned(SERVER_CORE, [PYTHON, "-c", BARE_SERVER, str(bare_port)])
        )
        listed_file = Path(tmp) / "listed.json"
        listed_file.write_bytes(orjson.dumps(listed))
        minimal = await asyncio.create_subprocess_exec(
            *pinned(SERVER_CORE, [PYTHON, "-c", MINIMAL_SERVER, str(minimal_port), str(listed_file)])
        )
        try:
            urls = {
                "bare": f"http://127.0.0.1:{bare_port}",
                "minimal": f"http://127.0.0.1:{minimal_port}",
                "agent": f"http://127.0.0.1:{agent_port}",
            }
            await wait_ready(f"{urls['agent']}/readyz")
            await wait_ready(f"{urls['bare']}/get/cdr")
            await wait_ready(f"{urls['minimal']}/get/cdr")
            await check_agent(urls["agent"], listed, clean)
            await measure(args, urls, script)
        finally:
            for process in (agent, bare, minimal):
                process.terminate()
                await process.wait()
            await runner.cleanup()


async def measure(args: argparse.Namespace, urls: dict[str, str], script: Path) -> None:
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[Result]] = {}
    for connections in levels:  # warm-up: caches, sockets and the allocator settle
        for url in urls.values():
            await run_wrk(url, script, connections, 1)
    for _ in range(args.rounds):
        for connections in levels:
            for name, url in urls.items():
                result = await run_wrk(url, script, connections, args.duration)
                results.setdefault((name, connections), []).append(result)
    rows = []
    for c in levels:
        bare, minimal, agent = (_median(results[(name, c)]) for name in ("bare", "minimal", "agent"))
        rows.append(
            [
                c,
                f"{bare.rps:,.0f}",
                f"{minimal.rps:,.0f} ({minimal.rps / bare.rps:.2f})",
                f"{agent.rps:,.0f}",
                f"{agent.rps / bare.rps:.2f}",
                f"{bare.p50_ms:.2f} / {bare.p99_ms:.2f}",
                f"{agent.p50_ms:.2f} / {agent.p99_ms:.2f}",
                f"{agent.p99_ms / bare.p99_ms:.2f}",
            ]
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
        "agent req/s",
        "agent/bare",
        "bare p50/p99 ms",
        "agent p50/p99 ms",
        "agent/bare p99",
    ]
    print(table(headers, rows))


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
