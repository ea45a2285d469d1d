"""Evidence kept of listed/detected addresses, its pcap, and HOMER's Download PCAP button end to end."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import unused_port
from pytest_aiohttp import AiohttpClient

from hepsub_apiban.app import create_app
from hepsub_apiban.core.config import AgentSettings
from hepsub_apiban.formats.hep import HepPacket, build_hep3
from hepsub_apiban.ingest.evidence import MAX_PACKET_BYTES, Evidence, EvidencePacket
from hepsub_apiban.ingest.pcap import HEADER, pcap_file
from hepsub_apiban.keys import EVIDENCE, SIGHTINGS
from hepsub_apiban.web import MAX_DOWNLOAD_IPS, download_ips

from .conftest import HOMER_PASSWORD, HOMER_TOKEN, HOMER_USER, AgentFactory, ApibanPeer, HomerPeer
from .test_collector import Client, decoded, sip_packet, udp_send, until

LISTED = "45.9.9.9"
CALL = "call-1@evidence.example"
PCAP_TYPE = "application/vnd.tcpdump.pcap"
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


def packet(
    src: str, dst: str = "198.51.100.1", *, at: int = 0, call_id: str = CALL, **fields: Any
) -> HepPacket:
    base = sip_packet(src, dst, call_id=call_id)
    return dataclasses.replace(base, ts_sec=base.ts_sec + at, **fields)


def tshark_sip(pcap: bytes, tmp_path: Path) -> list[list[str]]:
    """What tshark, an independent reader, decodes as SIP: source, destination, method, Call-ID."""
    path = tmp_path / "evidence.pcap"
    path.write_bytes(pcap)
    fields = ["ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "sip.Method", "sip.Call-ID", "udp.srcport"]
    command = ["tshark", "-n", "-r", str(path), "-Y", "sip", "-T", "fields"]
    for name in fields:
        command += ["-e", name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    # One address column per family is filled: keep src, dst, method, call-id, port.
    return [[r[0] or r[1], r[2] or r[3], r[4], r[5], r[6]] for r in rows]


# ------------------------------------------------------------------------------- the ring
def test_only_protected_addresses_are_kept_each_packet_once_in_capture_order() -> None:
    protected = {LISTED, "2a01:4f8::5"}
    evidence = Evidence(protected)
    evidence.keep(packet(LISTED, at=2))
    evidence.keep(packet("45.1.1.1", at=1))  # the caller probes first; keep() files nothing for it
    evidence.keep(packet("2a01:4f8::5", LISTED, at=1))  # both ends protected: one packet, two rings

    both = evidence.packets([LISTED, "2a01:4f8::5"])
    assert [(p.src_ip, p.time) for p in both] == [("2a01:4f8::5", 1_700_000_001.0), (LISTED, 1_700_000_002.0)]
    assert [p.src_ip for p in evidence.packets(["45.1.1.1"])] == []
    assert len(evidence) == 2


def test_rings_are_bounded_per_address_in_addresses_and_in_bytes() -> None:
    protected = {f"45.0.0.{n}" for n in range(10)}
    evidence = Evidence(protected, per_address=3, max_addresses=4, max_bytes=10_000)
    for at in range(5):
        evidence.keep(packet("45.0.0.0", at=at))
    assert [p.time - 1_700_000_000 for p in evidence.packets(["45.0.0.0"])] == [2, 3, 4]  # the newest 3

    for n in range(1, 5):  # a fifth address: the least recently touched (45.0.0.0) leaves
        evidence.keep(packet(f"45.0.0.{n}"))
    assert evidence.packets(["45.0.0.0"]) == []
    assert (len(evidence), evidence.evicted) == (4, 1)

    big = packet("45.0.0.9", payload=b"x" * 20_000)
    evidence.keep(big)  # cut to MAX_PACKET_BYTES, and over the byte cap: older addresses leave
    [kept] = evidence.packets(["45.0.0.9"])
    assert (len(kept.payload), kept.length) == (MAX_PACKET_BYTES, 20_000)
    assert evidence.bytes <= 10_000
    assert evidence.bytes == sum(len(p.payload) for n in range(10) for p in evidence.packets([f"45.0.0.{n}"]))


def test_a_download_keeps_the_newest_packets_that_fit() -> None:
    evidence = Evidence({LISTED})
    for at in range(5):
        evidence.keep(packet(LISTED, at=at))
    size = len(evidence.packets([LISTED])[0].payload)
    newest = evidence.packets([LISTED], max_bytes=2 * size + 1)
    assert [p.time - 1_700_000_000 for p in newest] == [3, 4]


# ------------------------------------------------------------------------------- the pcap
def test_an_empty_pcap_is_the_classic_header_alone() -> None:
    assert pcap_file([]) == HEADER
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", HEADER)
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 101)


@needs_tshark
def test_tshark_decodes_ipv4_ipv6_tcp_and_cut_packets_as_sip(tmp_path: Path) -> None:
    evidence = Evidence({LISTED, "2a01:4f8::5"})
    evidence.keep(packet(LISTED, at=0, src_port=5999, dst_port=5080))  # SIP found off port 5060 too
    evidence.keep(packet("2a01:4f8::5", "2001:db8::1", at=1, ip_proto=6, call_id="over-tcp"))
    evidence.keep(packet(LISTED, "2001:db8::1", at=2, call_id="mixed-families"))

    rows = tshark_sip(pcap_file(evidence.packets([LISTED, "2a01:4f8::5"])), tmp_path)

    assert rows == [
        [LISTED, "198.51.100.1", "REGISTER", CALL, "5999"],
        ["2a01:4f8::5", "2001:db8::1", "REGISTER", "over-tcp", "5060"],
        [f"::ffff:{LISTED}", "2001:db8::1", "REGISTER", "mixed-families", "5060"],
    ]


def test_the_ip_and_udp_headers_carry_valid_checksums_and_real_lengths() -> None:
    sip = packet(LISTED).payload
    frame = pcap_file([EvidencePacket(1.5, LISTED, "10.0.0.1", 5060, 5060, 17, sip, len(sip))])[24:]
    seconds, micros, caplen, length = struct.unpack("<IIII", frame[:16])
    ip = frame[16:]
    assert (seconds, micros, caplen, length) == (1, 500_000, 28 + len(sip), 28 + len(sip))
    assert struct.unpack("!H", ip[2:4])[0] == 28 + len(sip)
    assert _ones_complement_sum(ip[:20]) == 0xFFFF  # a valid header sums to all ones
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, 8 + len(sip))
    assert _ones_complement_sum(pseudo + ip[20:]) == 0xFFFF


def _ones_complement_sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


# ------------------------------------------------------------------------------- the routes
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"__hep__":[{"type":"download","ips":["45.9.9.9","::ffff:45.1.1.1",7,"x"]}]}',
            [LISTED, "45.1.1.1"],
        ),
        (b'{"__hep__":[{"ips":[]}],"sid":["c"]}', []),
        (b'{"__hep__":[]}', None),
        (b'{"__hep__":[{"ips":"45.9.9.9"}]}', None),
        (b'{"__hep__":{"ips":["45.9.9.9"]}}', None),
        (b"[1]", None),
        (b"", None),
        (b"\xff", None),
    ],
)
def test_download_bodies(body: bytes, expected: list[str] | None) -> None:
    assert download_ips(body) == expected


def test_a_download_names_at_most_ten_addresses() -> None:
    ips = [f"45.0.0.{n}" for n in range(50)]
    assert download_ips(orjson.dumps({"__hep__": [{"ips": ips}]})) == ips[:MAX_DOWNLOAD_IPS]


async def test_evidence_route_answers_a_pcap_or_a_json_error(agent: AgentFactory) -> None:
    client = await agent()
    client.app[EVIDENCE].protected = {LISTED}  # as if the capture had made it listed
    client.app[EVIDENCE].keep(packet(LISTED))

    kept = await client.get(f"/api/v1/evidence/{LISTED}.pcap")
    none = await client.get("/api/v1/evidence/2001:db8::9.pcap")
    bad = await client.get("/api/v1/evidence/not-an-ip.pcap")

    assert (kept.status, kept.content_type) == (200, PCAP_TYPE)
    assert kept.headers["Content-Disposition"] == f'attachment; filename="evidence-{LISTED}.pcap"'
    body = await kept.read()
    assert body.startswith(HEADER)
    assert packet(LISTED).payload in body
    assert (none.status, await none.read()) == (200, HEADER)
    assert none.headers["Content-Disposition"] == 'attachment; filename="evidence-2001_db8__9.pcap"'
    assert (bad.status, await bad.json()) == (400, {"error": "'not-an-ip' is not an IP address"})


async def test_evidence_is_behind_agent_allow_from(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_AGENT_ALLOW_FROM="10.9.9.0/24")
    assert (await client.get(f"/api/v1/evidence/{LISTED}.pcap")).status == 403


@pytest.mark.parametrize("body", [b"", b"not json", b'{"data":{"sid":["x"]}}', b'{"__hep__":[{"ips":7}]}'])
async def test_download_answers_a_pcap_whatever_the_body(agent: AgentFactory, body: bytes) -> None:
    client = await agent()
    response = await client.post("/get/download", data=body, headers={"Content-Type": "application/json"})
    assert (response.status, response.content_type, await response.read()) == (200, PCAP_TYPE, HEADER)
    enrichment = await client.post("/get/cdr-download", data=b'{"data":{"sid":["x"]}}')
    assert enrichment.content_type == "application/json"  # the download route took only "download"


def test_the_registered_type_carries_download_unless_turned_off() -> None:
    assert AgentSettings().registered_type == "cdr-download"
    assert AgentSettings(type="pcap;download").registered_type == "pcap;download"
    assert AgentSettings(download=False).registered_type == "cdr"


async def test_packets_of_listed_addresses_reach_the_evidence_through_real_udp(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    apiban.fake.add(LISTED)
    client = await agent(HEPSUB_HEP_UDP="127.0.0.1:0")
    await _listed_traffic(client)
    kept = client.app[EVIDENCE].packets([LISTED, "45.1.1.1", "198.51.100.1"])
    assert [(p.src_ip, p.dst_ip) for p in kept] == [(LISTED, "198.51.100.1")] * 3 + [("198.51.100.1", LISTED)]


async def _listed_traffic(client: Client) -> None:
    """The listed address sends (and gets an answer); an unlisted one sends too."""
    udp_send(client, build_hep3(packet(LISTED, call_id="first")))
    await until(lambda: bool((s := client.app[SIGHTINGS].get(LISTED)) and s.listed), "the verdict")
    udp_send(
        client,
        *(build_hep3(packet(LISTED, at=n)) for n in range(1, 4)),
        build_hep3(packet("45.1.1.1", at=4, call_id="other")),
        build_hep3(packet("198.51.100.1", LISTED, at=5)),
    )
    await until(lambda: decoded(client, "udp") == 6, "6 decoded packets")


# ------------------------------------------------------------------------------- through HOMER
async def _registered_agent(
    agent: AgentFactory, homer: HomerPeer, aiohttp_client: AiohttpClient, **env: str
) -> tuple[Client, str]:
    """The agent registers itself with the HOMER fake at the port it really serves on."""
    port = unused_port()
    settings = agent.settings(
        HEPSUB_HEP_UDP="127.0.0.1:0",
        HEPSUB_HOMER_URL=homer.url,
        HEPSUB_HOMER_TOKEN=HOMER_TOKEN,
        HEPSUB_AGENT_HOST="127.0.0.1",
        HEPSUB_AGENT_PORT=str(port),
        **env,
    )
    client = await aiohttp_client(create_app(settings), server_kwargs={"port": port})
    await until(lambda: bool(homer.fake.active_rows()), "the registration")
    [row] = homer.fake.active_rows()
    return client, row.uuid


async def _homer_post(session: aiohttp.ClientSession, homer: HomerPeer, path: str, body: Any) -> Any:
    """What the HOMER UI sends to homer-app (with a user's JWT); the response, read."""
    login = await session.post(
        f"{homer.url}/api/v3/auth", json={"username": HOMER_USER, "password": HOMER_PASSWORD}
    )
    headers = {"Authorization": f"Bearer {(await login.json())['token']}"}
    response = await session.post(f"{homer.url}/api/v3{path}", json=body, headers=headers)
    await response.read()
    return response


def _ui_search(**call: Any) -> dict[str, Any]:
    search = {
        "1_call": {"id": 100, "callid": [CALL], "sid": [CALL], "source_ip": [LISTED, "45.1.1.1"], **call}
    }
    return {"param": {"search": search, "transaction": {}}, "timestamp": {"from": 1_700_000_000_000, "to": 1}}


# The button's search: the UI adds the clicked Call-ID's __hep__ object from the answer.
DOWNLOAD = _ui_search(__hep__=[{"type": "download", "call_id": CALL, "ips": [LISTED, "45.1.1.1"]}])


@needs_tshark
async def test_the_download_button_gets_the_listed_addresses_packets_through_homer(
    agent: AgentFactory,
    apiban: ApibanPeer,
    homer: HomerPeer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    apiban.fake.add(LISTED)
    client, uuid = await _registered_agent(agent, homer, aiohttp_client)
    await _listed_traffic(client)
    [row] = homer.fake.active_rows()
    assert row.type == "cdr-download"

    async with aiohttp.ClientSession() as session:
        # The tab's search goes to the agent's full type and is answered as before.
        search = await _homer_post(session, homer, f"/agent/search/{uuid}/{row.type}", _ui_search())
        wrapper = await search.json()
        # The button: the UI takes the clicked Call-ID's __hep__ from the answer it shows.
        hep = wrapper["data"][CALL]["__hep__"]
        download = await _homer_post(
            session, homer, f"/agent/search/{uuid}/download", _ui_search(__hep__=[hep])
        )
        pcap = await download.read()

    assert (search.status, wrapper["message"]) == (200, "request answer")
    assert hep == {"type": "download", "ips": [LISTED]}  # the call's listed address, not 45.1.1.1
    assert wrapper["data"][CALL]["pcap"] == f"Download PCAP: the SIP packets kept of {LISTED}"
    assert LISTED.encode() in orjson.dumps(wrapper["data"])
    assert download.status == 200
    assert download.content_type == "application/octet-stream"
    assert download.headers["Content-Disposition"].startswith(f"attachment; filename=export-{uuid}-")
    assert tshark_sip(pcap, tmp_path) == [
        [LISTED, "198.51.100.1", "REGISTER", CALL, "5060"],
        [LISTED, "198.51.100.1", "REGISTER", CALL, "5060"],
        [LISTED, "198.51.100.1", "REGISTER", CALL, "5060"],
        ["198.51.100.1", LISTED, "REGISTER", CALL, "5060"],
    ]  # not the unlisted 45.1.1.1's, not the one sent before APIBAN's answer was in


async def test_with_agent_download_off_the_button_finds_no_agent(
    agent: AgentFactory, homer: HomerPeer, aiohttp_client: AiohttpClient
) -> None:
    _, uuid = await _registered_agent(agent, homer, aiohttp_client, HEPSUB_AGENT_DOWNLOAD="false")
    [row] = homer.fake.active_rows()
    async with aiohttp.ClientSession() as session:
        download = await _homer_post(session, homer, f"/agent/search/{uuid}/download", DOWNLOAD)
        refused = await download.json()
        search = await _homer_post(session, homer, f"/agent/search/{uuid}/cdr", _ui_search())
    assert row.type == "cdr"
    # The browser says "Problem while downloading the file".
    assert (download.status, refused) == (400, {"data": {}, "message": "record not found"})
    assert search.status == 200
