"""The routes that say how the agent is: liveness, readiness, the status document and the metrics.

``/healthz`` answers while the process runs; ``/readyz`` once the APIBAN list is loaded, whatever
HEP ingest or the store do (enrichment answers from memory), saying what is wrong for whoever looks;
``/api/v1/status`` gathers every part's state in one JSON document (never a secret: whether a key is
set, never the key); ``/metrics`` renders the Prometheus registry.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from . import __version__
from .core.jsonutil import json_response
from .detection.detector import rule_name
from .ingest.workers import WorkerPool
from .keys import (
    AGENT_UUID,
    APIBAN,
    COLLECTOR,
    DETECTIONS,
    DETECTOR,
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
