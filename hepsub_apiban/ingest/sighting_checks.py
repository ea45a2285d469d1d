"""Check mode's background lookups of captured addresses (``BackgroundChecks``, one per ``Sightings``).

A new address costs one ``/check`` in the background, never on the packet path: at most
``MAX_BACKGROUND_CHECKS`` in flight, and those lookups may spend only ``sightings.check_share``
of the APIBAN budget, so the HOMER lookups keep the rest whatever the capture shows. In mirror
mode there are none: the list is on its way and the packet path re-reads it. What a verdict
found does to the sightings (``ingest/sightings.py``) is theirs to decide: it is handed back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..apiban.lookups import LookupService, Verdict
from .sighting import Sighting

MAX_BACKGROUND_CHECKS = 64  # check mode: upstream lookups in flight for new IPs


class BackgroundChecks:
    """The /check tasks of check mode: started by ``later`` (from ``Sightings._judge``, on the
    packet path, when an address has no verdict yet), each verdict learnt handed to ``found``."""

    def __init__(
        self, lookups: LookupService, check_share: float, found: Callable[[Sighting, Verdict], None]
    ) -> None:
        self._lookups = lookups
        self._check_share = check_share
        self._found = found
        self._checks: set[asyncio.Task[None]] = set()
        self._starting = 0  # check tasks created that have not asked the lookup service yet

    def later(self, sighting: Sighting) -> None:
        # In mirror mode the list is on its way (the packet path re-reads it); per-IP checks of
        # captured addresses would take the budget the list pull and enrichment need.
        if self._lookups.mirror is not None or sighting.checked or len(self._checks) >= MAX_BACKGROUND_CHECKS:
            return
        if not self._lookups.may_look_up(self._check_share, self._starting):
            return  # the capture's share of the budget is spent: a later packet tries again
        sighting.checked = True
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._check(sighting))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, sighting: Sighting) -> None:
        self._starting -= 1  # the lookup below queues its request before it first waits
        verdict = await self._lookups.lookup(sighting.address, deadline=30.0, share=self._check_share)
        if verdict.listed is None:
            sighting.checked = False  # nothing learnt (share spent, APIBAN failing): try again later
            return
        self._found(sighting, verdict)

    async def settle(self) -> None:
        """Wait for the check-mode lookups under way (their verdicts land in the sightings)."""
        await asyncio.gather(*self._checks, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
