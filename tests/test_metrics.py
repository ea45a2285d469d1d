"""The hand-kept enrichment histogram exports what Prometheus expects of a histogram."""

from __future__ import annotations

import asyncio
import socket

from prometheus_client.parser import text_string_to_metric_families

from hepsub_apiban.formats.hep import HepPacket, build_hep3
from hepsub_apiban.keys import COLLECTOR
from hepsub_apiban.metrics import LatencyHistogram

from .conftest import AgentFactory, ApibanPeer


def test_buckets_are_cumulative_and_inclusive() -> None:
    histogram = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 3.0):
        histogram.observe(seconds)
    family = histogram.family("h", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert buckets == {"0.001": 2.0, "0.01": 3.0, "0.1": 4.0, "+Inf": 5.0}
    count = next(s.value for s in family.samples if s.name == "h_count")
    total = next(s.value for s in family.samples if s.name == "h_sum")
    assert count == 5.0
    assert abs(total - 3.0535) < 1e-9


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_counters_move_with_traffic(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("45.9.9.9")
    client = await agent(HEPSUB_HEP_UDP="127.0.0.1:0", HEPSUB_HEP_TCP="")
    before = samples(await (await client.get("/metrics")).text())
    body = {"data": {"sid": ["m@x"], "source_ip": ["45.9.9.9", "8.8.8.8", "10.0.0.1"]}, "fromts": 1}
    assert (await client.post("/get/cdr", json=body)).status == 200
    await client.post("/get/cdr", data=b"not json")
    address = client.app[COLLECTOR].udp_address()
    assert address is not None
    packet = build_hep3(
        HepPacket(
            3,
            2,
            17,
            "45.9.9.9",
            "10.0.0.1",
            5060,
            5060,
            1_700_000_000,
            0,
            1,
            1,
            b"OPTIONS sip:a SIP/2.0\r\n\r\n",
        )
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(packet, address)
        sock.sendto(b"junk-that-is-no-HEP", address)
    for _ in range(500):
        if client.app[COLLECTOR].stats.packets["udp"] and sum(client.app[COLLECTOR].stats.bad.values()):
            break
        await asyncio.sleep(0.01)
    after = samples(await (await client.get("/metrics")).text())

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    p = "hepsub_apiban_"
    assert moved(f"{p}enrichment_requests_total", outcome="ok") == 1
    assert moved(f"{p}enrichment_requests_total", outcome="bad_request") == 1
    assert moved(f"{p}enrichment_seconds_count") == 2
    assert moved(f"{p}lookups_total", source="check", verdict="listed") == 1
    assert moved(f"{p}lookups_total", source="check", verdict="clean") == 1
    assert moved(f"{p}lookups_total", source="private", verdict="clean") == 1
    assert moved(f"{p}upstream_requests_total", endpoint="check", outcome="ok") == 2
    assert moved(f"{p}budget_remaining") == -2
    assert moved(f"{p}hep_packets_total", transport="udp", version="3") == 1
    assert moved(f"{p}hep_bad_packets_total", reason="bad magic") == 1
    assert moved(f"{p}sightings") == 2
    assert moved(f"{p}sightings_listed") == 1  # 45.9.9.9: listed, and its verdict was already cached
    assert moved(f"{p}listed_packets_total") == 1
    assert after[(f"{p}registration_state", (("state", "disabled"),))] == 1
