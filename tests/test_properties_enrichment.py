"""Property tests: whatever body arrives, parsing and answering raise nothing but
BadEnrichmentRequest, and the answer is a JSON object without ``data``, within the size cap.

Bodies are arbitrary bytes, and JSON shaped like homer-app's with junk mixed in at every level
(numbers where lists go, nested lists and objects, huge and control-character strings, IPv4/IPv6
addresses in every spelling). The limits and the HEP sightings are drawn too, so the member by
member answer and its cuts are exercised, not only the common small answer.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hepsub_apiban.apiban.lookups import Verdict
from hepsub_apiban.core.addresses import Addr
from hepsub_apiban.core.config import EnrichmentSettings
from hepsub_apiban.homer.enrichment import (
    BadEnrichmentRequest,
    EnrichmentRequest,
    Known,
    build_answer,
    parse_request,
)
from hepsub_apiban.ingest.sightings import Sighting

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

text = st.text(max_size=300) | st.sampled_from(["", "data", "sid", "callid", "\x00", "\n\r", "💥" * 70])
ips = (
    st.ip_addresses().map(str)
    | st.ip_addresses(v=6).map(lambda a: f"[{a.exploded}]")
    | st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    | st.sampled_from(["10.0.0.1", "1.2.3.4", "001.2.3.4", "1.2.3.4\x00", " 1.2.3.4", "fe80::1%eth0"])
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
junk = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4)
)
# Many distinct addresses or Call-IDs at once, cheaply: what makes limits and the cap bite.
many_ips = st.builds(
    lambda n, v6: [
        f"2a01:4f8::{i:x}" if v6 else f"45.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)
    ],
    st.integers(0, 700),
    st.booleans(),
)
many_ids = st.builds(
    lambda n, width: [f"{i:0{width}d}" for i in range(n)], st.integers(0, 300), st.integers(1, 300)
)
values = many_ips | many_ids | st.lists(ips | text | junk, max_size=120) | junk
data = st.dictionaries(
    st.sampled_from(["sid", "callid", "source_ip", "dst_ip", "destination_ip"]) | text, values, max_size=8
)
bodies = st.fixed_dictionaries(
    {"data": data},
    optional={
        "fromts": scalars | st.integers(min_value=0, max_value=2**64 - 1),
        "tots": scalars,
        "data ": junk,
    },
)
limits = st.builds(
    EnrichmentSettings,
    max_call_ids=st.sampled_from([1, 2, 5, 100]),
    max_addresses=st.sampled_from([1, 3, 50, 500]),
    max_answer_bytes=st.sampled_from([16384, 20000, 1024 * 1024]),
)
seen = st.builds(
    lambda packets, methods, user_agents: Sighting(
        "0.0.0.0",
        Addr("0.0.0.0", 4, 0),
        1700000000.0,
        1700000500.0,
        packets=packets,
        methods=Counter(methods),
        user_agents=tuple(user_agents),
    ),
    st.integers(min_value=0, max_value=2**40),
    st.dictionaries(text, st.integers(min_value=0, max_value=2**40), max_size=20),
    st.lists(text, max_size=5),
)


def verdicts(request: EnrichmentRequest, states: list[bool | None]) -> list[Verdict]:
    result = []
    for n, address in enumerate(request.addresses):
        state = states[n % len(states)] if states else False
        if state is None:
            result.append(
                Verdict(address.text, None, "unavailable", reason="APIBAN did not answer within 1 s")
            )
        else:
            result.append(Verdict(address.text, state, "mirror", "1700000001" if state else None))
    return result


def check(
    raw: bytes, limit: EnrichmentSettings, states: list[bool | None], sightings: list[Sighting]
) -> None:
    try:
        request = parse_request(raw, limit)
    except BadEnrichmentRequest:
        return  # the one error the parser may raise: the route answers it as {"error": ...}
    assert len(request.call_ids) <= limit.max_call_ids
    assert len(request.addresses) <= limit.max_addresses
    seen_by_ip = (
        {a.text: sightings[n % len(sightings)] for n, a in enumerate(request.addresses)} if sightings else {}
    )
    answer_raw = build_answer(request, verdicts(request, states), Known(seen=seen_by_ip))
    assert len(answer_raw) <= limit.max_answer_bytes
    answer = orjson.loads(answer_raw)
    assert isinstance(answer, dict)
    assert "data" not in answer
    for call_id in request.call_ids:
        if call_id in answer:  # a Call-ID past the cap is left out and counted
            assert "t_sec" in answer[call_id]
            assert isinstance(answer[call_id]["summary"], str)
    if request.call_ids:
        assert request.call_ids[0] in answer  # the first Call-ID always carries the call's object


@PROPERTY_SETTINGS
@given(st.binary(max_size=2000), limits)
def test_arbitrary_bytes(raw: bytes, limit: EnrichmentSettings) -> None:
    check(raw, limit, [True, False, None], [])


@PROPERTY_SETTINGS
@given(
    bodies,
    limits,
    st.lists(st.sampled_from([True, False, None]), max_size=5),
    st.lists(seen, max_size=3),
)
def test_homer_shaped_json_with_junk(
    body: dict[str, Any],
    limit: EnrichmentSettings,
    states: list[bool | None],
    sightings: list[dict[str, Any]],
) -> None:
    check(orjson.dumps(body), limit, states, sightings)


@PROPERTY_SETTINGS
@given(junk)
def test_any_json_value(body: Any) -> None:
    check(orjson.dumps(body), EnrichmentSettings(), [False], [])
