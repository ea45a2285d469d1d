"""The state directory: the registration uuid (and, in mirror mode, the list snapshot).

Writes are atomic (temp file in the same directory, fsync, rename), so a crash mid-write
leaves the previous file, never half of a new one. At start a state directory that cannot take
a write (missing, read-only, full) is a ``ConfigError`` naming ``state.dir``, so the agent exits
with one line instead of a traceback; later, a failed snapshot write is only a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

from .config import ConfigError

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.state")
# Written and synced by the start-up probe: an empty file can still be created on a full disk
# (it takes an inode, not a block), a file with data cannot.
PROBE_BYTES = 4096


def ensure_state_dir(path: Path) -> Path:
    """Create the directory and prove it can take a write, or raise a ConfigError naming state.dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-") as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise _unwritable(path, exc) from None
    return path


def _unwritable(path: Path, exc: OSError) -> ConfigError:
    return ConfigError("state.dir", f"{str(path)!r} is not a writable directory ({exc.strerror or exc})")


def atomic_write(path: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_or_create_uuid(state_dir: Path) -> str:
    """The agent's registration uuid, generated once and kept across restarts.

    HOMER keys the registration by uuid: a new uuid at every restart would leave the old row
    behind, and a stale row breaks the HEPSUB tab for every agent until it is purged.
    """
    path = state_dir / "uuid"
    try:
        return str(uuid.UUID(path.read_text(encoding="ascii").strip()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, UnicodeDecodeError):
        log.warning("state file %s does not hold a UUID; generating a new one", path)
    value = str(uuid.uuid4())
    try:
        atomic_write(path, (value + "\n").encode("ascii"))
    except OSError as exc:
        raise _unwritable(state_dir, exc) from None
    return value
