"""The shared store (``store.url``): PostgreSQL, HOMER's own database engine, for several agents.

The agent creates and migrates its own schema (``hepsub``): versioned steps, each applied once
and recorded in ``hepsub.schema_version``, all in one transaction under a transaction-scoped
advisory lock, so two agents starting at once cannot both apply a step, and a step that fails
leaves the schema as it was. Running ``migrate`` again does nothing.

A lease (``try_acquire``/``renew``/``release``) elects one agent for a job (the APIBAN puller of a
key). Each is one SQL statement judged by the database's clock, never the agents': agents'
clocks disagree, the database's is one. The lease's ``epoch`` grows each time it changes hands,
so a write can be fenced against a holder that lost it without knowing (paused, partitioned).

The URL's password never reaches a log line or an error: errors show the URL redacted
(``postgresql://user:***@host:port/db``) and the driver's words with every secret masked.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..core.config import StoreSettings
from ..core.logs import Redactor

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.store")
SCHEMA = "hepsub"
# pg_advisory_xact_lock key of the migration: "hepsub" and 1, a constant every agent version shares.
MIGRATION_LOCK = 0x6865_7073_7562_0001
CONNECT_TIMEOUT = 10.0  # seconds to open a connection, the password exchange included
COMMAND_TIMEOUT = 30.0  # seconds a statement may take; a migration step included
CREATED_ATTEMPTS = 5  # opens of a database another agent is still creating (about 2 s in all)
POOL_SIZE = 4  # the store carries batches about once a second, not a query per packet


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


# Times an agent computes (APIBAN's feed, the mirror's sync) are its own wall clock in Unix
# seconds, as in the state.dir snapshot (apiban/mirror.py); times that must agree across agents
# (leases, when a row changed) are the database's own (timestamptz, now()).
V1_LIST_AND_LEASES = f"""
CREATE TABLE {SCHEMA}.apiban_sources (
    -- Which list: mirror.snapshot_source(url, key), a digest; the key itself is never stored.
    source text PRIMARY KEY,
    cursor text NOT NULL DEFAULT '100',     -- the APIBAN ID to ask for next
    full_pull_started bigint,               -- the sweep mark of the full pull under way; NULL: none
    last_full_sync double precision,        -- when the last full pull reached the end
    last_sync double precision,             -- when APIBAN last said there is nothing newer
    last_full_entries integer,              -- entries the last accepted full pull reported
    shrink_confirmations integer NOT NULL DEFAULT 0,  -- smaller full pulls in a row (apiban/mirror.py)
    next_serial bigint NOT NULL DEFAULT 0,  -- the local serial the next new entry gets
    -- Grows with every change of this source's entries: followers poll it (or LISTEN) and read
    -- the entries whose change is above what they hold.
    version bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {SCHEMA}.apiban_entries (
    source text NOT NULL REFERENCES {SCHEMA}.apiban_sources (source) ON DELETE CASCADE,
    ip inet NOT NULL,
    apiban_id text,                         -- APIBAN's ID of the page that listed it
    last_reported bigint,                   -- Unix seconds
    serial bigint NOT NULL,                 -- its ID in the site API and the decision stream
    change bigint NOT NULL,                 -- apiban_sources.version when it last changed
    removed_at double precision,            -- swept or expired, kept a while for the decision stream
    PRIMARY KEY (source, ip)
);
CREATE INDEX apiban_entries_change ON {SCHEMA}.apiban_entries (source, change);
CREATE INDEX apiban_entries_serial ON {SCHEMA}.apiban_entries (source, serial);

CREATE TABLE {SCHEMA}.leases (
    name text PRIMARY KEY,                  -- the job, e.g. "apiban-puller:<source>"
    holder text NOT NULL,                   -- the agent that holds (or last held) it
    epoch bigint NOT NULL,                  -- grows when the lease changes hands: a fencing token
    acquired_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);
"""

# Sightings shared by agents (store/sightings.py). Each writer (one agent process, a random ID
# per start) upserts its own cumulative totals per address and per *life* of the address in its
# memory (``first_seen``: an address forgotten and seen again starts a new life, a new row), so a
# batch sent twice sets the same totals and nothing is counted twice; readers add rows up.
V2_SHARED_SIGHTINGS = f"""
CREATE TABLE {SCHEMA}.sightings (
    ip inet NOT NULL,
    writer uuid NOT NULL,                   -- one agent process; a restart writes new rows
    first_seen double precision NOT NULL,   -- Unix seconds; also names the life of the row
    agent text NOT NULL,                    -- the agent's HEPSUB UUID, for people reading the table
    last_seen double precision NOT NULL,
    packets bigint NOT NULL,
    methods jsonb NOT NULL,                 -- {{"INVITE": 3, "401": 2}}: ingest/sightings.py's buckets
    user_agents jsonb NOT NULL,             -- samples, as bounded as in memory
    users jsonb NOT NULL,
    call_ids jsonb NOT NULL,
    -- The database's clock, for pruning: HEP timestamps are the sender's word, forgeable.
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ip, writer, first_seen)    -- leads with ip: the enrichment lookup's index
);
CREATE INDEX sightings_written_at ON {SCHEMA}.sightings (written_at);  -- pruning by age
"""

# Served detections shared by agents (store/detections.py): one row per address, its ID the one
# every agent's site API and decision stream hands out. IDs and changes come from one counter row,
# not a SEQUENCE: every write locks that row until it commits, so rows become visible in the order
# of their IDs and changes (a reader polling ``change > held`` never misses a row that committed
# late), and an ID can be taken above the APIBAN entries' serials (the millisecond scale of
# apiban/mirror.py), so one ID orders the merged list and a client resuming from its last ID sees it.
V3_SHARED_DETECTIONS = f"""
CREATE TABLE {SCHEMA}.detection_counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),  -- a single row
    serial bigint NOT NULL DEFAULT 0,       -- the last ID handed out
    change bigint NOT NULL DEFAULT 0        -- grows with every write; followers poll it
);
INSERT INTO {SCHEMA}.detection_counter DEFAULT VALUES;

CREATE TABLE {SCHEMA}.detections (
    ip inet PRIMARY KEY,                    -- two agents detecting one address share one row
    serial bigint NOT NULL,                 -- its ID in every agent's site API and decision stream
    since double precision NOT NULL,        -- Unix seconds, the detecting agents' clocks
    until double precision NOT NULL,        -- the later end of every agent's wins
    announced_until double precision NOT NULL,  -- the end clients were told with this serial
    rules jsonb NOT NULL,                   -- {{"rule": "evidence"}}, in the order they fired
    proof text,                             -- why it evidently talks to us
    repeats integer NOT NULL,
    agents jsonb NOT NULL,                  -- HEPSUB UUIDs of the agents that detected it
    ended_at double precision,              -- set when it ended; NULL while it lasts
    change bigint NOT NULL,                 -- detection_counter.change of its last write
    written_at timestamptz NOT NULL DEFAULT now()  -- the database's clock, for pruning
);
CREATE INDEX detections_change ON {SCHEMA}.detections (change);
CREATE INDEX detections_written_at ON {SCHEMA}.detections (written_at);
"""

# The APIBAN request budget of a key shared by agents in check mode (store/budget.py): one row per
# source holding the key's requests of the current window, by the database's clock. A request is
# spent by one UPDATE of that row, which PostgreSQL serialises, so two agents asking at once cannot
# both take the last slot. (Version 3 is taken by the shared detections.)
V4_SHARED_BUDGET = f"""
CREATE TABLE {SCHEMA}.apiban_budget (
    source text PRIMARY KEY,                -- mirror.snapshot_source(url, key), as apiban_sources
    sent timestamptz[] NOT NULL DEFAULT '{{}}',  -- the key's requests still in the window, oldest first
    blocked_until timestamptz NOT NULL DEFAULT '-infinity',  -- after a 429: nothing until then
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {SCHEMA}.apiban_budget_agents (
    source text NOT NULL,
    holder text NOT NULL,                   -- one agent process (StoreLink.holder)
    seen_at timestamptz NOT NULL,           -- its last request: the agents sharing the key lately
    PRIMARY KEY (source, holder)
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "APIBAN list, sync position per source, leases", V1_LIST_AND_LEASES),
    Migration(2, "sightings shared by agents", V2_SHARED_SIGHTINGS),
    Migration(3, "served detections shared by agents", V3_SHARED_DETECTIONS),
    Migration(4, "APIBAN request budget shared by agents in check mode", V4_SHARED_BUDGET),
)
LATEST = MIGRATIONS[-1].version

BOOTSTRAP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

# Taken when free, expired, or already ours (then extended); one statement, so two agents asking
# at once get one winner: the loser's ON CONFLICT waits for the winner's row and sees it held.
ACQUIRE = f"""
INSERT INTO {SCHEMA}.leases AS lease (name, holder, epoch, acquired_at, expires_at)
VALUES ($1, $2, 1, now(), now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET
    holder = excluded.holder,
    epoch = lease.epoch + CASE WHEN lease.holder = excluded.holder THEN 0 ELSE 1 END,
    acquired_at = CASE WHEN lease.holder = excluded.holder THEN lease.acquired_at ELSE now() END,
    expires_at = excluded.expires_at
WHERE lease.expires_at <= now() OR lease.holder = excluded.holder
RETURNING epoch, expires_at
"""
# Only a lease still held: once expired, another agent may have acted in between.
RENEW = f"""
UPDATE {SCHEMA}.leases SET expires_at = now() + make_interval(secs => $3)
WHERE name = $1 AND holder = $2 AND expires_at > now()
RETURNING epoch, expires_at
"""
# Expired at once rather than deleted: the epoch must keep growing for the next holder.
RELEASE = f"""
UPDATE {SCHEMA}.leases SET expires_at = now()
WHERE name = $1 AND holder = $2 AND expires_at > now()
RETURNING epoch
"""


class StoreError(Exception):
    """The store cannot be reached or used; the message is safe to log (no password in it)."""


# What a store that is down, slow or broken raises: every module that talks to it counts these as
# a failure and carries on from memory.
STORE_FAILURES = (
    StoreError,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection left mid-statement by a cancelled task
)


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires_at: datetime  # the database's clock


class Store:
    """A small pool of connections to the store's database (PostgreSQL), and its schema migrations.

    Built and owned by ``StoreLink``; every store-backed object (``SharedSightings``,
    ``SharedDetections``, ``SharedBudget``, the mirror's rows) gets it from the link once connected.
    Never lets a query run without a timeout, and never runs on the packet path.
    """

    def __init__(self, pool: asyncpg.Pool, settings: StoreSettings) -> None:
        self._pool = pool
        self.shown = settings.shown

    @property
    def pool(self) -> asyncpg.Pool:
        """For the modules that keep their own tables and statements (store/shared_list.py,
        store/sightings.py, store/detections.py)."""
        return self._pool

    @classmethod
    async def connect(cls, settings: StoreSettings, *, pool_size: int = POOL_SIZE) -> Store:
        """Open the pool (one connection at once, so a wrong URL or password fails here).

        A database that does not exist yet is created when the user may (homer-app and
        heplify-server create theirs the same way), so pointing agents at HOMER's PostgreSQL
        needs no manual step; otherwise the error says what to run.
        """
        try:
            try:
                pool = await _open_pool(settings, pool_size)
            except asyncpg.InvalidCatalogNameError:
                await _create_database(settings)
                pool = await _open_created(settings, pool_size)
        except StoreError:
            raise
        except CONNECT_FAILURES as exc:
            # `from None`: the driver's exception may carry the URL; only its redacted words go on.
            raise StoreError(
                f"cannot connect to the store {settings.shown}: {_reason(exc, settings)}"
            ) from None
        return cls(pool, settings)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> int:
        """Bring the schema to ``LATEST``; the version it is at afterwards."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await connection.execute(BOOTSTRAP)
            recorded = await connection.fetch(f"SELECT version FROM {SCHEMA}.schema_version")
            applied: set[int] = {row["version"] for row in recorded}
            current = max(applied, default=0)
            if current > LATEST:
                raise StoreError(
                    f"the store {self.shown} has schema version {current}, newer than this agent's "
                    f"{LATEST}: upgrade this agent"
                )
            # Every step not recorded, not only those above the highest: a step numbered below
            # one already applied (two lines of work merged) is still applied once.
            for step in MIGRATIONS:
                if step.version not in applied:
                    log.info("store: migrating the schema to version %d (%s)", step.version, step.description)
                    await connection.execute(step.sql)
                    await connection.execute(
                        f"INSERT INTO {SCHEMA}.schema_version (version, description) VALUES ($1, $2)",
                        step.version,
                        step.description,
                    )
                    current = max(current, step.version)
        return current

    async def schema_version(self) -> int:
        version: int | None = await self._pool.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version")
        return version or 0

    async def try_acquire(self, name: str, holder: str, ttl: float) -> Lease | None:
        """The lease for ``ttl`` seconds if it is free, expired or already ``holder``'s; else None."""
        row = await self._pool.fetchrow(ACQUIRE, name, holder, _positive(ttl))
        return None if row is None else Lease(name, holder, row["epoch"], row["expires_at"])

    async def renew(self, name: str, holder: str, ttl: float) -> Lease | None:
        """Extend a lease ``holder`` still holds to ``ttl`` seconds from now; None if it lapsed."""
        row = await self._pool.fetchrow(RENEW, name, holder, _positive(ttl))
        return None if row is None else Lease(name, holder, row["epoch"], row["expires_at"])

    async def release(self, name: str, holder: str) -> bool:
        """Free a lease ``holder`` holds, for another agent to take at once; False if it did not."""
        return await self._pool.fetchval(RELEASE, name, holder) is not None


CONNECT_FAILURES = (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def _open_pool(settings: StoreSettings, pool_size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn=settings.url,
        min_size=1,
        max_size=pool_size,
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        server_settings={"application_name": "hepsub-apiban"},
    )


async def _open_created(settings: StoreSettings, pool_size: int) -> asyncpg.Pool:
    # Another agent's CREATE DATABASE may still be committing ("it seems to have just been dropped").
    for attempt in range(CREATED_ATTEMPTS):
        try:
            return await _open_pool(settings, pool_size)
        except asyncpg.InvalidCatalogNameError:
            if attempt == CREATED_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def _create_database(settings: StoreSettings) -> None:
    """Create the URL's database through the server's maintenance database ``postgres``."""
    name = settings.database
    user = _identifier(settings.user) if settings.user else "THE_USER_OF_STORE_URL"
    if not name:
        raise StoreError(f"the store {settings.shown} names no database: end store.url with /DATABASE")
    admin = await asyncpg.connect(dsn=settings.url, database="postgres", timeout=CONNECT_TIMEOUT)
    try:
        await admin.execute(f"CREATE DATABASE {_identifier(name)}")
        log.info("store: created the database %s on %s", name, settings.shown)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass  # another agent starting at the same moment created it
    except asyncpg.InsufficientPrivilegeError:
        raise StoreError(
            f"the database {name} does not exist on {settings.shown} and {user} may not create it; "
            f"as a PostgreSQL superuser run: CREATE DATABASE {_identifier(name)} OWNER {user}"
        ) from None
    finally:
        await admin.close()


def _identifier(name: str) -> str:
    """``name`` as SQL names it: bare when PostgreSQL would not fold or misread it, else quoted."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _positive(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"a lease's ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


def _reason(exc: BaseException, settings: StoreSettings) -> str:
    words = str(exc) or type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        words = f"no answer within {CONNECT_TIMEOUT:g} s"
    return Redactor(settings.secrets())(words)
