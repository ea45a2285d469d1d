"""Just enough SIP parsing for sightings and detection: method or status, Call-ID, CSeq, From/To and
request-URI users, From display name, User-Agent, bottom Via, and the digest nonces (the one a
server challenged with, the one a client's credentials were computed on).

Captured payloads are whatever went over the wire: truncated, folded, compact header names,
``\\n`` instead of ``\\r\\n``, binary junk. Nothing here raises on bad input; a field that cannot
be read is simply missing. Only the header block is examined, never the body.

Two parsers give the same ``SipInfo`` for every input (tests/test_sip_fast.py holds them to it):
``parse_sip``, on the packet path, reads every field with one compiled pattern, so that the regex
engine walks the header block once in C and Python only converts the captured values; and
``parse_sip_general``, which splits and walks every line in Python, the reference the fast one is
proven against and what it hands the rare messages with folded lines or several Vias in one line.
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


# ------------------------------------------------------------------ the fast path
#
# One pattern matches the whole header block: the start line, then every line in turn, each
# header we read by an alternative that captures its sub-fields (the URI user, the branch, ...),
# every other line by the last one. The regex engine does the walking in C; Python converts the
# few captured values. Rules the pattern keeps, each what the reference does:
# - a line is what lies between two ``\n``; the block ends at the first ``\r\n\r\n`` or ``\n\n``;
# - a header's name is what precedes its first colon, blanks around it ignored, in any case;
# - of a header seen twice, the first counts (a condition on a group the first one set), except
#   the Via, whose last line gives received/rport;
# - a group is entered only once a look-ahead has shown that what follows it matches: the
#   engine (CPython 3.11) does not reset a group set on a path it then abandoned, once a
#   higher-numbered group is set, so an abandoned capture would show through.
# Messages with folded lines, or a comma (several Vias) in the first Via line, go to
# ``parse_sip_general``: rare, and the pattern would grow for little.

_WS = rb"[ \t\r\x0b\x0c]"  # what bytes.strip() removes, less the newline that ends a line
_EQ = _WS + rb"*+=" + _WS + rb"*+"
_TO_EOL = rb"[^\n]*+"


def _uri_user(sip: str, tel: str) -> bytes:
    """The first URI user in the rest of the line, as ``_user`` finds it; first where most are:
    after at most three bytes that cannot start one (``<``, a blank)."""
    return rb"(?:(?:[^sStT\n]{0,3}+|" + _BEFORE_USER + rb")" + _user_at(sip, tel) + rb"|)"


def _header(name: bytes, seen: str, pattern: bytes) -> bytes:
    """The alternative for header ``name``: ``pattern`` on its first line (which sets group
    ``seen``), later lines skipped."""
    return name + _WS + rb"*+:(?(" + seen.encode() + rb")" + _TO_EOL + rb"|" + pattern + rb")"


# fmt: off
_START = (
    _WS + rb"*+(?:"
    rb"[Ss]IP/2\.0[^ \n]*+ (?=\d{3}(?: |" + _WS + rb"*+(?:\n|\Z)))(?P<status>\d{3})"
    rb"|(?=(?-i:[A-Z]{1,20}) " + _WS + rb"*+[^\s])(?P<method>(?-i:[A-Z]{1,20})) "
    + _uri_user("ru1", "ru2") +
    rb")" + _TO_EOL
)
# Every ;parameter of the first Via line, in order: the first branch, the last received and
# rport (the bottom Via's, while no other Via line follows).
_VIA = (
    rb"(?P<vtop>)(?:[^;,\n]*+;" + _WS + rb"*+(?:"
    rb"[Bb]ranch" + _EQ + rb"(?(branch)|(?=[^;,\s])(?P<branch>[^;,\s]{1,128}))"
    rb"|[Rr]eceived" + _EQ + rb"(?=[^;,\s])(?P<received>[^;,\s]+)"
    rb"|[Rr]port" + _EQ + rb"(?=[^;,\s])(?P<rport>[^;,\s]+)"
    rb"|))*+[^;,\n]*+(?:,(?P<comma>)|)" + _TO_EOL
)
# The display name as ``_DISPLAY_NAME`` reads it, then the user.
_FROM = (
    rb"(?P<from_>)(?=" + _WS + rb"*+(?:"
    rb'"(?=[^"\n]{0,200}")(?P<name1>[^"\n]{0,200})'
    rb'|(?=[^<"\n]{1,200}?' + _WS + rb'*+<)(?P<name2>[^<"\n]{1,200}?)' + _WS + rb"*+<"
    rb")|)" + _uri_user("from1", "from2") + _TO_EOL
)
_CSEQ = (  # two words, the second letters: the number is the first if it is 1-10 digits
    rb"(?P<cseq>)(?:(?=" + _WS + rb"*+[^\s]++" + _WS + rb"++[a-z]++" + _WS + rb"*+(?:\n|\Z))"
    + _WS + rb"*+(?:(?=\d{1,10}" + _WS + rb")(?P<number>\d{1,10})|[^\s]++)"
    + _WS + rb"++(?P<cseq_method>[a-z]++)|)" + _TO_EOL
)
_STRIPPED = _WS + rb"*+(?P<%s>(?:[^\n]*[^\s])?)" + _TO_EOL
_LINES = [  # each starts with a one-letter class, which the engine tests before trying the rest
    rb"[ \t](?P<folded>)" + _TO_EOL,
    rb"[Vv](?:ia)?" + _WS + rb"*+:(?(vtop)(?P<bottom>" + _TO_EOL + rb")|" + _VIA + rb")",
    _header(rb"[Ff](?:rom)?", "from_", _FROM),
    _header(rb"[Tt]o?", "to", rb"(?P<to>)" + _uri_user("to1", "to2") + _TO_EOL),
    _header(rb"[CcIi](?:(?<=[Ii])|(?<=[Cc])all-id)", "call_id", _STRIPPED % b"call_id"),
    _header(rb"[Cc]seq", "cseq", _CSEQ),
    _header(rb"[Uu]ser-agent", "user_agent", _STRIPPED % b"user_agent"),
    _header(rb"[Aa]uthorization", "auth", rb"(?P<auth>" + _TO_EOL + rb")"),
    _header(rb"[Pp]roxy-authorization", "proxy_auth", rb"(?P<proxy_auth>" + _TO_EOL + rb")"),
    _header(rb"[Ww]ww-authenticate", "challenge", rb"(?P<challenge>" + _TO_EOL + rb")"),
    _header(rb"[Pp]roxy-authenticate", "proxy_challenge", rb"(?P<proxy_challenge>" + _TO_EOL + rb")"),
    # any other line, but not an empty one, nor a lone \r after \r\n: the end of the block
    rb"(?:[^\r\n]|\r(?!\n)|(?<!\r\n)\r)" + _TO_EOL,
]
# fmt: on
_GROUPS = [  # parse_sip unpacks them in this order
    "status",
    "method",
    "ru1",
    "ru2",
    "folded",
    "bottom",
    "vtop",
    "branch",
    "received",
    "rport",
    "comma",
    "from_",
    "name1",
    "name2",
    "from1",
    "from2",
    "to",
    "to1",
    "to2",
    "call_id",
    "cseq",
    "number",
    "cseq_method",
    "user_agent",
    "auth",
    "proxy_auth",
    "challenge",
    "proxy_challenge",
]  # fmt: skip


def _compile(pattern: bytes) -> re.Pattern[bytes]:
    """``pattern`` with each condition ``(?(name)`` turned into ``(?(number)``: a condition can
    name only a group defined before it, but by number it can refer to one further on."""
    condition = re.compile(rb"\(\?\((\w+)\)")
    numbers = re.compile(condition.sub(b"(?:", pattern)).groupindex  # the same groups, in order
    compiled = re.compile(
        condition.sub(lambda found: b"(?(%d)" % numbers[found[1].decode()], pattern), re.IGNORECASE
    )
    assert list(compiled.groupindex) == _GROUPS == list(numbers)
    return compiled


_MESSAGE = _compile(_START + rb"(?:\n(?:" + b"|".join(_LINES) + rb"))*+")
_STATUS = {b"%03d" % code: code for code in range(1000)}
_COMMON_METHODS = [
    "INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "SUBSCRIBE", "NOTIFY", "PUBLISH",
    "INFO", "PRACK", "UPDATE", "MESSAGE", "REFER",
]  # fmt: skip
_METHODS = {  # each as bytes in three spellings, so most packets skip decode() and upper()
    spelling: name
    for name in _COMMON_METHODS
    for spelling in (name.encode(), name.lower().encode(), name.title().encode())
}


def parse_sip(payload: bytes) -> SipInfo | None:
    """The fields of one SIP message, or None when the payload is not SIP at all."""
    found = _MESSAGE.match(payload)
    if found is None:
        return None
    (
        status, method, ru1, ru2, folded, bottom, _vtop, branch, received, rport, comma, _from,
        name1, name2, from1, from2, _to, to1, to2, call_id, _cseq, number, cseq_method, user_agent,
        auth, proxy_auth, challenge, proxy_challenge,
    ) = found.groups()  # fmt: skip
    if folded is not None or comma is not None:
        return parse_sip_general(payload)
    if bottom is not None:  # several Via lines: received/rport come from the last one
        received, rport = _bottom_params(bottom)
    credentials = auth if auth is not None else proxy_auth
    if status is None:
        user = ru1 or ru2
        nonce = _nonce(credentials.strip()) if credentials is not None else None
    else:
        user = None
        if challenge is None:
            challenge = proxy_challenge
        nonce = _nonce(challenge.strip()) if challenge is not None else None
    name = name1 or name2
    sender = from1 or from2
    receiver = to1 or to2
    return _new_info(
        SipInfo,
        (
            _method(method) if method is not None else _cseq_method(cseq_method),
            _STATUS[status] if status is not None else None,
            call_id[:MAX_FIELD].decode("utf-8", "replace") if call_id else None,
            sender[:MAX_FIELD].decode("utf-8", "replace") if sender else None,
            receiver[:MAX_FIELD].decode("utf-8", "replace") if receiver else None,
            user_agent[:MAX_FIELD].decode("utf-8", "replace") if user_agent else None,
            received[:MAX_FIELD].decode("utf-8", "replace") if received else None,
            _port(rport) if rport is not None else None,
            int(number) if number is not None else None,
            user[:MAX_FIELD].decode("utf-8", "replace") if user else None,
            name.decode("utf-8", "replace") if name else None,
            credentials is not None,
            nonce,
            branch.decode("ascii", "replace") if branch is not None else None,
        ),
    )


_new_info = tuple.__new__  # SipInfo from a tuple, without the keyword handling of its __new__


def _method(raw: bytes) -> str:
    return _METHODS.get(raw) or raw.decode("ascii")


def _cseq_method(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return _METHODS.get(raw) or raw.decode("ascii").upper()


def _port(raw: bytes) -> int | None:
    return int(raw) if raw.isdigit() and int(raw) < 65536 else None


def _bottom_params(line: bytes) -> tuple[bytes | None, bytes | None]:
    params = {name.lower(): value for name, value in _VIA_PARAM.findall(line.rsplit(b",", 1)[-1])}
    return params.get(b"received"), params.get(b"rport")
