"""A real CrowdSec bouncer consumes the agent's decision stream: Debian's crowdsec-custom-bouncer.

The bouncer runs its script with ``add IP DURATION SCENARIO JSON`` for each new decision and
``del IP DURATION SCENARIO JSON`` for each deleted one. An attacker is detected from SIP sent over
real HEP (a scanner's OPTIONS over TCP, so it is served), and its decision must reach the script
with the decision's duration; when the agent's clock passes the detection's end, the script must be
told to delete it, while APIBAN's entry stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.keys import COLLECTOR, DETECTIONS

from .conftest import AgentFactory, ApibanPeer, ManualClock
from .test_collector import sip_packet, udp_send, until
from .test_site_api import SITE_KEY, Client, addresses, write_list
from .test_site_blocklist import clocked_site_agent

BOUNCER = shutil.which("crowdsec-custom-bouncer")
pytestmark = pytest.mark.skipif(
    BOUNCER is None,
    reason="crowdsec-custom-bouncer is not installed (Debian: apt install crowdsec-custom-bouncer)",
)
ATTACKER = "5.6.7.8"
SCRIPT = """#!/bin/sh
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' "$1" "$2" "$3" "$4" "$5" >> {calls}
"""
CONFIG = """bin_path: {script}
feed_via_stdin: false
total_retries: 0
scenarios_containing: []
scenarios_not_containing: []
origins: []
piddir: {dir}/
update_frequency: 200ms
cache_retention_duration: 10s
daemonize: false
log_mode: file
log_dir: {dir}/
log_level: debug
log_compression: false
api_url: http://127.0.0.1:{port}/
api_key: {key}
prometheus:
  enabled: false
  listen_addr: 127.0.0.1
  listen_port: 60602
"""


@dataclasses.dataclass
class Bouncer:
    calls: Path
    log: Path

    def lines(self) -> list[list[str]]:
        if not self.calls.exists():
            return []
        return [line.split("\t") for line in self.calls.read_text().splitlines()]

    async def wait_for(self, action: str, ip: str) -> list[str]:
        """The script's first call for ``action ip``; the bouncer polls on its own clock."""
        for _ in range(200):
            for call in self.lines():
                if call[:2] == [action, ip]:
                    return call
            await asyncio.sleep(0.05)
        log = self.log.read_text() if self.log.exists() else "(no log)"
        raise AssertionError(
            f"the bouncer never ran '{action} {ip}'; calls {self.lines()}; log: {log[-3000:]}"
        )


def write_config(directory: Path, port: int) -> Path:
    """The bouncer's configuration in ``directory``: its script records each call, it polls the agent
    every 200 ms with a site key, in the foreground, logging to a file there."""
    directory.mkdir()
    script = directory / "record.sh"
    script.write_text(SCRIPT.format(calls=directory / "calls.txt"))
    script.chmod(0o755)
    config = directory / "bouncer.yaml"
    config.write_text(CONFIG.format(script=script, dir=directory, port=port, key=SITE_KEY))
    return config


@contextlib.asynccontextmanager
async def running_bouncer(directory: Path, port: int) -> AsyncIterator[Bouncer]:
    config = write_config(directory, port)
    assert BOUNCER is not None
    process = await asyncio.create_subprocess_exec(
        BOUNCER, "-c", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield Bouncer(directory / "calls.txt", directory / "crowdsec-custom-bouncer.log")
    finally:
        process.terminate()
        await process.wait()


def scanner_over_tcp(attacker: str, count: int = 3) -> list[bytes]:
    """A scanner's OPTIONS pings, captured on a TCP connection (so the attacker evidently talks to us)."""
    return [
        build_hep3(
            dataclasses.replace(
                sip_packet(attacker, "198.51.100.1", method="OPTIONS", call_id=f"ping-{n}"), ip_proto=6
            )
        )
        for n in range(count)
    ]


async def hep_site_agent(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> tuple[Client, ManualClock]:
    write_list(tmp_path, apiban, addresses(1))
    return await clocked_site_agent(agent, HEPSUB_HEP_UDP="127.0.0.1:0")


async def test_custom_bouncer_adds_a_detection_with_its_duration_and_deletes_it_when_it_ends(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    client, clock = await hep_site_agent(agent, apiban, tmp_path)
    udp_send(client, *scanner_over_tcp(ATTACKER))
    await until(lambda: client.app[COLLECTOR].stats.packets["udp"] == 3, "3 decoded packets")
    detection = client.app[DETECTIONS].get(ATTACKER)
    assert detection is not None
    assert detection.served
    assert list(detection.rules) == ["scanner_ua"]

    async with running_bouncer(tmp_path / "bouncer", client.server.port or 0) as bouncer:
        add = await bouncer.wait_for("add", ATTACKER)
        # The clock stands still while the bouncer pulls: exactly scanner_ua's first hour is left.
        assert add[2:4] == ["3600", "hepsub-apiban/scanner-ua"]
        decision = json.loads(add[4])
        assert decision["duration"] == "1h0m0s"
        assert decision["origin"] == "hepsub-apiban"
        assert decision["id"] == detection.serial
        listed = await bouncer.wait_for("add", addresses(1)[0])
        assert listed[3] == "apiban"
        assert 7 * 86400 - 5 <= int(listed[2]) <= 7 * 86400

        clock.advance(3600)  # the detection's hour is up
        deleted = await bouncer.wait_for("del", ATTACKER)
        assert deleted[3] == "hepsub-apiban/scanner-ua"
        assert json.loads(deleted[4])["id"] == detection.serial
        assert [call[:2] for call in bouncer.lines()].count(["del", addresses(1)[0]]) == 0
