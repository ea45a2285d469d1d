"""The state directory: the registration uuid (and, in mirror mode, the list snapshot).

Writes are atomic (temp file in the same directory, fsync, rename), so a crash mid-write
leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)


def ensure_state_dir(path: Path) -> Path:
    """Create the directory and prove it is writable, or raise a ConfigError naming state.dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            "state.dir", f"{str(path)!r} is not a writable directory ({exc.strerror})"
        ) from None
    return path


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
    atomic_write(path, (value + "\n").encode("ascii"))
    return value
