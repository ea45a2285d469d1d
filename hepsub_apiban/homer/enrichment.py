"""What homer-app posts to ``{path}/{type}`` and the answer the HOMER UI renders best.

homer-app sends ``{"data": {"sid": [...], "source_ip": [...], ...}, "fromts": ms, "tots": ms}``
(keys from the operator's HEPSUB mapping). The UI then reads ``answer[callid].t_sec`` and shows
the whole object as a JSON tree, and it overwrites any top-level ``data`` key. So the answer
has one object per Call-ID, one verdict per IP, and never a ``data`` key. This module is pure:
no I/O, so every shape rule is testable without a server.

Anyone may post here, so the work per request is bounded and linear. The parser examines at
most ``enrichment.max_call_ids`` distinct Call-IDs and ``enrichment.max_addresses`` distinct
addresses (looking at no more than twice as many values) and only counts the rest, at C speed
(a set insertion each, never a parse); it examines at most 64 keys of ``data`` and refuses a
body of more than 10,000 lists and objects before decoding it. The answer stays within
``enrichment.max_answer_bytes``: only the first Call-ID carries the call's whole object, the
others point to it (so the answer never grows with Call-IDs times IPs), and what does not fit
is left out. Whatever was left out, and which limit did it, is said in a ``left_out`` object.

This module is the entry point: ``parse_request`` (from ``homer/request.py``) and
``build_answer``, which serialises a common answer whole (``homer/answer.py``) and a large one
fitted to the cap (``homer/fitting.py``). The names the package, tests and bench import from here
are re-exported (``__all__``).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ..apiban.lookups import Verdict
from .answer import DOWNLOAD_IPS, NOTHING_KNOWN, POINTER_IPS, Known, _call, _whole_answer
from .fitting import LEFT_OUT_ROOM, _fitted_answer
from .request import (
    MAX_BRACKETS,
    MAX_CALL_ID_CHARS,
    MAX_DATA_KEYS,
    VALUES_PER_LIMIT,
    BadEnrichmentRequest,
    EnrichmentRequest,
    parse_request,
    request_from_json,
)

__all__ = [
    "DOWNLOAD_IPS",
    "LEFT_OUT_ROOM",
    "MAX_BRACKETS",
    "MAX_CALL_ID_CHARS",
    "MAX_DATA_KEYS",
    "NOTHING_KNOWN",
    "POINTER_IPS",
    "VALUES_PER_LIMIT",
    "BadEnrichmentRequest",
    "EnrichmentRequest",
    "Known",
    "build_answer",
    "parse_request",
    "request_from_json",
]

# A request with at most this many IPs plus Call-IDs is serialised in one go, and only redone
# piece by piece in the rare case it overshoots the size cap: the common request stays as fast
# as a plain orjson.dumps.
WHOLE_ANSWER_ITEMS = 64


def build_answer(
    request: EnrichmentRequest, verdicts: Sequence[Verdict], known: Known = NOTHING_KNOWN
) -> bytes:
    """The JSON answer for homer-app, at most ``request.limits.max_answer_bytes`` long.

    The summary and the listed or detected addresses first (for Go's sorted rendering), Call-ID
    keys, then one object per IP: its verdict in words, what the capture saw in one line, then
    the details. A small request is serialised whole; a large one piece by piece, and what does
    not fit is left out and said so.
    """
    call = _call(request, verdicts, known)
    if len(verdicts) + len(request.call_ids) <= WHOLE_ANSWER_ITEMS:
        raw = orjson.dumps(_whole_answer(request, verdicts, known, call))
        if len(raw) <= request.limits.max_answer_bytes:
            return raw
    return _fitted_answer(request, verdicts, known, call)
