"""The HTTP server's own bounds: time to send a request, size of a body, number of connections.

What aiohttp 3.14 already does, and how the agent uses it (read from ``web_protocol.py``):

- Headers and idle time: the keep-alive timer (``keepalive_timeout``) is armed when a connection
  opens and again after every answer; when it fires while the connection still waits for the
  next request's headers, the connection is closed. So ``agent.idle_timeout`` bounds both an idle
  keep-alive connection and a client trickling its headers (slowloris). It is passed to the
  ``web.Application`` as ``handler_args``, so every runner that serves the app uses it (the
  ``serve`` command, the demo, the tests).
- Bodies: aiohttp has no body timeout; every handler that reads a body goes through
  ``read_body``, which bounds time (``agent.body_timeout``) and size (the app's
  ``client_max_size``) and turns each failure into a ``BodyError`` the route answers in its own
  shape. A body the handler never reads is drained for at most ``LINGER`` seconds after the answer.
- Connections: aiohttp has no cap. ``CappedSite`` serves a bound socket and closes, at once, a
  connection that would pass ``agent.max_connections``; each admitted connection also gets
  ``TCP_USER_TIMEOUT``, so a client that stops reading its answers is dropped by the kernel
  instead of holding the connection (and its unsent answer) forever.
- Logs: aiohttp logs every malformed request as an error with a traceback, one per request a
  scanner sends; ``quiet_bad_requests`` makes that one escaped debug line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from .config import AgentSettings
from .logs import safe_text

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.httpserver")
# Seconds aiohttp keeps reading (and discarding) a body its handler did not read, after the answer,
# so the client sees the answer rather than a reset; then the connection is closed.
LINGER = 2.0
# Connections the kernel may queue before the agent accepts them, as ``cli.bind_socket`` asks.
BACKLOG = 1024
_REFUSED_BODY = b'{"error":"too many open connections (agent.max_connections)"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)


def handler_args(agent: AgentSettings) -> dict[str, Any]:
    """aiohttp ``RequestHandler`` arguments for the agent's application."""
    return {"keepalive_timeout": agent.idle_timeout, "lingering_time": min(LINGER, agent.body_timeout)}


class BodyError(Exception):
    """A request body that could not be read: the status and message to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: web.Request, time_limit: float) -> bytes:
    """The whole body, within ``time_limit`` seconds and the app's size cap, or ``BodyError``."""
    try:
        if request.content.is_eof():
            # The common case: the whole body came with the headers. Nothing to wait for, so no
            # timer (arming and cancelling one costs more than the rest of reading the body).
            return await request.read()
        async with asyncio.timeout(time_limit):
            return await request.read()
    except TimeoutError:
        raise BodyError(408, f"request body not received within {time_limit:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"request body too large (over {request.client_max_size:,} bytes)") from None
    except ConnectionError:
        # Clients drop connections all the time; one line at debug, never a traceback.
        log.debug(
            "%s closed the connection before sending the whole body of %s %s",
            safe_text(request.remote, 64),
            safe_text(request.method, 16),
            safe_text(request.path, 200),
        )
        raise BodyError(400, "connection closed before the whole body arrived") from None
    except HttpProcessingError:  # bad chunked framing, a body that does not decompress
        raise BodyError(400, "request body is malformed (framing or content encoding)") from None


class _BadRequestLog(logging.Filter):
    """aiohttp's error-with-traceback for a request it could not parse, as one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        sender = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg = "bad HTTP request from %s: %s"
        record.args = (safe_text(sender, 64), safe_text(error.message, 300))
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.exc_info, record.exc_text = None, None
        return True


_BAD_REQUEST_LOG = _BadRequestLog()


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (once; adding it again changes nothing)."""
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUEST_LOG)


class CappedSite(web.BaseSite):
    """Serves an already bound socket; past ``max_connections`` open ones, a new one is closed."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        max_connections: int,
        unacked_timeout: float,
        on_refused: Callable[[str], None],
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._sock = sock
        self.max_connections = max_connections
        self.unacked_timeout = unacked_timeout
        self.on_refused = on_refused
        self.open = 0

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return str(URL.build(scheme="http", host=host, port=port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self, server), sock=self._sock, backlog=self._backlog
        )


class _Gate(asyncio.Protocol):
    """Admits a connection to aiohttp's protocol while the site is under its cap, else closes it.

    Counting here (not from aiohttp's connection list) is exact: a burst of accepts cannot pass
    the cap, and a connection stops counting the moment its socket is closed.
    """

    __slots__ = ("_handler", "_server", "_site")

    def __init__(self, site: CappedSite, server: web.Server) -> None:
        self._site = site
        self._server = server
        self._handler: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        if site.open >= site.max_connections:
            peer = transport.get_extra_info("peername")
            site.on_refused(str(peer[0]) if isinstance(peer, tuple) and peer else "unknown")
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_REFUSED)  # best effort: the client may see a reset instead
            transport.close()
            return
        site.open += 1
        _limit_unacked(transport, site.unacked_timeout)
        self._handler = self._server()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            self._site.open -= 1
            handler.connection_lost(exc)


def _limit_unacked(transport: asyncio.BaseTransport, seconds: float) -> None:
    # Linux: data unacknowledged (or unsent to a zero window) this long ends the connection.
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
