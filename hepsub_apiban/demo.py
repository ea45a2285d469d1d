"""``hepsub-apiban demo``: the whole chain on loopback, with no key, no HOMER and no network.

It starts the built-in APIBAN-compatible feed with sample data and the HOMER-like registry
(the same fakes the tests use), then the real agent; waits for the agent to register; replays a
short capture into its HEP collector, in which the agent's own rules detect an attacker APIBAN
does not list; asks the registry to call the agent exactly as homer-app does when a user opens a
call; prints what the HOMER tab would show; and shuts down (the agent unregisters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from .app import create_app
from .core.config import Settings, load_settings
from .core.logs import Redactor, setup_logging
from .detection.book import Detection
from .detection.detector import rule_name
from .fakes.apiban import FakeApiban
from .fakes.homer import FakeHomer
from .formats.hep import HepPacket, build_hep3
from .homer.view import tab_lines
from .ingest.replay import send
from .keys import AGENT_UUID, COLLECTOR, DETECTIONS, LOOKUPS, MIRROR_SYNC, SIGHTINGS

DEMO_KEY = "demo-apiban-key"
DEMO_TOKEN = "demo-homer-token"
DEMO_USER, DEMO_PASSWORD = "admin", "sipcapture"
# Sample feed: addresses from APIBAN's own documentation examples and neighbours. They stand
# for attackers in this demo only.
SAMPLE_LISTED = [f"1.2.3.{n}" for n in range(240, 252)] + [f"5.188.10.{n}" for n in range(1, 9)]
CALL_ID = "a84b4c76e66710@pc33.example.com"
PROXY = "198.51.100.1"  # the site's edge proxy, where the capture was taken
# A global address the sample feed does not list: the capture's extension scan comes from it, and
# the agent's own rules find it (scanner-ua, user-enumeration, extension-scan) and serve it.
ATTACKER = "1.2.3.77"
SCANNED = [str(extension) for extension in range(200, 220)]  # detect.extension_scan.threshold: 20
CALL_IPS = ["192.168.1.10", "1.2.3.251", ATTACKER, "5.188.10.4", "2a01:4f8::5"]
# Loggers whose per-address WARNING lines (an APIBAN-listed sighting, a detection) the demo tells
# in its own words on stdout; their errors still show.
NARRATED_LOGGERS = ("hepsub_apiban.sightings", "hepsub_apiban.detections")


def run_demo(keep_running: bool = False, out: TextIO = sys.stdout) -> int:
    return asyncio.run(_demo(keep_running, out))


async def _demo(keep_running: bool, out: TextIO) -> int:
    redactor = Redactor([DEMO_KEY, DEMO_TOKEN, DEMO_PASSWORD])
    setup_logging("warning", redactor)
    for name in NARRATED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    feed = FakeApiban(keys=[DEMO_KEY])
    feed.add_many(SAMPLE_LISTED)
    registry = FakeHomer(tokens=[DEMO_TOKEN], users={DEMO_USER: DEMO_PASSWORD}, seed_dummy=True)
    with tempfile.TemporaryDirectory(prefix="hepsub-apiban-demo-") as state:
        async with _serve(feed.app()) as feed_url, _serve(registry.app()) as homer_url:
            sock = socket.create_server(("127.0.0.1", 0))
            settings = _settings(feed_url, homer_url, sock.getsockname()[1], Path(state))
            app = create_app(settings, redactor=redactor)
            async with _serve(app, sock) as agent_url:
                _say(out, f"APIBAN-compatible feed  {feed_url}  ({len(SAMPLE_LISTED)} sample entries)")
                _say(out, f"HOMER-like registry     {homer_url}")
                _say(out, f"agent                   {agent_url}  (uuid {app[AGENT_UUID]})")
                if not await _registered(registry, app[AGENT_UUID]):
                    _say(out, "the agent did not register with the registry within 5 s")
                    return 1
                agent = settings.agent
                registered = f"node '{agent.node}', type '{agent.registered_type}', path '{agent.path}'"
                _say(out, f"registered with HOMER:  {registered}")
                if not await _until(lambda: app[LOOKUPS].ready):
                    _say(out, "the agent did not load the APIBAN list within 5 s")
                    return 1
                held = len(app[MIRROR_SYNC].mirror.entries)
                _say(
                    out,
                    f"APIBAN list held:       {held} entries, {feed.request_count()} requests to the feed\n",
                )
                if not await _replay_capture(app, out):
                    return 1
                await _enrich(registry, app[AGENT_UUID], settings.agent.registered_type, out)
                if keep_running:
                    _say(out, f"\nkeeping the agent up at {agent_url}; Ctrl-C stops it")
                    await _forever()
            feed.release()
    return 0


def _settings(feed_url: str, homer_url: str, port: int, state: Path) -> Settings:
    return load_settings(
        None,
        {
            "HEPSUB_APIBAN_URL": feed_url,
            "HEPSUB_APIBAN_KEY": DEMO_KEY,
            "HEPSUB_HOMER_URL": homer_url,
            "HEPSUB_HOMER_TOKEN": DEMO_TOKEN,
            "HEPSUB_HOMER_USER": DEMO_USER,
            "HEPSUB_HOMER_PASSWORD": DEMO_PASSWORD,
            "HEPSUB_AGENT_BIND": "127.0.0.1",
            "HEPSUB_AGENT_HOST": "127.0.0.1",
            "HEPSUB_AGENT_PORT": str(port),
            "HEPSUB_STATE_DIR": str(state),
            "HEPSUB_HEP_UDP": "",
            "HEPSUB_HEP_TCP": "127.0.0.1:0",  # TCP: the demo's replay must not lose a packet
        },
    )


@contextlib.asynccontextmanager
async def _serve(app: web.Application, sock: socket.socket | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    site = web.TCPSite(runner, "127.0.0.1", 0) if sock is None else web.SockSite(runner, sock)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _registered(registry: FakeHomer, agent_uuid: str) -> bool:
    return await _until(lambda: any(row.uuid == agent_uuid for row in registry.active_rows()))


async def _until(condition: Callable[[], bool]) -> bool:
    """Poll for up to 5 s: the demo watches another component's progress, once."""
    for _ in range(250):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return False


def _capture() -> list[bytes]:
    """A few seconds of what a capture agent sees at an edge proxy (``PROXY``, port 5060): a
    REGISTER brute force and a toll-fraud INVITE from listed scanners, an extension scan from
    ``ATTACKER`` (OPTIONS from friendly-scanner to 20 extensions, each answered 404 by the proxy:
    the replies are what tell the detector the extensions do not exist), and clean customer traffic."""
    traffic = [("1.2.3.251", "REGISTER", "friendly-scanner", f"10{n}") for n in range(12)]
    traffic += [("5.188.10.4", "INVITE", "sipcli/v1.8", "00972595000000")] * 3
    traffic += [("9.9.9.9", "OPTIONS", "Asterisk PBX 20.5.0", "ping")] * 4
    traffic += [("2a01:4f8::5", "REGISTER", "Yealink SIP-T46U", "alice")] * 2
    traffic += [(ATTACKER, "OPTIONS", "friendly-scanner", extension) for extension in SCANNED]
    packets = []
    for n, (src, method, agent, user) in enumerate(traffic):
        dialog = (
            f"From: <sip:{user}@{PROXY}>;tag={n}\r\nTo: <sip:{user}@{PROXY}>\r\nCall-ID: demo-{n}@{src}\r\n"
            f"CSeq: 1 {method}\r\n"
        )
        via = f"Via: SIP/2.0/UDP {src}:5060;branch=z9hG4bK{n};rport"
        request = f"{method} sip:{user}@{PROXY} SIP/2.0\r\n{via}\r\n{dialog}User-Agent: {agent}\r\n"
        dst = "2001:db8::1" if ":" in src else PROXY
        packets.append(_hep(src, dst, request, n))
        if src == ATTACKER:
            reply = f"SIP/2.0 404 Not Found\r\n{via}=5060;received={src}\r\n{dialog}Server: edge-proxy\r\n"
            packets.append(_hep(dst, src, reply, n))
    return packets


def _hep(src: str, dst: str, message: str, n: int) -> bytes:
    family = 10 if ":" in src else 2
    payload = f"{message}Content-Length: 0\r\n\r\n".encode()
    return build_hep3(HepPacket(3, family, 17, src, dst, 5060, 5060, int(time.time()), n, 1, 2001, payload))


async def _replay_capture(app: web.Application, out: TextIO) -> bool:
    collector = app[COLLECTOR]
    address = collector.tcp_address()
    assert address is not None
    packets = _capture()
    sent = await send(packets, f"tcp:{address[0]}:{address[1]}", rate=None)
    if not await _until(lambda: collector.stats.packets["tcp"] >= sent):
        _say(out, "the agent did not receive the replayed HEP packets within 5 s")
        return False
    _say(out, f"HEP replayed:           {sent} SIP packets of a capture, over TCP to the agent's collector")
    for sighting in app[SIGHTINGS].values(listed=True):
        methods = ", ".join(f"{method} x{count}" for method, count in sighting.methods.most_common())
        agents = ", ".join(sighting.user_agents)
        _say(out, f"  listed by APIBAN:     {sighting.ip:<12} {methods}  ({agents})")
    clean = [s.ip for s in app[SIGHTINGS].values(listed=False)]
    _say(out, f"  not listed:           {', '.join(clean)}")
    book = app.get(DETECTIONS)
    detections = sorted(book.active(), key=lambda d: (not d.served, d.ip)) if book is not None else []
    for detection in detections:
        _say(out, f"  detected here:        {detection.ip:<12} {_detection_line(detection)}")
    if detections:
        _say(out, "  (the agent also logs each as a WARNING line, once an hour per address and rule)")
    _say(out, "")
    return True


def _detection_line(detection: Detection) -> str:
    rules = ", ".join(rule_name(rule) for rule in detection.rules)
    if detection.served:
        # The ID continues the mirror's sequence: site clients pulling /banned get it next.
        return f"{rules} -> served ({detection.proof}), site API ID {detection.serial}"
    return f"{rules} -> flagged, not served: {detection.held_back}"


TAB_HEADING = "what the HEPSUB:apiban tab shows (homer-app sorts the keys, every level expanded):"


async def _enrich(registry: FakeHomer, agent_uuid: str, agent_type: str, out: TextIO) -> None:
    _say(out, f"a HOMER user opens call {CALL_ID}; homer-app posts its source IPs to the agent:")
    _say(out, "  " + ", ".join(CALL_IPS))
    # The UI asks homer-app for the agent's full registered type (homer-app matches it with LIKE).
    status, wrapper = await registry.search_agent(agent_uuid, agent_type, sids=[CALL_ID], source_ips=CALL_IPS)
    answer = wrapper.get("data") if isinstance(wrapper, dict) else None
    if status != 200 or not isinstance(answer, dict):
        _say(out, f"homer-app got no usable answer ({status}): {wrapper}")
        return
    _say(out, f"\n{TAB_HEADING}")
    for line in tab_lines(answer):
        _say(out, "  " + line)
    call: dict[str, Any] = answer.get(CALL_ID, {})
    _say(out, f"\nsummary: {call.get('summary')}")


async def _forever() -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)
