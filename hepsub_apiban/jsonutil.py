"""JSON helpers shared by the clients, the HTTP routes and the fakes (orjson everywhere)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


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
