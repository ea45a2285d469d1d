"""What a real ``serve`` logs: the start line first, the warnings after it, and every run of
failures as state changes (failing, still failing, recovered) with a hint naming the setting.

The "still failing every 5 minutes" lines are shown on an injected clock (tests/test_trouble.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from hepsub_apiban import __version__

from .conftest import HOMER_TOKEN, HOMER_USER, ApibanPeer, HomerPeer
from .test_cli import _registered, free_port, get_json, running, serve_env

WRONG_PASSWORD = "not-the-HOMER-password-5d1"


async def _check(port: int, ip: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session,
        session.post(f"http://127.0.0.1:{port}/api/v1/check", json={"ips": [ip]}) as response,
    ):
        assert response.status == 200
        answer: dict[str, object] = (await response.json())["results"][0]
        return answer


def _lines(stderr: str) -> list[str]:
    """The messages, without the time stamp: 'LEVEL logger: message'."""
    return [line.split(" ", 2)[2] for line in stderr.splitlines()]


async def test_the_start_line_comes_first_and_each_trouble_is_a_state_change(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    port = free_port()
    env = {
        **serve_env(tmp_path, apiban, homer, port),
        "HEPSUB_HOMER_PASSWORD": WRONG_PASSWORD,
        "HEPSUB_SITE_KEYS": "a-site-key-1234",  # in check mode: a warning at start
        "HEPSUB_STATE_DIR": "./state",  # relative to where the agent starts: shown absolute
    }
    apiban.fake.fail_status = 503
    async with running(["serve"], env, tmp_path) as child:
        await _registered(child, homer, 1)
        await child.until(lambda: get_json(f"http://127.0.0.1:{port}/healthz"), within=5.0)
        # Check mode: an APIBAN outage is logged as it starts, and as it ends.
        for ip in ("1.2.3.4", "5.6.7.8", "9.9.9.9"):
            assert (await _check(port, ip))["source"] == "unavailable"
        apiban.fake.fail_status = None
        assert (await _check(port, "1.2.3.4"))["source"] == "check"
        result = await child.stop()
    assert result.code == 0, result.stderr
    result.assert_clean()
    assert WRONG_PASSWORD not in result.stderr
    lines = _lines(result.stderr)

    assert lines[0].startswith(
        f"INFO hepsub_apiban: hepsub-apiban {__version__} listening on 127.0.0.1:{port}; "
    )
    assert lines[0].endswith(
        "; site API for 1 key on /api/{key}/banned and /v1/decisions/stream, serving local detections only"
        f"; state in {tmp_path}/state"  # tmp_path is absolute
    ), lines[0]
    assert lines[1].startswith("WARNING hepsub_apiban: site.keys: apiban.mode = check"), lines[1]

    refused = [n for n, line in enumerate(lines) if "refused the login" in line]
    assert len(refused) == 1, result.stderr
    assert lines[refused[0]] == (
        f"WARNING hepsub_apiban.registration: HOMER refused the login of homer.user {HOMER_USER!r} "
        "(401: incorrect password): check homer.password; without that login the registration stays "
        "in HOMER until its ttl runs out after shutdown"
    )
    assert refused[0] < lines.index("INFO hepsub_apiban: shutting down")  # at start, not at shutdown
    assert lines[-1].startswith("INFO hepsub_apiban.registration: HOMER keeps this agent's registration")
    assert lines[-1].endswith(f"(HOMER refused homer.user {HOMER_USER!r}'s login: check homer.password)")

    outage = [line for line in lines if "APIBAN lookups" in line]
    assert len(outage) == 2, result.stderr
    assert outage[0] == (
        "WARNING hepsub_apiban.app: APIBAN lookups failing: APIBAN answered 503; "
        "lookups answer listed: null meanwhile"
    )
    # Real time here (a process): how long it took is not the point, that it is one line is.
    assert re.fullmatch(
        r"INFO hepsub_apiban\.app: APIBAN lookups recovered after 3 failed attempts over \d+ s", outage[1]
    ), outage[1]


async def test_a_refused_homer_token_is_logged_once_naming_homer_token(
    tmp_path: Path, apiban: ApibanPeer, homer: HomerPeer
) -> None:
    port = free_port()
    env = {**serve_env(tmp_path, apiban, homer, port), "HEPSUB_HOMER_TOKEN": "x" + HOMER_TOKEN[1:]}
    async with running(["serve"], env, tmp_path) as child:

        async def refused_twice() -> bool | None:
            return True if len(homer.fake.subscriptions) >= 2 else None

        await child.until(refused_twice, within=10.0)
        result = await child.stop()
    assert result.code == 0, result.stderr
    result.assert_clean()
    failing = [line for line in _lines(result.stderr) if "HOMER registration" in line]
    assert failing == [
        "WARNING hepsub_apiban.registration: HOMER registration failing: (400) no auth_token found or "
        "it has been expired: [***] (check homer.token: HOMER -> Preferences -> AUTH TOKEN; "
        "homer.user and homer.password do not register); retrying with backoff"
    ], result.stderr
