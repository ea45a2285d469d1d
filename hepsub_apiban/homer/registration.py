"""HEPSUB registration with homer-app: subscribe at start, refresh at 0.9 x ttl, retry, unsubscribe.

homer-app has no refresh call: re-POSTing the same uuid replaces the row and every subscribe
also purges expired rows of all agents (which otherwise break the HEPSUB tab for everyone), so
registering promptly and refreshing well before ``ttl`` matters for every agent on the HOMER.
Failures are retried with capped exponential backoff and jitter; a run of failures is logged as
state changes (failing, still failing every few minutes, recovered), not once per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ..core.config import Settings
from ..core.jsonutil import BodyTooLarge, loads_object, read_capped
from ..core.logs import Redactor, safe_text
from ..core.timing import Sleep
from ..core.trouble import FailureRun

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.registration")
MAX_BACKOFF = 60.0
# homer-app answers a subscribe with a few hundred bytes of JSON; anything far larger is not it.
MAX_ANSWER_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 300  # of homer-app's reason, in the log and the status page


@dataclass(slots=True)
class RegistrationStatus:
    state: str = "starting"  # disabled, starting, registered, failing, unregistered
    attempts: int = 0
    failures: int = 0  # consecutive
    last_attempt: float | None = None
    last_success: float | None = None
    expires_at: float | None = None
    last_status: int | None = None
    last_message: str = ""
    next_attempt: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "attempts": self.attempts,
            "consecutive_failures": self.failures,
            "last_attempt": self.last_attempt,
            "last_success": self.last_success,
            "expires_at": self.expires_at,
            "last_status": self.last_status,
            "last_message": self.last_message,
            "next_attempt": self.next_attempt,
        }


class Registrar:
    """This agent's HEPSUB registration with homer-app: subscribe, refresh at 0.9 x ttl, unsubscribe.

    Owns the registration loop (``run``, a task of ``create_app``'s registration context, started once
    the listeners are bound) and its ``status`` for /api/v1/status and /metrics. Uses the process' HTTP
    session; HOMER's credentials go through the ``Redactor`` before any log line.

    Never blocks the start (HOMER down means retries with capped backoff and jitter, logged as state
    changes) and never logs a token or a password.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        agent_uuid: str,
        redactor: Redactor,
        *,
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._session = session
        self._homer = settings.homer
        self._agent = settings.agent
        self.uuid = agent_uuid
        self._redact = redactor
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._jitter = jitter
        self._timeout = aiohttp.ClientTimeout(total=settings.homer.timeout)
        self._trouble = FailureRun("HOMER registration", log, clock=wall_clock)
        self._login_checked = False
        self._login_refused: str | None = None  # homer-app's reason, once it refused homer.user's login
        self.status = RegistrationStatus()

    def body(self) -> dict[str, Any]:
        """The subscribe body; port, gid and ttl must be JSON numbers or homer-app's bind fails."""
        return {
            "uuid": self.uuid,
            "gid": self._agent.gid,
            "host": self._agent.host,
            "port": self._agent.port,
            "protocol": "http",
            "path": self._agent.path,
            "node": self._agent.node,
            "type": self._agent.registered_type,
            "ttl": self._homer.ttl,
        }

    async def run(self) -> None:
        """Register now, then keep the registration alive until cancelled."""
        while True:
            ok = await self.register_once()
            if ok:
                await self.check_login()
            delay = self.next_delay(ok)
            self.status.next_attempt = self._wall_clock() + delay
            await self._sleep(delay)

    def next_delay(self, ok: bool) -> float:
        refresh = 0.9 * self._homer.ttl
        if ok:
            return refresh
        # Full-range jitter on a capped exponential: agents restarted together do not retry in step,
        # and the cap keeps a failing agent from waiting past its TTL once HOMER is back.
        ceiling = min(MAX_BACKOFF, refresh, 2.0 ** (self.status.failures - 1))
        return ceiling * (0.5 + 0.5 * self._jitter())

    async def register_once(self) -> bool:
        self.status.attempts += 1
        self.status.last_attempt = self._wall_clock()
        url = f"{self._homer.url}/api/v3/agent/subscribe"
        headers = {"Auth-Token": self._homer.token, "Content-Type": "application/json"}
        try:
            async with self._session.post(
                url, data=orjson.dumps(self.body()), headers=headers, timeout=self._timeout
            ) as response:
                status, raw = response.status, await read_capped(response, MAX_ANSWER_BYTES)
        except TimeoutError:
            return self._failed(None, f"homer-app at {self._homer.url} did not answer in time")
        except BodyTooLarge as exc:
            return self._failed(None, f"homer-app at {self._homer.url} sent {exc}")
        except aiohttp.ClientError as exc:
            return self._failed(None, f"cannot reach homer-app at {self._homer.url}: {exc}")
        if status == 201:
            return self._succeeded(raw)
        return self._failed(status, _message(raw) or f"HTTP {status}")

    def _succeeded(self, raw: bytes) -> bool:
        now = self._wall_clock()
        first = self.status.last_success is None
        self.status.state = "registered"
        self.status.failures = 0
        self.status.last_success = now
        self.status.last_status = 201
        self.status.last_message = _message(raw) or "registered"
        expire = _expire_ts(raw)
        self.status.expires_at = expire if expire is not None else now + self._homer.ttl
        recovered = self._trouble.succeeded()
        (log.info if first or recovered else log.debug)(
            "registered with HOMER at %s as node %r type %r (uuid %s), refreshing every %.0f s",
            self._homer.url,
            self._agent.node,
            self._agent.registered_type,
            self.uuid,
            0.9 * self._homer.ttl,
        )
        return True

    def _failed(self, status: int | None, message: str) -> bool:
        message = self._redact(message)
        self.status.state = "failing"
        self.status.failures += 1
        self.status.last_status = status
        self.status.last_message = message
        said = f"({status if status is not None else 'no answer'}) {message}{_hint(status, message)}"
        if not self._trouble.failed(said, "retrying with backoff"):
            log.debug("HOMER registration failed %s", said)
        return False

    async def check_login(self) -> None:
        """Try homer.user's login once, at the first registration, so a wrong homer.password is
        one warning at start rather than a surprise at shutdown (it is used only there)."""
        if self._login_checked or self._homer.token_access or not self._homer.user:
            return
        self._login_checked = True
        await self._delete_headers(at_shutdown=False)

    async def unregister(self) -> bool:
        """Remove the row at shutdown, where homer-app lets an agent do it.

        DELETE is on homer-app's JWT group: it takes the Auth-Token only with
        ``enable_token_access``; otherwise it needs a user login.
        """
        if self.status.last_success is None:
            return False
        headers = await self._delete_headers()
        if headers is None:
            why = (
                f"HOMER refused homer.user {self._homer.user!r}'s login: check homer.password"
                if self._login_refused is not None
                else "set homer.user/homer.password or homer.token_access to remove it at shutdown"
            )
            log.info(
                "HOMER keeps this agent's registration until it expires in %.0f s (%s)",
                max(0.0, (self.status.expires_at or 0) - self._wall_clock()),
                why,
            )
            return False
        url = f"{self._homer.url}/api/v3/agent/subscribe/{self.uuid}"
        try:
            async with self._session.delete(url, headers=headers, timeout=self._timeout) as response:
                status, raw = response.status, await read_capped(response, MAX_ANSWER_BYTES)
        except (TimeoutError, aiohttp.ClientError, BodyTooLarge) as exc:
            log.warning("could not unregister from HOMER: %s", self._redact(str(exc) or type(exc).__name__))
            return False
        if status != 200:
            log.warning("HOMER refused to unregister (%s): %s", status, self._redact(_message(raw)))
            return False
        self.status.state = "unregistered"
        log.info("unregistered from HOMER (uuid %s)", self.uuid)
        return True

    async def _delete_headers(self, *, at_shutdown: bool = True) -> dict[str, str] | None:
        if self._homer.token_access:
            return {"Auth-Token": self._homer.token}
        if not self._homer.user:
            return None
        credentials = {"username": self._homer.user, "password": self._homer.password}
        status: int | None = None
        raw = b""
        try:
            async with self._session.post(
                f"{self._homer.url}/api/v3/auth", json=credentials, timeout=self._timeout
            ) as response:
                status, raw = response.status, await read_capped(response, MAX_ANSWER_BYTES)
        except (TimeoutError, aiohttp.ClientError, BodyTooLarge):
            status = None
        body = loads_object(raw) if status == 201 else None
        token = body.get("token") if body is not None else None
        if isinstance(token, str) and token:
            self._login_refused = None
            return {"Authorization": f"Bearer {token}"}
        if status in (400, 401, 403):
            # homer-app said no to these credentials (not merely unreachable): name the setting.
            reason = self._redact(_message(raw) or f"HTTP {status}")
            if self._login_refused is None:
                log.warning(
                    "HOMER refused the login of homer.user %r (%s: %s): check homer.password; "
                    "without that login the registration stays in HOMER until its ttl runs out "
                    "after shutdown",
                    self._homer.user,
                    status,
                    reason,
                )
            self._login_refused = reason
        elif at_shutdown:
            log.warning("could not log in to HOMER as %r to unregister", self._homer.user)
        return None


def _hint(status: int | None, message: str) -> str:
    """The setting to look at when homer-app refused the Auth-Token (docs/peers/homer-app.md#registration: a
    400 naming it).
    """
    if status is not None and "auth_token" in message.lower().replace("-", "_"):
        return (
            " (check homer.token: HOMER -> Preferences -> AUTH TOKEN; "
            "homer.user and homer.password do not register)"
        )
    return ""


def _message(raw: bytes) -> str:
    """homer-app's reason, fit for the log and the status page: escaped and cut short."""
    body = loads_object(raw)
    if body is None:
        return safe_text(raw[:MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip(), MAX_MESSAGE_CHARS)
    message = body.get("message")
    return safe_text(message, MAX_MESSAGE_CHARS) if isinstance(message, str) else ""


def _expire_ts(raw: bytes) -> float | None:
    body = loads_object(raw)
    data = body.get("data") if body else None
    value = data.get("expire_ts") if isinstance(data, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
