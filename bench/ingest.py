"""HEP ingest over UDP: the agent's highest loss-free rate beside a bare uvloop receiver's, and memory
under a flood of spoofed sources.

    python bench/ingest.py [--seconds 2] [--rates 25000,50000,...] [--flood 1000000] [--flood-only]

Both receivers run pinned to core 0 with a 4 MiB receive buffer; the sender runs pinned to core 1
and offers HEP3 packets carrying SIP REGISTERs (about 480 bytes; source addresses drawn from 10,000,
a fifth of them listed) at a fixed rate for a few seconds. The agent decodes each packet, parses the
SIP and updates its sightings (mirror mode, 20,000 listed IPs loaded from a snapshot); the bare
receiver only counts datagrams. A rate is loss-free when every packet offered was counted. Then the
agent gets one packet from each of 2,000 listed addresses, then N packets from N distinct spoofed
sources at 40,000/s (``--flood-rate``); its RSS (current and peak) is read, and how many of the
listed senders it still remembers. ``--flood-only`` skips the rate search. To measure another
checkout, run this script from that checkout's directory: the agent it starts (``python -m``)
imports the package from the current directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import BENCH_KEY, PYTHON, free_port, machine, pinned, public_ips, rss_kib, table, write_snapshot

from hepsub_apiban.hep import HepPacket, build_hep3

SERVER_CORE, LOAD_CORE = 0, 1
RCVBUF = 4 * 1024 * 1024
FLOOD_RATE = 40_000  # below the loss-free rate, so every spoofed source arrives

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


def sip_packets(sources: list[str], dst: str = "198.51.100.1") -> list[bytes]:
    packets = []
    for n, src in enumerate(sources):
        payload = (
            f"REGISTER sip:{dst} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch=z9hG4bK-{n};rport\r\n"
            f"From: <sip:{100 + n % 900}@{dst}>;tag={n}\r\nTo: <sip:{100 + n % 900}@{dst}>\r\n"
            f"Call-ID: bench-{n}@{src}\r\nCSeq: 1 REGISTER\r\nUser-Agent: friendly-scanner\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        packet = HepPacket(3, 2, 17, src, dst, 5060, 5060, 1_800_000_000, n % 1_000_000, 1, 2001, payload)
        packets.append(build_hep3(packet))
    return packets


async def offer(port: int, rate: float, seconds: float, packets_file: Path) -> int:
    argv = pinned(LOAD_CORE, [PYTHON, "-c", SENDER, str(port), str(rate), str(seconds), str(packets_file)])
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    sent, elapsed = out.split()
    if float(elapsed) > seconds * 1.1:
        print(
            f"  (sender fell behind at {rate:,.0f}/s: {sent.decode()} in {float(elapsed):.2f} s)",
            file=sys.stderr,
        )
    return int(sent)


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


async def settle(read: object, previous: int = -1) -> int:
    """The count once it stops moving (the receiver drained its socket)."""
    assert callable(read)
    for _ in range(50):
        await asyncio.sleep(0.2)
        current = int(read())
        if current == previous:
            return current
        previous = current
    return previous


async def loss_free(
    name: str, port: int, read: object, rates: list[int], seconds: float, packets: Path
) -> tuple[int, list[list[str]]]:
    best, rows = 0, []
    for rate in rates:
        before = await settle(read)
        sent = await offer(port, rate, seconds, packets)
        received = await settle(read) - before
        lost = sent - received
        rows.append([name, f"{rate:,}", f"{sent:,}", f"{received:,}", f"{lost / sent * 100:.2f} %"])
        if lost > 0:
            break
        best = rate
    return best, rows


async def main(args: argparse.Namespace) -> None:
    rates = [int(r) for r in args.rates.split(",")]
    listed = public_ips(20_000, seed=11)
    sources = listed[:2000] + public_ips(8000, seed=12)
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        packets_file = Path(tmp) / "packets.pickle"
        packets_file.write_bytes(pickle.dumps(sip_packets(sources)))
        bare_port, hep_port, http_port = free_port(), free_port(), free_port()
        state = Path(tmp) / "state"
        write_snapshot(state, "http://127.0.0.1:9", listed, time.time())
        env = {
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
        }
        bare = await asyncio.create_subprocess_exec(
            *pinned(SERVER_CORE, [PYTHON, "-c", BARE_RECEIVER, str(bare_port), str(RCVBUF)])
        )
        agent = await asyncio.create_subprocess_exec(
            *pinned(SERVER_CORE, [PYTHON, "-m", "hepsub_apiban", "serve"]), env=env
        )
        bare_best = agent_best = 0
        bare_rows: list[list[str]] = []
        agent_rows: list[list[str]] = []
        try:
            await _until_up(http_port, bare_port)
            if not args.flood_only:
                bare_best, bare_rows = await loss_free(
                    "bare uvloop", bare_port, lambda: bare_count(bare_port), rates, args.seconds, packets_file
                )
                agent_best, agent_rows = await loss_free(
                    "agent", hep_port, lambda: agent_count(http_port), rates, args.seconds, packets_file
                )
            flood = await flood_memory(
                agent.pid, hep_port, http_port, (args.flood, args.flood_rate), Path(tmp), listed[:2000]
            )
        finally:
            for process in (bare, agent):
                process.terminate()
                await process.wait()
    print(f"machine: {machine()}")
    if not args.flood_only:
        print(
            f"HEP3/UDP on loopback, SIP REGISTER payloads; receivers on core {SERVER_CORE}, "
            f"sender on core {LOAD_CORE}, {args.seconds:g} s per rate"
        )
        print(table(["receiver", "offered/s", "sent", "received", "lost"], bare_rows + agent_rows))
        print(
            table(
                ["receiver", "highest loss-free rate", "agent / bare"],
                [
                    ["bare uvloop", f"{bare_best:,}/s", "-"],
                    [
                        "agent (decode + SIP + sightings)",
                        f"{agent_best:,}/s",
                        f"{agent_best / bare_best:.2f}" if bare_best else "-",
                    ],
                ],
            )
        )
        print()
    print(
        table(
            [
                "distinct spoofed sources sent",
                "counted",
                "sightings kept",
                "evicted",
                "listed senders kept",
                "RSS before",
                "RSS after",
                "peak RSS",
            ],
            [flood],
        )
    )


async def _until_up(http_port: int, bare_port: int) -> None:
    for _ in range(100):
        try:
            agent_status(http_port)
            bare_count(bare_port)
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("receivers did not start")


def listed_senders(http_port: int) -> set[str]:
    url = f"http://127.0.0.1:{http_port}/api/v1/sightings?listed=true&limit=1000000"
    with urllib.request.urlopen(url, timeout=30) as response:
        return {s["ip"] for s in json.loads(response.read())["sightings"]}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


async def flood_memory(
    pid: int, hep_port: int, http_port: int, flood: tuple[int, float], tmp: Path, listed: list[str]
) -> list[str]:
    count, rate = flood
    path = tmp / "listed.pickle"
    path.write_bytes(pickle.dumps(sip_packets(listed)))  # one packet from each listed sender
    await offer(hep_port, rate / 10, len(listed) / (rate / 10), path)
    counted = await settle(lambda: agent_count(http_port))
    seen_listed = listed_senders(http_port) & set(listed)
    before = rss_kib(pid)
    chunk = 100_000
    for start in range(0, count, chunk):
        sources = [
            socket.inet_ntoa((0x2D000000 + start + i).to_bytes(4, "big"))
            for i in range(min(chunk, count - start))
        ]
        path = tmp / "flood.pickle"
        path.write_bytes(pickle.dumps(sip_packets(sources)))
        await offer(hep_port, rate, len(sources) / rate, path)
    counted = await settle(lambda: agent_count(http_port)) - counted
    hep = agent_status(http_port)["hep"]
    assert isinstance(hep, dict)
    after = rss_kib(pid)
    sightings = hep["sightings"]
    kept_listed = listed_senders(http_port) & seen_listed
    return [
        f"{count:,}",
        f"{counted:,}",
        f"{sightings['ips']:,} (cap {sightings['capacity']:,})",
        f"{sightings['evicted']:,}",
        f"{len(kept_listed):,} of {len(seen_listed):,}",
        f"{before / 1024:.1f} MiB",
        f"{after / 1024:.1f} MiB",
        f"{peak_rss_kib(pid) / 1024:.1f} MiB",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rates", default="25000,50000,75000,100000,150000,200000,250000")
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--flood-rate", type=float, default=FLOOD_RATE)
    parser.add_argument("--flood-only", action="store_true", help="skip the loss-free rate search")
    asyncio.run(main(parser.parse_args()))
