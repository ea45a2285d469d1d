"""Local detection with real peers: attack tools and legitimate traffic against a real SIP server.

Kamailio from Debian (tests/pbx.py: a registrar/PBX on 127.0.0.1-127.0.0.5, digest auth for users
1000-1199, siptrace mirroring every request and reply as HEPv3) feeds the agent's UDP collector.

* Attacks, from the global address ``ATTACKER`` on ``lo`` (the agent never detects non-routable
  sources): SIPVicious from Debian, svmap (bound with ``-b``), svwar and svcrack (bound through
  tests/pbx.py's launcher: Debian's 0.3.3 ignores their ``-b``). Each must be detected by the
  rule it trips within ``DETECT_DEADLINE`` s of its start, served (listed to the site), and show
  in an enrichment answer, in ``/api/v1/detections`` and in the site API (banned, check, ipset).
* No false positive, with SIPp from Debian: 200 phones of an office behind NAT (``OFFICE``) each
  registering with its first 401 then a 200, and a trunk in ``allow.cidrs`` (``TRUNK``) sending
  200 calls/s. Each runs beside an svmap scan from ``ATTACKER`` on the same PBX: the scan must be
  detected (the engine is on and sees this stream), the legitimate address must not be.

Before any detection is asserted, the test checks what the agent must see anyway: the tool's
requests in ``/api/v1/sightings`` of its address, and what the tool itself reports. Addresses are
added to ``lo`` by the ``site`` fixture (root only; otherwise the tests skip) and removed after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hepsub_apiban.keys import COLLECTOR

from .conftest import AgentFactory
from .kamailio import Kamailio, installation, kamailio, kamailio_available
from .pbx import (
    PBX_HOSTS,
    USERS,
    RunningTool,
    ToolRun,
    global_addresses,
    pbx_modules_missing,
    render_pbx_config,
    sipp_argv,
    sipp_available,
    sipvicious_argv,
    sipvicious_available,
    start_tool,
    write_users_csv,
)
from .test_collector import Client, hep_agent, sightings

_reason = kamailio_available() or ", ".join(pbx_modules_missing(installation().module_dir)) or None
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"Kamailio PBX not usable: {_reason}")

ATTACKER = "5.6.7.8"
OFFICE = "5.6.7.9"
TRUNK = "5.6.7.10"
SITE_KEY = "site-detect-key-1"
DETECT_DEADLINE = 10.0  # seconds from a tool's start to its detection
TRAFFIC_DEADLINE = 20.0  # seconds for the agent to have ingested a run's traffic


@dataclass
class Site:
    client: Client
    pbx: Kamailio
    workdir: Path

    async def tool(self, name: str, argv: list[str]) -> RunningTool:
        return await start_tool(argv, self.workdir / f"{name}.log", self.workdir)

    async def sipvicious(self, tool: str, *args: str) -> RunningTool:
        """``tool`` from ATTACKER against the PBX's port (targets in ``args``)."""
        argv = sipvicious_argv(tool, ATTACKER, ["-p", str(self.pbx.sip_port), *args])
        return await self.tool(tool, argv)

    async def svmap(self) -> RunningTool:
        """svmap's default scan (OPTIONS) of the PBX's five addresses."""
        return await self.sipvicious("svmap", f"{PBX_HOSTS[0]}-{PBX_HOSTS[-1]}")


@pytest.fixture
def site_env() -> dict[str, str]:
    """Further agent settings for a test (it parametrizes ``site_env`` to set some)."""
    return {}


@pytest.fixture
async def site(agent: AgentFactory, tmp_path: Path, site_env: dict[str, str]) -> AsyncIterator[Site]:
    """The agent (mirror mode, a site key, HEP over UDP, the trunk allow-listed, the PBX's
    addresses as ``detect.own``, then ``site_env``) fed by the PBX, with the three global
    addresses on lo."""
    with global_addresses([ATTACKER, OFFICE, TRUNK]) as reason:
        if reason is not None:
            pytest.skip(reason)
        env = {
            "HEPSUB_HEP_TCP": "",
            "HEPSUB_APIBAN_MODE": "mirror",
            "HEPSUB_SITE_KEYS": SITE_KEY,
            "HEPSUB_ALLOW_CIDRS": f"{TRUNK}/32",
            "HEPSUB_DETECT_ENABLED": "true",
            "HEPSUB_DETECT_OWN": ",".join(f"{host}/32" for host in PBX_HOSTS),
        }
        client = await hep_agent(agent, **{**env, **site_env})
        address = client.app[COLLECTOR].udp_address()
        assert address is not None
        hep_port = address[1]
        module_dir = installation().module_dir

        def config(sip_port: int) -> str:
            return render_pbx_config(
                sip_port=sip_port, hep_port=hep_port, module_dir=module_dir, trunks=[TRUNK]
            )

        async with kamailio(hep_port=hep_port, render=config) as pbx:
            await eventually(lambda: ready(client), "the agent's APIBAN list loaded (site API ready)")
            yield Site(client, pbx, tmp_path)


def need(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


async def ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def eventually(check: Callable[[], Any], what: str, deadline: float = TRAFFIC_DEADLINE) -> Any:
    """Poll the (async) ``check`` until it returns something true; that value. Bounded."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    last: Any = None
    while loop.time() < until:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {deadline} s: {what} (last: {last!r})")


async def methods_of(client: Client, ip: str) -> dict[str, int]:
    seen = (await sightings(client)).get(ip)
    return dict(seen["methods"]) if seen else {}


async def sent(client: Client, ip: str, method: str, count: int) -> dict[str, int]:
    """Wait until the agent has seen at least ``count`` ``method`` requests from ``ip``."""

    async def check() -> dict[str, int] | None:
        methods = await methods_of(client, ip)
        return methods if methods.get(method, 0) >= count else None

    result: dict[str, int] = await eventually(check, f"{count} {method} from {ip} in /api/v1/sightings")
    return result


async def detections(client: Client, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/detections{query}")
    assert response.status == 200, f"GET /api/v1/detections{query}: {response.status} {await response.text()}"
    body = await response.json()
    listed: list[dict[str, Any]] = body["detections"]
    return listed


async def detected(
    client: Client, ip: str, wanted: Callable[[dict[str, Any]], bool], started: float, what: str
) -> dict[str, Any]:
    """The detection of ``ip`` that satisfies ``wanted``, once it appears: at most
    DETECT_DEADLINE s after ``started`` (time.monotonic of the tool's start)."""
    last: list[dict[str, Any]] = []
    while True:
        last = [d for d in await detections(client) if d["ip"] == ip]
        match = next((d for d in last if wanted(d)), None)
        if match is not None:
            return match
        if time.monotonic() - started > DETECT_DEADLINE:
            raise AssertionError(
                f"{ip} not detected ({what}) within {DETECT_DEADLINE} s; its detections: {last}"
            )
        await asyncio.sleep(0.1)


def served_with(*rules: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d["action"] == "serve" and set(rules) <= set(d["rules"])


async def enrichment_of(client: Client, ip: str) -> dict[str, Any]:
    body = {"data": {"sid": [f"probe-{ip}@detect.test"], "source_ip": [ip]}}
    response = await client.post("/get/cdr", json=body)
    assert response.status == 200
    answer: dict[str, Any] = (await response.json())[ip]
    return answer


async def banned_by_site_api(client: Client) -> list[str]:
    """Every address of ``/api/{key}/banned``, page after page (bounded)."""
    addresses: list[str] = []
    cursor = ""
    for _ in range(100):
        response = await client.get(f"/api/{SITE_KEY}/banned{cursor}")
        body = await response.json()
        if response.status == 400:
            assert body["ID"] == "none", body
            return addresses
        assert response.status == 200, body
        addresses += body["ipaddress"]
        cursor = f"/{body['ID']}"
    raise AssertionError("the site API's banned list did not end within 100 pages")


async def assert_shown_everywhere(client: Client, ip: str, rule: str) -> None:
    """A served detection of ``ip`` by ``rule``: in the filtered detections, in enrichment,
    and in the site API's banned list, check and ipset list."""
    filtered = await detections(client, f"?rule={rule}&action=serve")
    assert ip in [d["ip"] for d in filtered]
    detection = next(d for d in filtered if d["ip"] == ip)
    assert detection["until"] > detection["since"]
    assert detection["evidence"], detection
    verdict = await enrichment_of(client, ip)
    assert rule in verdict["detected"]["rules"], verdict
    assert ip in await banned_by_site_api(client)
    check = await client.get(f"/api/{SITE_KEY}/check/{ip}")
    assert check.status == 200, await check.text()
    assert (await check.json())["ipaddress"] == [ip]
    ipset = await client.get(f"/ipset/{SITE_KEY}/list")
    assert ip in (await ipset.text()).split()


async def assert_not_detected(client: Client, ip: str) -> None:
    assert ip not in [d["ip"] for d in await detections(client)]
    assert "detected" not in await enrichment_of(client, ip)
    assert ip not in await banned_by_site_api(client)
    check = await client.get(f"/api/{SITE_KEY}/check/{ip}")
    assert check.status == 400, await check.text()


def succeeded(run: ToolRun) -> ToolRun:
    assert run.returncode == 0, (
        f"{run.argv[0]} ended with {run.returncode} after {run.seconds:.1f} s:\n{run.output[-3000:]}"
    )
    return run


async def finished(tool: RunningTool) -> ToolRun:
    return succeeded(await tool.finish(TRAFFIC_DEADLINE))


# --- attacks --------------------------------------------------------------------------------------


async def test_svmap_scan_of_five_addresses_is_detected_and_served(site: Site) -> None:
    """svmap: one OPTIONS per address (UA friendly-scanner, From "sipvicious"): the scanner
    signature and the scan of 5 of our addresses, two rules, so served."""
    need(sipvicious_available())
    started = time.monotonic()
    svmap = await site.svmap()
    methods = await sent(site.client, ATTACKER, "OPTIONS", len(PBX_HOSTS))
    assert methods == {"OPTIONS": len(PBX_HOSTS)}
    seen = (await sightings(site.client))[ATTACKER]
    assert seen["user_agents"] == ["friendly-scanner"]
    try:
        await detected(site.client, ATTACKER, served_with("scanner-ua", "extension-scan"), started, "svmap")
    finally:
        run = await svmap.finish(TRAFFIC_DEADLINE)  # svmap waits 3 s for late answers before it ends
    succeeded(run)
    assert all(f"{host}:{site.pbx.sip_port}" in run.output for host in PBX_HOSTS), run.output
    await assert_shown_everywhere(site.client, ATTACKER, "scanner-ua")
    await assert_shown_everywhere(site.client, ATTACKER, "extension-scan")


@pytest.mark.parametrize("method", ["REGISTER", "INVITE"])
async def test_svwar_extension_scan_is_detected_and_served(site: Site, method: str) -> None:
    """svwar over 990-1029 (1000-1029 exist): a first request for a random 32-bit user, then one
    per extension; unknown users get 404, known ones a challenge without credentials (401 for
    REGISTER, 407 for INVITE). REGISTER carries the extension in To/From only (its R-URI is
    sip:<host>); INVITE in the R-URI too."""
    need(sipvicious_available())
    started = time.monotonic()
    svwar = await site.sipvicious("svwar", "-m", method, "-e", "990-1029", PBX_HOSTS[0])
    methods = await sent(site.client, ATTACKER, method, 41)
    assert methods[method] == 41
    rules = ("scanner-ua", "user-enumeration", "extension-scan")
    try:
        await detected(site.client, ATTACKER, served_with(*rules), started, f"svwar -m {method}")
    finally:
        run = await svwar.finish(TRAFFIC_DEADLINE)  # svwar waits 3 s for late answers before it ends
    succeeded(run)
    # What svwar concluded from the PBX's answers: 1000-1029 need authentication, 990-999 do not exist.
    assert all(f"| {user}" in run.output for user in range(1000, 1030)), run.output
    assert not any(f"| {user} " in run.output for user in range(990, 1000)), run.output
    for rule in rules:
        await assert_shown_everywhere(site.client, ATTACKER, rule)


@pytest.mark.parametrize(
    ("site_env", "rules"),
    [({}, {"auth-failure", "scanner-ua"}), ({"HEPSUB_DETECT_SCANNER_UA_SIMULATE": "true"}, {"auth-failure"})],
    ids=["defaults", "scanner-ua-simulated"],
)
async def test_svcrack_password_guessing_is_detected_and_served(site: Site, rules: set[str]) -> None:
    """svcrack on user 1000 with 30 wrong passwords: each guess carries digest credentials
    computed on the nonce of the PBX's latest 401 to it, and is refused with a new 401. With the
    scanner signature only simulated, auth-failure is the one rule: it is served because the
    guesses echo our nonce."""
    need(sipvicious_available())
    guesses = site.workdir / "passwords.txt"
    guesses.write_text("".join(f"guess-{n}\n" for n in range(30)))
    started = time.monotonic()
    svcrack = await site.sipvicious("svcrack", "-u", "1000", "-d", str(guesses), PBX_HOSTS[0])
    await sent(site.client, ATTACKER, "REGISTER", 31)  # one without credentials, then the 30 guesses
    try:
        detection = await detected(site.client, ATTACKER, served_with("auth-failure"), started, "svcrack")
    finally:
        # After its last guess svcrack waits 10 s for more answers before it ends: not needed.
        run = await svcrack.stop()
    assert "The password for" not in run.output, run.output
    assert set(detection["rules"]) == rules
    await assert_shown_everywhere(site.client, ATTACKER, "auth-failure")


# --- no false positive ----------------------------------------------------------------------------


async def test_office_registering_200_phones_is_not_detected(site: Site) -> None:
    """200 phones behind one NAT address, 100 a second: each REGISTER without credentials gets
    its 401, the same REGISTER with the right credentials a 200."""
    need(sipp_available())
    need(sipvicious_available())
    users = write_users_csv(site.workdir / "users.csv", USERS)
    target = f"{PBX_HOSTS[0]}:{site.pbx.sip_port}"
    argv = sipp_argv("register_auth.xml", target, OFFICE, "-inf", str(users), "-m", "200", "-r", "100")
    started = time.monotonic()
    office = await site.tool("sipp-office", [*argv, "-timeout", "20s", "-timeout_error"])
    svmap = await site.svmap()  # the control: an attack on the same PBX meanwhile
    await finished(office)  # SIPp's exit status 0: every registration ended with its 200
    await sent(site.client, OFFICE, "REGISTER", 400)
    await finished(svmap)

    await detected(site.client, ATTACKER, served_with("scanner-ua"), started, "the control scan")
    await assert_not_detected(site.client, OFFICE)


async def trunk_calls(site: Site) -> None:
    """600 calls of a carrier trunk (authenticated by its address) at 200 calls/s, each INVITE,
    200, ACK, BYE, 200, with an svmap scan from ATTACKER meanwhile, detected as the control."""
    need(sipp_available())
    need(sipvicious_available())
    target = f"{PBX_HOSTS[0]}:{site.pbx.sip_port}"
    argv = sipp_argv("trunk_call.xml", target, TRUNK, "-s", "4930555", "-m", "600", "-r", "200", "-l", "400")
    started = time.monotonic()
    trunk = await site.tool("sipp-trunk", [*argv, "-timeout", "20s", "-timeout_error"])
    svmap = await site.svmap()
    await finished(trunk)  # SIPp's exit status 0: every call went through
    methods = await sent(site.client, TRUNK, "BYE", 600)
    assert methods["INVITE"] >= 600
    assert methods["ACK"] >= 600
    await finished(svmap)
    await detected(site.client, ATTACKER, served_with("scanner-ua"), started, "the control scan")


async def test_trunk_in_allow_list_at_200_calls_per_second_is_not_detected(site: Site) -> None:
    await trunk_calls(site)
    await assert_not_detected(site.client, TRUNK)


@pytest.mark.parametrize("site_env", [{"HEPSUB_ALLOW_CIDRS": ""}], ids=["allow-cidrs-empty"])
async def test_same_trunk_outside_allow_list_is_flagged_not_served(site: Site) -> None:
    """What allow.cidrs spares the trunk: request-flood, a rule that only flags."""
    await trunk_calls(site)
    flagged = [d for d in await detections(site.client) if d["ip"] == TRUNK]
    assert [(d["rules"], d["action"]) for d in flagged] == [(["request-flood"], "flag")]
    assert TRUNK not in await banned_by_site_api(site.client)
    assert (await site.client.get(f"/api/{SITE_KEY}/check/{TRUNK}")).status == 400
