"""Just enough SIP parsing for sightings and detection: method or status, Call-ID, CSeq, From/To and
request-URI users, From display name, User-Agent, bottom Via, and the digest nonces (the one a
server challenged with, the one a client's credentials were computed on).

Captured payloads are whatever went over the wire: truncated, folded, compact header names,
``\\n`` instead of ``\\r\\n``, binary junk. Nothing here raises on bad input; a field that cannot
be read is simply missing. Only the header block is examined, never the body.

Two parsers give the same ``SipInfo`` for every input (tests/test_sip_fast.py holds them to it):
``parse_sip``, here and on the packet path, reads every field with one compiled pattern, so that
the regex engine walks the header block once in C and Python only converts the captured values;
and ``parse_sip_general`` (``formats/sip_reference.py``, with ``SipInfo`` itself), which splits
and walks every line in Python, the reference the fast one is proven against and what it hands
the rare messages with folded lines or several Vias in one line.
"""

from __future__ import annotations

import re

from . import sip_reference as _reference
from .sip_reference import (
    _BEFORE_USER,
    MAX_FIELD,
    SipInfo,
    _nonce,
    _user_at,
    parse_sip_general,
)

__all__ = ["MAX_FIELD", "SipInfo", "parse_sip"]

# Bound here by assignment rather than imported: CPython compiles ``name.findall(...)`` on an
# imported name as an attribute load (a bound method per call), not LOAD_METHOD.
_VIA_PARAM = _reference._VIA_PARAM


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
