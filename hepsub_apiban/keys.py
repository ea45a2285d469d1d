"""Typed keys for what the application holds (aiohttp ``AppKey``s), in one place.

Handlers and the application factory both need them; keeping them here lets the web layer
and the factory share names without importing each other.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .apiban.client import ApibanClient
from .apiban.lookups import LookupService
from .apiban.mirror import MirrorSync
from .core.access import Refusals
from .core.config import Settings
from .core.logs import Redactor
from .detection.book import Detections
from .detection.detector import Detector
from .homer.registration import Registrar
from .ingest.collector import HepCollector
from .ingest.evidence import Evidence
from .ingest.sightings import Sightings
from .metrics import Metrics
from .site.api import SiteApi
from .site.blocklist import Blocklist
from .store.budget import SharedBudget
from .store.detections import SharedDetections
from .store.link import StoreLink
from .store.sightings import SharedSightings

SETTINGS = web.AppKey("settings", Settings)
REDACTOR = web.AppKey("redactor", Redactor)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
APIBAN = web.AppKey("apiban", ApibanClient)
LOOKUPS = web.AppKey("lookups", LookupService)
REGISTRAR = web.AppKey("registrar", Registrar)
AGENT_UUID = web.AppKey("agent_uuid", str)
STARTED_AT = web.AppKey("started_at", float)
METRICS = web.AppKey("metrics", Metrics)
MIRROR_SYNC = web.AppKey("mirror_sync", MirrorSync)
SIGHTINGS = web.AppKey("sightings", Sightings)
SHARED_SIGHTINGS = web.AppKey("shared_sightings", SharedSightings)
SHARED_DETECTIONS = web.AppKey("shared_detections", SharedDetections)
COLLECTOR = web.AppKey("collector", HepCollector)
SITE_API = web.AppKey("site_api", SiteApi)
REFUSALS = web.AppKey("refusals", Refusals)
DETECTOR = web.AppKey("detector", Detector)
DETECTIONS = web.AppKey("detections", Detections)
BLOCKLIST = web.AppKey("blocklist", Blocklist)
EVIDENCE = web.AppKey("evidence", Evidence)
STORE_LINK = web.AppKey("store_link", StoreLink)
SHARED_BUDGET = web.AppKey("shared_budget", SharedBudget)
