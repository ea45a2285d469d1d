"""State files that cannot stop the agent: checked snapshots, and a full disk at start.

A snapshot is trusted whole or not at all: any malformed field (a NUL in an address, a cursor
that only ``str.isdigit()`` calls a number, a time in the future, a bad serial) gets it rejected
with one warning, and the agent starts and pulls the list again. A state directory that cannot
take a write at start (a full disk included) ends the start with one line naming state.dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hepsub_apiban.apiban.client import ApibanClient, is_plain_id
from hepsub_apiban.apiban.mirror import (
    MAX_SNAPSHOT_BYTES,
    STATE_CLOCK_SLACK,
    CurrentMirror,
    Mirror,
    MirrorSync,
    SnapshotError,
    mirror_from_snapshot,
)
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.addresses import is_non_routable, parse_ip
from hepsub_apiban.core.config import ConfigError, load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.core.ratelimit import Budget
from hepsub_apiban.core.state import load_or_create_uuid
from hepsub_apiban.keys import MIRROR_SYNC

from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, ManualClock, agent_env, drive_agent_sync
from .test_cli import Result, assert_one_line_error, child_env, free_port, get_json, run, running
from .test_upstream_poison import JSON

NOW = 1_700_000_000.0
DAY = 86400.0
SOURCE = "feed-source-id"
LISTED = ["45.0.0.1", "45.0.0.2", "2a01:4f8::5"]


def good_document(now: float = NOW) -> dict[str, Any]:
    """A snapshot as the agent writes it: three entries, a complete list, saved a minute ago."""
    mirror = Mirror()
    mirror.add(LISTED, "1699999000", now - 120)
    mirror.cursor = "1699999000"
    mirror.last_full_sync = mirror.last_sync = now - 120
    mirror.last_full_entries = len(LISTED)
    document: dict[str, Any] = orjson.loads(mirror.to_snapshot(SOURCE, now - 60))
    return document


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        del document[key]

    return change


def _repeat_serial(document: dict[str, Any]) -> None:
    document["entries"][1][3] = document["entries"][0][3]


def _repeat_address(document: dict[str, Any]) -> None:
    document["entries"].append([*document["entries"][0][:3], document["next_serial"]])
    document["next_serial"] += 1


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "nul in an address": (_set(("entries", 0, 0), "45.0.0.1\x00"), "entry 0 is malformed: not an address"),
    "nul alone": (_set(("entries", 1, 0), "\x00"), "entry 1 is malformed"),
    "address not canonical": (_set(("entries", 2, 0), "2A01:4F8::5"), "entry 2 is malformed"),
    "nul in an entry ID": (_set(("entries", 0, 1), "1699999000\x00"), "entry 0 is malformed: ID"),
    "superscript entry ID": (_set(("entries", 0, 1), "169999900²"), "entry 0 is malformed: ID"),
    "number entry ID": (_set(("entries", 0, 1), 1699999000), "entry 0 is malformed: ID"),
    "superscript cursor": (_set(("cursor",), "²"), "cursor is not an APIBAN ID"),
    "cursor of 5,000 digits": (_set(("cursor",), "1" * 5000), "cursor is not an APIBAN ID"),
    "signed cursor": (_set(("cursor",), "-5"), "cursor is not an APIBAN ID"),
    "cursor with a newline": (_set(("cursor",), "1699999000\n"), "cursor is not an APIBAN ID"),
    "number cursor": (_set(("cursor",), 1699999000), "cursor is not an APIBAN ID"),
    "cursor far ahead": (_set(("cursor",), str(int(NOW + 2 * DAY))), "cursor is more than a day ahead"),
    "last_sync in the future": (_set(("last_sync",), NOW + 3600), "last_sync is in the future"),
    "last_full_sync in the future": (
        _set(("last_full_sync",), NOW + 3600),
        "last_full_sync is in the future",
    ),
    "saved_at in the future": (_set(("saved_at",), NOW + 3600), "saved_at is in the future"),
    "full_pull_started in the future": (
        _set(("full_pull_started",), NOW + 3600),
        "full_pull_started is in the future",
    ),
    "entry time in the future": (_set(("entries", 1, 2), int(NOW + 3600)), "entry 1 is malformed: the time"),
    "entry time not a whole number": (_set(("entries", 1, 2), 1.5e9), "entry 1 is malformed: the time"),
    "negative last_sync": (_set(("last_sync",), -1), "last_sync is negative"),
    "text last_sync": (_set(("last_sync",), "yesterday"), "last_sync is not a number"),
    "no saved_at": (_drop("saved_at"), "saved_at is missing"),
    "serial not a whole number": (_set(("entries", 0, 3), 1.5), "entry 0 is malformed: serial"),
    "serial a boolean": (_set(("entries", 0, 3), True), "entry 0 is malformed: serial"),
    "serial negative": (_set(("entries", 0, 3), -1), "entry 0 is malformed: serial"),
    "serial taken twice": (_repeat_serial, "entry 1 has a serial that is taken"),
    "serial at next_serial": (
        _set(("next_serial",), 0),
        "next_serial is not a whole number|serial that is taken",
    ),
    "next_serial as text": (_set(("next_serial",), "5"), "next_serial is not a whole number"),
    "next_serial far ahead": (_set(("next_serial",), 2**62), "next_serial is not a whole number"),
    "last_full_entries negative": (_set(("last_full_entries",), -1), "last_full_entries"),
    "address twice": (_repeat_address, "entry 3 repeats an address"),
    "entries not a list": (_set(("entries",), {"45.0.0.1": 1}), "entries is not a list"),
    "entry of three fields": (_set(("entries", 0), ["45.0.0.1", "1699999000", 1]), "entry 0 is malformed"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_field_rejects_the_snapshot(case: str) -> None:
    change, message = MALFORMED[case]
    document = good_document()
    change(document)
    with pytest.raises(SnapshotError, match=message):
        mirror_from_snapshot(orjson.dumps(document), SOURCE, NOW)


def test_the_good_document_loads() -> None:
    """The control for every case above: unchanged, the same document loads whole."""
    mirror = mirror_from_snapshot(orjson.dumps(good_document()), SOURCE, NOW)
    assert set(mirror.entries) == set(LISTED)
    assert mirror.loaded
    assert mirror.last_full_entries == 3


def test_times_a_little_ahead_are_a_clock_stepped_back_not_a_bad_file() -> None:
    document = good_document(NOW + STATE_CLOCK_SLACK - 1)  # saved just under the slack ahead
    document["cursor"] = str(int(NOW + DAY))  # an ID may be up to a day ahead, as on the wire
    assert mirror_from_snapshot(orjson.dumps(document), SOURCE, NOW).loaded


def test_an_older_snapshot_without_the_full_pull_count_uses_its_size() -> None:
    document = good_document()
    del document["last_full_entries"]
    assert mirror_from_snapshot(orjson.dumps(document), SOURCE, NOW).last_full_entries == 3


def test_a_version_1_snapshot_still_loads() -> None:
    document = good_document()
    document["version"] = 1
    document["entries"] = [entry[:3] for entry in document["entries"]]
    del document["next_serial"]
    mirror = mirror_from_snapshot(orjson.dumps(document), SOURCE, NOW)
    assert set(mirror.entries) == set(LISTED)
    assert len(set(mirror.serials.values())) == 3


def test_a_snapshot_over_the_size_bound_is_not_read_whole() -> None:
    with pytest.raises(SnapshotError, match="larger than"):
        mirror_from_snapshot(b" " * (MAX_SNAPSHOT_BYTES + 1), SOURCE, NOW)


# ------------------------------------------------------------- through MirrorSync.load_snapshot


@pytest.fixture
async def sync_for(tmp_path: Path) -> AsyncIterator[Callable[[], MirrorSync]]:
    """MirrorSyncs reading ``tmp_path/mirror.json`` on a manual clock at NOW (no request is sent)."""
    async with aiohttp.ClientSession() as session:
        settings_ = load_settings(None, {"HEPSUB_APIBAN_URL": "http://127.0.0.1:9"}).apiban
        clock = ManualClock(NOW)
        client = ApibanClient(session, settings_, Budget(settings_.rate_limit, clock), Redactor(), clock)

        def make() -> MirrorSync:
            return MirrorSync(
                client,
                CurrentMirror(),
                poll_interval=300,
                snapshot_path=tmp_path / "mirror.json",
                source=SOURCE,
                wall_clock=clock,
                sleep=clock.sleep,
            )

        yield make


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_rejected_snapshot_costs_one_warning_and_a_re_pull(
    case: str, sync_for: Callable[[], MirrorSync], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    change, _ = MALFORMED[case]
    document = good_document()
    change(document)
    (tmp_path / "mirror.json").write_bytes(orjson.dumps(document))
    sync = sync_for()
    with caplog.at_level(logging.INFO):
        sync.load_snapshot()
    assert sync.mirror.entries == {}
    assert not sync.mirror.loaded
    assert sync.mirror.needs_full_pull(NOW)
    assert sync.status.snapshot_error
    assert not sync.status.snapshot_loaded
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].startswith("ignoring the list snapshot")
    assert "\x00" not in warnings[0]


# ------------------------------------------------------------------------- property tests

TIME = st.one_of(st.none(), st.floats(-1e12, 1e12, allow_nan=False), st.integers(-(2**63), 2**63 - 1), JSON)
IP = (
    st.sampled_from(["45.0.0.1", "45.0.0.2", "::1", "10.0.0.1", "2a01:4f8::5", "45.0.0.1\x00", "²", ""])
    | JSON
)
ID = st.sampled_from(["1699999000", "100", "²", "1" * 30, "-1", "1699999000\n"]) | JSON
ENTRY = (
    st.tuples(IP, ID, TIME, st.integers(-5, 2**40) | JSON).map(list)
    | st.tuples(IP, ID, TIME).map(list)
    | JSON
)
DOCUMENT = st.fixed_dictionaries(
    {
        "format": st.just("hepsub-apiban/mirror") | JSON,
        "version": st.sampled_from([1, 2]) | JSON,
        "source": st.just(SOURCE) | JSON,
    },
    optional={
        "saved_at": TIME,
        "cursor": ID,
        "full_pull_started": TIME,
        "last_full_sync": TIME,
        "last_sync": TIME,
        "last_full_entries": st.integers(-5, 2**40) | JSON,
        "next_serial": st.integers(-5, 2**62) | JSON,
        "entries": st.lists(ENTRY, max_size=8) | JSON,
    },
)


def assert_sane(mirror: Mirror) -> None:
    """What a loaded mirror guarantees, whatever the file held."""
    latest = NOW + STATE_CLOCK_SLACK
    assert is_plain_id(mirror.cursor)
    assert int(mirror.cursor) <= NOW + DAY
    for value in (mirror.last_sync, mirror.last_full_sync, mirror.full_pull_started):
        assert value is None or 0 <= value <= latest
    assert set(mirror.entries) == set(mirror.serials)
    assert len(set(mirror.serials.values())) == len(mirror.serials)
    assert all(0 <= serial < mirror.next_serial for serial in mirror.serials.values())
    for ip, verdict in mirror.entries.items():
        address = parse_ip(ip)
        assert address is not None
        assert address.text == ip
        assert not is_non_routable(address)
        assert verdict.last_reported is not None
        assert 0 <= verdict.last_reported <= latest
        assert is_plain_id(verdict.id)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=500))
def test_random_bytes_are_a_snapshot_error_or_a_sane_mirror(raw: bytes) -> None:
    try:
        mirror = mirror_from_snapshot(raw, SOURCE, NOW)
    except SnapshotError:
        return
    assert_sane(mirror)


@settings(max_examples=400, deadline=None)
@given(document=DOCUMENT)
def test_snapshot_shaped_junk_is_a_snapshot_error_or_a_sane_mirror(document: dict[str, Any]) -> None:
    try:
        mirror = mirror_from_snapshot(orjson.dumps(document), SOURCE, NOW)
    except SnapshotError:
        return
    assert_sane(mirror)


async def test_load_snapshot_survives_any_file(sync_for: Callable[[], MirrorSync], tmp_path: Path) -> None:
    path = tmp_path / "mirror.json"
    outcomes: set[bool] = set()

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(raw=st.binary(max_size=300) | DOCUMENT.map(orjson.dumps))
    def load(raw: bytes) -> None:
        path.write_bytes(raw)
        sync = sync_for()
        sync.load_snapshot()  # never raises
        assert sync.status.snapshot_loaded != bool(sync.status.snapshot_error)
        if sync.status.snapshot_loaded:
            assert_sane(sync.mirror)
        outcomes.add(sync.status.snapshot_loaded)

    load()
    assert False in outcomes


# ------------------------------------------------------------------------ the real agent

NUL_CASES = ["nul in an address", "superscript cursor", "last_sync in the future"]


def write_snapshot(tmp_path: Path, apiban: ApibanPeer, change: Callable[[dict[str, Any]], None]) -> Path:
    """A snapshot as a previous run left it (for the fixture's APIBAN URL and key), then damaged."""
    from hepsub_apiban.apiban.mirror import snapshot_source

    mirror = Mirror()
    now = NOW
    mirror.add(LISTED, "1699999000", now)
    mirror.cursor = "1699999000"
    mirror.last_full_sync = mirror.last_sync = now
    document = orjson.loads(mirror.to_snapshot(snapshot_source(apiban.url, APIBAN_KEY), now))
    change(document)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = state / "mirror.json"
    path.write_bytes(orjson.dumps(document))
    return path


@pytest.mark.parametrize("case", NUL_CASES)
async def test_the_agent_starts_on_a_rejected_snapshot_and_pulls_again(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    clock = ManualClock(NOW)
    apiban.fake.rate_limit = None
    apiban.fake.add_many(["46.0.0.1", "46.0.0.2"])
    write_snapshot(tmp_path, apiban, MALFORMED[case][0])
    with caplog.at_level(logging.INFO):
        client = await agent(
            Clocks(monotonic=clock, wall=clock, sleep=clock.sleep), HEPSUB_APIBAN_MODE="mirror"
        )
        assert (await client.get("/healthz")).status == 200
        status = (await (await client.get("/api/v1/status")).json())["mirror"]["snapshot"]
        assert status["loaded_at_start"] is False
        assert re.search(MALFORMED[case][1], status["rejected_because"])
        sync = client.app[MIRROR_SYNC]
        await drive_agent_sync(clock, lambda: sync.mirror.loaded)
    assert (await client.get("/readyz")).status == 200
    assert set(sync.mirror.entries) == {"46.0.0.1", "46.0.0.2"}  # the list from APIBAN, not the file
    assert len([w for w in _warnings(caplog) if "snapshot" in w]) == 1


async def test_a_serve_process_starts_on_a_snapshot_with_a_nul(tmp_path: Path, apiban: ApibanPeer) -> None:
    """The issue's case end to end: once a traceback and exit 1 at every start."""
    apiban.fake.add_many(["46.0.0.1"])
    write_snapshot(tmp_path, apiban, MALFORMED["nul in an address"][0])
    port = free_port()
    env = agent_env(
        tmp_path,
        apiban,
        HEPSUB_APIBAN_MODE="mirror",
        HEPSUB_AGENT_BIND="127.0.0.1",
        HEPSUB_AGENT_PORT=str(port),
    )
    base = f"http://127.0.0.1:{port}"
    async with running(["serve"], env, tmp_path) as child:

        async def answered(path: str) -> tuple[int, Any] | None:
            got = await get_json(base + path)
            return got if got is not None and got[0] == 200 else None

        assert (await child.until(lambda: answered("/healthz"), within=10.0))[0] == 200
        assert (await child.until(lambda: answered("/readyz"), within=10.0))[0] == 200
        result = await child.stop()
    assert result.code == 0, result.stderr
    result.assert_clean()
    rejected = [line for line in result.stderr.splitlines() if "ignoring the list snapshot" in line]
    assert len(rejected) == 1
    assert "entry 0 is malformed" in rejected[0]


async def test_a_snapshot_that_cannot_be_saved_later_is_a_warning(
    agent: AgentFactory, apiban: ApibanPeer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(NOW)
    apiban.fake.rate_limit = None
    apiban.fake.add_many(["46.0.0.1"])
    client = await agent(Clocks(monotonic=clock, wall=clock, sleep=clock.sleep), HEPSUB_APIBAN_MODE="mirror")
    shutil.rmtree(agent.tmp_path / "state")  # the disk taken away while the agent runs
    sync = client.app[MIRROR_SYNC]
    with caplog.at_level(logging.INFO):
        await drive_agent_sync(clock, lambda: sync.mirror.loaded)
    assert (await client.get("/readyz")).status == 200
    assert sync.status.snapshot_saved is None
    assert any(w.startswith("cannot save the list snapshot") for w in _warnings(caplog))


# ------------------------------------------------------------------------ a full disk at start


@contextlib.contextmanager
def full_tmpfs(path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``path``, filled up; skips where mounting is not permitted."""
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command here; the RLIMIT_FSIZE test covers the same start-up path")
    path.mkdir()
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(
            f"mounting a tmpfs is not permitted here ({mounted.stderr.strip() or mounted.returncode}); "
            "the RLIMIT_FSIZE test covers the same start-up path"
        )
    try:
        _fill(path / "filler")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(path: Path) -> None:
    """Write until the file system says it is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["check", "mirror"])
async def test_a_full_disk_at_first_start_is_one_line_naming_state_dir(
    tmp_path: Path, apiban: ApibanPeer, mode: str
) -> None:
    with full_tmpfs(tmp_path / "full") as state:
        env = agent_env(
            tmp_path,
            apiban,
            HEPSUB_STATE_DIR=str(state),
            HEPSUB_APIBAN_MODE=mode,
            HEPSUB_AGENT_BIND="127.0.0.1",
            HEPSUB_AGENT_PORT=str(free_port()),
        )
        if mode == "mirror":
            env["HEPSUB_AGENT_UUID"] = (
                "4f6f0d3c-8a5e-4d8e-9c4a-3b1f2e5d6a7b"  # only the snapshot needs the disk
            )
        result = await run(["serve"], env, tmp_path, within=10.0)
    assert_one_line_error(result, "state.dir")
    assert str(state) in result.stderr
    assert "No space left on device" in result.stderr
    assert apiban.fake.request_count() == 0  # nothing started


async def test_state_dir_over_the_file_size_limit_is_one_line_naming_state_dir(
    tmp_path: Path, apiban: ApibanPeer
) -> None:
    """The same start on a limit every Linux process has (RLIMIT_FSIZE): writes past it fail."""
    env = child_env(
        agent_env(tmp_path, apiban, HEPSUB_AGENT_BIND="127.0.0.1", HEPSUB_AGENT_PORT=str(free_port()))
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hepsub_apiban",
        "serve",
        env=env,
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit_file_size,
    )
    async with asyncio.timeout(15.0):
        stdout, stderr = await proc.communicate()
    result = Result(proc.returncode or 0, stdout.decode(), stderr.decode())
    assert_one_line_error(result, "state.dir")
    assert "File too large" in result.stderr


def test_a_uuid_that_cannot_be_written_names_state_dir(tmp_path: Path) -> None:
    (tmp_path / "uuid").mkdir()  # where the uuid file goes, something that is no file
    with pytest.raises(ConfigError, match=r"^state\.dir: .* is not a writable directory"):
        load_or_create_uuid(tmp_path)
