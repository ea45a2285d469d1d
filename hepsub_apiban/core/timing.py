"""Types of the injectable time sources, so tests move time instead of waiting for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Waker:
    """A loop's sleep that ``wake()`` ends early: a writer backing off while the store was away
    writes at once when it is back, not at the end of its backoff."""

    def __init__(self, sleep: Sleep) -> None:
        self._sleep = sleep
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def sleep(self, seconds: float) -> None:
        if not self._woken.is_set():
            nap = asyncio.ensure_future(self._sleep(seconds))
            woken = asyncio.ensure_future(self._woken.wait())
            try:
                await asyncio.wait((nap, woken), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (nap, woken):
                    waiter.cancel()
        self._woken.clear()
