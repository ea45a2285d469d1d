"""The application factory: wires settings, clients, services and routes into one aiohttp app.

Every background task and client session is owned by a ``cleanup_ctx`` context, so startup
and shutdown happen in one well-defined order: HTTP session, then APIBAN client, lookups and
the mirror sync, then the HEP collector, then the HOMER registration. So the agent registers
only once its listeners are bound, and unregisters before the session closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from . import __version__
from .apiban.client import ApibanClient
from .apiban.lookups import CachePolicy, LookupService
from .apiban.mirror import CurrentMirror, MirrorSync, snapshot_source
from .core.access import Refusals, SourceFilter
from .core.addresses import NetworkSet
from .core.config import Settings
from .core.httpserver import handler_args, quiet_bad_requests
from .core.logs import Redactor
from .core.ratelimit import Budget
from .core.state import ensure_state_dir, load_or_create_uuid
from .core.timing import Sleep
from .core.trouble import FailureRun
from .detection.book import Detections
from .detection.detector import Detector, Report
from .homer.registration import Registrar
from .ingest.collector import HepCollector
from .ingest.evidence import Evidence
from .ingest.sightings import Sightings
from .ingest.workers import WorkerPool
from .keys import (
    AGENT_UUID,
    APIBAN,
    BLOCKLIST,
    COLLECTOR,
    DETECTIONS,
    DETECTOR,
    EVIDENCE,
    HTTP_SESSION,
    LOOKUPS,
    METRICS,
    MIRROR_SYNC,
    REDACTOR,
    REFUSALS,
    REGISTRAR,
    SETTINGS,
    SHARED_BUDGET,
    SHARED_DETECTIONS,
    SHARED_SIGHTINGS,
    SIGHTINGS,
    SITE_API,
    STARTED_AT,
    STORE_LINK,
)
from .metrics import Metrics, Sources
from .site.access import SiteAccess
from .site.api import SiteApi
from .site.blocklist import Blocklist
from .site.decisions import DecisionApi
from .store.budget import SharedBudget
from .store.database import STORE_FAILURES
from .store.detections import SharedDetections
from .store.mirror import StoreLink, process_holder
from .store.sightings import SharedSightings
from .web import allow_from, json_errors, setup_routes

USER_AGENT = f"hepsub-apiban/{__version__}"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Clocks:
    """Time sources, injectable so tests can move time instead of waiting for it."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Sleep = field(default=asyncio.sleep)


def create_app(
    settings: Settings, *, redactor: Redactor | None = None, clocks: Clocks = Clocks()
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


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # One session per process for APIBAN and HOMER; per-request timeouts are set by each client.
    session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
    app[HTTP_SESSION] = session
    yield
    await session.close()


def _lookups(
    clocks: Clocks, current: CurrentMirror | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        budget = Budget(settings.apiban.rate_limit, clocks.monotonic)
        # With a store, the key's window is shared by its agents: check mode's /check requests
        # spend it, mirror mode's puller records its requests in it (store/budget.py).
        shared = (
            SharedBudget(
                budget,
                snapshot_source(settings.apiban.url, settings.apiban.key),
                process_holder(app[AGENT_UUID]),
                gating=current is None,
                monotonic=clocks.monotonic,
            )
            if settings.store.url
            else None
        )
        client = ApibanClient(
            app[HTTP_SESSION], settings.apiban, budget, app[REDACTOR], clocks.wall, shared=shared
        )
        policy = CachePolicy(
            settings.apiban.cache_size, settings.apiban.listed_ttl, settings.apiban.unlisted_ttl
        )
        allow = NetworkSet(settings.allow.cidrs)
        sync = _mirror_sync(app, client, current, clocks) if current is not None else None
        lookups = LookupService(
            client,
            allow,
            policy,
            mirror=current,
            clock=clocks.monotonic,
            wall_clock=clocks.wall,
            trouble=None if sync else FailureRun("APIBAN lookups", log, clock=clocks.monotonic),
        )
        app[APIBAN] = client
        app[LOOKUPS] = lookups
        if shared is not None:
            app[SHARED_BUDGET] = shared
        # With a store, the sync runs only while this agent holds the key's puller lease.
        task = None
        if sync is not None and not settings.store.url:
            task = asyncio.create_task(sync.run(), name="apiban-mirror-sync")
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await lookups.close()

    return context


def _collector(
    clocks: Clocks, serials: CurrentMirror | _Serials
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        book = app.get(DETECTIONS)
        sightings = Sightings(
            app[LOOKUPS],
            capacity=settings.sightings.max,
            check_share=settings.sightings.check_share,
            log_every=settings.apiban.poll_interval,
            clock=clocks.wall,
            detected=None if book is None else book.holds,
        )
        detector = None
        if book is not None:
            _detection_started(app, book, sightings, serials, clocks)
            detector = app[DETECTOR]
        evidence = Evidence(sightings.protected_addresses())
        collector = (
            HepCollector(sightings, settings.hep, clocks.wall, app[REFUSALS], detector, evidence)
            if settings.hep.workers == 1 or (settings.hep.udp is None and settings.hep.tcp is None)
            else WorkerPool(
                sightings, settings, clocks.wall, app[REFUSALS], detector, evidence, _book_report(app)
            )
        )
        app[SIGHTINGS] = sightings
        app[EVIDENCE] = evidence
        app[COLLECTOR] = collector
        upkeep = asyncio.create_task(_detection_upkeep(app, clocks), name="detection-upkeep")
        await collector.start()
        yield
        await collector.stop()
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
        _save_detections(app)
        await sightings.close()

    return context


LAST_FLUSH_TIMEOUT = 2.0  # seconds the shutdown waits to write the last sightings to the store


async def _sightings_sharing(app: web.Application) -> AsyncIterator[None]:
    """With store.url: sightings written to the store about once a second and read back by
    enrichment. The store is attached (``attach``) by whoever connects it; until then, memory."""
    sharing = SharedSightings(None, app[SIGHTINGS], app[AGENT_UUID])
    app[SHARED_SIGHTINGS] = sharing
    app[STORE_LINK].when_connected(sharing.attach)  # registered after the link, only with a store
    # Real time, as the detection upkeep: the injected sleep belongs to the sync loop tests drive.
    task = asyncio.create_task(sharing.run(), name="sightings-sharing")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sharing.flush(), LAST_FLUSH_TIMEOUT)


async def _detections_sharing(app: web.Application) -> AsyncIterator[None]:
    """With store.url and detection on: served detections written to the store and followed."""
    sharing = app.get(SHARED_DETECTIONS)
    task = None if sharing is None else asyncio.create_task(sharing.run(), name="detections-sharing")
    yield
    if sharing is not None:
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(TimeoutError, *STORE_FAILURES):
            await asyncio.wait_for(sharing.flush(), LAST_FLUSH_TIMEOUT)


DETECTIONS_FILE = "detections.json"
UPKEEP_EVERY = 10.0  # seconds between expiring detections, forgetting idle counters and saving


def _detection(app: web.Application, serials: CurrentMirror | _Serials, clocks: Clocks) -> Detections:
    """The book and the detector, built before the routes (the site API serves the book); a saved
    book comes back with its remaining durations. Numbered through ``serials`` (the mirror's
    holder in mirror mode), so a mirror replaced by the store's copy keeps numbering them."""
    settings = app[SETTINGS]
    book = Detections(settings.detect, serials.new_serial, clock=clocks.wall)
    authenticated = book.load(settings.state.dir / DETECTIONS_FILE)
    detector = Detector(settings.detect, book.report, allow=NetworkSet(settings.allow.cidrs))
    detector.restore_authenticated(authenticated, clocks.wall())
    app[DETECTIONS] = book
    app[DETECTOR] = detector
    return book


def _detection_started(
    app: web.Application,
    book: Detections,
    sightings: Sightings,
    serials: CurrentMirror | _Serials,
    clocks: Clocks,
) -> None:
    """At startup, once the mirror's snapshot is loaded and the sightings exist."""
    if isinstance(serials, CurrentMirror):
        # The snapshot numbered the list; the saved detections' IDs stay below what comes next.
        highest = max((d.serial or 0 for d in book.active()), default=-1)
        serials.next_serial = max(serials.next_serial, highest + 1)
    # The sightings and the book each tell the other: the sightings ask the book (``holds``, at
    # construction) and the book, built first for the site API's routes, tells them what changes.
    book.tell(sightings.flag)
    if STORE_LINK in app:
        # Served detections go to the store and come back with the ID every agent serves.
        sharing = SharedDetections(book, app[AGENT_UUID], serials, wall_clock=clocks.wall)
        app[SHARED_DETECTIONS] = sharing
        app[STORE_LINK].when_connected(sharing.attach)


def _book_report(app: web.Application) -> Report | None:
    book = app.get(DETECTIONS)
    return None if book is None else book.report


class _Serials:
    """Check mode has no mirror: the same numbering (milliseconds, always increasing) on its own."""

    def __init__(self) -> None:
        self.next_serial = 0

    def new_serial(self, now: float) -> int:
        serial = max(self.next_serial, int(now * 1000))
        self.next_serial = serial + 1
        return serial


async def _detection_upkeep(app: web.Application, clocks: Clocks) -> None:
    # Real time, not clocks.sleep: housekeeping only (readers compare each detection's end with
    # the clock themselves), and the injected sleep belongs to the sync loop tests drive.
    while DETECTIONS in app:
        await asyncio.sleep(UPKEEP_EVERY)
        now = clocks.wall()
        app[DETECTIONS].expire(now)
        app[DETECTOR].forget_idle(now)
        if app[DETECTIONS].dirty:
            _save_detections(app)


def _save_detections(app: web.Application) -> None:
    book = app.get(DETECTIONS)
    if book is None:
        return
    try:
        book.save(app[SETTINGS].state.dir / DETECTIONS_FILE, app[DETECTOR].authenticated())
    except OSError as exc:
        log.warning("Detections not saved to %s: %s", app[SETTINGS].state.dir, exc.strerror)


def _store_link(clocks: Clocks) -> Callable[[web.Application], AsyncIterator[None]]:
    """The store, reached in the background: a database that is down never holds up the start."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        shared = app[SHARED_BUDGET]
        link = StoreLink(
            settings.store,
            shared.holder,
            sync=app.get(MIRROR_SYNC),
            budget=app[APIBAN].budget,
            source=shared.source,
            shared_budget=shared,
            wall_clock=clocks.wall,
        )
        app[STORE_LINK] = link
        link.when_connected(shared.attach)
        link.start()
        yield
        await shared.close()
        await link.close()

    return context


def _mirror_sync(
    app: web.Application, client: ApibanClient, current: CurrentMirror, clocks: Clocks
) -> MirrorSync:
    settings = app[SETTINGS]
    sync = MirrorSync(
        client,
        current,
        poll_interval=settings.apiban.poll_interval,
        snapshot_path=settings.state.dir / "mirror.json",  # checked writable by create_app
        source=snapshot_source(settings.apiban.url, settings.apiban.key),
        wall_clock=clocks.wall,
        sleep=clocks.sleep,
    )
    sync.load_snapshot()
    app[MIRROR_SYNC] = sync
    return sync


def _registration(clocks: Clocks) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        if not settings.homer.url:
            yield
            return
        registrar = Registrar(
            app[HTTP_SESSION],
            settings,
            app[AGENT_UUID],
            app[REDACTOR],
            wall_clock=clocks.wall,
            sleep=clocks.sleep,
        )
        app[REGISTRAR] = registrar
        task = asyncio.create_task(registrar.run(), name="homer-registration")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registrar.unregister()

    return context


async def _metrics(app: web.Application) -> AsyncIterator[None]:
    """Metrics, built last: every object they read at scrape time exists by then, so the collector
    is handed all of them at once. Only handlers read ``METRICS``, and they run after startup."""
    app[METRICS] = Metrics(
        Sources(
            client=app[APIBAN],
            lookups=app[LOOKUPS],
            registrar=app.get(REGISTRAR),
            sync=app.get(MIRROR_SYNC),
            sightings=app[SIGHTINGS],
            collector=app[COLLECTOR],
            refusals=app[REFUSALS],
            detections=app.get(DETECTIONS),
            detector=app.get(DETECTOR),
            store=app.get(STORE_LINK),
            shared_sightings=app.get(SHARED_SIGHTINGS),
            shared_detections=app.get(SHARED_DETECTIONS),
        )
    )
    yield


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
