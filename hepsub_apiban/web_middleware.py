"""The HTTP layer's middlewares: JSON for every error, and ``agent.allow_from``.

Every handler of the agent runs inside ``json_errors`` (never an HTML page or a traceback to a
client, the error logged on one line with its frames); with ``agent.allow_from`` set, ``allow_from``
refuses other clients with a 403, except on the probes and the routes that have keys of their own
(``OPEN_PATHS``). ``error_response`` is the one shape of an error the agent's own routes answer.
"""

from __future__ import annotations

import logging
import traceback

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .core.access import SourceFilter
from .core.httpserver import BodyError
from .core.jsonutil import json_response
from .core.logs import safe_text
from .keys import (
    REFUSALS,
)
from .site.api import SITE_PATHS
from .site.decisions import DECISION_PATHS

log = logging.getLogger("hepsub_apiban.web")  # the name it had before web.py was split


def error_response(message: str, status: int) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON for every error, never aiohttp's HTML pages or a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.reason, exc.status)
        if "Allow" in exc.headers:  # 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except BodyError as exc:
        return error_response(exc.message, exc.status)
    except Exception as exc:
        # The path and the error's text may carry what a client sent: escaped, on one line each;
        # the traceback's frames come from the code.
        log.error(
            "unhandled error in %s %s: %s\n%s",
            safe_text(request.method, 16),
            safe_text(request.path, 200),
            safe_text(f"{type(exc).__name__}: {exc}", 500),
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
        return error_response("internal error; see the agent's log", 500)
    return response


# Routes open to every client whatever agent.allow_from says: probes, and the site API and the
# CrowdSec decision API (they have keys).
OPEN_PATHS = frozenset({"/healthz", "/readyz", *SITE_PATHS, *DECISION_PATHS})


def allow_from(sources: SourceFilter) -> Middleware:
    """403 for a client outside ``agent.allow_from``, except on ``OPEN_PATHS``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or ""
        if sources.allows(remote):
            return await handler(request)
        resource = request.match_info.route.resource
        if resource is not None and resource.canonical in OPEN_PATHS:
            return await handler(request)
        request.app[REFUSALS].refuse("http", "not in agent.allow_from", remote or "unknown")
        return error_response("this address may not use the agent's HTTP API (agent.allow_from)", 403)

    return middleware
