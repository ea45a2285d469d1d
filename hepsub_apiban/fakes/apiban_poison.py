"""The poisoned pages of the APIBAN fake (fakes/apiban.py): the ways an upstream page can be wrong.

A poisoned feed (APIBAN compromised, or anything on the way): ``FakeApiban.poison`` set to one of
``POISONS`` spoils every ``/banned`` (and apiv2 ``get``) answer that has addresses to give, built
from the page the fake would have served; "no new bans" stays as it is. Each name is one way a page
can be wrong:

* ``int_id``             ``ID`` as a JSON number (``1700000249``), not the documented string.
* ``missing_id``         no ``ID`` at all.
* ``non_digit_id``       ``ID`` with a non-ASCII digit (``"170000024²"``: ``str.isdigit()`` says yes).
* ``long_id``            the right ID behind 5,000 leading zeros (``int()`` reads it as the same number).
* ``far_ahead_id``       ``ID`` a year ahead of the fake's ``wall_clock``: a client taking it skips
                         every ban for a year.
* ``backwards_id``       ``ID`` one below the ID asked for ("0" when none was given).
* ``same_id``            ``ID`` equal to the ID asked for ("100" when none was given).
* ``non_string_entries`` ``ipaddress`` starting with a number, a null and an object (cut to the page size).
* ``ipaddress_object``   ``ipaddress`` a JSON object mapping each address to the ID.
* ``not_an_object``      the body a JSON array ``[[addresses], ID]``, not an object.
* ``oversized_page``     ``oversized_count`` addresses (2,000 by default) in one page: the page's own,
                         then made-up ones counting up from 23.0.0.0, all under the page's ID.
* ``huge_body``          a well-formed page of ``huge_body_bytes`` (4 MiB by default) of the page's
                         addresses repeated, streamed chunked (no Content-Length to warn the client).
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ..core.jsonutil import json_response

POISONS: Final = frozenset(
    {
        "int_id",
        "missing_id",
        "non_digit_id",
        "long_id",
        "far_ahead_id",
        "backwards_id",
        "same_id",
        "non_string_entries",
        "ipaddress_object",
        "not_an_object",
        "oversized_page",
        "huge_body",
    }
)
YEAR: Final = 365 * 86400


@dataclass(frozen=True, slots=True)
class Spoilt:
    """The fake's settings a poisoned page is built with, read when the page is asked for."""

    now: float  # the fake's wall clock
    page_size: int
    oversized_count: int
    huge_body_bytes: int


def poisoned_page(kind: str, ips: list[str], page_id: str, asked: int | None, spoilt: Spoilt) -> web.Response:
    """The page of ``ips`` under ``page_id`` spoilt as ``kind`` says; ``asked``: the ID asked for, if any."""
    if kind == "not_an_object":
        return json_response([ips, page_id], 200)
    if kind == "huge_body":
        return web.Response(
            status=200, body=_huge_page(ips, page_id, spoilt.huge_body_bytes), content_type="application/json"
        )
    ids: dict[str, object] = {
        "int_id": int(page_id),
        "non_digit_id": page_id[:-1] + "\u00b2",
        "long_id": "0" * 5000 + page_id,
        "far_ahead_id": str(int(spoilt.now) + YEAR),
        "backwards_id": "0" if asked is None else str(max(asked - 1, 0)),
        "same_id": "100" if asked is None else str(asked),
    }
    body: dict[str, object] = {"ipaddress": ips, "ID": ids.get(kind, page_id)}
    if kind == "missing_id":
        del body["ID"]
    elif kind == "non_string_entries":
        body["ipaddress"] = [16909060, None, {"ip": ips[0]}, *ips][: max(spoilt.page_size, 3)]
    elif kind == "ipaddress_object":
        body["ipaddress"] = dict.fromkeys(ips, page_id)
    elif kind == "oversized_page":
        made_up = (str(ipaddress.IPv4Address(0x17000000 + n)) for n in range(spoilt.oversized_count))
        body["ipaddress"] = [*ips, *made_up][: spoilt.oversized_count]
    return json_response(body, 200)


async def _huge_page(ips: list[str], page_id: str, size: int) -> AsyncIterator[bytes]:
    """A valid page of about ``size`` bytes, in 64 KiB chunks produced as they are sent."""
    entries = b"".join(b'"%s",' % ip.encode() for ip in ips)
    chunk = entries * max(1, 65536 // len(entries))
    yield b'{"ipaddress":['
    for _ in range(max(1, size // len(chunk))):
        yield chunk
    yield b'"%s"],"ID":"%s"}' % (ips[-1].encode(), page_id.encode())
