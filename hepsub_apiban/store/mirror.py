"""Several agents, one APIBAN list: the old home of the store link and the shared list.

The link to the store, its reconnects and the puller lease live in store/link.py; the list's rows
in the store, written by the puller and read by the followers, in store/shared_list.py. This
module re-exports what the package, tests and scripts imported from here before the split.
"""

from __future__ import annotations

from .link import StoreLink, StoreStatus, process_holder
from .shared_list import TOMBSTONE_SECONDS, LeaseLost, MirrorStore

__all__ = ["TOMBSTONE_SECONDS", "LeaseLost", "MirrorStore", "StoreLink", "StoreStatus", "process_holder"]
