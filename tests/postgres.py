"""A throwaway PostgreSQL cluster for the store tests: Debian's ``postgresql`` package, started by hand.

``initdb`` into a temporary directory, ``pg_ctl start`` on a free loopback TCP port with the
socket in that directory and durability off (the data dies with the test run anyway), then
``pg_ctl stop`` and the directory removed. PostgreSQL refuses to run as root, and CI runs as
root: there the cluster runs as ``nobody`` (``runuser``), which owns the temporary directory.

The superuser ``postgres`` needs a password over TCP (scram-sha-256), so a wrong password is
refused as it would be by a real server; over the socket (the harness only) it is trusted.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "postgres"
PASSWORD = "store-SECRET-password-5e1c8a"
UNPRIVILEGED = "nobody"  # who runs the cluster when the tests run as root


def bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(Path(path).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is not None:
        # /usr/local/bin/initdb may be a symlink into the real directory, which has pg_ctl beside it.
        directory = Path(initdb).resolve().parent
        if (directory / "pg_ctl").exists():
            return directory
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Cluster:
    bin: Path
    root: Path  # owned by the user the cluster runs as
    port: int
    user: str | None  # None: the tests' own user (not root)
    start_seconds: float = 0.0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=120, check=False
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr[-2000:]}\n{tail}")

    def start(self) -> None:
        began = time.monotonic()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._chown(pwfile)
        self._check(
            self._run(
                "initdb",
                "--pgdata",
                str(self.data),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            "initdb",
        )
        self.launch()
        self.start_seconds = time.monotonic() - began

    def launch(self) -> None:
        """``pg_ctl start`` on the cluster's port and data directory (again after ``stop_fast``)."""
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=100",
            ]
        )
        self._check(
            self._run(
                "pg_ctl", "--pgdata", str(self.data), "--log", str(self.root / "server.log"),
                "--options", options, "--wait", "--timeout", "60", "start",
            ),
            "pg_ctl start",
        )  # fmt: skip

    def stop_fast(self) -> None:
        """An administrator's ``pg_ctl stop -m fast``: sessions are ended, the server shuts down
        cleanly; ``launch`` brings it back on the same port with the same data."""
        self._check(
            self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "fast", "--wait", "stop"), "pg_ctl stop"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "immediate", "--wait", "stop")

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


def start_cluster() -> Cluster:
    """A running cluster; raises RuntimeError with initdb's/pg_ctl's words if it cannot start."""
    directory = bin_dir()
    if directory is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    user = UNPRIVILEGED if os.geteuid() == 0 else None
    # Not pytest's tmp_path: its parents are mode 0700 and root's, so `nobody` could not enter them.
    root = Path(tempfile.mkdtemp(prefix="hepsub-pg-"))
    cluster = Cluster(directory, root, free_port(), user)
    cluster._chown(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def throwaway_cluster() -> Iterator[Cluster]:
    """A running cluster for a fixture to yield, removed afterwards; the test skips without PostgreSQL."""
    if bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)")
    cluster = start_cluster()
    yield cluster
    remove_cluster(cluster)
