"""Shared helpers of the benchmark scripts: machine description, tables, listed-IP samples."""

from __future__ import annotations

import os
import platform
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from hepsub_apiban import __version__
from hepsub_apiban.apiban.mirror import Mirror, snapshot_source

BENCH_KEY = "bench-apiban-key"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, hepsub-apiban {__version__}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def public_ips(count: int, seed: int) -> list[str]:
    """Distinct random addresses in routable unicast space (1.0.0.0-99.255.255.255)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < count:
        value = rng.randrange(1 << 24, 100 << 24)
        if (value >> 24) in (10, 100, 127):
            continue
        seen.add(socket.inet_ntoa(value.to_bytes(4, "big")))
    return sorted(seen)


def write_snapshot(state_dir: Path, feed_url: str, listed: Sequence[str], now: float) -> None:
    """A mirror snapshot the agent loads at start, so a benchmark needs no 15-minute cold pull."""
    mirror = Mirror()
    mirror.add(listed, "1700000000", now)
    mirror.cursor = "1700000000"
    mirror.last_full_sync = now
    mirror.last_sync = now
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "mirror.json").write_bytes(mirror.to_snapshot(snapshot_source(feed_url, BENCH_KEY), now))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one core, when taskset exists (Linux)."""
    if core is None or not _has_taskset():
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def _has_taskset() -> bool:
    try:
        subprocess.run(["taskset", "-V"], capture_output=True, check=False)
    except FileNotFoundError:
        return False
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


PYTHON = sys.executable


def agent_env(feed_url: str, state: Path, port: int, log_level: str = "warning") -> dict[str, str]:
    """The environment of a benchmarked ``serve``: the bench key, the state dir holding its
    snapshot, HTTP on loopback at ``port``, no HEP listeners."""
    return {
        **os.environ,
        "HEPSUB_APIBAN_URL": feed_url,
        "HEPSUB_APIBAN_KEY": BENCH_KEY,
        "HEPSUB_STATE_DIR": str(state),
        "HEPSUB_AGENT_BIND": "127.0.0.1",
        "HEPSUB_AGENT_PORT": str(port),
        "HEPSUB_HEP_UDP": "",
        "HEPSUB_HEP_TCP": "",
        "HEPSUB_LOG_LEVEL": log_level,
    }
