"""The enrichment route homer-app calls for a call's HEPSUB tab, and the answer it gets.

homer-app's UI shows no HEPSUB data from *any* agent when one agent fails; so ``enrich`` answers 200
with a JSON object whatever happens (bad body, APIBAN down, a bug), within ``agent.deadline``.
``answer_enrichment`` is the part that holds the event loop once the body is read (the benches call
it directly); ``_known`` adds what the capture saw of each address and its active detection.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from .core.httpserver import BodyError, read_body
from .core.jsonutil import json_response
from .detection.book import Detection
from .homer.enrichment import BadEnrichmentRequest, Known, build_answer, parse_request
from .ingest.sightings import Sighting
from .keys import (
    DETECTIONS,
    LOOKUPS,
    METRICS,
    MIRROR_SYNC,
    SETTINGS,
    SHARED_SIGHTINGS,
    SIGHTINGS,
)

log = logging.getLogger("hepsub_apiban.web")  # the name it had before web.py was split


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
