"""Bounded work per enrichment request: the enrichment.* limits, linear parsing, the answer cap.

The HTTP tests post through the real stack with private addresses (answered locally, so no
APIBAN budget is involved); the unit tests drive homer/enrichment.py directly, and count the work a
request costs instead of timing it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
import pytest

from hepsub_apiban.apiban.lookups import Verdict
from hepsub_apiban.core.addresses import Addr
from hepsub_apiban.core.config import EnrichmentSettings
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.homer.enrichment import (
    LEFT_OUT_ROOM,
    MAX_BRACKETS,
    MAX_CALL_ID_CHARS,
    MAX_DATA_KEYS,
    POINTER_IPS,
    VALUES_PER_LIMIT,
    EnrichmentRequest,
    Known,
    build_answer,
    parse_request,
    request_from_json,
)
from hepsub_apiban.homer.wording import seen_details, seen_line, verdict_details, verdict_sentence
from hepsub_apiban.ingest.sightings import SAMPLE_BYTES, Sighting
from hepsub_apiban.keys import SIGHTINGS

from .conftest import AgentFactory, ApibanPeer

FROM_MS = 1669986139000
ONE_MIB = 1024 * 1024


def private_ips(count: int) -> list[str]:
    return [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(1, count + 1)]


def body(call_ids: list[str], **lists: Any) -> bytes:
    return orjson.dumps({"data": {"sid": call_ids, **lists}, "fromts": FROM_MS, "tots": FROM_MS + 1000})


def verdicts_for(request: EnrichmentRequest) -> list[Verdict]:
    """Every third address listed, every fifth unknown: all three shapes of verdict."""
    verdicts = []
    for n, address in enumerate(request.addresses):
        if n % 5 == 4:
            verdicts.append(Verdict(address.text, None, "unavailable", reason="APIBAN did not answer"))
        elif n % 3 == 0:
            verdicts.append(Verdict(address.text, True, "mirror", "1700000001", 1700000000))
        else:
            verdicts.append(Verdict(address.text, False, "mirror"))
    return verdicts


def seen(user_agent_chars: int = 200) -> Sighting:
    """A sighting at the bounds the sightings store keeps: ~20 method keys, 5 user agents."""
    return Sighting(
        "0.0.0.0",
        Addr("0.0.0.0", 4, 0),
        1700000000.0,
        1700000500.0,
        packets=123456,
        methods=Counter({f"METHOD{n}": n for n in range(20)}),
        user_agents=tuple(f"{n}" * user_agent_chars for n in range(5)),
    )


def answer_of(
    request: EnrichmentRequest, seen_by_ip: dict[str, Sighting] | None = None
) -> tuple[bytes, dict[str, Any]]:
    raw = build_answer(request, verdicts_for(request), Known(seen=seen_by_ip or {}))
    answer = orjson.loads(raw)
    assert isinstance(answer, dict)
    assert "data" not in answer
    assert len(raw) <= request.limits.max_answer_bytes
    return raw, answer


def named(answer: dict[str, Any]) -> list[str]:
    """The answer's Call-ID and address keys, without the "(1) summary" kind put first for people."""
    return [key for key in answer if not key.startswith("(")]


def left_out_of(answer: dict[str, Any], request: EnrichmentRequest) -> dict[str, str]:
    holder = answer[request.call_ids[0]] if request.call_ids else answer
    notes: dict[str, str] = holder.get("left_out", {})
    return notes


# --------------------------------------------------------------------------- through HTTP


async def post(client: Any, payload: bytes) -> tuple[int, bytes, dict[str, Any], float]:
    started = time.perf_counter()
    response = await client.post("/get/cdr", data=payload, headers={"Content-Type": "application/json"})
    raw = await response.read()
    elapsed = time.perf_counter() - started
    assert response.headers["Content-Type"].startswith("application/json")
    return response.status, raw, orjson.loads(raw), elapsed


async def test_a_1_mb_body_of_many_call_ids_and_ips_gets_a_bounded_answer(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    call_ids = [f"c{n}@a" for n in range(40_000)]
    ips = private_ips(20_000)
    payload = body(call_ids, source_ip=ips, dst_ip=ips)
    assert 900_000 < len(payload) <= ONE_MIB
    client = await agent()
    status, raw, answer, elapsed = await post(client, payload)
    assert status == 200
    assert elapsed < 2.0  # the deadline homer-app's 10 s leaves room for
    assert len(raw) <= EnrichmentSettings().max_answer_bytes
    assert "data" not in answer
    first = answer[call_ids[0]]
    assert abs(first["t_sec"] - time.time()) < 60  # check mode: the data is this moment's
    assert first["checked"] == ips[:500]
    assert first["left_out"] == {
        "call_ids": "39,900 further values of sid/callid not examined (enrichment.max_call_ids = 100)",
        "addresses": "19,500 further values not examined (enrichment.max_addresses = 500)",
    }
    assert "not every value was examined" in first["summary"]
    for call_id in call_ids[1:100]:  # every Call-ID examined has the object the HOMER tab reads
        assert answer[call_id] == {
            "t_sec": first["t_sec"],
            "summary": "APIBAN lists none of 500 addresses; not every value was examined (see left_out)",
            "checked": ips[:POINTER_IPS],  # the first ten; the first Call-ID has them all
            "pcap": "no listed or detected address in this call: Download PCAP gives an empty capture",
            "details": f"see {call_ids[0]}",
        }
    assert call_ids[100] not in answer
    # Past a limit the rest is only counted: dst_ip, after source_ip's 20,000, was not examined.
    assert answer[ips[499]]["fields"] == ["source_ip"]
    assert ips[500] not in answer
    assert apiban.fake.request_count() == 0


async def test_the_answer_cap_leaves_out_details_and_says_so(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_ENRICHMENT_MAX_ANSWER_BYTES="65536")
    ips = private_ips(500)
    store = client.app[SIGHTINGS]
    for n, ip in enumerate(ips):  # a sighting with a long User-Agent for every address
        info = SipInfo(method="REGISTER", user_agent=f"scanner-{n}-" + "x" * 190)
        store.record(ip, "10.255.255.254", info, 1700000000.0)
    call_ids = [f"leg-{n}@example.com" for n in range(100)]
    status, raw, answer, _ = await post(client, body(call_ids, source_ip=ips))
    assert status == 200
    assert len(raw) <= 65536
    first = answer[call_ids[0]]
    assert first["checked"] == ips  # every address is still counted and listed by name
    assert all(answer[call_id]["t_sec"] == first["t_sec"] for call_id in call_ids)
    detailed = [ip for ip in ips if ip in answer]
    assert 0 < len(detailed) < 500
    # The sighting keeps a sample cut to SAMPLE_BYTES; the answer shows it whole.
    assert answer[detailed[0]]["seen"]["user_agents"] == [("scanner-0-" + "x" * 190)[:SAMPLE_BYTES]]
    assert first["left_out"] == {
        "answer_size": "to stay within enrichment.max_answer_bytes = 65,536, left out: "
        f"the details of {500 - len(detailed)} of 500 addresses"
    }


async def test_limits_set_low_through_the_environment_are_honoured(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_ENRICHMENT_MAX_ADDRESSES="3", HEPSUB_ENRICHMENT_MAX_CALL_IDS="2")
    ips = private_ips(10)
    status, _, answer, _ = await post(client, body(["a@x", "b@x", "c@x", "a@x", "d@x"], source_ip=ips))
    assert status == 200
    assert sorted(answer) == sorted(["(1) summary", "a@x", "b@x", *ips[:3]])
    assert answer["a@x"]["checked"] == ips[:3]
    assert answer["a@x"]["left_out"] == {
        "call_ids": "2 further values of sid/callid not examined (enrichment.max_call_ids = 2)",
        "addresses": "7 further values not examined (enrichment.max_addresses = 3)",
    }
    assert answer["b@x"]["details"] == "see a@x"


async def test_a_low_answer_cap_through_the_environment_is_honoured(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_ENRICHMENT_MAX_ANSWER_BYTES="16384")
    ips = private_ips(500)
    status, raw, answer, _ = await post(client, body([f"leg-{n}" for n in range(100)], source_ip=ips))
    assert status == 200
    assert len(raw) <= 16384
    assert abs(answer["leg-0"]["t_sec"] - time.time()) < 60
    assert "enrichment.max_answer_bytes = 16,384" in answer["leg-0"]["left_out"]["answer_size"]


async def test_a_body_of_many_lists_is_refused_before_decoding(agent: AgentFactory) -> None:
    # 1 MiB of "[]" decodes into 350,000 lists: 20 to 90 ms of the event loop. homer-app's body
    # has a handful of brackets, so the body gets the same answer as one that is not JSON.
    client = await agent()
    payload = body(["c@d"], source_ip=[[]] * 340_000)
    assert len(payload) <= ONE_MIB
    status, _, answer, _ = await post(client, payload)
    assert status == 200
    assert answer == {
        "error": 'request body has 340,004 "[" and "{" characters, more than 10,000; '
        "homer-app sends one object and one list per mapping key"
    }


def test_the_most_lists_a_body_may_hold_are_examined() -> None:
    lists = MAX_BRACKETS - 4  # and the body's object, data's object, the sid and source_ip lists
    request = parse_request(body(["c@d"], source_ip=[[]] * lists + ["10.0.0.1"]))
    assert request.call_ids == ["c@d"]
    assert request.ignored == {"source_ip": ["(a list of 0 items)"] * 5}
    _, answer = answer_of(request)
    examined = VALUES_PER_LIMIT * 500
    assert answer["c@d"]["left_out"] == {
        "addresses": f"{lists - examined + 1:,} further values not examined (enrichment.max_addresses = 500)",
        "ignored": f"{examined:,} values are not IP addresses; 5 of them shown in ignored",
    }


# --------------------------------------------------------------------------- linear work


class Counted(str):
    """A string that counts how often it is hashed or compared: the work a container does."""

    operations = 0

    def __hash__(self) -> int:
        Counted.operations += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        Counted.operations += 1
        return str.__eq__(self, other)

    __ne__ = str.__ne__


def work(data: dict[str, Any], limits: EnrichmentSettings) -> int:
    Counted.operations = 0
    request_from_json({"data": data, "fromts": FROM_MS}, limits)
    return Counted.operations


@pytest.mark.parametrize("limit", [100, 100_000], ids=["default-limit", "highest-limit"])
def test_call_id_work_grows_linearly(limit: int) -> None:
    # With the highest limit every Call-ID is examined: de-duplicating by list membership
    # would compare each with all before it (n squared / 2 comparisons).
    limits = EnrichmentSettings(max_call_ids=limit)

    def call_ids(n: int) -> dict[str, Any]:
        return {"sid": [Counted(f"call-{i}@example.com") for i in range(n)]}

    small, large = work(call_ids(2_000), limits), work(call_ids(20_000), limits)
    assert small > 0
    assert large <= 11 * small


@pytest.mark.parametrize("limit", [500, 100_000], ids=["default-limit", "highest-limit"])
def test_address_work_grows_linearly(limit: int) -> None:
    limits = EnrichmentSettings(max_addresses=limit)

    def addresses(n: int) -> dict[str, Any]:
        ips = [Counted(ip) for ip in private_ips(n)]
        return {"source_ip": ips, "dst_ip": ips}

    small, large = work(addresses(2_000), limits), work(addresses(20_000), limits)
    assert small > 0
    assert large <= 11 * small


def test_200_000_call_ids_are_answered_correctly() -> None:
    call_ids = [f"{n:06d}@example.com" for n in range(200_000)]
    request = parse_request(body(call_ids, source_ip=["10.0.0.1"]))
    assert request.call_ids == call_ids[:100]
    _, answer = answer_of(request)
    assert sorted(named(answer)) == sorted([*call_ids[:100], "10.0.0.1"])
    assert answer["(1) summary"] == answer[call_ids[0]]["summary"]
    assert left_out_of(answer, request) == {
        "call_ids": "199,900 further values of sid/callid not examined (enrichment.max_call_ids = 100)"
    }


def test_200_000_call_ids_at_the_highest_limit_stay_within_the_cap() -> None:
    call_ids = [f"{n:06d}@example.com" for n in range(200_000)]
    limits = EnrichmentSettings(max_call_ids=100_000)
    request = parse_request(body(call_ids, source_ip=["10.0.0.1"]), limits)
    assert len(request.call_ids) == 100_000
    _, answer = answer_of(request)
    answered = [call_id for call_id in call_ids if call_id in answer]
    assert answered == call_ids[: len(answered)]  # in request order, the first ones first
    notes = left_out_of(answer, request)
    assert notes["call_ids"].startswith("100,000 further values")
    assert f"{100_000 - len(answered):,} of 100,000 Call-IDs (not answered)" in notes["answer_size"]


def test_the_answer_grows_by_a_small_object_per_call_id() -> None:
    def size(call_ids: int, addresses: int) -> int:
        ips = private_ips(addresses)
        request = parse_request(body([f"leg-{n:02d}@example.com" for n in range(call_ids)], source_ip=ips))
        raw, _ = answer_of(request, {ip: seen() for ip in ips})
        return len(raw)

    assert size(1, 300) > 300 * 1000  # 300 addresses with their sightings
    few = (size(100, 70) - size(1, 70)) / 99  # past WHOLE_ANSWER_ITEMS, as 300 is: built alike
    many = (size(100, 300) - size(1, 300)) / 99
    assert many < 160 + 2 * POINTER_IPS * len('"10.0.0.100",')  # t_sec, a summary, short lists
    assert many - few <= 3  # only the digits of the counts differ


# --------------------------------------------------------------------------- parsing details


def test_duplicates_and_junk_are_examined_once() -> None:
    request = request_from_json(
        {
            "data": {
                "callid": ["x@y"],
                "sid": ["x@y", "x@y", "", "data", 7, None, ["nested"], "z@y"],
                "source_ip": ["10.0.0.1", "10.0.0.1", "::ffff:10.0.0.1", 3, {"a": [1]}, [[["deep"]]], "nope"],
                "dst_ip": ["10.0.0.1", True],
            },
            "fromts": FROM_MS,
        }
    )
    assert request.call_ids == ["x@y", "z@y"]
    assert [a.text for a in request.addresses] == ["10.0.0.1"]
    assert request.fields == {"10.0.0.1": ["source_ip", "dst_ip"]}
    assert request.ignored == {
        "source_ip": ["3", "(an object of 1 keys)", "(a list of 1 items)", "nope"],
        "dst_ip": ["true"],
    }


def test_long_call_ids_and_keys_are_cut_and_said_so() -> None:
    long_id = "c" * 5000
    request = request_from_json({"data": {"sid": [long_id], "k" * 1000: ["not-an-ip"]}})
    assert request.call_ids == ["c" * MAX_CALL_ID_CHARS]
    assert request.ignored == {"k" * 100: ["not-an-ip"]}
    _, answer = answer_of(request)
    assert answer["c" * MAX_CALL_ID_CHARS]["left_out"] == {
        "long_call_ids": f"1 Call-IDs longer than {MAX_CALL_ID_CHARS} characters answered under their first "
        f"{MAX_CALL_ID_CHARS}"
    }


def test_the_ignored_sample_is_bounded_and_counted() -> None:
    data = {f"key{k}": [f"junk-{k}-{n}" for n in range(50)] for k in range(20)}
    request = request_from_json({"data": {"sid": ["c@d"], **data}})
    assert len(request.ignored) == 10
    assert all(len(values) == 5 for values in request.ignored.values())
    _, answer = answer_of(request)
    assert answer["c@d"]["left_out"] == {
        "ignored": "1,000 values are not IP addresses; 50 of them shown in ignored"
    }
    assert answer["c@d"]["summary"] == "no IP address found in key0, key1, key2 and 7 more"


def test_keys_past_the_limit_are_counted_not_examined() -> None:
    data = {f"key{k:03d}": ["10.0.0.1"] for k in range(MAX_DATA_KEYS + 36)}
    request = request_from_json({"data": {**data, "sid": ["c@d"]}})
    assert request.call_ids == ["c@d"]  # found wherever it is among the keys
    assert len(request.fields["10.0.0.1"]) == 8  # the keys named per IP are bounded too
    _, answer = answer_of(request)
    assert answer["c@d"]["left_out"] == {
        "keys": f"36 further keys of data not examined (at most {MAX_DATA_KEYS} are)"
    }


@pytest.mark.parametrize("fromts", [1e300, -5, "1669986139000", True, None, 2**63, 253_402_300_800_000])
def test_a_fromts_that_is_no_time_gives_no_t_sec(fromts: object) -> None:
    request = request_from_json({"data": {"sid": ["c@d"]}, "fromts": fromts})
    _, answer = answer_of(request)
    assert answer["c@d"]["t_sec"] is None


def test_every_left_out_note_at_once_fits_the_room_kept_for_it() -> None:
    # The longest left_out there can be: every cause, with counts larger than any body allows.
    limits = EnrichmentSettings(max_call_ids=100_000, max_addresses=100_000, max_answer_bytes=16384)
    call_ids = [f"{n}-" + "\x01" * MAX_CALL_ID_CHARS for n in range(300)]
    data = {"sid": call_ids, "source_ip": private_ips(3000), "ipv6": [f"2001:db8::{n:x}" for n in range(10)]}
    data |= {f"junk{k}": [f"junk-{n}" for n in range(20)] for k in range(MAX_DATA_KEYS + 5)}
    request = request_from_json({"data": data, "fromts": FROM_MS}, limits)
    request.call_ids_left_out = request.values_left_out = request.keys_left_out = 10**12 - 1
    request.call_ids_cut = request.ignored_count = 10**12 - 1
    raw = build_answer(
        request, verdicts_for(request), Known(seen={a.text: seen() for a in request.addresses})
    )
    assert len(raw) <= 16384
    notes = orjson.loads(raw)[request.call_ids[0]]["left_out"]
    assert set(notes) == {"call_ids", "addresses", "keys", "long_call_ids", "ignored", "answer_size"}
    for name in ("Call-IDs (not answered)", "in listed", "in unknown", "in checked", "the details of"):
        assert name in notes["answer_size"]
    assert len(orjson.dumps({"left_out": notes})) <= LEFT_OUT_ROOM


def test_no_call_id_still_gets_a_bounded_answer_with_its_notes() -> None:
    limits = EnrichmentSettings(max_addresses=5, max_answer_bytes=16384)
    request = request_from_json({"data": {"source_ip": private_ips(400)}}, limits)
    _, answer = answer_of(request, {ip: seen() for ip in private_ips(5)})
    assert answer["left_out"] == {
        "addresses": "395 further values not examined (enrichment.max_addresses = 5)"
    }
    assert answer["note"].startswith("no Call-ID in the request")
    assert set(named(answer)) == {"note", "left_out", *private_ips(5)}
    assert answer["(1) summary"].startswith("APIBAN lists")


def test_a_small_request_with_a_large_answer_is_fitted_to_the_cap() -> None:
    # 40 addresses are few enough to be serialised whole; with their sightings that is about
    # 56 KB, past the cap, so the answer is built again member by member.
    limits = EnrichmentSettings(max_answer_bytes=16384)
    ips = private_ips(40)
    request = parse_request(body(["a@x"], source_ip=ips), limits)
    _, answer = answer_of(request, {ip: seen() for ip in ips})
    assert len(orjson.dumps({ip: seen_details(seen()) for ip in ips})) > 50_000
    detailed = [ip for ip in ips if ip in answer]
    listed = [v.ip for v in verdicts_for(request) if v.listed]
    assert 0 < len(detailed) < len(listed)
    assert detailed == listed[: len(detailed)]  # listed addresses have the first claim
    assert answer["a@x"]["checked"] == ips
    assert answer["a@x"]["left_out"] == {
        "answer_size": "to stay within enrichment.max_answer_bytes = 16,384, left out: "
        f"the details of {40 - len(detailed)} of 40 addresses"
    }


def test_whole_and_fitted_answers_agree_when_nothing_is_cut() -> None:
    # A small answer is serialised whole; past WHOLE_ANSWER_ITEMS it is assembled member by
    # member. Both must give the same object when the cap is not reached.
    ips = private_ips(70)
    request = parse_request(body(["a@x", "b@x", "10.0.0.3"], source_ip=ips, dst_ip=ips[:3]))
    _, fitted = answer_of(request, {ip: seen() for ip in ips[:4]})
    small = parse_request(body(["a@x", "b@x", "10.0.0.3"], source_ip=ips[:10], dst_ip=ips[:3]))
    _, whole = answer_of(small, {ip: seen() for ip in ips[:4]})
    for answer, parsed in ((fitted, request), (whole, small)):
        count = len(parsed.addresses)
        assert answer["a@x"]["checked"] == ips[:count]
        listed = sum(1 for verdict in verdicts_for(parsed) if verdict.listed)
        assert (
            answer["10.0.0.3"]
            == {  # a Call-ID that looks like an IP keeps the Call-ID's object
                "t_sec": FROM_MS // 1000,
                "summary": f"APIBAN lists {listed} of {count} addresses; {count // 5} unknown "
                "(APIBAN unavailable)",
                "listed": answer["a@x"]["listed"][:POINTER_IPS],
                "checked": ips[:POINTER_IPS],
                "details": "see a@x",
            }
        )
        assert answer["b@x"] == answer["10.0.0.3"]
        first, fifth = verdicts_for(request)[0], verdicts_for(request)[4]
        assert answer["10.0.0.1"] == {
            "(1) verdict": verdict_sentence(first),
            **verdict_details(first),
            "fields": ["source_ip", "dst_ip"],
            "(2) seen": seen_line(seen()),
            "seen": seen_details(seen()),
        }
        assert answer["10.0.0.5"] == {
            "(1) verdict": verdict_sentence(fifth),
            **verdict_details(fifth),
            "fields": ["source_ip"],
        }
        assert "left_out" not in answer["a@x"]
