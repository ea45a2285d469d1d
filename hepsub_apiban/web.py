"""HTTP API: HOMER enrichment, verdict lookups, health, status and metrics.

The enrichment route is called by homer-app, whose UI shows no HEPSUB data from *any* agent
when one agent fails; so that route answers 200 with a JSON object whatever happens (bad body,
APIBAN down, a bug), within the configured deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .addresses import parse_ip
from .enrichment import BadEnrichmentRequest, build_answer, parse_request
from .jsonutil import json_response
from .keys import (
    AGENT_UUID,
    APIBAN,
    COLLECTOR,
    LOOKUPS,
    METRICS,
    MIRROR_SYNC,
    REFUSALS,
    REGISTRAR,
    SETTINGS,
    SIGHTINGS,
    STARTED_AT,
)
from .lookups import Verdict

log = logging.getLogger(__name__)
MAX_CHECK_IPS = 1000


def error_response(message: str, status: int) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
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
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response("internal error; see the agent's log", 500)
    return response


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
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_response({"error": "request body too large"}), "bad_request"
    return await answer_enrichment(request.app, raw)


async def answer_enrichment(app: web.Application, raw: bytes) -> tuple[web.Response, str]:
    """The answer to a body already read: the part of a request that holds the event loop
    (bounded by the enrichment.* settings; bench/enrichment_limits.py times it)."""
    settings = app[SETTINGS]
    try:
        parsed = parse_request(raw, settings.enrichment)
    except BadEnrichmentRequest as exc:
        return json_response({"error": str(exc)}), "bad_request"
    verdicts = await app[LOOKUPS].lookup_many(parsed.addresses, settings.agent.deadline)
    answer = build_answer(parsed, verdicts, _seen(app, parsed.fields))
    return web.Response(body=answer, content_type="application/json"), "ok"


def _seen(app: web.Application, ips: Iterable[str]) -> dict[str, dict[str, Any]] | None:
    """What the HEP capture saw of the call's IPs, added to their verdicts."""
    sightings = app[SIGHTINGS]
    if not len(sightings):
        return None
    known = {ip: sightings.get(ip) for ip in ips}
    return {ip: s.summary() for ip, s in known.items() if s is not None} or None


async def sightings_list(request: web.Request) -> web.Response:
    listed_text = request.query.get("listed")
    filters = {"true": True, "false": False, "null": None}
    if listed_text is not None and listed_text not in filters:
        return error_response("listed must be true, false or null", 400)
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return error_response("limit must be a whole number", 400)
    sightings = request.app[SIGHTINGS]
    chosen = (
        sightings.values()
        if listed_text is None
        else (s for s in sightings.values() if s.listed is filters[listed_text])
    )
    items = [s.to_json() for _, s in zip(range(max(0, limit)), chosen, strict=False)]
    return json_response({"sightings": items, "total": len(sightings)})


async def check_one(request: web.Request) -> web.Response:
    text = request.match_info["ip"]
    address = parse_ip(text)
    if address is None:
        return error_response(f"{text[:100]!r} is not an IP address", 400)
    verdict = await request.app[LOOKUPS].lookup(address, request.app[SETTINGS].agent.deadline)
    return json_response(verdict.to_json())


async def check_many(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
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


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    lookups = request.app.get(LOOKUPS)
    if lookups is None or not lookups.ready:
        return json_response({"ready": False, "reason": "the APIBAN list is not loaded yet"}, 503)
    return json_response({"ready": True})


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
        "hep": _hep_status(request.app),
        "refusals": app[REFUSALS].to_json(),
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
            "type": settings.agent.type,
            "endpoint": f"http://{settings.agent.host}:{settings.agent.port}{settings.agent.path}/{settings.agent.type}"
            if settings.agent.host
            else None,
            **(registrar.status.to_json() if registrar else {"state": "disabled"}),
        },
    }
    return json_response(body)


def _hep_status(app: web.Application) -> dict[str, Any]:
    collector, sightings = app[COLLECTOR], app[SIGHTINGS]
    stats = collector.stats
    return {
        "udp_listen": _address(collector.udp_address()),
        "tcp_listen": _address(collector.tcp_address()),
        "packets": dict(stats.packets),
        "bad_packets": dict(stats.bad),
        "non_sip_packets": {str(k): v for k, v in stats.non_sip.items()},
        "unparsable_sip": stats.unparsable_sip,
        "udp_receive_buffer": stats.rcvbuf_granted,
        "udp_kernel_drops": collector.kernel_drops(),
        "tcp_connections": {
            "open": stats.tcp_open,
            "accepted": stats.tcp_accepted,
            "refused_over_cap": stats.tcp_refused,
            "closed_bad_stream": stats.tcp_closed_bad,
            "closed_idle": stats.tcp_idle_closed,
        },
        "sightings": {
            "ips": len(sightings),
            "listed": sightings.listed_count(),
            "listed_packets": sightings.listed_packets,
            "evicted": sightings.evicted,
            "capacity": sightings.capacity,
        },
    }


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


def _mirror_status(app: web.Application) -> dict[str, Any] | None:
    sync = app.get(MIRROR_SYNC)
    if sync is None:
        return None
    mirror, status = sync.mirror, sync.status
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
    app.router.add_post(f"{enrichment_path}/{{type}}", enrich)
    app.router.add_get("/api/v1/check/{ip}", check_one)
    app.router.add_post("/api/v1/check", check_many)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/sightings", sightings_list)
