"""APIBAN's own Kamailio example, pointed at the agent's site API, run in a real Kamailio.

``config/apiban-kamailio.cfg`` is merged into a small kamailio.cfg the way its comments say, with
the agent's URL and a site key, the rtimer interval cut from 30 s to 1 s, and ``ctl`` loaded on a
socket in a temporary folder. The agent runs in mirror mode against the fake APIBAN, which lists
600 addresses (127.0.0.2 among them, so the test can send SIP from a listed address) plus one that
the agent's allow-list covers. The agent never holds a non-routable address; for this test only,
127.0.0.2 is let through, as the one address a test socket can send from. Kamailio is started
before the agent's list is loaded and must ride out the 503s; then pull exactly what the site API
serves into its ``apiban`` htable (read back with ``kamcmd htable.dump apiban`` over the ctl
socket), each address once; drop a request from 127.0.0.2 and answer one from 127.0.0.3; and get
a ban APIBAN adds later on its next tick, from the ID it kept.

Skipped where Kamailio, ``kamcmd`` or the modules the example needs are not installed (Debian:
kamailio, kamailio-utils-modules for http_client.so, kamailio-extra-modules for jansson.so).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hepsub_apiban.apiban import held_list as mirror_module
from hepsub_apiban.app import Clocks
from hepsub_apiban.keys import MIRROR_SYNC

from .conftest import AgentFactory, ApibanPeer, ManualClock, drive_agent_sync
from .kamailio import (
    READY_USER,
    _stop,
    _wait_ready,
    core_settings,
    free_udp_port,
    installation,
    kamailio_available,
    sip_exchange,
    start_kamailio,
)

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "config" / "apiban-kamailio.cfg"
# http_client and jansson are the example's own; htable, rtimer, pv, xlog it uses too; ctl for kamcmd.
MODULES = ("http_client.so", "jansson.so", "htable.so", "rtimer.so", "pv.so", "xlog.so", "sl.so", "ctl.so")
SITE_KEY = "site-local-key-1"
LISTED = "127.0.0.2"  # a loopback address a test socket can send from
CLEAN = "127.0.0.3"
ALLOWED = "46.0.2.10"  # listed by APIBAN, but in the agent's allow-list: never served to the site
LATE = "46.51.100.77"  # listed by APIBAN after Kamailio has caught up
# What the route logs for the agent's 503 (no body kept) and for the end of the list (a 400).
UNAVAILABLE = re.compile(r"APIBAN: Non 200 response\. *$", re.MULTILINE)
END = 'APIBAN: Non 200 response. {"ipaddress":["no new bans"],"ID":"none"}'
TIMER = 'modparam("rtimer", "timer", "name=apiban;interval=30;mode=1;")'


def _kamcmd() -> str | None:
    found = shutil.which("kamcmd")
    if found:
        return found
    for candidate in (Path(installation().binary).with_name("kamcmd"), Path("/usr/sbin/kamcmd")):
        if candidate.is_file():
            return str(candidate)
    return None


def _unusable() -> str | None:
    """Why this test cannot run here, or None."""
    reason = kamailio_available()
    if reason is not None:
        return f"Kamailio not usable: {reason}"
    module_dir = installation().module_dir
    missing = [name for name in MODULES if not Path(module_dir, name).is_file()]
    if missing:
        return (
            f"Kamailio modules {', '.join(missing)} not in {module_dir} (Debian: apt-get install "
            "kamailio-utils-modules kamailio-extra-modules)"
        )
    if _kamcmd() is None:
        return "kamcmd not found (Debian: it comes with the kamailio package)"
    return None


_reason = _unusable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def apiban_list() -> list[str]:
    """600 addresses: routable IPv4, two IPv6, and LISTED in the middle of the second page."""
    addresses = [f"45.18.{i >> 8}.{i & 255}" for i in range(597)]
    addresses[300:300] = [LISTED]
    addresses += ["2a01:4f8::1", "2a01:4f8:0:1::5"]
    assert len(set(addresses)) == 600
    return addresses


def site_config(
    *, sip_port: int, api: str, key: str, ctl_socket: Path, module_dir: str, interval: int
) -> str:
    """An operator's kamailio.cfg with the snippet merged in as its comments say."""
    snippet = SNIPPET.read_text()
    assert snippet.count(TIMER) == 1, "the rtimer line the test shortens is gone"
    snippet = snippet.replace(TIMER, TIMER.replace("interval=30;", f"interval={interval};"))
    return f"""#!KAMAILIO
{core_settings(sip_port, module_dir)}

#!define APIBAN_API "{api}"
#!define APIBAN_KEY "{key}"

loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "sl.so"
loadmodule "htable.so"
loadmodule "ctl.so"
modparam("ctl", "binrpc", "unix:{ctl_socket}")

{snippet}

request_route {{
    if (uri =~ "^sip:{READY_USER}@") {{
        sl_send_reply("200", "Ready");
        exit;
    }}
    route(APIBAN_CHECK);
    sl_send_reply("200", "OK");
    exit;
}}
"""


@dataclass
class RunningKamailio:
    sip_port: int
    ctl_socket: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def rpc(self, *command: str) -> str:
        kamcmd = _kamcmd()
        assert kamcmd is not None
        process = await asyncio.create_subprocess_exec(
            kamcmd,
            "-s",
            f"unix:{self.ctl_socket}",
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(10):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, f"kamcmd {' '.join(command)}: {err.decode(errors='replace')}"
        return out.decode(errors="replace")

    async def htable(self, name: str) -> list[tuple[str, str]]:
        """Every (key, value) of htable ``name``, as ``htable.dump`` lists them."""
        dump = await self.rpc("htable.dump", name)
        return re.findall(r"^\s*name:\s*(\S+)\s*\n\s*value:\s*(\S+)\s*$", dump, re.MULTILINE)

    def added(self) -> collections.Counter[str]:
        """How many times the route stored each address ("APIBAN: Adding block ...")."""
        return collections.Counter(re.findall(r"APIBAN: Adding block ipaddress\[\d+\] == (\S+)", self.log()))


@contextlib.asynccontextmanager
async def run_kamailio(api: str, key: str, interval: int = 1) -> AsyncIterator[RunningKamailio]:
    inst = installation()
    # A short folder: the ctl socket path must fit in sockaddr_un (108 bytes).
    with tempfile.TemporaryDirectory(prefix="kam-apiban-") as folder:
        workdir = Path(folder)
        sip_port = free_udp_port()
        ctl_socket = workdir / "ctl.sock"
        config = workdir / "kamailio.cfg"
        config.write_text(
            site_config(
                sip_port=sip_port,
                api=api,
                key=key,
                ctl_socket=ctl_socket,
                module_dir=inst.module_dir,
                interval=interval,
            )
        )
        log_path = workdir / "kamailio.log"
        process = await start_kamailio(config, workdir, log_path, private_mb=8)
        try:
            failure = await _wait_ready(process, sip_port, 15.0)
            assert failure is None, f"{failure}\n{log_path.read_text(errors='replace')[-4000:]}"
            yield RunningKamailio(sip_port, ctl_socket, log_path)
        finally:
            await _stop(process, 5.0)


async def eventually(check: Callable[[], object], what: str, deadline: float = 30.0) -> None:
    """Poll the async ``check`` until it returns something true, at most ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            while True:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.25)
    except TimeoutError:
        raise AssertionError(f"not within {deadline} s: {what}") from None


async def test_apiban_kamailio_example_pulls_the_mirror_and_blocks(
    agent: AgentFactory, apiban: ApibanPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = mirror_module.is_non_routable
    monkeypatch.setattr(
        mirror_module, "is_non_routable", lambda address: address.text != LISTED and rule(address)
    )
    addresses = apiban_list()
    apiban.fake.add_many([*addresses, ALLOWED])
    clock = ManualClock()
    client = await agent(
        Clocks(sleep=clock.sleep),
        HEPSUB_APIBAN_MODE="mirror",
        HEPSUB_SITE_KEYS=f"other-key,{SITE_KEY}",
        HEPSUB_ALLOW_CIDRS="46.0.2.0/24",
    )
    mirror = client.app[MIRROR_SYNC].mirror
    served = set(addresses)  # the mirror, less the allow-listed address
    api = str(client.make_url("/api/"))

    async with run_kamailio(api, SITE_KEY) as kam:
        # Until the agent holds the list it answers 503; the route keeps ID 100 and tries again.
        # (http_client keeps no body for a 5xx: the route logs an empty one.)
        await eventually(lambda: UNAVAILABLE.search(kam.log()), "the route meeting the agent's 503")
        assert await kam.htable("apiban") == []
        await drive_agent_sync(clock, lambda: mirror.loaded)
        assert set(mirror.entries) == {*addresses, ALLOWED}

        async def holds_all() -> bool:
            return len(await kam.htable("apiban")) >= len(served)

        await eventually(holds_all, f"Kamailio's apiban htable holds {len(served)} addresses")
        # ... and has reached the end of the list: the agent's 400 "no new bans".
        await eventually(lambda: END in kam.log(), "the route reaching the end")
        entries = await kam.htable("apiban")
        names = [name for name, _ in entries]
        assert len(names) == len(set(names)) == 600
        assert set(names) == served
        assert ALLOWED not in names
        assert {value for _, value in entries} == {"1"}
        # The site API served every address exactly once over the pages.
        added = kam.added()
        assert set(added) == served
        assert set(added.values()) == {1}

        # A listed source is dropped without a reply; a clean one is answered.
        assert (await sip_exchange(kam.sip_port, "OPTIONS", source_host=CLEAN)).status == 200
        with pytest.raises(TimeoutError):
            await sip_exchange(kam.sip_port, "OPTIONS", source_host=LISTED, deadline=1.0)
        assert (await sip_exchange(kam.sip_port, "OPTIONS", source_host=CLEAN)).status == 200
        # The drop was the APIBAN route's: it counts blocks in apibanctl, whose initval=100 (meant
        # for the ID) is also where that counter starts.
        assert re.search(r"^\s*value:\s*101\s*$", await kam.rpc("htable.get", "apibanctl", "blocks"), re.M)

        # A ban APIBAN adds later: the agent's next pull, then Kamailio's next tick from its kept ID.
        apiban.fake.add(LATE)
        clock.wake()
        await drive_agent_sync(clock, lambda: LATE in mirror.entries)

        async def holds_late() -> bool:
            return LATE in dict(await kam.htable("apiban"))

        await eventually(holds_late, f"Kamailio picking up {LATE}")
        added = kam.added()
        assert added[LATE] == 1
        assert sum(added.values()) == 601  # after the first load, only the new address was sent
        log = kam.log()
    assert " ERROR" not in log, log[-4000:]
