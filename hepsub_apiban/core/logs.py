"""Logging set-up with secret redaction.

The APIBAN key sits in the URL path of every v1 request, so any exception text or debug line
that carries a URL would leak it. Redaction happens twice: the APIBAN client never formats a
URL with the key into a message, and a logging filter on every handler replaces any configured
secret that slipped through anyway.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable

import orjson

MASK = "***"
# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: any of them
# in a logged value could forge a line or drive a terminal.
UNSAFE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}"


def safe_text(value: object, limit: int = 200) -> str:
    """A value from the network, fit for a log line: control characters escaped, length bounded."""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value[: limit * 4]).decode("utf-8", "backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = UNSAFE_CHARACTERS.sub(_escape, text)
    return f"{text}...({cut:,} more)" if cut > 0 else text


# A secret that is also an ordinary word ("mirror", "apiban", one letter) is masked only where it
# stands as a value: a whole token right after one of these (a URL path segment or user part, a
# key=value, a header or JSON value, a list item), or after a word that names a credential.
_CREDENTIAL_WORDS = ("bearer", "key", "keys", "token", "password", "secret")
_VALUE_BEFORE = "|".join(
    [
        r"""(?<=[/=:"'@\[,])""",
        *(rf"(?<=\b{word}{sep})" for word in _CREDENTIAL_WORDS for sep in (r"\s", r":\s", "=")),
    ]
)
_TOKEN_AFTER = r"(?![\w.-])"  # "." too: "apiban" in "https://apiban.org" is a host name
_WORDLIKE = re.compile(r"[A-Za-z._-]*")
DISTINCTIVE_LENGTH = 8


def is_wordlike(secret: str) -> bool:
    """Short, or letters and punctuation only: it may also occur in the agent's own words."""
    return len(secret) < DISTINCTIVE_LENGTH or _WORDLIKE.fullmatch(secret) is not None


class Redactor:
    """Replaces known secret values in text; shared by the log filter and error messages.

    A distinctive secret (a generated key or token) is masked wherever it occurs. A word-like one
    is masked where it stands as a value, so that a site key "mirror" does not turn the start
    line's "mode mirror" into "mode ***".
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self._distinctive: tuple[str, ...] = ()
        self._wordlike: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        # Longest first, so a secret that contains another is masked whole.
        merged = {s for s in (*self._secrets, *secrets) if s}
        self._secrets = tuple(sorted(merged, key=len, reverse=True))
        self._distinctive = tuple(s for s in self._secrets if not is_wordlike(s))
        words = [re.escape(s) for s in self._secrets if is_wordlike(s)]
        pattern = f"(?i:{_VALUE_BEFORE})(?:{'|'.join(words)}){_TOKEN_AFTER}"
        self._wordlike = re.compile(pattern) if words else None

    def __call__(self, text: str) -> str:
        for secret in self._distinctive:
            if secret in text:
                text = text.replace(secret, MASK)
        if self._wordlike is not None:
            text = self._wordlike.sub(MASK, text)
        return text


class RedactingFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Formatting the traceback could reveal a secret inside an exception argument.
            text = logging.Formatter().formatException(record.exc_info)
            cleaned += "\n" + self._redact(text)
            record.exc_info = None
            record.exc_text = None
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (Loki, Elasticsearch, journald's JSON mode)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        return orjson.dumps(entry).decode()


FIRST_LINE = {"first_line": True}  # ``extra`` of the line StartupHold lets through at once


class StartupHold(logging.Filter):
    """Holds a handler's records back while the agent starts, so that the line saying what the
    agent does comes first and the start-up warnings right after it, whatever logged meanwhile.

    The start line is logged with ``extra=FIRST_LINE``; ``release`` then lets the held records
    through in their order. Bounded: past ``MAX_HELD`` records the hold ends by itself.
    """

    MAX_HELD = 1000

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self._handler = handler
        self._held: list[logging.LogRecord] = []
        self._holding = True
        handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._holding or getattr(record, "first_line", False):
            return True
        self._held.append(record)
        if len(self._held) >= self.MAX_HELD:
            self.release()
        return False

    def release(self) -> None:
        """Emit what was held and stop holding; idempotent (a failed start releases too)."""
        self._holding = False
        held, self._held = self._held, []
        for record in held:
            self._handler.handle(record)


def setup_logging(level: str, redactor: Redactor, fmt: str = "text") -> logging.Handler:
    """One stderr handler, redacting, on the root logger; idempotent. Returns the handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_hepsub", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._hepsub = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log line per request drowns the useful lines at info level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
