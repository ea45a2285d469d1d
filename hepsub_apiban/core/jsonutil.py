"""JSON helpers shared by the clients, the HTTP routes and the fakes (orjson everywhere)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class BodyTooLarge(Exception):
    """A peer's answer passed the size its reader allows; nothing of it is used."""


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """A peer's body, or ``BodyTooLarge`` as soon as it passes ``limit`` bytes (counted decoded,
    so a compressed bomb is cut too). Leaving the response context then closes the connection
    unread."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"a {declared:,}-byte body; at most {limit:,} bytes are read")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"a body of more than {limit:,} bytes")
    return bytes(body)


def loads_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object in ``raw``, or None for invalid JSON or any other JSON type.

    Peers answer with whatever they like (HTML error pages, truncated bodies, ``[]``);
    callers decide what a missing object means instead of catching decode errors.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None
