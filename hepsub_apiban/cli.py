"""Command line: ``serve``, ``check``, ``replay``, ``health`` and ``demo``.

A mistake a user can make (bad setting, missing key, port in use) ends with one line naming
the setting and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from . import __version__
from .apiban.client import ApibanClient, BadKey
from .apiban.lookups import LookupService, Verdict
from .app import USER_AGENT, create_app, startup_summary
from .core.addresses import NetworkSet, parse_ip
from .core.config import ConfigError, Settings, http_url, load_settings, require_apiban_key, setting_warnings
from .core.httpserver import BACKLOG, CappedSite
from .core.jsonutil import BodyTooLarge, read_capped
from .core.logs import FIRST_LINE, Redactor, StartupHold, safe_text, setup_logging
from .core.ratelimit import Budget
from .ingest.hep_worker import tune_gc
from .keys import REFUSALS, SETTINGS

log = logging.getLogger("hepsub_apiban")
_T = TypeVar("_T")
EXIT_FAILED = 1  # the command could not do its job (check: no answer; see EXIT_USAGE)
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hepsub-apiban",
        description="HOMER 7 HEPSUB agent that flags APIBAN-listed SIP attackers in captured calls.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the agent")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides log.format")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level"
    )
    check = commands.add_parser("check", help="look IP addresses up once and print one JSON verdict per line")
    check.add_argument("ips", nargs="+", metavar="IP")
    source = check.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML configuration file")
    source.add_argument(
        "--agent",
        metavar="URL",
        help="ask this running agent (POST URL/api/v1/check) instead of APIBAN: no key needed, "
        "and the lookups share the agent's list, cache and budget",
    )
    replay = commands.add_parser(
        "replay", help="send HEP packets from hex or pcap/pcapng files to a collector"
    )
    replay.add_argument("files", nargs="+", metavar="FILE")
    replay.add_argument("--to", required=True, metavar="udp:HOST:PORT|tcp:HOST:PORT")
    replay.add_argument("--rate", type=float, help="packets per second (default: as fast as possible)")
    health = commands.add_parser(
        "health",
        help="exit 0 when the agent this configuration describes answers GET /healthz "
        "(the container's health check: it reads agent.bind and agent.port as serve does)",
    )
    health.add_argument("--config", type=Path, help="TOML configuration file")
    demo = commands.add_parser("demo", help="run the whole chain on loopback with built-in fakes")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the demo request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(_with_log_flags(_settings(args.config), args.log_format, args.log_level))
        if args.command == "check":
            if args.agent is not None:
                return _check_via_agent(args.agent, args.ips)
            return _check(_settings(args.config), args.ips)
        if args.command == "health":
            return _health(args.config)
        if args.command == "replay":
            from .ingest.replay import main as replay_main

            setup_logging("warning", Redactor())
            return replay_main(args.files, args.to, args.rate, sys.stdout)
        from .demo import run_demo

        return run_demo(keep_running=args.keep_running)
    except ConfigError as exc:
        print(f"hepsub-apiban: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _with_log_flags(settings: Settings, fmt: str | None, level: str | None) -> Settings:
    log = replace(settings.log, format=fmt or settings.log.format, level=level or settings.log.level)
    return replace(settings, log=log)


def _settings(path: Path | None) -> Settings:
    settings = load_settings(path, os.environ)
    require_apiban_key(settings)
    return settings


def bind_socket(settings: Settings) -> socket.socket:
    """Bind before anything starts, so a busy port is a clear error and nothing is registered."""
    host, port = settings.agent.bind, settings.agent.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False, backlog=BACKLOG)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError("agent.port", f"{port} is already in use on {host}") from None
        raise ConfigError("agent.bind", f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _serve(settings: Settings) -> int:
    redactor = Redactor(settings.secrets())
    # The start line comes first, the warnings about the settings right after it: what the
    # snapshot load, the sync and the registration log while starting waits until then.
    hold = StartupHold(setup_logging(settings.log.level, redactor, settings.log.format))
    try:
        for line in setting_warnings(settings):
            log.warning("%s", line)
        sock = bind_socket(settings)
        app = create_app(settings, redactor=redactor)
        run(serve_app(app, sock, hold))
    finally:
        hold.release()  # a start that failed loses nothing it logged
    return 0


HEALTH_TIMEOUT = 3.0  # seconds: under the Dockerfile's HEALTHCHECK --timeout


def health_url(settings: Settings) -> str:
    """Where this machine reaches the agent's /healthz: its bind address, loopback for a wildcard."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.agent.bind, settings.agent.bind)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.agent.port}/healthz"


def _health(path: Path | None) -> int:
    """Exit 0 or 1 only: Docker reserves a health check's exit 2."""
    try:
        settings = load_settings(path, os.environ)
    except ConfigError as exc:
        print(f"hepsub-apiban: {exc}", file=sys.stderr)
        return EXIT_FAILED
    url = health_url(settings)
    try:
        status = asyncio.run(_get_status(url))
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"hepsub-apiban: no answer from {url}: {_reason(exc)}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200:
        print(f"hepsub-apiban: {url} answered {status}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _get_status(url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop where it exists: CPython's default loop loses most HEP datagrams under load."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_app(app: web.Application, sock: socket.socket, hold: StartupHold | None = None) -> None:
    """Serve on an already bound socket until SIGINT or SIGTERM, then shut down in order."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    try:
        await runner.setup()
    except BaseException:
        # A listener that cannot bind (hep.udp in use, say) fails the startup: undo what started.
        await runner.cleanup()
        raise
    await capped_site(runner, sock, app).start()
    if app[SETTINGS].hep.workers > 1:
        # The workers' batches die young by the thousand: with Python's defaults they set off
        # full collections over the agent's whole heap (50-70 ms, on a core a worker needs).
        tune_gc()
    host, port = sock.getsockname()[:2]
    log.info(
        "hepsub-apiban %s listening on %s:%s; %s",
        __version__,
        host,
        port,
        startup_summary(app),
        extra=FIRST_LINE,
    )
    if hold is not None:
        hold.release()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def capped_site(runner: web.AppRunner, sock: socket.socket, app: web.Application) -> CappedSite:
    """The agent's listening site: agent.max_connections open at most, the rest refused and counted."""
    agent, refusals = app[SETTINGS].agent, app[REFUSALS]
    return CappedSite(
        runner,
        sock,
        max_connections=agent.max_connections,
        unacked_timeout=agent.idle_timeout,
        on_refused=lambda sender: refusals.refuse("http", "over the connection cap", sender),
    )


def _check(settings: Settings, ips: Sequence[str]) -> int:
    redactor = Redactor(settings.secrets())
    setup_logging("warning" if settings.log.level == "info" else settings.log.level, redactor)
    verdicts, key_refused = asyncio.run(_check_all(settings, redactor, ips))
    _print_verdicts(verdict.to_json() for verdict in verdicts)
    failed = [verdict for verdict in verdicts if verdict.source == "unavailable"]
    if not failed:
        return 0
    reason = redactor(failed[0].reason or "no answer")
    if key_refused:
        print(f"hepsub-apiban: apiban.key: {reason}", file=sys.stderr)
        return EXIT_USAGE
    return _no_answer(len(failed), len(verdicts), reason)


def _no_answer(failed: int, asked: int, reason: str) -> int:
    print(f"hepsub-apiban: no APIBAN answer for {failed} of {asked} addresses: {reason}", file=sys.stderr)
    return EXIT_FAILED


def _print_verdicts(verdicts: Iterable[dict[str, Any]]) -> None:
    for verdict in verdicts:
        sys.stdout.buffer.write(orjson.dumps(verdict) + b"\n")
    sys.stdout.flush()


async def _check_all(
    settings: Settings, redactor: Redactor, ips: Sequence[str]
) -> tuple[list[Verdict], bool]:
    """The verdicts, and whether APIBAN refused the key.

    After the first upstream failure no more requests go out: with a refused key, an outage or a
    spent budget each would fail alike, and would only spend the key's budget or wait out timeouts.
    """
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        budget = Budget(settings.apiban.rate_limit, asyncio.get_running_loop().time)
        client = ApibanClient(session, settings.apiban, budget, redactor)
        lookups = LookupService(client, NetworkSet(settings.allow.cidrs))
        results = []
        failure: str | None = None
        for text in ips:
            address = parse_ip(text)
            if address is None:
                results.append(Verdict(text, None, "invalid", reason="not an IP address"))
                continue
            local = lookups.answer_now(address)
            if local is None and failure is not None:
                results.append(Verdict(address.text, None, "unavailable", reason=f"not asked: {failure}"))
                continue
            # A one-shot command may wait for APIBAN's own timeout, unlike an enrichment answer.
            verdict = local or await lookups.lookup(address, settings.apiban.timeout + 1.0)
            if verdict.source == "unavailable":
                failure = verdict.reason
            results.append(verdict)
        await lookups.close()
        return results, any(outcome == BadKey.outcome for _, outcome in client.requests)


AGENT_BATCH = 1000  # IPs per POST: the most the agent's /api/v1/check takes at once
AGENT_TIMEOUT = 30.0  # seconds per request to the agent: its own deadline is at most 1.8 s


def _check_via_agent(url: str, ips: Sequence[str]) -> int:
    setup_logging("warning", Redactor())
    try:
        base = http_url(url)
    except ValueError as exc:
        raise ConfigError("--agent", str(exc)) from None
    try:
        verdicts = asyncio.run(_ask_agent(base, ips))
    except AgentError as exc:
        print(f"hepsub-apiban: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_verdicts(verdicts)
    failed = [verdict for verdict in verdicts if verdict.get("source") == "unavailable"]
    if failed:
        return _no_answer(len(failed), len(verdicts), str(failed[0].get("reason") or "no answer"))
    return 0


class AgentError(Exception):
    """The agent could not be asked, or did not answer with verdicts."""


async def _ask_agent(base: str, ips: Sequence[str]) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=AGENT_TIMEOUT)
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, timeout=timeout) as session:
        for start in range(0, len(ips), AGENT_BATCH):
            batch = list(ips[start : start + AGENT_BATCH])
            try:
                async with session.post(f"{base}/api/v1/check", json={"ips": batch}) as response:
                    body = await read_capped(response, MAX_AGENT_ANSWER)
                    status = response.status
            except (aiohttp.ClientError, BodyTooLarge, TimeoutError) as exc:
                raise AgentError(f"cannot ask the agent at {base}: {_reason(exc)}") from None
            verdicts += _agent_results(base, status, body, len(batch))
    return verdicts


MAX_AGENT_ANSWER = 4 * 1024 * 1024  # bytes: a verdict of 1,000 is some 200 kB


def _agent_results(base: str, status: int, body: bytes, expected: int) -> list[dict[str, Any]]:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if status != 200:
        said = answer.get("error") if isinstance(answer, dict) else None
        raise AgentError(f"the agent at {base} answered {status}: {safe_text(said or 'no JSON error')}")
    results = answer.get("results") if isinstance(answer, dict) else None
    if (
        not isinstance(results, list)
        or len(results) != expected
        or not all(isinstance(r, dict) for r in results)
    ):
        raise AgentError(f"{base} did not answer as the agent's POST /api/v1/check does")
    return results


def _reason(exc: BaseException) -> str:
    return "no answer in time" if isinstance(exc, TimeoutError) else safe_text(str(exc) or type(exc).__name__)
