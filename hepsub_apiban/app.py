"""The application factory: wires settings, clients, services and routes into one aiohttp app.

Every background task and client session is owned by a ``cleanup_ctx`` context, so startup
and shutdown happen in one well-defined order: HTTP session, then APIBAN client, lookups and
the mirror sync, then the HEP collector, then the HOMER registration. So the agent registers
only once its listeners are bound, and unregisters before the session closes. The contexts
themselves are in ``app_contexts``; this module builds what exists before the start (the
middlewares, the routes, the site API) and says in one line what the agent will do
(``startup_summary``).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from .apiban.mirror import CurrentMirror
from .app_contexts import (
    USER_AGENT,
    Clocks,
    _collector,
    _detection,
    _detections_sharing,
    _http_session,
    _lookups,
    _metrics,
    _registration,
    _Serials,
    _sightings_sharing,
    _store_link,
)
from .core.access import Refusals, SourceFilter
from .core.addresses import NetworkSet
from .core.config import Settings
from .core.httpserver import handler_args, quiet_bad_requests
from .core.logs import Redactor
from .core.state import ensure_state_dir, load_or_create_uuid
from .detection.book import Detections
from .ingest.workers import WorkerPool
from .keys import (
    AGENT_UUID,
    BLOCKLIST,
    COLLECTOR,
    MIRROR_SYNC,
    REDACTOR,
    REFUSALS,
    SETTINGS,
    SITE_API,
    STARTED_AT,
)
from .site.access import SiteAccess
from .site.api import SiteApi
from .site.blocklist import Blocklist
from .site.decisions import DecisionApi
from .web import allow_from, json_errors, setup_routes

__all__ = ["USER_AGENT", "Clocks", "create_app", "startup_summary"]

REAL_TIME = Clocks()  # create_app's default: the system's clocks and asyncio.sleep


def create_app(
    settings: Settings, *, redactor: Redactor | None = None, clocks: Clocks = REAL_TIME
) -> web.Application:
    """The agent as one aiohttp application: settings in, every object built whole and put under its
    ``AppKey`` (keys.py), routes added, background work in ``cleanup_ctx`` contexts.

    Built here, before anything runs: the middlewares, the refusals, the agent's UUID, the mirror's
    holder (``CurrentMirror``), the detection book and detector (a saved book is read back), and the
    site API's blocklist, which serves both (routes are fixed before the start).
    Built at startup, in this order: the HTTP session; the APIBAN client, the lookups and the mirror
    sync; the store link; the sightings, evidence and the HEP collector (or worker pool);
    the store sharing; the HOMER registration (once the listeners are bound); the metrics (last, once
    every source exists). Shutdown runs the other way round. Used by ``cli serve``, the demo, the
    tests and the benches; nothing else builds these objects for a running agent.

    Never makes a network request and never starts a task: it only builds (a state dir that cannot be
    written is a ``ConfigError`` here, not a traceback half-way through the start).
    """
    agent = settings.agent
    middlewares: list[Middleware] = [json_errors]
    if agent.allow_from:
        middlewares.append(allow_from(SourceFilter(agent.allow_from)))
    app = web.Application(
        middlewares=middlewares, client_max_size=agent.max_body_bytes, handler_args=handler_args(agent)
    )
    quiet_bad_requests()
    app[SETTINGS] = settings
    app[REDACTOR] = redactor or Redactor(settings.secrets())
    app[REFUSALS] = Refusals(clock=clocks.monotonic)
    app[STARTED_AT] = clocks.wall()
    if settings.apiban.mode == "mirror" or not settings.agent.uuid or settings.detect.enabled:
        # Before anything starts: a state dir that cannot take a write (full disk included) is a
        # one-line error naming state.dir, not a traceback half-way through the start.
        ensure_state_dir(settings.state.dir)
    app[AGENT_UUID] = settings.agent.uuid or load_or_create_uuid(settings.state.dir)
    # One holder for the mirror, built before the routes: the site API and the lookups read through
    # it, and a loaded snapshot or the store's copy replaces what it holds (mirror.CurrentMirror).
    current = CurrentMirror() if settings.apiban.mode == "mirror" else None
    # Served detections take their IDs from the mirror's sequence, so site clients see one list.
    serials: CurrentMirror | _Serials = current if current is not None else _Serials()
    book = _detection(app, serials, clocks) if settings.detect.enabled else None
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_lookups(clocks, current))
    if settings.store.url:
        app.cleanup_ctx.append(_store_link(clocks))
    app.cleanup_ctx.append(_collector(clocks, serials))
    if settings.store.url:
        app.cleanup_ctx.append(_sightings_sharing)
        app.cleanup_ctx.append(_detections_sharing)
    app.cleanup_ctx.append(_registration(clocks))
    app.cleanup_ctx.append(_metrics)
    setup_routes(app, settings.agent.path.rstrip("/"))
    if settings.site.keys:
        _site_routes(app, clocks, current, book)
    return app


def _site_routes(
    app: web.Application, clocks: Clocks, current: CurrentMirror | None, book: Detections | None
) -> None:
    """The APIBAN-compatible site API and the CrowdSec decision API: one blocklist, one key gate.
    Registered after the agent's own routes, so /api/v1/... is never taken for a key."""
    settings = app[SETTINGS]
    access = SiteAccess(
        settings.site.keys,
        settings.site.rate_limit,
        clocks.monotonic,
        auth_failure_limit=settings.site.auth_failure_limit,
        refusals=app[REFUSALS],
    )
    blocklist = Blocklist(
        NetworkSet(settings.allow.cidrs),
        include_local=settings.site.include_local,
        clock=clocks.wall,
        mirror=current,
        book=book,
    )
    app[BLOCKLIST] = blocklist
    app[SITE_API] = SiteApi(access, blocklist, body_timeout=settings.agent.body_timeout)
    app.router.add_routes(app[SITE_API].routes())
    app.router.add_routes(DecisionApi(access, blocklist, clocks.monotonic).routes())


def startup_summary(app: web.Application) -> str:
    """The one line an operator reads first: what the agent will do and how far it is."""
    settings = app[SETTINGS]
    sync = app.get(MIRROR_SYNC)
    if sync is None:
        lookups = "mode check (one /check per new IP, within the budget)"
    elif sync.mirror.loaded:
        lookups = f"mode mirror, {len(sync.mirror.entries):,} listed addresses loaded from the snapshot"
    else:
        lookups = "mode mirror, pulling the whole APIBAN list (lookups fall back to /check until it is in)"
    registration = (
        f"registering with HOMER at {settings.homer.url} as {settings.agent.host}:{settings.agent.port}"
        f"{settings.agent.path}/{settings.agent.registered_type}"
        if settings.homer.url
        else "no HOMER registration (homer.url is empty)"
    )
    collector = app[COLLECTOR]
    addresses = (("udp", collector.udp_address()), ("tcp", collector.tcp_address()))
    listeners = [f"{name} {address[0]}:{address[1]}" for name, address in addresses if address]
    hep = "HEP on " + ", ".join(listeners) if listeners else "no HEP listener"
    if isinstance(collector, WorkerPool) and listeners:
        hep += f" ({len(collector.slots)} worker processes)"
    # Absolute: a relative state.dir depends on where the agent was started.
    state = f"state in {settings.state.dir.absolute()}"
    return f"{lookups}; {registration}; {hep}; {_site_summary(settings)}; {state}"


def _site_summary(settings: Settings) -> str:
    keys = len(settings.site.keys)
    if not keys:
        return "no site API (site.keys is empty)"
    local = settings.detect.enabled and settings.site.include_local
    if settings.apiban.mode == "check":
        served = "local detections only"
    else:
        served = "the APIBAN list" + (" and local detections" if local else "")
    return (
        f"site API for {keys} key{'s' if keys > 1 else ''} on /api/{{key}}/banned and "
        f"/v1/decisions/stream, serving {served}"
    )
