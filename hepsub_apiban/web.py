"""HTTP API: the agent's route table (HOMER enrichment, verdict lookups, health, status, metrics).

The handlers live by concern in ``web_middleware`` (JSON errors, ``agent.allow_from``),
``web_enrichment`` (homer-app's enrichment, always a 200 with a JSON object), ``web_listings``
(checks, sightings, detections, pcaps) and ``web_status`` (probes, status, metrics); this module puts
them on their paths (``setup_routes``) and re-exports them. Nothing but the app factory imports it.
"""

from __future__ import annotations

from aiohttp import web

from .web_enrichment import _known, answer_enrichment, enrich
from .web_listings import (
    MAX_CHECK_IPS,
    MAX_DOWNLOAD_BYTES,
    MAX_DOWNLOAD_IPS,
    MAX_SIGHTINGS_LIMIT,
    PCAP_TYPE,
    check_many,
    check_one,
    detections_list,
    download,
    download_ips,
    evidence_pcap,
    sightings_list,
)
from .web_middleware import OPEN_PATHS, allow_from, error_response, json_errors
from .web_status import healthz, metrics, readyz, status

__all__ = [
    "MAX_CHECK_IPS",
    "MAX_DOWNLOAD_BYTES",
    "MAX_DOWNLOAD_IPS",
    "MAX_SIGHTINGS_LIMIT",
    "OPEN_PATHS",
    "PCAP_TYPE",
    "_known",
    "allow_from",
    "answer_enrichment",
    "check_many",
    "check_one",
    "detections_list",
    "download",
    "download_ips",
    "enrich",
    "error_response",
    "evidence_pcap",
    "healthz",
    "json_errors",
    "metrics",
    "readyz",
    "setup_routes",
    "sightings_list",
    "status",
]


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
