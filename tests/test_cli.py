"""The real console program, run as a subprocess against the fakes served in the test's event loop.

The child is started with ``asyncio.create_subprocess_exec`` so the APIBAN and HOMER fakes keep
answering while it runs; every wait is bounded and the child is killed if a test fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest

from hepsub_apiban import __version__
from hepsub_apiban.demo import TAB_HEADING
from hepsub_apiban.homer.view import SELF_REFERENCE

from .conftest import (
    APIBAN_KEY,
    HOMER_PASSWORD,
    HOMER_TOKEN,
    HOMER_USER,
    AgentFactory,
    ApibanPeer,
    HomerPeer,
    agent_env,
    assert_no_secret,
)
from .test_replay import eth_udp, pcap, synthetic_hep3

T = TypeVar("T")
CALL = "a84b4c76e66710@pc33.example.com"
FIXTURE_IPS = ["192.168.1.10", "203.0.113.7"]  # docs/peers/homer-app.md#request-fixtures, fixture 1
CLEARED = ("HEPSUB_", "HOMER_")
CLEARED_NAMES = frozenset({"PUBLIC_IP", "APIBAN_KEY"})
HEP_FIXTURE = Path(__file__).parent / "fixtures" / "hep" / "heplify-server-decoder-test-hep3.hex"


def child_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any agent setting, plus ``settings``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(CLEARED) and name not in CLEARED_NAMES
    }
    env.update(settings)
    return env


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def local_agent(tmp_path: Path, apiban: ApibanPeer, **settings: str) -> tuple[int, dict[str, str]]:
    """A free port, and the environment of an agent serving on it on loopback."""
    port = free_port()
    env = agent_env(tmp_path, apiban, HEPSUB_AGENT_BIND="127.0.0.1", HEPSUB_AGENT_PORT=str(port), **settings)
    return port, env


async def ready(port: int) -> bool | None:
    """True once the agent on ``port`` answers /readyz with 200 (in mirror mode: the list is in)."""
    answer = await get_json(f"http://127.0.0.1:{port}/readyz")
    return True if answer and answer[0] == 200 else None


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def assert_clean(self) -> None:
        """No secret anywhere in the output, no traceback."""
        assert_no_secret(self.stdout)
        assert_no_secret(self.stderr)
        assert "Traceback" not in self.stderr, self.stderr


class Child:
    """A running ``python -m hepsub_apiban`` whose output is drained while it runs."""

    def __init__(self, proc: asyncio.subprocess.Process, started: float) -> None:
        self.proc = proc
        self.started = started  # time.monotonic() just before the spawn
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._stdout = asyncio.ensure_future(proc.stdout.read())
        self._stderr = asyncio.ensure_future(proc.stderr.read())

    async def finish(self, within: float) -> Result:
        """Wait for the exit (at most ``within`` s) and return what the child printed."""
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            # Shielded: a timeout here must not cancel the readers, which kill() still awaits.
            stdout = await asyncio.shield(self._stdout)
            stderr = await asyncio.shield(self._stderr)
        return Result(code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    async def stop(self, within: float = 10.0) -> Result:
        """SIGTERM, as a container runtime stops the agent."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.finish(within)

    async def until(self, probe: Callable[[], Awaitable[T | None]], within: float) -> T:
        """Poll ``probe`` every 20 ms until it gives something; fail early if the child exits."""
        async with asyncio.timeout(within):
            while True:
                value = await probe()
                if value is not None:
                    return value
                if self.proc.returncode is not None:
                    result = await self.finish(5.0)
                    pytest.fail(f"the agent exited early with {result.code}: {result.stderr[-2000:]}")
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(TimeoutError):
            await self.finish(5.0)


@contextlib.asynccontextmanager
async def running(args: list[str], env: Mapping[str, str], cwd: Path) -> AsyncIterator[Child]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hepsub_apiban",
        *args,
        env=child_env(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    child = Child(proc, started)
    try:
        yield child
    finally:
        await child.kill()


async def run(args: list[str], env: Mapping[str, str], cwd: Path, within: float = 15.0) -> Result:
    async with running(args, env, cwd) as child:
        return await child.finish(within)


async def get_json(url: str) -> tuple[int, Any] | None:
    """One GET to the child; None while it does not answer yet."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session,
            session.get(url) as response,
        ):
            return response.status, orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError):
        return None


def serve_env(tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer, port: int) -> dict[str, str]:
    return agent_env(
        tmp_path,
        apiban,
        HEPSUB_HOMER_URL=homer.url,
        HEPSUB_HOMER_TOKEN=HOMER_TOKEN,
        HEPSUB_HOMER_USER=HOMER_USER,
        HEPSUB_HOMER_PASSWORD=HOMER_PASSWORD,
        HEPSUB_AGENT_HOST="127.0.0.1",
        HEPSUB_AGENT_BIND="127.0.0.1",
        HEPSUB_AGENT_PORT=str(port),
    )


def assert_one_line_error(result: Result, setting: str) -> None:
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hepsub-apiban: {setting}:"), lines[0]
    assert result.stdout == ""
    result.assert_clean()


# --------------------------------------------------------------------------- check


async def test_check_prints_one_verdict_per_line_in_order(tmp_path: Path, apiban: ApibanPeer) -> None:
    entry_id = apiban.fake.add("1.2.3.4")
    config = tmp_path / "agent.toml"
    # The APIBAN URL is only in the file: the lookups below prove --config is read.
    config.write_text(f'[apiban]\nurl = "{apiban.url}"\nmode = "check"\n', encoding="utf-8")
    ips = ["1.2.3.4", "8.8.8.8", "10.0.0.1", "nonsense"]
    result = await run(["check", *ips, "--config", str(config)], agent_env(tmp_path), tmp_path)
    assert result.code == 0, result.stderr
    result.assert_clean()
    verdicts = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(verdicts) == 4
    assert [v["ip"] for v in verdicts] == ips
    assert [(v["listed"], v["source"]) for v in verdicts] == [
        (True, "check"),
        (False, "check"),
        (False, "private"),
        (None, "invalid"),
    ]
    assert verdicts[0]["ID"] == entry_id
    assert isinstance(verdicts[0]["last_reported"], int)
    assert apiban.fake.request_count("check") == 2  # the private and the invalid one never go upstream


def assert_one_line_reason(result: Result, code: int, reason: str) -> None:
    assert result.code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hepsub-apiban: {reason}"), lines[0]
    result.assert_clean()


async def test_check_with_apiban_down_answers_unknown_and_exits_1(tmp_path: Path, apiban: ApibanPeer) -> None:
    apiban.fake.add("1.2.3.4")
    apiban.fake.fail_status = 503
    ips = ["1.2.3.4", "10.0.0.1", "5.6.7.8"]
    result = await run(["check", *ips], agent_env(tmp_path, apiban), tmp_path)
    assert_one_line_reason(result, 1, "no APIBAN answer for 2 of 3 addresses: APIBAN answered 503")
    verdicts = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert verdicts[0]["listed"] is None
    assert verdicts[0]["source"] == "unavailable"
    assert verdicts[1] == {"ip": "10.0.0.1", "listed": False, "source": "private"}
    assert verdicts[2]["source"] == "unavailable"
    assert verdicts[2]["reason"] == "not asked: APIBAN answered 503"
    assert apiban.fake.request_count("check") == 1  # no more requests after the first failure


async def test_check_with_apiban_unreachable_exits_1(tmp_path: Path) -> None:
    env = agent_env(tmp_path, HEPSUB_APIBAN_URL=f"http://127.0.0.1:{free_port()}")
    result = await run(["check", "1.2.3.4"], env, tmp_path)
    assert_one_line_reason(result, 1, "no APIBAN answer for 1 of 1 addresses: APIBAN unreachable")


async def test_check_with_a_refused_key_exits_2_naming_apiban_key(tmp_path: Path, apiban: ApibanPeer) -> None:
    env = agent_env(tmp_path, apiban, HEPSUB_APIBAN_KEY="not-the-key-0000")
    result = await run(["check", "1.2.3.4", "5.6.7.8"], env, tmp_path)
    assert_one_line_reason(result, 2, "apiban.key: APIBAN refused the key (403)")
    assert [orjson.loads(line)["source"] for line in result.stdout.splitlines()] == ["unavailable"] * 2
    assert apiban.fake.request_count("check") == 1


async def test_check_can_ask_a_running_agent_instead_of_apiban(
    tmp_path: Path, apiban: ApibanPeer, agent: AgentFactory
) -> None:
    apiban.fake.add("1.2.3.4")
    running_agent = await agent()  # check mode, against the APIBAN fake
    url = str(running_agent.make_url("")).rstrip("/")
    ips = ["1.2.3.4", "10.0.0.1", "nonsense"]
    no_key = {"HEPSUB_STATE_DIR": str(tmp_path / "elsewhere")}  # no APIBAN key, no config
    first = await run(["check", "--agent", url, *ips], no_key, tmp_path)
    assert first.code == 0, first.stderr
    verdicts = [orjson.loads(line) for line in first.stdout.splitlines()]
    assert [(v["ip"], v["listed"], v["source"]) for v in verdicts] == [
        ("1.2.3.4", True, "check"),
        ("10.0.0.1", False, "private"),
        ("nonsense", None, "invalid"),
    ]
    again = await run(["check", "--agent", url, "1.2.3.4"], no_key, tmp_path)
    assert again.code == 0, again.stderr
    assert orjson.loads(again.stdout)["source"] == "cache"  # the agent's cache: no new APIBAN request
    assert apiban.fake.request_count("check") == 1

    apiban.fake.fail_status = 503
    failed = await run(["check", "--agent", url, "5.6.7.8"], no_key, tmp_path)
    assert_one_line_reason(failed, 1, "no APIBAN answer for 1 of 1 addresses: APIBAN answered 503")


async def test_check_with_no_agent_at_the_url_exits_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = await run(["check", "--agent", url, "1.2.3.4"], {}, tmp_path)
    assert_one_line_reason(result, 1, f"cannot ask the agent at {url}: ")
    assert result.stdout == ""


# --------------------------------------------------------------------------- user mistakes


def _case(tmp_path: Path, name: str) -> tuple[list[str], dict[str, str]]:
    env = agent_env(tmp_path)
    if name == "bad-port":
        return ["serve"], {**env, "HEPSUB_AGENT_PORT": "http"}
    if name == "port-out-of-range":
        return ["serve"], {**env, "HEPSUB_AGENT_PORT": "70000"}
    if name == "unknown-key-in-file":
        config = tmp_path / "agent.toml"
        config.write_text("[agent]\nprot = 18088\n", encoding="utf-8")
        return ["serve", "--config", str(config)], env
    if name == "missing-config-file":
        return ["check", "1.2.3.4", "--config", str(tmp_path / "missing.toml")], env
    if name == "no-apiban-key":
        env.pop("HEPSUB_APIBAN_KEY")
        return ["serve"], env
    homer = {"HEPSUB_HOMER_URL": "http://127.0.0.1:9", "HEPSUB_HOMER_TOKEN": HOMER_TOKEN}
    if name.startswith("agent-host="):
        return ["serve"], {**env, **homer, "PUBLIC_IP": name.removeprefix("agent-host=")}
    if name.startswith("homer-ip="):
        legacy = {
            "HOMER_IP": name.removeprefix("homer-ip="),
            "HOMER_TOKEN": HOMER_TOKEN,
            "PUBLIC_IP": "10.0.0.20",
        }
        return ["serve"], {**env, **legacy}
    if name == "check-agent-without-scheme":
        return ["check", "--agent", "127.0.0.1:18088", "1.2.3.4"], env
    if name == "site-keys-with-nothing-to-serve":
        return ["serve"], {**env, "HEPSUB_SITE_KEYS": "a-site-key-1234", "HEPSUB_DETECT_ENABLED": "false"}
    assert name == "homer-without-agent-host"
    return ["serve"], {**env, **homer}


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("bad-port", "agent.port"),
        ("port-out-of-range", "agent.port"),
        ("unknown-key-in-file", "agent.prot"),
        ("missing-config-file", "--config"),
        ("no-apiban-key", "apiban.key"),
        ("homer-without-agent-host", "agent.host"),
        # Each of these would be registered, and a bad registered address breaks HOMER's tab.
        ("agent-host=http://10.0.0.20", "agent.host"),
        ("agent-host=10.0.0.20:18088", "agent.host"),
        ("agent-host=0.0.0.0", "agent.host"),
        ("agent-host=agent host", "agent.host"),
        ("site-keys-with-nothing-to-serve", "site.keys"),
        ("check-agent-without-scheme", "--agent"),
        ("homer-ip=http://10.0.0.10", "homer.url"),  # was registered with http://http://10.0.0.10:9080
    ],
)
async def test_config_mistakes_exit_2_with_one_line(tmp_path: Path, case: str, setting: str) -> None:
    args, env = _case(tmp_path, case)
    result = await run(args, env, tmp_path, within=10.0)
    assert_one_line_error(result, setting)


async def test_port_in_use_exits_2_and_registers_nothing(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = await run(["serve"], serve_env(tmp_path, apiban, homer, port), tmp_path, within=10.0)
    assert_one_line_error(result, "agent.port")
    assert str(port) in result.stderr
    assert homer.fake.subscriptions == []


async def test_hep_port_in_use_exits_2_and_registers_nothing(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        env = {
            **serve_env(tmp_path, apiban, homer, free_port()),
            "HEPSUB_HEP_UDP": f"127.0.0.1:{taken.getsockname()[1]}",
        }
        result = await run(["serve"], env, tmp_path, within=10.0)
    assert_one_line_error(result, "hep.udp")
    assert homer.fake.subscriptions == []


WARNED = {
    "agent.host": (
        {
            "HEPSUB_HOMER_URL": "http://192.0.2.10:9080",  # TEST-NET: never answers
            "HEPSUB_HOMER_TOKEN": HOMER_TOKEN,
            "HEPSUB_HOMER_TIMEOUT": "0.5",
            "PUBLIC_IP": "127.0.0.1",
        },
        "agent.host: 127.0.0.1 is this machine's loopback address, registered with HOMER at http://192.0.2.10:9080",
    ),
    # Check mode holds no list: the site routes would answer 503 forever (the stream still serves).
    "site.keys": (
        {"HEPSUB_SITE_KEYS": "a-site-key-1234"},
        "site.keys: apiban.mode = check holds no APIBAN list",
    ),
}


@pytest.mark.parametrize("setting", sorted(WARNED))
async def test_a_setting_that_is_probably_a_mistake_is_one_warning_line_naming_it(
    tmp_path: Path, apiban: ApibanPeer, setting: str
) -> None:
    settings, expected = WARNED[setting]
    port, env = local_agent(tmp_path, apiban, **settings)
    async with running(["serve"], env, tmp_path) as child:
        await child.until(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), within=5.0)
        result = await child.stop()
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.stderr
    assert f"hepsub_apiban: {expected}" in warnings[0]
    result.assert_clean()


# --------------------------------------------------------------------------- serve


async def _registered(child: Child, homer: HomerPeer, count: int) -> str:
    """Wait for the ``count``-th successful subscription; return the uuid it registered."""

    async def probe() -> str | None:
        ok = [s for s in homer.fake.subscriptions if s.status == 201]
        return ok[count - 1].body["uuid"] if len(ok) >= count and homer.fake.active_rows() else None

    return await child.until(probe, within=5.0)


async def test_serve_registers_enriches_and_unregisters(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    port = free_port()
    env = serve_env(tmp_path, apiban, homer, port)
    async with running(["serve"], env, tmp_path) as child:
        agent_uuid = await _registered(child, homer, 1)
        first = next(s for s in homer.fake.subscriptions if s.status == 201)
        assert first.at - child.started < 1.0, f"registered {first.at - child.started:.2f} s after start"
        body = first.body
        assert str(uuid.UUID(body["uuid"])) == body["uuid"]
        assert type(body["port"]) is int
        assert body["port"] == port
        assert type(body["ttl"]) is int
        assert body["ttl"] == 300
        assert (body["gid"], body["host"], body["protocol"], body["path"], body["type"], body["node"]) == (
            10,
            "127.0.0.1",
            "http",
            "/get",
            "cdr-download",  # agent.download: the Download PCAP button reaches the agent
            "apiban",
        )
        assert [row.uuid for row in homer.fake.active_rows()] == [agent_uuid]
        assert (tmp_path / "state" / "uuid").read_text().strip() == agent_uuid

        status, wrapper = await homer.fake.search_agent(
            agent_uuid, "cdr-download", sids=[CALL], source_ips=FIXTURE_IPS
        )
        assert status == 200, wrapper
        assert (wrapper["uuid"], wrapper["node"]) == (agent_uuid, "apiban")
        answer = wrapper["data"]
        assert "data" not in answer
        assert answer[CALL]["checked"] == FIXTURE_IPS
        assert answer["192.168.1.10"]["source"] == "private"

        result = await child.stop(within=10.0)
    assert result.code == 0, result.stderr
    result.assert_clean()
    assert (agent_uuid, 200) in homer.fake.deletions
    assert agent_uuid not in homer.fake.rows

    # A restart with the same state dir registers the same uuid again.
    async with running(["serve"], env, tmp_path) as child:
        assert await _registered(child, homer, 2) == agent_uuid
        result = await child.stop(within=10.0)
    assert result.code == 0, result.stderr
    result.assert_clean()
    assert homer.fake.deletions.count((agent_uuid, 200)) == 2


async def test_site_keys_that_are_ordinary_words_leave_the_log_readable(
    tmp_path: Path, apiban: ApibanPeer
) -> None:
    port, env = local_agent(tmp_path, apiban, HEPSUB_APIBAN_MODE="mirror", HEPSUB_SITE_KEYS="apiban,mirror,a")
    async with running(["serve", "--log-level", "debug"], env, tmp_path) as child:
        answer = await child.until(lambda: get_json(f"http://127.0.0.1:{port}/api/mirror/banned"), within=5.0)
        assert answer[0] in {200, 400, 503}, answer  # the key is taken: not APIBAN's 403
        result = await child.stop()
    assert result.code == 0, result.stderr
    start = next(line for line in result.stderr.splitlines() if " listening on " in line)
    assert f"hepsub-apiban {__version__} listening on 127.0.0.1:{port}; mode mirror, " in start
    assert "***" not in result.stderr, result.stderr


async def test_the_first_pull_logs_its_progress_against_an_estimated_total(
    tmp_path: Path, apiban: ApibanPeer
) -> None:
    week, count = 7 * 86400, 1000
    now = int(time.time())
    for n in range(count):  # IDs are the entries' times, spread over APIBAN's 7 days as in life
        apiban.fake.add(f"45.1.{n // 250}.{n % 250}", now - week + (n + 1) * week // count)
    # Two pages a second (one request of each window is kept for checks).
    port, env = local_agent(tmp_path, apiban, HEPSUB_APIBAN_MODE="mirror", HEPSUB_APIBAN_RATE_LIMIT="3/1")
    async with running(["serve"], env, tmp_path) as child:
        await child.until(lambda: ready(port), within=10.0)
        result = await child.stop()
    assert result.code == 0, result.stderr
    progress = [
        line.split(": ", 1)[1] for line in result.stderr.splitlines() if "APIBAN list: synced" in line
    ]
    assert progress, result.stderr
    assert progress[0].startswith("APIBAN list: synced 500 of ~1,000 addresses (2 pages), "), progress


async def test_json_logs_start_with_a_line_that_says_what_the_agent_does(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    apiban.fake.add_many([f"45.0.{n // 250}.{n % 250}" for n in range(300)])
    port = free_port()
    env = {**serve_env(tmp_path, apiban, homer, port), "HEPSUB_APIBAN_MODE": "mirror"}
    async with running(["serve", "--log-format", "json", "--log-level", "info"], env, tmp_path) as child:
        await _registered(child, homer, 1)
        await child.until(lambda: ready(port), within=10.0)
        result = await child.stop()
    assert result.code == 0
    entries = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert all(set(entry) == {"ts", "level", "logger", "msg"} for entry in entries)
    start = next(e["msg"] for e in entries if "listening on" in e["msg"])
    assert f"127.0.0.1:{port}" in start
    assert "mode mirror, pulling the whole APIBAN list" in start
    assert f"registering with HOMER at {homer.url} as 127.0.0.1:{port}/get/cdr" in start
    assert any(e["msg"].startswith("APIBAN list complete: 300 entries") for e in entries)
    assert any(e["msg"].startswith("registered with HOMER") for e in entries)
    assert_no_secret(result.stderr)


async def test_serve_keeps_serving_when_homer_is_unreachable(tmp_path: Path, apiban: ApibanPeer) -> None:
    port = free_port()
    env = agent_env(
        tmp_path,
        apiban,
        HEPSUB_HOMER_URL=f"http://127.0.0.1:{free_port()}",
        HEPSUB_HOMER_TOKEN=HOMER_TOKEN,
        HEPSUB_AGENT_HOST="127.0.0.1",
        HEPSUB_AGENT_BIND="127.0.0.1",
        HEPSUB_AGENT_PORT=str(port),
    )
    base = f"http://127.0.0.1:{port}"
    async with running(["serve"], env, tmp_path) as child:
        assert await child.until(lambda: get_json(f"{base}/healthz"), within=5.0) == (200, {"status": "ok"})

        async def failing() -> dict[str, Any] | None:
            answer = await get_json(f"{base}/api/v1/status")
            registration = answer[1]["registration"] if answer else None
            return registration if registration and registration["state"] == "failing" else None

        registration = await child.until(failing, within=5.0)
        assert registration["attempts"] >= 1
        assert registration["last_status"] is None
        assert "cannot reach" in registration["last_message"]
        result = await child.stop(within=10.0)
    assert result.code == 0, result.stderr
    result.assert_clean()


# --------------------------------------------------------------------------- replay


def nine_packet_capture(tmp_path: Path) -> Path:
    capture = tmp_path / "nine.pcap"
    packets = [synthetic_hep3(f"OPTIONS sip:{n}@example.com SIP/2.0\r\n\r\n".encode()) for n in range(9)]
    capture.write_bytes(pcap([eth_udp(packet) for packet in packets]))
    return capture


async def test_replay_exits_0_and_counts_what_a_listening_collector_got(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(5.0)
        target = f"udp:127.0.0.1:{collector.getsockname()[1]}"
        result = await run(["replay", str(nine_packet_capture(tmp_path)), "--to", target], {}, tmp_path)
        received = [collector.recv(65535) for _ in range(9)]
    assert result.code == 0, result.stderr
    assert result.stdout.startswith(f"sent 9 HEP packets from 1 file to {target} in "), result.stdout
    assert all(packet.startswith(b"HEP3") for packet in received)


@pytest.mark.parametrize("packets", ["nine-packet capture", "one-packet hex file"])
async def test_replay_to_a_udp_port_where_nothing_listens_exits_2_with_one_line(
    tmp_path: Path, packets: str
) -> None:
    source = nine_packet_capture(tmp_path) if packets.startswith("nine") else HEP_FIXTURE
    target = f"udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    result = await run(["replay", str(source), "--to", target], {}, tmp_path)
    assert result.code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hepsub-apiban: {target} refused the packets (ICMP port unreachable"), lines[
        0
    ]
    assert lines[0].endswith("is a HEP collector listening there?")


# --------------------------------------------------------------------------- demo and argparse


async def test_demo_runs_the_whole_chain(tmp_path: Path) -> None:
    result = await run(["demo"], {}, tmp_path, within=30.0)
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "APIBAN lists 2 of 5 addresses: 1.2.3.251, 5.188.10.4" in result.stdout
    assert CALL in result.stdout
    assert "APIBAN list held:       20 entries, 2 requests to the feed" in result.stdout
    assert "HEP replayed:           61 SIP packets" in result.stdout
    listed = [line.split()[3] for line in result.stdout.splitlines() if "listed by APIBAN:" in line]
    assert sorted(listed) == ["1.2.3.251", "5.188.10.4"]
    # The capture's extension scan from an address APIBAN does not list: found and served here.
    lines = result.stdout.splitlines()
    detected = {line.split()[2]: line for line in lines if line.startswith("  detected here:")}
    assert sorted(detected) == ["1.2.3.251", "1.2.3.77", "5.188.10.4"]
    assert "extension-scan" in detected["1.2.3.77"]
    assert "-> served (two different rules fired)" in detected["1.2.3.77"]
    assert "-> flagged, not served" in detected["1.2.3.251"]
    tab = [
        line[2:] for line in result.stdout.split(TAB_HEADING + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    ]
    # What a person sees first: the summary, then each listed or detected address with its verdict.
    first = tab[:15]
    assert first[0].startswith('(1) summary : "APIBAN lists 2 of 5 addresses: 1.2.3.251, 5.188.10.4; ')
    assert "detected here: 3 (1.2.3.251, 1.2.3.77, 5.188.10.4)" in first[0]
    assert first[1] == "(2) listed or detected :"
    assert first[2].startswith('  1.2.3.251 : "listed by APIBAN, last reported 20')
    assert first[3].startswith(
        '  1.2.3.77 : "detected here: scanner-ua, extension-scan, user-enumeration, until '
    )
    assert "(blocked at the site); not listed by APIBAN" in first[3]
    assert first[4].startswith('  5.188.10.4 : "listed by APIBAN, last reported 20')
    assert first[5] == "1.2.3.251 :"
    assert first[6].startswith('  (1) verdict : "listed by APIBAN')
    assert first[7].startswith('  (2) seen : "12 SIP packets to or from it, 20')
    # Anywhere in the tab: no raw epoch number but t_sec (the header box reads it as a date), and
    # no empty container.
    for line in tab:
        key, _, value = line.strip().partition(" : ")
        if key != "t_sec" and value.isdigit():
            assert int(value) < 10**9, line
        assert value not in ("Object", "Array[0]", "{}", "[]"), line
    assert tab.count(f"{CALL} :") == 1
    assert "data : " + SELF_REFERENCE in tab
    assert "WARNING" not in result.stderr  # the demo tells detections itself, calmly


async def test_version(tmp_path: Path) -> None:
    result = await run(["--version"], {}, tmp_path)
    assert result.code == 0
    assert result.stdout.strip() == f"hepsub-apiban {__version__}"


async def test_no_subcommand_is_a_usage_error(tmp_path: Path) -> None:
    result = await run([], {"HEPSUB_APIBAN_KEY": APIBAN_KEY}, tmp_path)
    assert result.code == 2
    assert result.stderr.startswith("usage: hepsub-apiban")
    assert "required" in result.stderr
    assert "Traceback" not in result.stderr
