"""Types of the injectable time sources, so tests move time instead of waiting for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
