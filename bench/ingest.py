"""HEP ingest over UDP: the agent's highest loss-free rate with local detection off and on (beside a
bare uvloop receiver's), and memory under a flood of spoofed sources.

    python bench/ingest.py [--seconds 2] [--rounds 1] [--refine 2] [--rates 20000,25000,...]
                           [--flood 1000000] [--flood-rate 25000] [--flood-only] [--no-flood] [--profile DIR]
    python bench/ingest.py --stages

Three receivers run pinned to core 0 with a 4 MiB receive buffer: a bare uvloop receiver that only
counts datagrams, and two agents (``serve``, mirror mode, 20,000 listed IPs loaded from a snapshot)
that differ in one setting, ``detect.enabled`` false and true. The sender runs pinned to core 1.
Each agent first gets one cycle of the traffic at 15,000/s (the steady state is measured: every
phone known, the server learned, the scanners detected). Then the rates go up, a few seconds
each; at each rate every receiver that has not lost a packet yet gets the same traffic in turn,
so the machine's noise falls on both agents alike; then ``--refine`` halvings of the gap between
each receiver's highest loss-free rate and its first lossy one. A rate is loss-free when every
packet offered was counted; a rate the sender could not reach counts as what it really offered
(its ceiling on this machine, about 230,000/s), and a bare receiver that lost nothing at any rate
is reported as at least that, so the agent / bare ratios printed are then upper bounds. Beside
it, each agent's CPU time per packet (user + system, from /proc), compared at the rates both
agents kept up with. ``--rounds N`` repeats the rate search and
reports medians. Before all this, the same traffic goes through the collector's datagram path in
process, detection off and on (best of 5 cycles): the steadiest ratio on a shared machine.
``--stages`` does only that, by stage (decode, SIP, sightings, detection, the whole path), before
(the chunk loop for every packet, the line walk) and after (``decode``, ``parse_sip``), alternating.

The traffic is what a capture agent at a registrar sees (``site_traffic``): 10,000 phones (a fifth
of them listed by APIBAN) each REGISTER, are challenged 401 by the server, REGISTER again with
credentials computed on that nonce and get 200; one phone in ten also places a call (INVITE, 407,
ACK, INVITE with credentials, 100, 180, 200, ACK, BYE, 200); and 20 scanners (``friendly-scanner``)
send OPTIONS to 100 extensions each, answered 404. Requests and replies are interleaved the way
concurrent transactions arrive, so the detector matches every reply to its request, learns the
server, exempts the phones that authenticated and detects the scanners.

Then each agent gets one packet from each of 2,000 listed addresses, then N packets (REGISTER,
``friendly-scanner``) from N distinct spoofed routable sources at ``--flood-rate``; its RSS is read
along the way, with how many addresses its sightings and its detector keep, and how many of the
listed senders it still remembers. ``--profile DIR`` runs the agents under cProfile and writes
``DIR/detect-off.prof`` and ``DIR/detect-on.prof`` when they stop. To measure another checkout,
run this script from that checkout's directory: the agents it starts (``python -m``) import the
package from the current directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pickle
import random
import re
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from common import BENCH_KEY, PYTHON, free_port, machine, pinned, public_ips, rss_kib, table, write_snapshot

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.access import Refusals
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import DetectSettings, HepSettings
from hepsub_apiban.detection.book import Detections
from hepsub_apiban.detection.detector import Detector
from hepsub_apiban.formats import sip_reference
from hepsub_apiban.formats.hep import BadPacket, HepPacket, build_hep3, decode
from hepsub_apiban.formats.hep.decoder import _decode_v2, _decode_v3
from hepsub_apiban.formats.sip import SipInfo, parse_sip
from hepsub_apiban.formats.sip_reference import parse_sip_general
from hepsub_apiban.ingest import collector as collector_module
from hepsub_apiban.ingest.collector import HepCollector
from hepsub_apiban.ingest.evidence import Evidence
from hepsub_apiban.ingest.sightings import Sightings

SERVER_CORE, LOAD_CORE = 0, 1
RCVBUF = 4 * 1024 * 1024
FLOOD_RATE = 25_000  # below the loss-free rate with detection on, so every spoofed source arrives
SERVER = "45.77.1.10"  # the site's registrar: routable, as a real one is
DOMAIN = "sip.example.net"
PHONES, CALLERS, SCANNERS, SCANNED = 10_000, 1_000, 20, 100
INTERLEAVE = 64  # transactions in flight at once
WARM_UP_RATE = 15_000

BARE_RECEIVER = """
import socket, sys, uvloop, asyncio
count = 0
class Counter(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        global count
        if data == b"STATS?":
            self.transport.sendto(str(count).encode(), addr)
        else:
            count += 1
async def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(sys.argv[2]))
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    await asyncio.get_running_loop().create_datagram_endpoint(Counter, sock=sock)
    await asyncio.Event().wait()
uvloop.run(main())
"""

# The agent under cProfile; serve stops cleanly on SIGTERM, and then the profile is written (--profile).
PROFILED_AGENT = """
import cProfile, sys
from hepsub_apiban.cli import main
profile = cProfile.Profile()
code = profile.runcall(main, ["serve"])
profile.dump_stats(sys.argv[1])
sys.exit(code)
"""

# The sender: a tight loop on a connected socket, paced per millisecond. Runs as its own process.
SENDER = """
import socket, sys, time, pickle
port, rate, seconds, path = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
packets = pickle.load(open(path, "rb"))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
sock.connect(("127.0.0.1", port))
total = int(rate * seconds)
sent, n, start = 0, len(packets), time.perf_counter()
while sent < total:
    due = int((time.perf_counter() - start) * rate) + 1
    while sent < min(due, total):
        try:
            sock.send(packets[sent % n])
        except (BlockingIOError, ConnectionRefusedError):
            pass
        sent += 1
print(sent, time.perf_counter() - start)
"""


# ---------------------------------------------------------------- traffic


_HEAD = struct.Struct("!4sH")
_FIXED = struct.Struct("!HHHB HHHB HHH4s HHH4s HHHH HHHH HHHI HHHI HHHB HHHI HHH")
_FIXED_SIZE = _FIXED.size - 6  # the chunks before the payload's header


def hep(src: str, dst: str, payload: str, n: int) -> bytes:
    """A HEP3 packet as ``build_hep3`` writes it (IPv4, UDP, SIP), without construct's per-packet cost:
    a million of them are built for the flood. ``test_fast_hep`` below checks that both agree."""
    body = payload.encode()
    chunks = _FIXED.pack(
        *(0, 1, 7, 2),
        *(0, 2, 7, 17),
        *(0, 3, 10, socket.inet_aton(src)),
        *(0, 4, 10, socket.inet_aton(dst)),
        *(0, 7, 8, 5060),
        *(0, 8, 8, 5060),
        *(0, 9, 10, 1_800_000_000),
        *(0, 10, 10, n % 1_000_000),
        *(0, 11, 7, 1),
        *(0, 12, 10, 2001),
        *(0, 15, 6 + len(body)),
    )
    return _HEAD.pack(b"HEP3", _HEAD.size + len(chunks) + len(body)) + chunks + body


def test_fast_hep() -> None:
    packet = HepPacket(
        3, 2, 17, "1.2.3.4", SERVER, 5060, 5060, 1_800_000_000, 7, 1, 2001, b"OPTIONS x SIP/2.0"
    )
    if hep(packet.src_ip, packet.dst_ip, packet.payload.decode(), 7) != build_hep3(packet):
        raise AssertionError("bench/ingest.py's HEP3 builder no longer matches build_hep3")


def sip_packets(sources: list[str], dst: str = "198.51.100.1") -> list[bytes]:
    """One REGISTER from each source (``friendly-scanner``): the flood and the listed senders."""
    packets = []
    for n, src in enumerate(sources):
        payload = (
            f"REGISTER sip:{dst} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-{n};rport\r\n"
            f"From: <sip:{100 + n % 900}@{dst}>;tag={n}\r\nTo: <sip:{100 + n % 900}@{dst}>\r\n"
            f"Call-ID: bench-{n}@{src}\r\nCSeq: 1 REGISTER\r\nUser-Agent: friendly-scanner\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        packets.append(hep(src, dst, payload, n))
    return packets


@dataclass
class Dialog:
    """One exchange between a remote and the server: (direction, SIP message) in order."""

    remote: str
    messages: list[tuple[bool, str]] = field(default_factory=list)  # (from the remote, payload)

    def request(self, text: str) -> None:
        self.messages.append((True, text))

    def reply(self, text: str) -> None:
        self.messages.append((False, text))


def _request(method: str, uri: str, remote: str, user: str, call_id: str, cseq: int, extra: str = "") -> str:
    to = f"sip:{user}@{DOMAIN}" if method == "REGISTER" else uri
    body = ""
    if method == "INVITE":
        extra += "Content-Type: application/sdp\r\n"
        body = (
            f"v=0\r\no={user} 2890844526 2890844526 IN IP4 {remote}\r\ns=-\r\nc=IN IP4 {remote}\r\n"
            "t=0 0\r\nm=audio 49170 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
        )
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {remote}:5060;branch=z9hG4bK{call_id[:8]}{cseq};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{user}@{DOMAIN}>;tag={call_id[:6]}\r\nTo: <{to}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContact: <sip:{user}@{remote}:5060>\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n{body}"
    )


def _reply(status: str, method: str, remote: str, user: str, call_id: str, cseq: int, extra: str = "") -> str:
    return (
        f"SIP/2.0 {status}\r\nVia: SIP/2.0/UDP {remote}:5060;branch=z9hG4bK{call_id[:8]}{cseq};"
        f"rport=5060;received={remote}\r\nFrom: <sip:{user}@{DOMAIN}>;tag={call_id[:6]}\r\n"
        f"To: <sip:{user}@{DOMAIN}>;tag=srv{cseq}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
        f"Server: kamailio (5.7.4 (x86_64/linux))\r\n{extra}Content-Length: 0\r\n\r\n"
    )


def _digest(header: str, realm_nonce: str, user: str = "", uri: str = "") -> str:
    """A challenge (``WWW-Authenticate``...) or, with ``user``, credentials computed on its nonce."""
    if not user:
        return f'{header}: Digest realm="{DOMAIN}", {realm_nonce}, algorithm=MD5\r\n'
    return (
        f'{header}: Digest username="{user}", realm="{DOMAIN}", {realm_nonce}, uri="{uri}", '
        'response="6629fae49393a05397450978507c4ef1", algorithm=MD5\r\n'
    )


PHONE_AGENT = "User-Agent: Yealink SIP-T46U 66.86.0.15\r\n"


def registration(phone: str, user: str, n: int) -> Dialog:
    """REGISTER, 401 with a nonce, REGISTER with credentials on that nonce, 200."""
    uri, call_id, nonce = f"sip:{DOMAIN}", f"reg{n:08x}a4c2e9@{phone}", f'nonce="{n:08x}5f2b1a7c"'
    dialog = Dialog(phone)
    dialog.request(_request("REGISTER", uri, phone, user, call_id, 1, PHONE_AGENT + "Expires: 3600\r\n"))
    dialog.reply(
        _reply("401 Unauthorized", "REGISTER", phone, user, call_id, 1, _digest("WWW-Authenticate", nonce))
    )
    signed = PHONE_AGENT + "Expires: 3600\r\n" + _digest("Authorization", nonce, user, uri)
    dialog.request(_request("REGISTER", uri, phone, user, call_id, 2, signed))
    contact = f"Contact: <sip:{user}@{phone}:5060>;expires=3600\r\n"
    dialog.reply(_reply("200 OK", "REGISTER", phone, user, call_id, 2, contact))
    return dialog


def call(phone: str, user: str, n: int) -> Dialog:
    """INVITE, 407, ACK, INVITE with credentials, 100, 180, 200, ACK, BYE, 200."""
    uri, call_id, nonce = f"sip:+4930{n:07d}@{DOMAIN}", f"call{n:08x}77d1@{phone}", f'nonce="{n:08x}c0ffee11"'
    dialog = Dialog(phone)
    dialog.request(_request("INVITE", uri, phone, user, call_id, 1, PHONE_AGENT))
    challenge = _digest("Proxy-Authenticate", nonce)
    dialog.reply(_reply("407 Proxy Authentication Required", "INVITE", phone, user, call_id, 1, challenge))
    dialog.request(_request("ACK", uri, phone, user, call_id, 1))
    signed = PHONE_AGENT + _digest("Proxy-Authorization", nonce, user, uri)
    dialog.request(_request("INVITE", uri, phone, user, call_id, 2, signed))
    for status in ("100 Trying", "180 Ringing", "200 OK"):
        dialog.reply(_reply(status, "INVITE", phone, user, call_id, 2))
    dialog.request(_request("ACK", uri, phone, user, call_id, 2))
    dialog.request(_request("BYE", uri, phone, user, call_id, 3))
    dialog.reply(_reply("200 OK", "BYE", phone, user, call_id, 3))
    return dialog


def scan(scanner: str, n: int) -> list[Dialog]:
    """OPTIONS from ``friendly-scanner`` to ``SCANNED`` extensions, each answered 404."""
    dialogs = []
    for extension in range(100, 100 + SCANNED):
        uri, call_id, user = f"sip:{extension}@{SERVER}", f"{n:04x}{extension:06d}scan", str(extension)
        dialog = Dialog(scanner)
        dialog.request(
            _request("OPTIONS", uri, scanner, user, call_id, 1, "User-Agent: friendly-scanner\r\n")
        )
        dialog.reply(_reply("404 Not Found", "OPTIONS", scanner, user, call_id, 1))
        dialogs.append(dialog)
    return dialogs


def site_traffic(phones: list[str], scanners: list[str], seed: int = 7) -> list[bytes]:
    """Registrations, calls and scans, ``INTERLEAVE`` transactions in flight at a time."""
    dialogs = [registration(phone, str(1000 + n), n) for n, phone in enumerate(phones)]
    dialogs += [call(phone, str(1000 + n), n) for n, phone in enumerate(phones[:CALLERS])]
    for n, scanner in enumerate(scanners):
        dialogs += scan(scanner, n)
    random.Random(seed).shuffle(dialogs)
    packets: list[bytes] = []
    for start in range(0, len(dialogs), INTERLEAVE):
        group = dialogs[start : start + INTERLEAVE]
        for step in range(max(len(d.messages) for d in group)):
            for dialog in group:
                if step < len(dialog.messages):
                    outbound, text = dialog.messages[step]
                    src, dst = (dialog.remote, SERVER) if outbound else (SERVER, dialog.remote)
                    packets.append(hep(src, dst, text, len(packets)))
    return packets


# ---------------------------------------------------------------- in process


def datagram_path(
    listed: list[str], detect: bool, evidence: bool = True
) -> Callable[[bytes, tuple[str, int]], None]:
    """The collector's UDP datagram callback as ``serve`` wires it (mirror verdicts; with
    ``detect``, the detector and its book, the book flagging sightings; with ``evidence``, the
    packets of protected addresses kept for the Download button)."""
    mirror = Mirror()
    mirror.add(listed, "1700000000", time.time())
    mirror.last_full_sync = time.time()
    sightings = Sightings(LookupService(None, NetworkSet(), mirror=mirror))
    detector = None
    if detect:
        book = Detections(DetectSettings(), mirror.new_serial, on_change=sightings.flag)
        detector = Detector(DetectSettings(), book.report)
    kept = Evidence(sightings.protected_addresses()) if evidence else None
    collector = HepCollector(sightings, HepSettings(), time.time, Refusals(), detector, kept)
    return collector.udp_protocol().datagram_received


def in_process(traffic: list[bytes], listed: list[str], rounds: int = 5) -> dict[bool, list[float]]:
    """Microseconds per datagram of one cycle of ``traffic``, detection off and on in turn, after
    a cycle of warm-up each; on core 0, like the agents (log lines off: serve runs at error)."""
    paths = {detect: datagram_path(listed, detect) for detect in (False, True)}
    sender = ("127.0.0.1", 40000)
    costs: dict[bool, list[float]] = {False: [], True: []}
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CORE})
    logging.disable(logging.ERROR)
    try:
        for round_ in range(rounds + 1):
            for detect, receive in paths.items():
                start = time.perf_counter()
                for data in traffic:
                    receive(data, sender)
                if round_:  # the first round fills the stores
                    costs[detect].append((time.perf_counter() - start) / len(traffic) * 1e6)
    finally:
        logging.disable(logging.NOTSET)
        os.sched_setaffinity(0, affinity)
    return costs


def decode_chunk_loop(data: bytes, received_at: float) -> HepPacket | BadPacket:
    """``decode`` as it was before the common layouts were read at once: every packet through the
    chunk loop (the stage table's "before")."""
    if type(data) is not bytes:
        data = bytes(data)
    try:
        if not data:
            return BadPacket("empty datagram")
        if data[0] in (1, 2):
            return _decode_v2(data, received_at)
        return _decode_v3(data, received_at)
    except Exception as error:
        return BadPacket(f"decoder error: {type(error).__name__}")


class SearchedUser:
    """``sip_reference._USER`` as it was before (the stage table's "before"): the leftmost match of a
    backtracking search, which the linear pattern now finds without its worst case."""

    match = staticmethod(re.compile(rb"sips?:([^@;>\s]+)@|tel:([^;>\s]+)", re.IGNORECASE).search)


USERS = {"before": SearchedUser, "after": sip_reference._USER}
Parse = Callable[[bytes], SipInfo | None]
Decode = Callable[[bytes, float], HepPacket | BadPacket]
VERSIONS: dict[str, tuple[Decode, Parse]] = {
    "before": (decode_chunk_loop, parse_sip_general),
    "after": (decode, parse_sip),
}


def stages(traffic: list[bytes], listed: list[str], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Microseconds per datagram of each stage of the collector's datagram path, best of
    ``rounds`` cycles of ``traffic``, before and after (``VERSIONS``), alternating, on core 0:
    decoding, SIP extraction, the sighting update and the detector, each alone on what the
    previous stage gave (stores filled by a first cycle); then the whole path with detection off
    and on, through the collector (so the rest is the collector's own bookkeeping)."""
    now = time.time()
    packets = [decode(data, now) for data in traffic]
    assert all(isinstance(packet, HepPacket) for packet in packets)
    sips = [(p.src_ip, p.dst_ip, parse_sip(p.payload), p.ip_proto) for p in packets]  # type: ignore[union-attr]
    payloads = [p.payload for p in packets]  # type: ignore[union-attr]
    mirror = Mirror()
    mirror.add(listed, "1700000000", now)
    sightings = Sightings(LookupService(None, NetworkSet(), mirror=mirror))
    detector = Detector(DetectSettings(), Detections(DetectSettings(), mirror.new_serial).report)

    def record() -> None:
        for src, dst, info, _ in sips:
            sightings.record(src, dst, info, now)  # type: ignore[arg-type]

    def observe() -> None:
        for src, dst, info, proto in sips:
            detector.observe(src, dst, info, proto, now)  # type: ignore[arg-type]

    def decoding(decode_fn: Decode) -> Callable[[], None]:
        def run() -> None:
            for data in traffic:
                decode_fn(data, now)

        return run

    def extracting(parse_fn: Parse) -> Callable[[], None]:
        def run() -> None:
            for payload in payloads:
                parse_fn(payload)

        return run

    def whole(path: Callable[[bytes, tuple[str, int]], None]) -> Callable[[], None]:
        def run() -> None:
            for data in traffic:
                path(data, sender)

        return run

    sender = ("127.0.0.1", 40000)
    work = {
        name: {
            "decode": decoding(decode_fn),
            "SIP": extracting(parse_fn),
            "sightings": record,
            "detection": observe,
            **{
                f"whole, detection {'on' if detect else 'off'}": whole(datagram_path(listed, detect))
                for detect in (False, True)
            },
        }
        for name, (decode_fn, parse_fn) in VERSIONS.items()
    }
    costs: dict[str, dict[str, list[float]]] = {name: {} for name in VERSIONS}
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CORE})
    logging.disable(logging.ERROR)
    try:
        for round_ in range(rounds + 1):  # the first round fills the stores
            for name, (decode_fn, parse_fn) in VERSIONS.items():
                # the collector calls whatever these module names hold when a datagram arrives
                collector_module.decode, collector_module.parse_sip = decode_fn, parse_fn  # type: ignore[assignment]
                sip_reference._USER = USERS[name]  # type: ignore[assignment]
                for stage, run in work[name].items():
                    start = time.perf_counter()
                    run()
                    if round_:
                        costs[name].setdefault(stage, []).append(time.perf_counter() - start)
    finally:
        collector_module.decode, collector_module.parse_sip = decode, parse_sip
        sip_reference._USER = USERS["after"]
        logging.disable(logging.NOTSET)
        os.sched_setaffinity(0, affinity)
    return {
        name: {stage: min(times) / len(traffic) * 1e6 for stage, times in by_stage.items()}
        for name, by_stage in costs.items()
    }


def print_stages(costs: dict[str, dict[str, float]]) -> None:
    names = list(costs)
    rows = []
    for stage in costs[names[0]]:
        values = [costs[name][stage] for name in names]
        rows.append([stage, *(f"{value:.2f} us" for value in values), f"{values[-1] / values[0]:.2f}"])
    print(
        "in process, per datagram, by stage (best of 5 cycles of the traffic, before and after alternating):"
    )
    print(table(["stage", *names, "after / before"], rows))
    print()


# ---------------------------------------------------------------- receivers


@dataclass
class Receiver:
    name: str
    port: int
    count: Callable[[], int]
    pid: int | None = None  # an agent's, for its CPU time and RSS
    http_port: int = 0
    best: list[int] = field(default_factory=list)  # the highest loss-free rate of each round
    lost_any: bool = False  # lost packets at some rate: its best is its limit, not the sender's
    cpu_per_packet: dict[tuple[int, int], float] = field(default_factory=dict)  # (round, rate) -> us


async def offer(port: int, rate: float, seconds: float, packets_file: Path) -> int:
    return (await offer_timed(port, rate, seconds, packets_file))[0]


async def offer_timed(port: int, rate: float, seconds: float, packets_file: Path) -> tuple[int, float]:
    """Packets sent and the seconds the sender took (more than ``seconds`` when it fell behind)."""
    argv = pinned(LOAD_CORE, [PYTHON, "-c", SENDER, str(port), str(rate), str(seconds), str(packets_file)])
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    sent, elapsed = out.split()
    if float(elapsed) > seconds * 1.1:
        print(
            f"  (sender fell behind at {rate:,.0f}/s: {sent.decode()} in {float(elapsed):.2f} s)",
            file=sys.stderr,
        )
    return int(sent), float(elapsed)


def bare_count(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(b"STATS?", ("127.0.0.1", port))
        return int(sock.recv(64))


def agent_status(http_port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/status", timeout=5) as response:
        status: dict[str, object] = json.loads(response.read())
        return status


def agent_count(http_port: int) -> int:
    hep = agent_status(http_port)["hep"]
    assert isinstance(hep, dict)
    bad: int = sum(hep["bad_packets"].values())
    return int(hep["packets"].get("udp", 0)) + bad


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(read: Callable[[], int], previous: int = -1) -> int:
    """The count once it stops moving (the receiver drained its socket)."""
    for _ in range(50):
        await asyncio.sleep(0.2)
        current = int(read())
        if current == previous:
            return current
        previous = current
    return previous


async def loss_free(
    receivers: list[Receiver], rates: list[int], seconds: float, packets: Path, round_: int, refine: int
) -> list[list[str]]:
    """Rates up; at each, every receiver that has lost nothing yet gets the same traffic in turn.
    Then ``refine`` halvings of the gap between each receiver's highest loss-free rate and its first
    lossy one (to 500/s), the receivers again in turn."""
    rows: list[list[str]] = []
    lossy: dict[str, int] = {}  # receiver -> the lowest rate at which it lost packets
    for receiver in receivers:
        receiver.best.append(0)
    for rate in rates:
        for receiver in receivers:
            if receiver.name not in lossy and await step(receiver, rate, seconds, packets, round_, rows):
                lossy[receiver.name] = rate
    for _ in range(refine):
        for receiver in receivers:
            high = lossy.get(receiver.name)
            rate = (receiver.best[-1] + high) // 1000 * 500 if high else 0
            between = high and receiver.best[-1] < rate < high
            if between and await step(receiver, rate, seconds, packets, round_, rows):
                lossy[receiver.name] = rate
    return rows


async def step(
    receiver: Receiver, rate: int, seconds: float, packets: Path, round_: int, rows: list[list[str]]
) -> bool:
    """``rate`` offered to ``receiver`` for ``seconds``: its row added; True when packets were lost."""
    before = await settle(receiver.count)
    cpu_before = cpu_seconds(receiver.pid) if receiver.pid else 0.0
    sent, elapsed = await offer_timed(receiver.port, rate, seconds, packets)
    received = await settle(receiver.count) - before
    # What was really offered: a sender that fell behind offered less than asked (its ceiling).
    offered = rate if elapsed <= seconds * 1.1 else min(rate, int(sent / elapsed))
    lost, cpu = sent - received, ""
    if receiver.pid:
        used = (cpu_seconds(receiver.pid) - cpu_before) / max(received, 1) * 1e6
        if not lost:
            receiver.cpu_per_packet[(round_, rate)] = used
        cpu = f"{used:.1f} us"
    loss = f"{lost / sent * 100:.2f} %"
    shown = f"{rate:,}" if offered == rate else f"{offered:,} (asked {rate:,})"
    rows.append([str(round_), receiver.name, shown, f"{sent:,}", f"{received:,}", loss, cpu])
    if not lost:
        receiver.best[-1] = max(receiver.best[-1], offered)
    else:
        receiver.lost_any = True
    return lost > 0


async def warm_up(receivers: list[Receiver], cycle: int, packets: Path) -> None:
    """One cycle of the traffic into each agent at a rate it keeps up with, so that the rates
    measure the steady state: every phone known to the sightings and the detector, the server
    learned, the scanners detected."""
    for receiver in receivers:
        if receiver.pid:
            await offer(receiver.port, WARM_UP_RATE, cycle / WARM_UP_RATE, packets)
            await settle(receiver.count)


def agent_env(http_port: int, hep_port: int, state: Path, detect: bool) -> dict[str, str]:
    return {
        **os.environ,
        "HEPSUB_APIBAN_URL": "http://127.0.0.1:9",
        "HEPSUB_APIBAN_KEY": BENCH_KEY,
        "HEPSUB_STATE_DIR": str(state),
        "HEPSUB_AGENT_BIND": "127.0.0.1",
        "HEPSUB_AGENT_PORT": str(http_port),
        "HEPSUB_HEP_UDP": f"127.0.0.1:{hep_port}",
        "HEPSUB_HEP_TCP": "",
        "HEPSUB_HEP_RCVBUF": str(RCVBUF),
        "HEPSUB_LOG_LEVEL": "error",
        "HEPSUB_DETECT_ENABLED": "true" if detect else "false",
    }


async def main(args: argparse.Namespace) -> None:
    test_fast_hep()
    rates = [int(r) for r in args.rates.split(",")]
    listed = public_ips(20_000, seed=11)
    phones = listed[:2000] + public_ips(PHONES - 2000, seed=12)
    scanners = public_ips(SCANNERS, seed=13)
    if args.stages:
        print(f"machine: {machine()}")
        print_stages(stages(site_traffic(phones, scanners), listed))
        return
    processes: list[asyncio.subprocess.Process] = []
    profiles: Path | None = args.profile
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        packets_file = Path(tmp) / "packets.pickle"
        traffic = site_traffic(phones, scanners)
        packets_file.write_bytes(pickle.dumps(traffic))
        costs = in_process(traffic, listed) if not args.flood_only else {}
        bare_port = free_port()
        receivers = [Receiver("bare uvloop", bare_port, lambda: bare_count(bare_port))]
        processes.append(
            await asyncio.create_subprocess_exec(
                *pinned(SERVER_CORE, [PYTHON, "-c", BARE_RECEIVER, str(bare_port), str(RCVBUF)])
            )
        )
        for detect in (False, True):
            hep_port, http_port = free_port(), free_port()
            state = Path(tmp) / f"state-{detect}"
            write_snapshot(state, "http://127.0.0.1:9", listed, time.time())
            name = "detect-on" if detect else "detect-off"
            argv = [PYTHON, "-m", "hepsub_apiban", "serve"]
            if profiles is not None:
                argv = [PYTHON, "-c", PROFILED_AGENT, str(profiles / f"{name}.prof")]
            process = await asyncio.create_subprocess_exec(
                *pinned(SERVER_CORE, argv), env=agent_env(http_port, hep_port, state, detect)
            )
            processes.append(process)
            receivers.append(
                Receiver(
                    f"agent, detection {'on' if detect else 'off'}",
                    hep_port,
                    lambda port=http_port: agent_count(port),  # type: ignore[misc]
                    process.pid,
                    http_port,
                )
            )
        rows: list[list[str]] = []
        floods: list[list[str]] = []
        detection: dict[str, object] = {}
        try:
            await _until_up(receivers)
            if not args.flood_only:
                await warm_up(receivers, len(traffic), packets_file)
                for round_ in range(1, args.rounds + 1):
                    rows += await loss_free(receivers, rates, args.seconds, packets_file, round_, args.refine)
                status = agent_status(receivers[2].http_port)["detection"]
                assert isinstance(status, dict)
                detection = status
            if not args.no_flood:
                files = write_flood(Path(tmp), args.flood, listed[:2000])
                for receiver in receivers[1:]:
                    floods.append(await flood_memory(receiver, files, args.flood_rate))
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
    print(f"machine: {machine()}")
    if costs:
        print_in_process(costs)
    if not args.flood_only:
        print_rates(args, receivers, rows, len(traffic), detection)
    if floods:
        print(
            f"flood: one REGISTER from each of 2,000 listed addresses, then {args.flood:,} from as many "
            f"spoofed routable sources at {args.flood_rate:,.0f}/s"
        )
        print(
            table(
                [
                    "agent",
                    "counted",
                    "sightings kept",
                    "detector tracks",
                    "listed senders kept",
                    "RSS before",
                    *[f"RSS after {n:,}" for n in flood_marks(args.flood)],
                    "peak RSS",
                ],
                floods,
            )
        )


def print_in_process(costs: dict[bool, list[float]]) -> None:
    off, on = min(costs[False]), min(costs[True])
    print(
        f"in process, the collector's UDP datagram path, a cycle of the traffic, best of {len(costs[False])}:"
    )
    print(
        table(
            ["detection", "per datagram", "each round", "off / on"],
            [
                ["off", f"{off:.2f} us", " / ".join(f"{c:.1f}" for c in costs[False]), "1.00"],
                ["on", f"{on:.2f} us", " / ".join(f"{c:.1f}" for c in costs[True]), f"{off / on:.2f}"],
            ],
        )
    )
    print()


def print_rates(
    args: argparse.Namespace,
    receivers: list[Receiver],
    rows: list[list[str]],
    cycle: int,
    detection: dict[str, object],
) -> None:
    print(
        f"HEP3/UDP on loopback, a registrar's traffic ({cycle:,} packets in the cycle); receivers on core "
        f"{SERVER_CORE}, sender on core {LOAD_CORE}, {args.seconds:g} s per rate, {args.rounds} round(s)"
    )
    print(table(["round", "receiver", "offered/s", "sent", "received", "lost", "agent CPU per packet"], rows))
    bare, off, on = receivers
    both = sorted(set(off.cpu_per_packet) & set(on.cpu_per_packet))  # (round, rate) both kept up with
    summary = []
    for receiver in receivers:
        ratio = "-"
        if receiver is not bare and all(off.best):
            ratio = " / ".join(
                f"{mine / base:.2f}" for mine, base in zip(receiver.best, off.best, strict=True)
            )
        cpu = (
            f"{median(receiver.cpu_per_packet[key] for key in both):.1f} us" if both and receiver.pid else "-"
        )
        rates = " / ".join(f"{best:,}" for best in receiver.best)
        summary.append([receiver.name, rates, f"{median(receiver.best):,.0f}/s", ratio, cpu])
    headers = [
        "receiver",
        "highest loss-free rate, each round",
        "median",
        "/ detection off",
        "CPU per packet",
    ]
    print(table(headers, summary))
    if all(off.best):
        print(f"loss-free rate, detection on / off (medians): {median(on.best) / median(off.best):.2f}")
    if all(bare.best):
        bound = (
            ""
            if bare.lost_any
            else " (upper bounds: the bare receiver lost nothing at any rate, so its figure is the most "
            "the sender offered, not its limit)"
        )
        base = median(bare.best)
        print(
            f"loss-free rate against the bare receiver (medians): detection off "
            f"{median(off.best) / base:.2f}, detection on {median(on.best) / base:.2f}{bound}"
        )
    if both:
        cpu_ratio = median(off.cpu_per_packet[key] / on.cpu_per_packet[key] for key in both)
        print(
            f"CPU per packet, detection off / on: {cpu_ratio:.2f} (median over the {len(both)} rates "
            "both agents kept up with; CPU per packet columns: median over the same)"
        )
    print(f"detector after the rates: {json.dumps(detection)}")
    print()


async def _until_up(receivers: list[Receiver]) -> None:
    for _ in range(100):
        try:
            for receiver in receivers:
                receiver.count()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("receivers did not start")


def listed_senders(http_port: int) -> set[str]:
    # 10,000: the most one answer holds (the flood asks about 2,000)
    url = f"http://127.0.0.1:{http_port}/api/v1/sightings?listed=true&limit=10000"
    with urllib.request.urlopen(url, timeout=30) as response:
        return {s["ip"] for s in json.loads(response.read())["sightings"]}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


CHUNK = 100_000


def flood_marks(count: int) -> list[int]:
    """Where RSS is read during the flood: after the first chunk, half way, at the end."""
    return sorted({mark for mark in (CHUNK, count // 2 // CHUNK * CHUNK, count) if 0 < mark <= count})


def write_flood(tmp: Path, count: int, listed: list[str]) -> list[tuple[Path, int]]:
    """The listed senders' packets, then the flood in chunks of ``CHUNK`` distinct sources."""
    files = [(tmp / "listed.pickle", len(listed))]
    files[0][0].write_bytes(pickle.dumps(sip_packets(listed)))
    for start in range(0, count, CHUNK):
        size = min(CHUNK, count - start)
        sources = [socket.inet_ntoa((0x2D000000 + start + i).to_bytes(4, "big")) for i in range(size)]
        files.append((tmp / f"flood-{start}.pickle", size))
        files[-1][0].write_bytes(pickle.dumps(sip_packets(sources)))
    return files


async def flood_memory(receiver: Receiver, files: list[tuple[Path, int]], rate: float) -> list[str]:
    assert receiver.pid is not None
    http_port, (listed_file, listed), chunks = receiver.http_port, files[0], files[1:]
    await offer(receiver.port, rate / 10, listed / (rate / 10), listed_file)
    counted = await settle(receiver.count)
    seen_listed = listed_senders(http_port)
    before = rss_kib(receiver.pid)
    marks, rss, done = flood_marks(sum(size for _, size in chunks)), [], 0
    for path, size in chunks:
        await offer(receiver.port, rate, size / rate, path)
        done += size
        if done in marks:
            await settle(receiver.count)
            rss.append(f"{rss_kib(receiver.pid) / 1024:.1f} MiB")
    counted = await settle(receiver.count) - counted
    status = agent_status(http_port)
    hep, detection = status["hep"], status["detection"]
    assert isinstance(hep, dict)
    assert isinstance(detection, dict)
    sightings = hep["sightings"]
    kept_listed = listed_senders(http_port) & seen_listed
    tracked = f"{detection['tracked']:,}" if detection.get("enabled") else "(off)"
    return [
        receiver.name,
        f"{counted:,}",
        f"{sightings['ips']:,} (cap {sightings['capacity']:,})",
        tracked,
        f"{len(kept_listed):,} of {len(seen_listed):,}",
        f"{before / 1024:.1f} MiB",
        *rss,
        f"{peak_rss_kib(receiver.pid) / 1024:.1f} MiB",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="rate searches, one after the other")
    parser.add_argument("--refine", type=int, default=2, help="halvings of the gap above each loss-free rate")
    parser.add_argument(
        "--rates", default="20000,25000,30000,35000,40000,45000,50000,55000,60000,70000,80000"
    )
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--flood-rate", type=float, default=FLOOD_RATE)
    parser.add_argument("--flood-only", action="store_true", help="skip the loss-free rate search")
    parser.add_argument("--no-flood", action="store_true", help="skip the spoofed flood")
    parser.add_argument(
        "--stages", action="store_true", help="only the in-process cost by stage, before and after, then exit"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=lambda text: Path(text).resolve(),
        help="run the agents under cProfile, profiles written to DIR",
    )
    asyncio.run(main(parser.parse_args()))
