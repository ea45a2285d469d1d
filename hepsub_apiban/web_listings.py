"""The operators' routes that look things up and list them: verdicts, sightings, detections, pcaps.

``/api/v1/check`` answers verdicts for given addresses; ``/api/v1/sightings`` and
``/api/v1/detections`` list what the capture saw and what the rules found (merged with every agent's
view when a store is shared); ``/api/v1/evidence/{ip}.pcap`` and HOMER's Download PCAP button
(``download``) write the kept SIP packets out as a pcap. Every query, body and answer is bounded
(``MAX_CHECK_IPS``, ``MAX_SIGHTINGS_LIMIT``, ``MAX_DOWNLOAD_IPS``, ``MAX_DOWNLOAD_BYTES``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from .apiban.lookups import Verdict
from .core.addresses import parse_ip
from .core.config import RULES
from .core.httpserver import BodyError, read_body
from .core.jsonutil import json_response, loads_object
from .detection.detector import rule_name
from .homer.enrichment import DOWNLOAD_IPS
from .ingest.evidence import Evidence
from .ingest.pcap import pcap_file
from .ingest.sightings import Sighting
from .keys import (
    DETECTIONS,
    EVIDENCE,
    LOOKUPS,
    SETTINGS,
    SHARED_SIGHTINGS,
    SIGHTINGS,
)
from .web_middleware import error_response

log = logging.getLogger("hepsub_apiban.web")  # the name it had before web.py was split
MAX_CHECK_IPS = 1000
MAX_SIGHTINGS_LIMIT = 10_000  # one answer stays a few MB, built in tens of ms
_UNIX_SECONDS = re.compile("[0-9]{1,12}")
_LIMIT = re.compile("[0-9]{1,5}")  # ASCII digits only: int() also takes "١٢" and "1_000"


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
