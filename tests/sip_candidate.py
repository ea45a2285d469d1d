"""A candidate for ``hepsub_apiban.sip.parse_sip``, kept beside its proof until it earns its place.

``parse_sip_located`` returns the same SipInfo for every input (tests/test_sip_fast.py proves it),
the wanted header lines located by one scan in C instead of a Python loop over every line. It is
not wired in: bench/sip.py measured it at 0.9 x the cost of ``parse_sip``, since most of that cost
is in reading the fields (see bench/README.md), not in finding the lines. The field readers are
the module's own, so the two cannot differ there.
"""

from __future__ import annotations

import re

from hepsub_apiban.sip import (
    _COMPACT,
    _WANTED,
    SipInfo,
    _bottom_via,
    _branch,
    _cseq_value,
    _display_name,
    _nonce,
    _start_line,
    _text,
    _user,
    parse_sip,
)


def parse_sip_located(payload: bytes) -> SipInfo | None:
    """A candidate for :func:`parse_sip`: the same SipInfo for every input (tests/test_sip_fast.py
    proves it), the wanted header lines located by one scan in C instead of a Python loop over
    every line. Not wired in: bench/sip.py measured it at 0.9 x the cost of ``parse_sip``, since
    most of that cost is in reading the fields (see bench/README.md), not in finding the lines.
    """
    end = payload.find(b"\r\n\r\n")
    if end < 0:
        end = len(payload)
    blank = payload.find(b"\n\n", 0, end)
    head = payload[: blank if blank >= 0 else end]
    newline = head.find(b"\n")
    if newline < 0:
        first = head
    else:
        first = head[: newline - 1] if head[newline - 1 : newline] == b"\r" else head[:newline]
    method, status = _start_line(first)
    if method is None and status is None:
        return None
    if b"\n " in head or b"\n\t" in head:
        return parse_sip(payload)  # folded lines: rare enough for the general parser
    found: dict[bytes, bytes] = {}
    bottom = None
    for name, value in reversed(_HEADER_LINE.findall(head)):  # backwards: the first one wins
        key = _CANONICAL[name.lower()]
        if bottom is None and key == b"via":
            bottom = value
        found[key] = value
    top = found.get(b"via")
    received, rport = _bottom_via([bottom.strip()] if bottom is not None else [])
    cseq, cseq_method = _cseq_value(_stripped(found.get(b"cseq")))
    sender = _stripped(found.get(b"from"))
    credentials = _stripped(found.get(b"authorization", found.get(b"proxy-authorization")))
    if status is None:
        nonce = _nonce(credentials)
    else:
        nonce = _nonce(_stripped(found.get(b"www-authenticate", found.get(b"proxy-authenticate"))))
    return _new_info(
        SipInfo,
        (
            method or cseq_method,
            status,
            _text(_stripped(found.get(b"call-id"))),
            _user(sender),
            _user(_stripped(found.get(b"to"))),
            _text(_stripped(found.get(b"user-agent"))),
            received,
            rport,
            cseq,
            _user(first) if status is None else None,
            _display_name(sender),
            credentials is not None,
            nonce,
            _branch(top.strip()) if top is not None else None,
        ),
    )


# A line (never the start line) whose name, in any case, is one we read, then blanks and a colon:
# what the reference's ``name.strip().lower()`` accepts. One scan in C instead of a loop per line.
_HEADER_LINE = re.compile(
    rb"\n(via|v|from|f|to|t|call-id|i|cseq|user-agent|authorization|proxy-authorization"
    rb"|www-authenticate|proxy-authenticate)[ \t\r\x0b\x0c]*:([^\n]*)",
    re.IGNORECASE,
)
_CANONICAL = {name: _COMPACT.get(name, name) for name in (*_WANTED, *_COMPACT)}
_new_info = tuple.__new__  # SipInfo from a tuple, without the keyword handling of its __new__


def _stripped(value: bytes | None) -> bytes | None:
    return None if value is None else value.strip()
