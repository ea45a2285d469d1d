"""What runs while the agent runs: the ``cleanup_ctx`` contexts ``create_app`` appends, in order.

Each context builds its objects at startup, puts them under their ``AppKey`` and owns their tasks,
which it stops at shutdown: the HTTP session (``_http_session``); the APIBAN client, the lookups and
the mirror sync (``_lookups``); the store link (``_store_link``); the sightings, evidence, detection
wiring and HEP collector (``_collector``); the store sharing; the HOMER registration
(``_registration``); the metrics (``_metrics``, last). Also here: the time sources every context is
handed (``Clocks``) and the detection book built before the routes (``_detection``, ``_Serials``).
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

from . import __version__
from .apiban.client import ApibanClient
from .apiban.lookups import CachePolicy, LookupService
from .apiban.mirror import CurrentMirror, MirrorSync, snapshot_source
from .core.addresses import NetworkSet
from .core.ratelimit import Budget
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
    STORE_LINK,
)
from .metrics import Metrics, Sources
from .store.budget import SharedBudget
from .store.database import STORE_FAILURES
from .store.detections import SharedDetections
from .store.link import StoreLink, process_holder
from .store.sightings import SharedSightings

USER_AGENT = f"hepsub-apiban/{__version__}"
log = logging.getLogger("hepsub_apiban.app")  # the name it had before app.py was split


@dataclass(frozen=True, slots=True)
class Clocks:
    """Time sources, injectable so tests can move time instead of waiting for it."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Sleep = field(default=asyncio.sleep)


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
