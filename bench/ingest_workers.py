"""HEP ingest with ``hep.workers = 2`` against ``hep.workers = 1``, in the same run: the highest
rate at which every packet offered is counted by the agent.

    python bench/ingest_workers.py [--seconds 2] [--rounds 1] [--refine 2] [--senders 32]
                                   [--workers 2] [--rates 20000,30000,...]

Two agents (``serve``, mirror mode with 20,000 listed addresses loaded from a snapshot, detection
on, 4 MiB receive buffer) that differ in one setting, ``hep.workers`` 1 and 2. Nothing is pinned:
the agent with workers needs both cores, and so the one without gets the same machine. The
traffic is ``ingest.py``'s registrar (10,000 phones, a fifth listed; registrations, calls, 20
scanners), sent by one process from ``--senders`` UDP sockets, each its own source port, as
that many capture agents would: each phone and scanner always goes through the same socket
(sockets chosen by the remote address), so SO_REUSEPORT, which spreads senders and not packets,
has something to spread and every transaction stays with one worker. Each agent first gets one
cycle at 15,000/s; then the rates go up, 2 s each, every agent that has not lost a packet yet
getting the same traffic in turn, then ``--refine`` halvings of the gap to its first lossy rate.
Loss is read from the agent's own counters (``/api/v1/status``: packets decoded and dropped as
bad, the totals of all workers), once they stop moving (batches cross from the workers twice a
second). Beside it, each agent's CPU per packet (its own and its workers' user + system time), the
busiest worker's share of the packets (the kernel spreads senders: it saturates first) and the
sender's CPU. The load generator runs on the same two cores: unlike ``ingest.py``'s, which
has a core of its own, it sleeps while it is ahead of its pace, and takes about a fifth of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from common import PYTHON, free_port, machine, public_ips, table, write_snapshot
from ingest import (
    PHONES,
    SCANNERS,
    SERVER,
    WARM_UP_RATE,
    agent_count,
    agent_env,
    agent_status,
    cpu_seconds,
    site_traffic,
)

from hepsub_apiban.formats.hep import HepPacket, decode

# One process, many sockets, paced like ingest.py's sender but sleeping while it is ahead.
SENDER = """
import socket, sys, time, pickle
port, rate, seconds, path = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
count, packets = pickle.load(open(path, "rb"))
socks = []
for _ in range(count):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    socks.append(sock.send)
packets = [(socks[n], data) for n, data in packets]
total = int(rate * seconds)
sent, n, start = 0, len(packets), time.perf_counter()
while sent < total:
    due = int((time.perf_counter() - start) * rate) + 1
    if sent >= due:
        time.sleep(0.0005)  # ahead: sleep, so the agents keep the CPU a spinning sender would take
        continue
    while sent < min(due, total):
        send, data = packets[sent % n]
        try:
            send(data)
        except (BlockingIOError, ConnectionRefusedError):
            pass
        sent += 1
print(sent, time.perf_counter() - start, time.process_time())
"""
SETTLE_EVERY = 0.75  # seconds between reads of the counters: longer than a workers' batch


@dataclass
class Agent:
    workers: int
    port: int
    http_port: int
    pid: int
    best: list[int] = field(default_factory=list)
    cpu_per_packet: dict[tuple[int, int], float] = field(default_factory=dict)  # (round, rate) -> us

    @property
    def name(self) -> str:
        return f"hep.workers = {self.workers}"

    def count(self) -> int:
        return agent_count(self.http_port)

    def per_worker(self) -> list[int]:
        """Packets each worker process has counted so far (none with hep.workers = 1)."""
        hep = agent_status(self.http_port)["hep"]
        assert isinstance(hep, dict)
        workers = hep.get("workers")  # None with hep.workers = 1
        return [int(p["packets"]) for p in workers["processes"]] if workers else []

    def cpu(self) -> float:
        """CPU seconds of the agent and its workers so far."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return sum(cpu_seconds(pid) for pid in (self.pid, *map(int, children)))


def by_sender(traffic: list[bytes], senders: int) -> list[tuple[int, bytes]]:
    """Each packet with the socket that sends it: the one of its remote (phone or scanner)."""
    tagged = []
    for data in traffic:
        packet = decode(data, 0.0)
        assert isinstance(packet, HepPacket)
        remote = packet.dst_ip if packet.src_ip == SERVER else packet.src_ip
        tagged.append((sum(int(part) for part in remote.split(".")) % senders, data))
    return tagged


async def offer(agent: Agent, rate: float, seconds: float, packets: Path) -> tuple[int, float]:
    """Packets sent, and the sender's CPU seconds per second of sending."""
    argv = [PYTHON, "-c", SENDER, str(agent.port), str(rate), str(seconds), str(packets)]
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    sent, elapsed, cpu = out.split()
    if float(elapsed) > seconds * 1.1:
        print(f"  (sender fell behind at {rate:,.0f}/s: {float(elapsed):.2f} s)", file=sys.stderr)
    return int(sent), float(cpu) / float(elapsed)


async def settle(agent: Agent) -> int:
    previous = -1
    for _ in range(40):
        await asyncio.sleep(SETTLE_EVERY)
        current = agent.count()
        if current == previous:
            return current
        previous = current
    return previous


async def step(
    agent: Agent, rate: int, seconds: float, packets: Path, round_: int, rows: list[list[str]]
) -> bool:
    """``rate`` offered for ``seconds``; True when the agent lost packets."""
    before = await settle(agent)
    cpu_before, split_before = agent.cpu(), agent.per_worker()
    sent, sender_cpu = await offer(agent, rate, seconds, packets)
    received = await settle(agent) - before
    split = [after - was for after, was in zip(agent.per_worker(), split_before, strict=True)]
    # The kernel spreads senders, not packets: the busiest worker sets the loss-free rate.
    busiest = f"{max(split) / max(sum(split), 1) * 100:.0f} %" if split else "-"
    cpu = (agent.cpu() - cpu_before) / max(received, 1) * 1e6
    loss = f"{(sent - received) / sent * 100:.2f} %"
    rows.append(
        [
            str(round_),
            agent.name,
            f"{rate:,}",
            f"{sent:,}",
            f"{received:,}",
            loss,
            f"{cpu:.1f} us",
            busiest,
            f"{sender_cpu:.2f}",
        ]
    )
    if sent == received:
        agent.best[-1] = max(agent.best[-1], rate)
        agent.cpu_per_packet[(round_, rate)] = cpu
    return sent != received


async def search(
    agents: list[Agent], rates: list[int], args: argparse.Namespace, packets: Path, round_: int
) -> list[list[str]]:
    rows: list[list[str]] = []
    lossy: dict[int, int] = {}
    for agent in agents:
        agent.best.append(0)
    for rate in rates:
        for agent in agents:
            if agent.workers not in lossy and await step(agent, rate, args.seconds, packets, round_, rows):
                lossy[agent.workers] = rate
    for _ in range(args.refine):
        for agent in agents:
            high = lossy.get(agent.workers)
            rate = (agent.best[-1] + high) // 1000 * 500 if high else 0
            if (
                high
                and agent.best[-1] < rate < high
                and await step(agent, rate, args.seconds, packets, round_, rows)
            ):
                lossy[agent.workers] = rate
    return rows


async def until_up(agents: list[Agent]) -> None:
    for _ in range(300):
        try:
            for agent in agents:
                agent.count()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the agents did not start")


async def main(args: argparse.Namespace) -> None:
    rates = [int(r) for r in args.rates.split(",")]
    load = os.getloadavg()[0]
    listed = public_ips(20_000, seed=11)
    phones = listed[:2000] + public_ips(PHONES - 2000, seed=12)
    traffic = site_traffic(phones, public_ips(SCANNERS, seed=13))
    processes: list[asyncio.subprocess.Process] = []
    agents: list[Agent] = []
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        packets = Path(tmp) / "packets.pickle"
        packets.write_bytes(pickle.dumps((args.senders, by_sender(traffic, args.senders))))
        for workers in (1, args.workers):
            hep_port, http_port = free_port(), free_port()
            state = Path(tmp) / f"state-{workers}"
            write_snapshot(state, "http://127.0.0.1:9", listed, time.time())
            env = {**agent_env(http_port, hep_port, state, detect=True), "HEPSUB_HEP_WORKERS": str(workers)}
            process = await asyncio.create_subprocess_exec(PYTHON, "-m", "hepsub_apiban", "serve", env=env)
            processes.append(process)
            agents.append(Agent(workers, hep_port, http_port, process.pid))
        rows: list[list[str]] = []
        try:
            await until_up(agents)
            for agent in agents:
                await offer(agent, WARM_UP_RATE, len(traffic) / WARM_UP_RATE, packets)
                await settle(agent)
            for round_ in range(1, args.rounds + 1):
                rows += await search(agents, rates, args, packets, round_)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
                await process.wait()
    print(f"machine: {machine()}; load average before the run {load:.2f}")
    print(
        f"HEP3/UDP on loopback, a registrar's traffic ({len(traffic):,} packets in the cycle) from "
        f"{args.senders} sender sockets, nothing pinned, {args.seconds:g} s per rate, {args.rounds} round(s)"
    )
    headers = [
        "round",
        "agent",
        "offered/s",
        "sent",
        "counted",
        "lost",
        "agent CPU per packet",
        "busiest worker's share",
        "sender cores",
    ]
    print(table(headers, rows))
    one, many = agents
    both = sorted(set(one.cpu_per_packet) & set(many.cpu_per_packet))  # rates both kept up with
    summary = [
        [
            a.name,
            " / ".join(f"{b:,}" for b in a.best),
            f"{median(a.best):,.0f}/s",
            f"{median(a.cpu_per_packet[key] for key in both):.1f} us" if both else "-",
        ]
        for a in agents
    ]
    headers = ["agent", "highest loss-free rate, each round", "median", "CPU per packet (agent + workers)"]
    print(table(headers, summary))
    if all(one.best):
        ratio = median(many.best) / median(one.best)
        print(f"loss-free rate, hep.workers = {many.workers} / 1 (medians): {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--senders", type=int, default=32, help="sender sockets (source ports)")
    parser.add_argument("--workers", type=int, default=2, help="hep.workers of the second agent")
    parser.add_argument("--rates", default="10000,15000,20000,25000,30000,35000,40000,45000,50000")
    asyncio.run(main(parser.parse_args()))
