"""Command line: ``serve``, ``check`` and ``demo``.

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
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from . import __version__
from .addresses import NetworkSet, parse_ip
from .apiban import ApibanClient
from .app import USER_AGENT, create_app, startup_summary
from .config import ConfigError, Settings, load_settings, require_apiban_key, warnings
from .hep_worker import tune_gc
from .httpserver import BACKLOG, CappedSite
from .keys import REFUSALS, SETTINGS
from .logs import Redactor, setup_logging
from .lookups import LookupService, Verdict
from .ratelimit import Budget

log = logging.getLogger("hepsub_apiban")
_T = TypeVar("_T")
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
    check.add_argument("--config", type=Path, help="TOML configuration file")
    replay = commands.add_parser(
        "replay", help="send HEP packets from hex or pcap/pcapng files to a collector"
    )
    replay.add_argument("files", nargs="+", metavar="FILE")
    replay.add_argument("--to", required=True, metavar="udp:HOST:PORT|tcp:HOST:PORT")
    replay.add_argument("--rate", type=float, help="packets per second (default: as fast as possible)")
    demo = commands.add_parser("demo", help="run the whole chain on loopback with built-in fakes")
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the demo request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(_with_log_flags(_settings(args.config), args.log_format, args.log_level))
        if args.command == "check":
            return _check(_settings(args.config), args.ips)
        if args.command == "replay":
            from .replay import main as replay_main

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
    setup_logging(settings.log.level, redactor, settings.log.format)
    for line in warnings(settings):
        log.warning("%s", line)
    sock = bind_socket(settings)
    app = create_app(settings, redactor=redactor)
    run(serve_app(app, sock))
    return 0


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop where it exists: CPython's default loop loses most HEP datagrams under load."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_app(app: web.Application, sock: socket.socket) -> None:
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
    log.info("hepsub-apiban %s listening on %s:%s; %s", __version__, host, port, startup_summary(app))
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
    for verdict in asyncio.run(_check_all(settings, redactor, ips)):
        sys.stdout.buffer.write(orjson.dumps(verdict.to_json()) + b"\n")
    sys.stdout.flush()
    return 0


async def _check_all(settings: Settings, redactor: Redactor, ips: Sequence[str]) -> list[Verdict]:
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        budget = Budget(settings.apiban.rate_limit, asyncio.get_running_loop().time)
        client = ApibanClient(session, settings.apiban, budget, redactor)
        lookups = LookupService(client, NetworkSet(settings.allow.cidrs))
        results = []
        for text in ips:
            address = parse_ip(text)
            if address is None:
                results.append(Verdict(text, None, "invalid", reason="not an IP address"))
                continue
            # A one-shot command may wait for APIBAN's own timeout, unlike an enrichment answer.
            results.append(await lookups.lookup(address, settings.apiban.timeout + 1.0))
        await lookups.close()
        return results
