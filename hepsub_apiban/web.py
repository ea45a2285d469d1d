"""HTTP API: HOMER enrichment, verdict lookups, health, status and metrics.

The enrichment route is called by homer-app, whose UI shows no HEPSUB data from *any* agent
when one agent fails; so that route answers 200 with a JSON object whatever happens (bad body,
APIBAN down, a bug), within the configured deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import __version__
from .apiban.lookups import Verdict
from .core.access import SourceFilter
from .core.addresses import parse_ip
from .core.config import RULES
from .core.httpserver import BodyError, read_body
from .core.jsonutil import json_response, loads_object
from .core.logs import safe_text
from .detection.book import Detection
from .detection.detector import rule_name
from .homer.enrichment import DOWNLOAD_IPS, BadEnrichmentRequest, Known, build_answer, parse_request
from .ingest.evidence import Evidence
from .ingest.pcap import pcap_file
from .ingest.sightings import Sighting
from .ingest.workers import WorkerPool
from .keys import (
    AGENT_UUID,
    APIBAN,
    COLLECTOR,
    DETECTIONS,
    DETECTOR,
    EVIDENCE,
    LOOKUPS,
    METRICS,
    MIRROR_SYNC,
    REFUSALS,
    REGISTRAR,
    SETTINGS,
    SHARED_DETECTIONS,
    SHARED_SIGHTINGS,
    SIGHTINGS,
    STARTED_AT,
    STORE_LINK,
)
from .site.api import SITE_PATHS
from .site.decisions import DECISION_PATHS

log = logging.getLogger(__name__)
MAX_CHECK_IPS = 1000
MAX_SIGHTINGS_LIMIT = 10_000  # one answer stays a few MB, built in tens of ms
_UNIX_SECONDS = re.compile("[0-9]{1,12}")
_LIMIT = re.compile("[0-9]{1,5}")  # ASCII digits only: int() also takes "١٢" and "1_000"


def error_response(message: str, status: int) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON for every error, never aiohttp's HTML pages or a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.reason, exc.status)
        if "Allow" in exc.headers:  # 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except BodyError as exc:
        return error_response(exc.message, exc.status)
    except Exception as exc:
        # The path and the error's text may carry what a client sent: escaped, on one line each;
        # the traceback's frames come from the code.
        log.error(
            "unhandled error in %s %s: %s\n%s",
            safe_text(request.method, 16),
            safe_text(request.path, 200),
            safe_text(f"{type(exc).__name__}: {exc}", 500),
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
        return error_response("internal error; see the agent's log", 500)
    return response


# Routes open to every client whatever agent.allow_from says: probes, and the site API and the
# CrowdSec decision API (they have keys).
OPEN_PATHS = frozenset({"/healthz", "/readyz", *SITE_PATHS, *DECISION_PATHS})


def allow_from(sources: SourceFilter) -> Middleware:
    """403 for a client outside ``agent.allow_from``, except on ``OPEN_PATHS``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or ""
        if sources.allows(remote):
            return await handler(request)
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in OPEN_PATHS:
            return await handler(request)
        request.app[REFUSALS].refuse("http", "not in agent.allow_from", remote or "unknown")
        return error_response("this address may not use the agent's HTTP API (agent.allow_from)", 403)

    return middleware


async def enrich(request: web.Request) -> web.Response:
    started = time.perf_counter()
    try:
        response, outcome = await _enrich(request)
    except Exception:
        log.exception("enrichment failed")
        response, outcome = json_response({"error": "internal error; see the agent's log"}), "error"
    stats = request.app[METRICS].enrichment
    stats.outcomes[outcome] += 1
    stats.latency.observe(time.perf_counter() - started)
    return response


async def _enrich(request: web.Request) -> tuple[web.Response, str]:
    try:
        raw = await read_body(request, request.app[SETTINGS].agent.body_timeout)
    except BodyError as exc:  # homer-app gets its 200 whatever the body's fate
        return json_response({"error": exc.message}), "bad_request"
    return await answer_enrichment(request.app, raw)


async def answer_enrichment(app: web.Application, raw: bytes) -> tuple[web.Response, str]:
    """The answer to a body already read: the part of a request that holds the event loop
    (bounded by the enrichment.* settings; bench/enrichment_limits.py times it)."""
    settings = app[SETTINGS]
    try:
        parsed = parse_request(raw, settings.enrichment)
    except BadEnrichmentRequest as exc:
        return json_response({"error": str(exc)}), "bad_request"
    lookups = app[LOOKUPS].lookup_many(parsed.addresses, settings.agent.deadline)
    shared = app.get(SHARED_SIGHTINGS)
    if shared is None:
        verdicts, seen = await lookups, None
    else:  # what every agent saw, read while the verdicts are looked up (a short timeout of its own)
        verdicts, seen = await asyncio.gather(lookups, shared.seen([a.text for a in parsed.addresses]))
    answer = build_answer(parsed, verdicts, _known(app, [v.ip for v in verdicts], seen))
    return web.Response(body=answer, content_type="application/json"), "ok"


def _known(app: web.Application, ips: list[str], shared: dict[str, Sighting] | None = None) -> Known:
    """What the HEP capture saw of the call's IPs (``shared``: what every agent saw), their
    active detections, and the data's age."""
    sightings, book = app[SIGHTINGS], app.get(DETECTIONS)
    seen: dict[str, Sighting] = {} if shared is None else shared
    if shared is None and len(sightings):
        for ip in ips:
            sighting = sightings.get(ip)
            if sighting is not None:
                seen[ip] = sighting
    detected: dict[str, Detection] = {}
    if book is not None and len(book):
        now = time.time()
        for ip in ips:
            detection = book.get(ip, now)
            if detection is not None:
                detected[ip] = detection
    return Known(seen, detected, _data_time(app), app[SETTINGS].agent.download)


def _data_time(app: web.Application) -> int:
    """When the data behind an answer last changed: the list's last sync in mirror mode (the
    HOMER tab shows it as "Date modified"); in check mode the verdicts are this moment's."""
    sync = app.get(MIRROR_SYNC)
    synced = None if sync is None else sync.mirror.last_sync or sync.mirror.last_full_sync
    return int(synced if synced is not None else time.time())


async def detections_list(request: web.Request) -> web.Response:
    book = request.app.get(DETECTIONS)
    query = request.query
    rule = query.get("rule", "").replace("-", "_")
    action = query.get("action", "")
    since_text = query.get("since", "0")
    if rule and rule not in RULES:
        return error_response(f"rule must be one of {', '.join(rule_name(r) for r in RULES)}", 400)
    if action not in ("", "serve", "flag"):
        return error_response("action must be serve or flag", 400)
    if not _UNIX_SECONDS.fullmatch(since_text):
        return error_response("since must be unix seconds", 400)
    since = int(since_text)
    chosen = (
        []
        if book is None
        else [
            d
            for d in book.active()
            if (not rule or rule in d.rules) and (not action or d.action == action) and d.since >= since
        ]
    )
    chosen.sort(key=lambda d: d.since, reverse=True)
    return json_response({"detections": [d.to_json() for d in chosen], "enabled": book is not None})


async def sightings_list(request: web.Request) -> web.Response:
    listed_text = request.query.get("listed")
    filters = {"true": True, "false": False, "null": None}
    if listed_text is not None and listed_text not in filters:
        return error_response("listed must be true, false or null", 400)
    limit_text = request.query.get("limit", "1000")
    if not _LIMIT.fullmatch(limit_text) or int(limit_text) > MAX_SIGHTINGS_LIMIT:
        return error_response(f"limit must be a whole number from 0 to {MAX_SIGHTINGS_LIMIT}", 400)
    limit = int(limit_text)
    sightings = request.app[SIGHTINGS]
    listed = None if listed_text is None else (filters[listed_text],)
    chosen = (
        sightings.values() if listed is None else (s for s in sightings.values() if s.listed is listed[0])
    )
    picked = [s for _, s in zip(range(limit), chosen, strict=False)]
    body: dict[str, Any] = {}
    shared = request.app.get(SHARED_SIGHTINGS)
    if shared is not None:  # what every agent saw; this agent's view alone (partial) if the store fails
        everyone = await shared.recent(limit, [s.ip for s in picked])
        body["partial"] = everyone is None
        if everyone is not None:
            picked = _newest(request.app, everyone.values(), listed, limit)
    items = [_sighting_json(request.app, s) for s in picked]
    return json_response({"sightings": items, "total": len(sightings), **body})


def _newest(
    app: web.Application, merged: Iterable[Sighting], listed: tuple[bool | None] | None, limit: int
) -> list[Sighting]:
    """Merged sightings newest first, those only other agents saw given this agent's verdict if it
    needs no upstream request (the mirror's, the cache's)."""
    lookups = app[LOOKUPS]
    chosen = []
    for sighting in sorted(merged, key=_last_seen, reverse=True):
        if sighting.verdict is None:
            sighting.verdict = lookups.answer_now(sighting.address)
        if listed is None or sighting.listed is listed[0]:
            chosen.append(sighting)
    return chosen[:limit]


def _last_seen(sighting: Sighting) -> float:
    return sighting.last_seen


def _sighting_json(app: web.Application, sighting: Sighting) -> dict[str, Any]:
    body = sighting.to_json()
    book = app.get(DETECTIONS)
    detection = book.get(sighting.ip) if book is not None else None
    if detection is not None:
        body["detected"] = detection.to_json()
    return body


async def check_one(request: web.Request) -> web.Response:
    text = request.match_info["ip"]
    address = parse_ip(text)
    if address is None:
        return error_response(f"{text[:100]!r} is not an IP address", 400)
    verdict = await request.app[LOOKUPS].lookup(address, request.app[SETTINGS].agent.deadline)
    return json_response(verdict.to_json())


async def check_many(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await read_body(request, request.app[SETTINGS].agent.body_timeout))
    except orjson.JSONDecodeError:
        return error_response("request body is not JSON", 400)
    ips = body.get("ips") if isinstance(body, dict) else None
    if not isinstance(ips, list):
        return error_response('expected {"ips": ["1.2.3.4", ...]}', 400)
    if len(ips) > MAX_CHECK_IPS:
        return error_response(f"at most {MAX_CHECK_IPS} IPs per request", 400)
    addresses = [parse_ip(ip) for ip in ips]
    valid = [a for a in addresses if a is not None]
    verdicts = iter(await request.app[LOOKUPS].lookup_many(valid, request.app[SETTINGS].agent.deadline))
    results = [
        next(verdicts).to_json() if address is not None else _invalid(ip)
        for ip, address in zip(ips, addresses, strict=True)
    ]
    return json_response({"results": results})


def _invalid(value: object) -> dict[str, Any]:
    # Echo what was sent (as JSON text for non-strings) so each result can be matched to its input.
    shown = value if isinstance(value, str) else orjson.dumps(value).decode()
    return Verdict(shown[:100], None, "invalid", reason="not an IP address").to_json()


MAX_DOWNLOAD_IPS = DOWNLOAD_IPS  # addresses a download may name: what the answer's __hep__ names
MAX_DOWNLOAD_BYTES = 2 * 1024 * 1024  # of SIP payload in one pcap; the newest packets are kept
PCAP_TYPE = "application/vnd.tcpdump.pcap"


async def evidence_pcap(request: web.Request) -> web.Response:
    """``GET /api/v1/evidence/{ip}.pcap``: the SIP packets kept of one address (header only: none)."""
    text = request.match_info["ip"]
    address = parse_ip(text)
    if address is None:
        return error_response(f"{text[:100]!r} is not an IP address", 400)
    packets = _evidence(request.app).packets([address.text], MAX_DOWNLOAD_BYTES)
    filename = f"evidence-{address.text.replace(':', '_')}.pcap"
    return _pcap_response(pcap_file(packets), filename)


async def download(request: web.Request) -> web.Response:
    """``POST {agent.path}/download``: HOMER's Download PCAP button, through homer-app.

    homer-app posts the UI's ``search["1_call"]`` object, ``{"__hep__": [{"ips": [...]}], ...}``,
    and saves whatever comes back as a .pcap: so the answer is a pcap whatever the body was
    (header only when it names nothing kept), never JSON.
    """
    try:
        raw = await read_body(request, request.app[SETTINGS].agent.body_timeout)
    except BodyError as exc:
        log.debug("download request not read (%s): answering an empty pcap", exc.message)
        raw = b""
    ips = download_ips(raw)
    if ips is None:
        log.debug("download request without __hep__[0].ips: answering an empty pcap")
        ips = []
    packets = _evidence(request.app).packets(ips, MAX_DOWNLOAD_BYTES)
    return _pcap_response(pcap_file(packets), "evidence.pcap")


def download_ips(raw: bytes) -> list[str] | None:
    """The canonical addresses ``__hep__[0].ips`` names (the first MAX_DOWNLOAD_IPS that are IPs);
    None when the body does not have that shape."""
    body = loads_object(raw)
    hep = body.get("__hep__") if body is not None else None
    first = hep[0] if isinstance(hep, list) and hep else None
    ips = first.get("ips") if isinstance(first, dict) else None
    if not isinstance(ips, list):
        return None
    addresses = (parse_ip(ip) for ip in ips[:MAX_DOWNLOAD_IPS] if isinstance(ip, str))
    return [address.text for address in addresses if address is not None]


def _evidence(app: web.Application) -> Evidence:
    # The collector's context sets it; before that (or without it) there is nothing kept.
    kept = app.get(EVIDENCE)
    return kept if kept is not None else Evidence(frozenset())


def _pcap_response(body: bytes, filename: str) -> web.Response:
    return web.Response(
        body=body,
        content_type=PCAP_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    lookups = request.app.get(LOOKUPS)
    if lookups is None or not lookups.ready:
        return json_response({"ready": False, "reason": "the APIBAN list is not loaded yet"}, 503)
    # Ready whatever HEP ingest or the store do: enrichment answers from memory, and a probe that
    # failed would take the agent out of homer-app's reach. What is wrong is said, for whoever looks.
    body: dict[str, Any] = {"ready": True}
    pool = request.app.get(COLLECTOR)
    if isinstance(pool, WorkerPool):
        body["hep_workers"] = workers = {"up": pool.up(), "configured": len(pool.slots)}
        if not workers["up"]:
            body["hep"] = "no HEP worker process is running: restarting them"
    link = request.app.get(STORE_LINK)
    if link is not None and not link.status.connected:
        body["store"] = "unreachable: answering from memory, reconnecting"
    return json_response(body)


async def status(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    client = app[APIBAN]
    lookups = app[LOOKUPS]
    registrar = app.get(REGISTRAR)
    error = client.last_error
    body = {
        "version": __version__,
        "uptime": round(time.time() - app[STARTED_AT], 3),
        "apiban": {
            "url": settings.apiban.url,
            "mode": settings.apiban.mode,
            "key_configured": bool(settings.apiban.key),
            "budget": {
                "limit": str(settings.apiban.rate_limit),
                "used": client.budget.used(),
                "next_request_in": round(client.budget.wait_time(), 3),
            },
            "requests_sent": client.requests_sent(),
            "last_success": client.last_success,
            "last_error": None if error is None else {"at": error.at, "message": error.message},
        },
        "mirror": _mirror_status(request.app),
        "store": _store_status(app),
        "hep": _hep_status(request.app),
        "refusals": app[REFUSALS].to_json(),
        "detection": _detection_status(app),
        "lookups": {
            "ready": lookups.ready,
            "cache_entries": lookups.cache_size(),
            "in_flight": lookups.in_flight(),
            "answers": {f"{source}/{verdict}": n for (source, verdict), n in sorted(lookups.answers.items())},
        },
        "registration": {
            "homer_url": settings.homer.url or None,
            "uuid": app[AGENT_UUID],
            "node": settings.agent.node,
            "type": settings.agent.registered_type,
            "endpoint": f"http://{settings.agent.host}:{settings.agent.port}{settings.agent.path}/{settings.agent.registered_type}"
            if settings.agent.host
            else None,
            **(registrar.status.to_json() if registrar else {"state": "disabled"}),
        },
    }
    return json_response(body)


def _detection_status(app: web.Application) -> dict[str, Any]:
    book, detector = app.get(DETECTIONS), app.get(DETECTOR)
    if book is None or detector is None:
        return {"enabled": False}
    counts = book.counts()
    return {
        "enabled": True,
        "active": {"serve": counts["serve"], "flag": counts["flag"]},
        "findings": {
            f"{rule_name(rule)}/{outcome}": n for (rule, outcome), n in sorted(book.stats.findings.items())
        },
        "breaker_trips": book.stats.breaker_trips,
        "tracked": detector.tracked() + _worker_tracked(app),
        "exempted": detector.stats.exempted,
        "retransmissions": detector.stats.retransmissions,
    }


def _worker_tracked(app: web.Application) -> int:
    pool = app.get(COLLECTOR)
    return pool.tracked() if isinstance(pool, WorkerPool) else 0


def _hep_status(app: web.Application) -> dict[str, Any]:
    collector, sightings = app[COLLECTOR], app[SIGHTINGS]
    stats, hep = collector.stats, app[SETTINGS].hep
    return {
        "udp_listen": _address(collector.udp_address()),
        "tcp_listen": _address(collector.tcp_address()),
        # Whether a key is asked for, never the key; what is refused is under "refusals".
        "allow_from": [str(network) for network in hep.allow_from],
        "auth_key_required": bool(hep.auth_key),
        "packets": dict(stats.packets),
        "bad_packets": dict(stats.bad),
        "non_sip_packets": {str(k): v for k, v in stats.non_sip.items()},
        "unparsable_sip": stats.unparsable_sip,
        "udp_receive_buffer": stats.rcvbuf_granted,
        "udp_kernel_drops": collector.kernel_drops(),
        "workers": collector.to_json() if isinstance(collector, WorkerPool) else None,
        "tcp_connections": {
            "open": stats.tcp_open,
            "accepted": stats.tcp_accepted,
            "refused_over_cap": stats.tcp_refused,
            "closed_bad_stream": stats.tcp_closed_bad,
            "closed_idle": stats.tcp_idle_closed,
            "closed_no_packet_in_time": stats.tcp_packet_timeouts,
            "closed_for_room": stats.tcp_evicted,
            "max": hep.max_connections,
            "max_per_sender": hep.max_connections_per_sender,
        },
        "sightings": {
            "ips": len(sightings),
            "listed": sightings.listed_count(),
            "listed_packets": sightings.listed_packets,
            "evicted": sightings.evicted,
            "capacity": sightings.capacity,
            "protected": sightings.protected_count(),
            "evicted_protected": sightings.evicted_protected,
        },
    }


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _store_status(app: web.Application) -> dict[str, Any] | None:
    link = app.get(STORE_LINK)
    if link is None:
        return None
    body = link.to_json()
    sharing = app.get(SHARED_SIGHTINGS)
    if sharing is not None:
        body["sightings"] = sharing.to_json()
    detections = app.get(SHARED_DETECTIONS)
    if detections is not None:
        body["detections"] = detections.to_json()
    return body


def _mirror_status(app: web.Application) -> dict[str, Any] | None:
    sync = app.get(MIRROR_SYNC)
    if sync is None:
        return None
    mirror, status = sync.mirror, sync.status
    rejected = status.full_pull_rejected
    now = time.time()
    return {
        "loaded": mirror.loaded,
        "entries": len(mirror.entries),
        "state": status.state,
        "position": mirror.cursor,
        "full_pull_in_progress": mirror.full_pull_started is not None,
        "pages_received": status.pages,
        "last_sync": mirror.last_sync,
        "last_sync_age": None if mirror.last_sync is None else round(now - mirror.last_sync, 3),
        "last_full_sync": mirror.last_full_sync,
        "next_sync": status.next_sync,
        "consecutive_failures": status.consecutive_failures,
        "last_full_entries": mirror.last_full_entries,
        "full_pull_rejected": None if rejected is None else rejected.to_json(),
        "full_pulls_rejected": status.full_pulls_rejected,
        "dropped": dict(mirror.dropped),
        "snapshot": {
            "loaded_at_start": status.snapshot_loaded,
            "rejected_because": status.snapshot_error,
            "last_saved": status.snapshot_saved,
        },
    }


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8", headers={}
    )


def setup_routes(app: web.Application, enrichment_path: str) -> None:
    # Before the enrichment route: aiohttp before 3.10 matched in this order and would give
    # "download" to {type} (later ones prefer the plain path anyway).
    app.router.add_post(f"{enrichment_path}/download", download)
    app.router.add_post(f"{enrichment_path}/{{type}}", enrich)
    app.router.add_get("/api/v1/check/{ip}", check_one)
    app.router.add_post("/api/v1/check", check_many)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/sightings", sightings_list)
    app.router.add_get("/api/v1/detections", detections_list)
    app.router.add_get("/api/v1/evidence/{ip}.pcap", evidence_pcap)
