"""The HTTP server against hostile clients, on real sockets.

Slow headers, idle connections, trickled and abandoned bodies, too many connections, forged log
lines, odd addresses and IDs, clients outside ``agent.allow_from``. (Site-key guessing is in
test_site_api.py.)
aiohttp's own timers cannot take an injected clock, so the timeout tests use short real ones
(1 s) and generous upper bounds; everything else is driven by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.app import Clocks, create_app
from hepsub_apiban.cli import capped_site
from hepsub_apiban.keys import METRICS, REFUSALS, SETTINGS

from .conftest import HOMER_BODY_1, AgentFactory, ApibanPeer, agent_env
from .test_cli import free_port, get_json, running
from .test_site_api import SITE_KEY, addresses, write_list

Client = TestClient[web.Request, web.Application]
FORGED = "FORGED hepsub_apiban ERROR admin password reset"


# --------------------------------------------------------------------------- raw HTTP helpers


@contextlib.asynccontextmanager
async def raw(
    client: Client | tuple[str, int], local: str | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = (client.server.host, client.server.port) if isinstance(client, TestClient) else client
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0) if local else None)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer with a Content-Length: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """When (``time.monotonic()``) the server closes the connection; whatever it sends is read."""
    async with asyncio.timeout(seconds):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return time.monotonic()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = 0.1) -> None:
    """Send ``data`` a byte at a time until it is sent or the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: agent", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --------------------------------------------------------------------------- timeouts


async def test_slowloris_connections_are_closed_after_the_idle_timeout_while_others_are_served(
    agent: AgentFactory,
) -> None:
    client = await agent(HEPSUB_AGENT_IDLE_TIMEOUT="1")
    header = b"GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Padding: " + b"a" * 200  # 23 s of trickle
    async with contextlib.AsyncExitStack() as stack:
        opened = time.monotonic()
        slow = [await stack.enter_async_context(raw(client)) for _ in range(5)]
        senders = [asyncio.create_task(trickle(writer, header)) for _, writer in slow]
        await asyncio.sleep(0.3)
        response = await client.get("/healthz")  # served while the slow ones hold their connections
        assert response.status == 200
        closed = await asyncio.gather(*(closed_within(reader, 4.0) for reader, _ in slow))
        for sender in senders:
            sender.cancel()
    held = [at - opened for at in closed]
    assert all(0.9 <= seconds <= 2.5 for seconds in held), held


async def test_a_connection_idle_after_an_answer_is_closed(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_AGENT_IDLE_TIMEOUT="1")
    async with raw(client) as (reader, writer):
        for pause in (0.6, 0.6, 0.0):  # keep-alive works while the client keeps asking
            await asyncio.sleep(pause)
            writer.write(request("GET", "/healthz"))
            assert (await read_answer(reader))[0] == 200
        answered = time.monotonic()
        idle = await closed_within(reader, 4.0) - answered
    assert 0.9 <= idle <= 2.0, idle


@pytest.mark.parametrize(
    ("path", "status", "outcome"),
    [("/api/v1/check", 408, None), ("/get/cdr", 200, "bad_request")],
    ids=["check", "enrichment"],
)
async def test_a_trickled_body_gets_its_answer_at_the_body_timeout_and_the_handler_is_released(
    agent: AgentFactory, path: str, status: int, outcome: str | None
) -> None:
    client = await agent(HEPSUB_AGENT_BODY_TIMEOUT="1")
    body = b'{"ips": ["8.8.8.8"]}' + b" " * 200
    async with raw(client) as (reader, writer):
        writer.write(request("POST", path, body, Content_Type="application/json")[: -len(body)])
        started = time.monotonic()
        sender = asyncio.create_task(trickle(writer, body))
        async with asyncio.timeout(5.0):
            got, answer = await read_answer(reader)
        answered = time.monotonic() - started
        assert not sender.done()  # the client is still sending: the handler did not wait for it
        assert got == status
        assert "1 s" in orjson.loads(answer)["error"]
        # Then what is left of the body is drained briefly and the connection closed.
        assert await closed_within(reader, 5.0) - started - answered <= 2.5
        sender.cancel()
    assert 0.9 <= answered <= 3.0, answered
    if outcome is not None:
        assert client.app[METRICS].enrichment.outcomes[outcome] == 1


@pytest.mark.parametrize(
    ("path", "status"), [("/api/v1/check", 413), ("/get/cdr", 200)], ids=["check", "enrichment"]
)
async def test_a_body_over_max_body_bytes_is_refused(agent: AgentFactory, path: str, status: int) -> None:
    client = await agent(HEPSUB_AGENT_MAX_BODY_BYTES="65536")
    response = await client.post(path, data=b'{"ips": ["' + b"1" * 70_000 + b'"]}')
    assert response.status == status
    assert "65,536" in (await response.json())["error"]


@pytest.mark.parametrize("path", ["/api/v1/check", "/get/cdr"], ids=["check", "enrichment"])
async def test_clients_that_drop_mid_body_cost_one_debug_line_each(
    agent: AgentFactory, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # The serve command's runner: unlike aiohttp's test server, it does not cancel the handler
    # of a connection that is lost, so the handler sees the client go.
    async with served(agent) as (_, _, port):
        caplog.set_level(logging.DEBUG)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(20):
                _, writer = await stack.enter_async_context(raw(("127.0.0.1", port)))
                writer.write(request("POST", path, b"x" * 1000)[:-990])
            await asyncio.sleep(0.3)  # the handlers are reading the bodies; then every client hangs up
        await until(lambda: len([r for r in caplog.records if r.name.startswith("hepsub_apiban")]) >= 20)
        await asyncio.sleep(0.2)  # anything logged late would show now
    records = [r for r in caplog.records if r.name not in ("aiohttp.access", "asyncio")]
    assert len(records) == 20, [r.getMessage() for r in records]
    assert all(r.levelno == logging.DEBUG and not r.exc_info for r in records)
    assert all("closed the connection" in r.getMessage() for r in records)


async def test_a_malformed_request_is_one_escaped_debug_line(
    agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await agent()
    caplog.set_level(logging.DEBUG)
    async with raw(client) as (reader, writer):
        writer.write(b"GET /x\x00\n" + FORGED.encode() + b" HTTP/1.1\r\nHost: agent\r\n\r\n")
        assert (await read_answer(reader))[0] == 400
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(server) == 1
    assert server[0].levelno == logging.DEBUG
    assert not server[0].exc_info
    assert "bad HTTP request from 127.0.0.1" in server[0].getMessage()
    assert_no_forged_line(caplog.records)


def assert_no_forged_line(records: list[logging.LogRecord]) -> None:
    """No record, message or traceback, has a line of the client's making or a raw NUL."""
    formatter = logging.Formatter("%(message)s")
    for record in records:
        text = formatter.format(record)
        assert "\x00" not in text
        assert not any(line.lstrip().startswith(FORGED) for line in text.splitlines()), text


async def test_network_text_in_log_lines_is_escaped(
    agent: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = agent.settings()
    app = create_app(settings)

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(f"cannot handle {request.match_info['thing']}")

    app.router.add_get("/broken/{thing}", broken)
    client = await agent.make_client(app)
    caplog.set_level(logging.DEBUG)
    forged = "%00%0A" + FORGED.replace(" ", "%20")
    response = await client.get(f"/broken/x{forged}")
    assert response.status == 500
    assert set(await response.json()) == {"error"}
    for path in (f"/api/v1/check/1.2.3.4{forged}", f"/get/cdr{forged}", f"/api/{forged}/banned/{forged}"):
        assert (await client.get(path)).status < 500
        assert (await client.post(path, data=HOMER_BODY_1)).status < 500
    unhandled = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert len(unhandled) == 1
    assert "x\\x00\\x0a" + FORGED in unhandled[0].getMessage()  # escaped, on the same line
    assert "broken" in unhandled[0].getMessage()  # the traceback is still there for the developer
    assert_no_forged_line(caplog.records)


# --------------------------------------------------------------------------- 400, never 500

LONG = "9" * 5000


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/check/1.2.3.4%00",
        "/api/v1/check/%00%0a",
        "/api/v1/check/1.2.3.%C2%B2",  # superscript two
        "/api/v1/check/%D9%A1.%D9%A2.%D9%A3.%D9%A4",  # Arabic-Indic digits
        "/api/v1/check/%EF%BC%91.2.3.4",  # fullwidth one
        "/api/v1/check/%ED%A0%80",  # a lone surrogate, as UTF-8
        "/api/v1/check/%FF%FE",  # not UTF-8
        f"/api/v1/check/{LONG}",
        "/api/v1/check/" + "a" * 7000,
        "/api/v1/check/[::1",
        "/api/v1/check/1.2.3.4%25eth0",
        "/api/v1/sightings?limit=%C2%B2",
        "/api/v1/sightings?limit=%D9%A1%D9%A2",
        "/api/v1/sightings?limit=1_000",
        f"/api/v1/sightings?limit={LONG}",
        "/api/v1/sightings?limit=-1",
        "/api/v1/sightings?listed=%00",
    ],
)
async def test_odd_addresses_and_numbers_are_400_with_a_json_error(agent: AgentFactory, path: str) -> None:
    client = await agent()
    response = await client.get(path)
    assert response.status == 400
    assert set(await response.json()) == {"error"}


@pytest.mark.parametrize(
    "payload",
    [b"\x00", b'{"ips": "\\u0000"}', b'{"ips": [' + LONG.encode() + b"]}", b"[" * 100_000],
    ids=["nul", "nul-string", "5000-digit-number", "deep-nesting"],
)
async def test_odd_check_bodies_are_400(agent: AgentFactory, payload: bytes) -> None:
    client = await agent()
    response = await client.post("/api/v1/check", data=payload)
    assert response.status == 400
    assert set(await response.json()) == {"error"}


async def test_nul_and_odd_digits_in_a_check_list_are_invalid_entries(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    client = await agent()
    odd = ["1.2.3.4\x00", "\x00", "\u0661.\u0662.\u0663.\u0664", "1.2.3.\u00b2", LONG]
    response = await client.post("/api/v1/check", data=orjson.dumps({"ips": odd}))
    assert response.status == 200
    results = (await response.json())["results"]
    assert [r["source"] for r in results] == ["invalid"] * len(odd)
    assert results[0]["ip"] == "1.2.3.4\x00"  # echoed (JSON escapes it) so it can be matched
    assert len(results[-1]["ip"]) <= 100
    assert apiban.fake.request_count() == 0


async def test_a_path_over_aiohttps_line_limit_is_a_400(agent: AgentFactory) -> None:
    client = await agent()
    async with raw(client) as (reader, writer):
        writer.write(request("GET", "/api/v1/check/" + "1" * 20_000))
        assert (await read_answer(reader))[0] == 400  # aiohttp's own parser answers this one


async def site_agent(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path, clocks: Clocks | None = None, **env: str
) -> Client:
    write_list(tmp_path, apiban, addresses(300))
    return await agent(clocks, HEPSUB_APIBAN_MODE="mirror", HEPSUB_SITE_KEYS=SITE_KEY, **env)


NO_NEW_BANS = {"ipaddress": ["no new bans"], "ID": "none"}
UNAUTHORIZED = {"ipaddress": "none", "ID": "unauthorized"}
RATE_LIMITED = {"ipaddress": "rate limit exceeded", "ID": "unauthorized"}


@pytest.mark.parametrize(
    ("method", "path", "payload", "expected"),
    [
        ("GET", f"/api/{SITE_KEY}/banned/%C2%B2", None, NO_NEW_BANS),
        ("GET", f"/api/{SITE_KEY}/banned/%D9%A1%D9%A2%D9%A3", None, NO_NEW_BANS),
        ("GET", f"/api/{SITE_KEY}/banned/{LONG}", None, NO_NEW_BANS),
        ("GET", f"/api/{SITE_KEY}/banned/100%00", None, NO_NEW_BANS),
        ("GET", f"/api/{SITE_KEY}/banned/-5", None, NO_NEW_BANS),
        ("GET", f"/api/{SITE_KEY}/check/%00", None, {}),
        ("GET", f"/api/{SITE_KEY}/check/45.0.0.7%00", None, {}),
        ("GET", f"/api/{SITE_KEY}/check/%D9%A1.2.3.4", None, {}),
        ("GET", f"/api/{SITE_KEY}/check/{LONG}", None, {}),
        ("POST", "/api/get", {"id": "²"}, NO_NEW_BANS),
        ("POST", "/api/get", {"id": LONG}, NO_NEW_BANS),
        ("POST", "/api/get", {"id": -5}, NO_NEW_BANS),
        ("POST", "/api/get", {"id": True}, NO_NEW_BANS),
        ("POST", "/api/get", b'{"id": ' + LONG.encode() + b"}", {}),
        ("POST", "/api/get", b"\x00", {}),
        ("POST", "/api/check", {"ipaddress": "45.0.0.7\x00"}, {}),
        ("POST", "/api/check", {"ipaddress": LONG}, {}),
        ("POST", "/api/check", b'{"ipaddress": ' + LONG.encode() + b"}", {}),
    ],
)
async def test_odd_site_ids_and_addresses_get_apibans_400(
    agent: AgentFactory,
    apiban: ApibanPeer,
    tmp_path: Path,
    method: str,
    path: str,
    payload: Any,
    expected: dict[str, Any],
) -> None:
    client = await site_agent(agent, apiban, tmp_path)
    data = payload if isinstance(payload, bytes | None) else orjson.dumps(payload)
    auth = {"Authorization": f"Bearer {SITE_KEY}"}
    response = await client.request(method, path, data=data, headers=auth)
    assert response.status == 400
    assert await response.json() == expected


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/%00%0a/banned/100", {}),
        (f"/api/{LONG}/banned", {}),
        ("/api/%ED%A0%80/check/1.2.3.4", {}),
        ("/api/get", {"Authorization": "Bearer ²"}),
        ("/api/get", {"Authorization": "Basic " + SITE_KEY}),
    ],
)
async def test_odd_site_keys_are_apibans_403(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path, path: str, headers: dict[str, str]
) -> None:
    client = await site_agent(agent, apiban, tmp_path)
    method = "POST" if path == "/api/get" else "GET"
    response = await client.request(method, path, data=b'{"id": "100"}', headers=headers)
    assert response.status == 403
    assert await response.json() == UNAUTHORIZED


# --------------------------------------------------------------------------- agent.allow_from


async def test_agent_allow_from_refuses_outsiders_but_not_probes_or_the_site_api(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The test client connects from 127.0.0.1; only 127.0.0.2 is allowed.
    client = await site_agent(agent, apiban, tmp_path, HEPSUB_AGENT_ALLOW_FROM="127.0.0.2/32,10.0.0.0/8")
    caplog.set_level(logging.DEBUG)
    refused = [
        ("GET", "/api/v1/status"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/check/8.8.8.8"),
        ("POST", "/api/v1/check"),
        ("POST", "/get/cdr"),
        ("GET", "/api/v1/sightings"),
        ("GET", "/no/such/route"),
    ]
    for method, path in refused:
        response = await client.request(method, path, data=HOMER_BODY_1)
        assert response.status == 403, path
        assert "agent.allow_from" in (await response.json())["error"]
    for path in ("/healthz", "/readyz", f"/api/{SITE_KEY}/banned", f"/ipset/{SITE_KEY}/list"):
        assert (await client.get(path)).status == 200, path
    auth = {"Authorization": f"Bearer {SITE_KEY}"}
    assert (await client.post("/api/get", data=b'{"id": "100"}', headers=auth)).status == 200
    assert client.app[REFUSALS].counts[("http", "not in agent.allow_from")] == len(refused)
    warnings = [r for r in caplog.records if r.name == "hepsub_apiban.access"]
    assert len(warnings) == 1  # one line per sender per interval, the rest counted

    # From an allowed address everything answers, and /metrics shows the refusals.
    port = client.server.port
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as inside:
        async with inside.get(f"http://127.0.0.1:{port}/api/v1/check/8.8.8.8") as response:
            assert response.status == 200
        async with inside.post(f"http://127.0.0.1:{port}/get/cdr", data=HOMER_BODY_1) as response:
            assert response.status == 200
        async with inside.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    line = 'hepsub_apiban_refused_total{channel="http",reason="not in agent.allow_from"} 7.0'
    assert line in text.splitlines()


async def test_agent_allow_from_lets_listed_clients_in(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_AGENT_ALLOW_FROM="10.0.0.0/8,127.0.0.0/8")
    for path in ("/api/v1/status", "/metrics", "/api/v1/check/8.8.8.8", "/api/v1/sightings"):
        assert (await client.get(path)).status == 200, path
    assert (await client.post("/get/cdr", data=HOMER_BODY_1)).status == 200
    assert not client.app[REFUSALS].counts


async def test_an_ipv4_client_on_a_dual_stack_listener_is_matched_as_ipv4(agent: AgentFactory) -> None:
    settings = agent.settings(HEPSUB_AGENT_ALLOW_FROM="127.0.0.1/32")
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    sock.listen()
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        port = sock.getsockname()[1]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as got:
            assert got.status == 200  # request.remote is "::ffff:127.0.0.1"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- the listening site


@contextlib.asynccontextmanager
async def served(agent: AgentFactory, **env: str) -> AsyncIterator[tuple[web.Application, Any, int]]:
    """The agent behind the ``serve`` command's own site, on a real socket."""
    app = create_app(agent.settings(**env))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    site = capped_site(runner, sock, app)
    await site.start()
    try:
        yield app, site, sock.getsockname()[1]
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition the server's side changes (nothing there to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_connection_cap_refuses_the_next_one_and_admits_again_after_a_close(
    agent: AgentFactory,
) -> None:
    async with served(agent, HEPSUB_AGENT_MAX_CONNECTIONS="16") as (app, site, port):
        assert app[SETTINGS].agent.max_connections == 16
        async with contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(raw(("127.0.0.1", port))) for _ in range(16)]
            for reader, writer in held:  # each one admitted and served
                writer.write(request("GET", "/healthz"))
                assert (await read_answer(reader))[0] == 200
            assert site.open == 16
            async with raw(("127.0.0.1", port)) as (reader, writer):
                with contextlib.suppress(ConnectionError):
                    head = await asyncio.wait_for(reader.read(), 2.0)
                    assert head == b"" or head.startswith(b"HTTP/1.1 503 ")
            assert app[REFUSALS].counts[("http", "over the connection cap")] == 1
            held[0][1].close()
            await until(lambda: site.open == 15)
            async with raw(("127.0.0.1", port)) as (reader, writer):
                writer.write(request("GET", "/metrics"))
                status, text = await read_answer(reader)
        assert status == 200
        line = 'hepsub_apiban_refused_total{channel="http",reason="over the connection cap"} 1.0'
        assert line in text.decode().splitlines()
        await until(lambda: site.open == 0)


async def test_a_client_that_never_reads_its_answer_is_dropped(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    async with served(agent, HEPSUB_AGENT_IDLE_TIMEOUT="1") as (_, site, port):
        body = orjson.dumps({"ips": [f"10.{n >> 8}.{n & 255}.1" for n in range(1000)]})
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await until(lambda: site.open == 1)
        try:
            # Answers of ~60 kB each, pipelined and never read: the buffers fill, the handler waits.
            with contextlib.suppress(ConnectionError):
                for _ in range(200):
                    await loop.sock_sendall(sock, request("POST", "/api/v1/check", body))
            await until(lambda: site.open == 0, within=10.0)  # the kernel gave up on the client
        finally:
            sock.close()


async def test_serve_caps_connections_and_slow_clients_cannot_keep_the_slots(
    tmp_path: Path, apiban: ApibanPeer
) -> None:
    port = free_port()
    env = agent_env(
        tmp_path,
        apiban,
        HEPSUB_AGENT_BIND="127.0.0.1",
        HEPSUB_AGENT_PORT=str(port),
        HEPSUB_AGENT_MAX_CONNECTIONS="16",
        HEPSUB_AGENT_IDLE_TIMEOUT="3",
    )
    address = ("127.0.0.1", port)
    async with running(["serve"], env, tmp_path) as child:
        await child.until(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), within=5.0)
        await asyncio.sleep(0.3)  # the probe's connection is gone on the agent's side too
        async with contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(raw(address)) for _ in range(16)]
            for reader, writer in held:
                writer.write(request("GET", "/healthz"))
                assert (await read_answer(reader))[0] == 200
            answered = time.monotonic()
            async with raw(address) as (reader, _):  # the 17th: closed at once
                with contextlib.suppress(ConnectionError):
                    head = await asyncio.wait_for(reader.read(), 2.0)
                    assert head == b"" or head.startswith(b"HTTP/1.1 503 ")
            # The 16 now trickle their next request's headers, slowloris style.
            senders = [
                asyncio.create_task(trickle(w, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 500)) for _, w in held
            ]
            held[0][1].close()
            refused = 1
            async with asyncio.timeout(5.0):
                while not await answers(address):  # a real client takes the freed slot
                    refused += 1  # (if it came before the agent saw the close)
                    await asyncio.sleep(0.05)
            closed = await asyncio.gather(*(closed_within(reader, 6.0) for reader, _ in held[1:]))
            assert max(closed) - answered <= 4.0  # 3 s after their last answer, still sending
            for sender in senders:
                sender.cancel()
        answer = await get_json(f"http://127.0.0.1:{port}/api/v1/status")
        assert answer is not None
        assert answer[1]["refusals"] == {"http": {"over the connection cap": refused}}
        result = await child.stop(within=10.0)
    assert result.code == 0, result.stderr
    result.assert_clean()
    assert "refused http from 127.0.0.1: over the connection cap" in result.stderr


async def answers(address: tuple[str, int]) -> bool:
    """Whether a new connection gets an answer to a request."""
    async with raw(address) as (reader, writer):
        writer.write(request("GET", "/healthz"))
        try:
            return (await read_answer(reader))[0] == 200
        except (ConnectionError, asyncio.IncompleteReadError):
            return False
