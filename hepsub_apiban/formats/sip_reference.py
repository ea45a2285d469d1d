"""The SIP fields (``SipInfo``) and the reference parser that reads them: ``parse_sip_general``
splits the header block and walks every line in Python. ``formats/sip.py``'s ``parse_sip``, on
the packet path, is proven to give the same ``SipInfo`` for every input (tests/test_sip_fast.py)
and hands this one the rare messages with folded lines or several Vias in one line; it builds
its pattern from the user-part rule here (``_BEFORE_USER``, ``_user_at``) and shares the nonce
and Via-parameter reads (``_nonce``, ``_VIA_PARAM``) and ``MAX_FIELD``.

Captured payloads are whatever went over the wire: truncated, folded, compact header names,
``\\n`` instead of ``\\r\\n``, binary junk. Nothing here raises on bad input; a field that cannot
be read is simply missing. Only the header block is examined, never the body.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# RFC 3261 §7.3.3 compact forms of the headers we read.
_COMPACT = {b"i": b"call-id", b"f": b"from", b"t": b"to", b"v": b"via"}
_CREDENTIALS = (b"authorization", b"proxy-authorization")
_CHALLENGES = (b"www-authenticate", b"proxy-authenticate")
_WANTED = frozenset({b"call-id", b"from", b"to", b"via", b"user-agent", b"cseq", *_CREDENTIALS, *_CHALLENGES})
_FIRST_LETTERS = frozenset(
    bytes([c]) for name in (*_WANTED, *_COMPACT) for c in (name[0], name[:1].upper()[0])
)
# The user part exists only before an "@" (sip:host:5060 has none); tel: URIs are all user. The
# first one in a value, as ``re.search`` of ``sips?:([^@;>\s]+)@|tel:([^;>\s]+)`` finds it, but in
# time linear in the value: that search tries every "sip:" against the whole run after it, so
# 64 KB of "sip:sip:..." held the event loop for seconds. Here a "sip:" whose run does not end at
# an "@" skips that run: every later "sip:" inside it ends at the same byte and fails too, so
# only a "tel:" can start a user there.
_SIP_USER = rb"sips?:[^@;>\s]++@"
_TEL_USER = rb"tel:[^;>\s]"
_BEFORE_USER = (
    rb"(?:[^sStT\n]++"
    rb"|(?!" + _SIP_USER + rb")[sS](?:ips?:(?:[^@;>\s\ntT]++|(?!" + _TEL_USER + rb")[tT])*+)?"
    rb"|(?!" + _TEL_USER + rb")[tT])*+"
)


def _user_at(sip: str, tel: str) -> bytes:
    """The user at the end of ``_BEFORE_USER``, in group ``sip`` or ``tel``, each entered only once
    it is sure to match (see ``parse_sip``'s pattern)."""
    return (
        rb"(?:sips?:(?=[^@;>\s]++@)(?P<" + sip.encode() + rb">[^@;>\s]++)"
        rb"|tel:(?=[^;>\s])(?P<" + tel.encode() + rb">[^;>\s]+))"
    )


_USER = re.compile(_BEFORE_USER + _user_at("sip", "tel"), re.IGNORECASE)
_BRANCH = re.compile(rb";\s*branch\s*=\s*([^;,\s]{1,128})", re.IGNORECASE)
_NONCE = re.compile(rb'nonce\s*=\s*"?([^",\s]{1,128})', re.IGNORECASE)
_DISPLAY_NAME = re.compile(rb'^\s*"([^"]{0,200})"|^\s*([^<"]{1,200}?)\s*<')
_VIA_PARAM = re.compile(rb";\s*(received|rport)\s*=\s*([^;,\s]+)", re.IGNORECASE)
MAX_FIELD = 200  # a scanner can send a 60 KiB User-Agent; sightings keep a bounded sample


class SipInfo(NamedTuple):
    """One message's fields; a NamedTuple because one is built for every captured packet."""

    method: str | None = None  # request method, or the CSeq method of a response
    status: int | None = None  # response status code
    call_id: str | None = None
    from_user: str | None = None
    to_user: str | None = None
    user_agent: str | None = None
    via_received: str | None = None  # bottom Via: the originating UA as its first hop saw it
    via_rport: int | None = None
    cseq: int | None = None  # the CSeq number: with Call-ID and method, names the transaction
    request_user: str | None = None  # user part of the request-URI (what a scanner walks)
    from_name: str | None = None  # From display name ("sipvicious")
    credentials: bool = False  # the request carries Authorization or Proxy-Authorization
    nonce: str | None = None  # the nonce those credentials were computed on, or a challenge's nonce
    branch: str | None = None  # top Via branch: a retransmission keeps it, a new request (a guess) does not

    @property
    def is_request(self) -> bool:
        return self.status is None and self.method is not None


def parse_sip_general(payload: bytes) -> SipInfo | None:
    """The fields of one SIP message, or None when the payload is not SIP at all: the reference,
    every line split and walked in Python."""
    head = payload.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    method, status = _start_line(lines[0])
    if method is None and status is None:
        return None
    headers = _headers(lines[1:])
    cseq, cseq_method = _cseq(headers.get(b"cseq"))
    vias = headers.get(b"via", [])
    received, rport = _bottom_via(vias)
    sender = _first(headers.get(b"from"))
    credentials = _first(headers.get(_CREDENTIALS[0]) or headers.get(_CREDENTIALS[1]))
    challenge = _first(headers.get(_CHALLENGES[0]) or headers.get(_CHALLENGES[1]))
    return SipInfo(
        method=method or cseq_method,
        status=status,
        call_id=_text(_first(headers.get(b"call-id"))),
        from_user=_user(sender),
        to_user=_user(_first(headers.get(b"to"))),
        user_agent=_text(_first(headers.get(b"user-agent"))),
        via_received=received,
        via_rport=rport,
        cseq=cseq,
        request_user=_user(lines[0]) if status is None else None,
        from_name=_display_name(sender),
        credentials=credentials is not None,
        nonce=_nonce(credentials if status is None else challenge),
        branch=_branch(vias[0]) if vias else None,
    )


def _start_line(line: bytes) -> tuple[str | None, int | None]:
    parts = line.strip().split(b" ", 2)
    if len(parts) >= 2 and parts[0].upper().startswith(b"SIP/2.0"):
        return None, int(parts[1]) if parts[1].isdigit() and len(parts[1]) == 3 else None
    if len(parts) >= 2 and parts[0].isalpha() and parts[0].isupper() and len(parts[0]) <= 20:
        # "INVITE sip:bob" (truncated, no SIP/2.0) still says which method it was.
        return parts[0].decode("ascii"), None
    return None, None


def _headers(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    headers: dict[bytes, list[bytes]] = {}
    last: list[bytes] | None = None
    folded: list[tuple[list[bytes], int, list[bytes]]] = []  # (a header's values, which one, its parts)
    for line in lines:
        first = line[:1]
        if first in (b" ", b"\t"):
            if last:
                # A folded continuation line. The parts are joined once at the end: adding them
                # one by one copies the value each time, quadratic in a 64 KB run of folds.
                at = len(last) - 1
                if not folded or folded[-1][0] is not last or folded[-1][1] != at:
                    folded.append((last, at, [last[at]]))
                folded[-1][2].append(line.strip())
            continue
        if first not in _FIRST_LETTERS:  # most headers: skipped without splitting them
            last = None
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            last = None
            continue
        key = name.strip().lower()
        key = _COMPACT.get(key, key)
        if key not in _WANTED:
            last = None
            continue
        last = headers.setdefault(key, [])
        last.append(value.strip())
    for values, at, parts in folded:
        values[at] = b" ".join(parts)
    return headers


def _first(values: list[bytes] | None) -> bytes | None:
    return values[0] if values else None


def _text(value: bytes | None) -> str | None:
    if not value:
        return None
    return value[:MAX_FIELD].decode("utf-8", "replace")


def _user(value: bytes | None) -> str | None:
    if not value:
        return None
    found = _USER.match(value)
    return _text(found.group(1) or found.group(2)) if found else None


def _cseq(values: list[bytes] | None) -> tuple[int | None, str | None]:
    return _cseq_value(_first(values))


def _cseq_value(value: bytes | None) -> tuple[int | None, str | None]:
    parts = (value or b"").split()
    if len(parts) != 2 or not parts[1].isalpha():
        return None, None
    number = int(parts[0]) if parts[0].isdigit() and len(parts[0]) <= 10 else None
    return number, parts[1].decode("ascii").upper()


def _branch(top: bytes) -> str | None:
    found = _BRANCH.search(top.split(b",", 1)[0])
    return found.group(1).decode("ascii", "replace") if found else None


def _display_name(value: bytes | None) -> str | None:
    if not value:
        return None
    found = _DISPLAY_NAME.match(value)
    return _text(found.group(1) or found.group(2)) if found else None


def _nonce(value: bytes | None) -> str | None:
    if not value:
        return None
    found = _NONCE.search(value)
    return found.group(1).decode("ascii", "replace") if found else None


def _bottom_via(values: list[bytes]) -> tuple[str | None, int | None]:
    """``received``/``rport`` of the bottom-most Via (several Via lines, or commas in one)."""
    if not values:
        return None, None
    bottom = values[-1].rsplit(b",", 1)[-1]
    params = {name.lower(): value for name, value in _VIA_PARAM.findall(bottom)}
    received = _text(params.get(b"received"))
    rport_text = params.get(b"rport", b"")
    rport = int(rport_text) if rport_text.isdigit() and int(rport_text) < 65536 else None
    return received, rport
