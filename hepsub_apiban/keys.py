"""Typed keys for what the application holds (aiohttp ``AppKey``s), in one place.

Handlers and the application factory both need them; keeping them here lets the web layer
and the factory share names without importing each other.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .access import Refusals
from .apiban import ApibanClient
from .blocklist import Blocklist
from .collector import HepCollector
from .config import Settings
from .detection import Detector
from .detections import Detections
from .evidence import Evidence
from .logs import Redactor
from .lookups import LookupService
from .metrics import Metrics
from .mirror import MirrorSync
from .registration import Registrar
from .shared_budget import SharedBudget
from .shared_detections import SharedDetections
from .shared_mirror import StoreLink
from .shared_sightings import SharedSightings
from .sightings import Sightings
from .site_api import SiteApi

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
