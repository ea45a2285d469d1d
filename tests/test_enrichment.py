"""HOMER enrichment through the real HTTP stack, against the APIBAN fake.

Bodies are the fixtures of docs/peers/homer-app.md#request-fixtures: what homer-app really posts with the
default mapping.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from typing import Any

import orjson
import pytest

from .conftest import APIBAN_KEY, HOMER_BODY_1, AgentFactory, ApibanPeer, assert_no_secret

CALL = "a84b4c76e66710@pc33.example.com"


def body(sids: list[str], **lists: list[str]) -> bytes:
    data = {"sid": sids, **lists}
    return orjson.dumps(
        {"data": data, "fromts": 1669986139000, "tots": 1669987239000}, option=orjson.OPT_SORT_KEYS
    )


async def post(client: Any, payload: bytes, path: str = "/get/cdr") -> tuple[int, dict[str, Any], float]:
    started = time.perf_counter()
    response = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
    raw = await response.read()
    elapsed = time.perf_counter() - started
    assert response.headers["Content-Type"].startswith("application/json")
    assert_no_secret(raw.decode())
    return response.status, orjson.loads(raw), elapsed


async def test_fixture_1_answers_the_documented_shape(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("203.0.113.7")  # documentation range: non-routable, so never looked up
    client = await agent()
    status, answer, _ = await post(client, HOMER_BODY_1)
    assert status == 200
    assert "data" not in answer
    call = answer[CALL]
    assert isinstance(call, dict)
    # Check mode: the verdicts are this moment's, so the data's time is the answer's.
    assert abs(call["t_sec"] - time.time()) < 60
    assert call["checked"] == ["192.168.1.10", "203.0.113.7"]
    assert "listed" not in call  # no empty containers: nothing listed, no list
    assert isinstance(call["summary"], str)
    assert "\n" not in call["summary"]
    assert answer["(1) summary"] == call["summary"]
    assert "(2) listed or detected" not in answer
    assert answer["192.168.1.10"] == {
        "(1) verdict": "private address, not looked up",
        "ip": "192.168.1.10",
        "listed": False,
        "source": "private",
        "fields": ["source_ip"],
    }
    assert apiban.fake.request_count() == 0


async def test_listed_and_clean_routable_addresses(agent: AgentFactory, apiban: ApibanPeer) -> None:
    entry_id = apiban.fake.add("1.2.3.4")
    client = await agent()
    status, answer, _ = await post(client, body([CALL], source_ip=["1.2.3.4", "8.8.8.8"], dst_ip=["9.9.9.9"]))
    assert status == 200
    assert answer[CALL]["listed"] == ["1.2.3.4"]
    assert answer[CALL]["checked"] == ["9.9.9.9", "1.2.3.4", "8.8.8.8"]
    assert "APIBAN lists 1 of 3 addresses: 1.2.3.4" in answer[CALL]["summary"]
    listed = answer["1.2.3.4"]
    assert listed["listed"] is True
    assert listed["source"] == "check"
    assert listed["ID"] == entry_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", listed["last_reported"])
    assert listed["(1) verdict"] == f"listed by APIBAN, last reported {listed['last_reported']}"
    assert answer["(2) listed or detected"] == {"1.2.3.4": listed["(1) verdict"]}
    assert answer["8.8.8.8"]["(1) verdict"] == "not listed by APIBAN"
    assert answer["9.9.9.9"]["fields"] == ["dst_ip"]
    assert answer["8.8.8.8"]["listed"] is False


async def test_fixture_2_two_calls_loopback_and_ipv6(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("2a01:4f8::5")
    client = await agent()
    status, answer, _ = await post(
        client,
        body(
            ["leg-a@example.com", "leg-b@example.com"],
            source_ip=["127.0.0.1", "2a01:04f8:0::5", "2001:db8::5"],
        ),
    )
    assert status == 200
    first, second = answer["leg-a@example.com"], answer["leg-b@example.com"]
    assert first["listed"] == ["2a01:4f8::5"]
    # Only the first Call-ID carries the call's whole object; the others, short lists and where it is.
    assert second == {
        "t_sec": first["t_sec"],
        "summary": "APIBAN lists 1 of 3 addresses",
        "listed": ["2a01:4f8::5"],
        "checked": ["127.0.0.1", "2a01:4f8::5", "2001:db8::5"],
        # Any leg's row may be clicked: each has what the Download PCAP button posts back.
        "pcap": "Download PCAP: the SIP packets kept of 2a01:4f8::5",
        "__hep__": {"type": "download", "ips": ["2a01:4f8::5"]},
        "details": "see leg-a@example.com",
    }
    assert (first["pcap"], first["__hep__"]) == (second["pcap"], second["__hep__"])
    assert answer["127.0.0.1"]["source"] == "private"
    assert answer["2a01:4f8::5"]["listed"] is True  # canonical IPv6 spelling
    assert answer["2001:db8::5"]["source"] == "private"
    assert apiban.fake.request_count("check") == 1  # only the routable IPv6 went upstream


@pytest.mark.parametrize(
    ("payload", "call_id"),
    [
        (
            b'{"data":{"dst_ip":["10.0.0.5"],"sid":["x@y"],"source_ip":["203.0.113.7"]},"fromts":1,"tots":2}',
            "x@y",
        ),
        (b'{"data":{"sid":["x@y"],"source_ip":[]},"fromts":1669986139000,"tots":1669987239000}', "x@y"),
        (b'{"data":{"callid":["x@y"]},"fromts":1669986139000,"tots":1669987239000}', "x@y"),
    ],
    ids=["fixture-3-extra-key", "fixture-4-empty", "fixture-5-no-source-ip"],
)
async def test_fixtures_3_to_5(agent: AgentFactory, payload: bytes, call_id: str) -> None:
    client = await agent()
    status, answer, _ = await post(client, payload)
    assert status == 200
    assert isinstance(answer[call_id], dict)
    assert "summary" in answer[call_id]


async def test_no_ip_lists_explains_the_mapping(agent: AgentFactory) -> None:
    client = await agent()
    _, answer, _ = await post(client, b'{"data":{"callid":["x@y"]},"fromts":1669986139000,"tots":1}')
    assert "checked" not in answer["x@y"]  # nothing examined: no empty list
    assert "source_ip" in answer["x@y"]["hint"]


@pytest.mark.parametrize("path", ["/get/cdr-download", "/get/unknown", "/get/pcap;download"])
async def test_fixtures_6_and_7_any_type_is_answered(agent: AgentFactory, path: str) -> None:
    client = await agent()
    status, answer, elapsed = await post(client, HOMER_BODY_1, path)
    assert status == 200
    assert CALL in answer
    assert elapsed < 2.0


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1,2]", b'{"nodata":1}', b'{"data":"x"}', b'{"data":[1]}', b"\xff\xfe"],
)
async def test_bad_bodies_get_a_json_error_with_200(agent: AgentFactory, payload: bytes) -> None:
    client = await agent()
    status, answer, _ = await post(client, payload)
    assert status == 200
    assert set(answer) == {"error"}
    assert isinstance(answer["error"], str)


async def test_oversized_body_gets_a_json_error(agent: AgentFactory) -> None:
    client = await agent()
    payload = io.BytesIO(b'{"data":{"sid":["' + b"x" * (2 * 1024 * 1024) + b'"]}}')
    response = await client.post("/get/cdr", data=payload, headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert "too large" in (await response.json())["error"]


async def test_non_ip_values_are_reported_not_looked_up(agent: AgentFactory, apiban: ApibanPeer) -> None:
    client = await agent()
    _, answer, _ = await post(client, body(["c@d"], source_ip=["1.1.1.1", "not-an-ip", "999.1.1.1"]))
    assert answer["c@d"]["ignored"] == {"source_ip": ["not-an-ip", "999.1.1.1"]}
    assert "not-an-ip" not in answer
    assert apiban.fake.request_count("check") == 1


@pytest.mark.parametrize("failure", ["503", "hang", "429", "invalid_json", "bad_key"])
async def test_upstream_failure_still_answers_within_2s(
    agent: AgentFactory, apiban: ApibanPeer, failure: str
) -> None:
    apiban.fake.add("1.2.3.4")
    if failure == "503":
        apiban.fake.fail_status = 503
    elif failure == "hang":
        apiban.fake.hang = True
    elif failure == "429":
        apiban.fake.rate_limit = (0, 120.0)
    elif failure == "invalid_json":
        apiban.fake.invalid_json = True
    else:
        apiban.fake.keys = {"another-key"}
    client = await agent(HEPSUB_APIBAN_TIMEOUT="10")
    status, answer, elapsed = await post(client, body([CALL], source_ip=["1.2.3.4", "10.1.1.1"]))
    assert status == 200
    assert elapsed < 2.0
    assert answer["1.2.3.4"]["listed"] is None
    assert answer["1.2.3.4"]["source"] == "unavailable"
    assert answer["10.1.1.1"]["listed"] is False  # local answers are unaffected
    assert "unknown" in answer[CALL]["summary"]
    assert answer[CALL]["unknown"] == ["1.2.3.4"]


async def test_failures_are_not_cached(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("1.2.3.4")
    apiban.fake.fail_status = 503
    client = await agent()
    _, first, _ = await post(client, body([CALL], source_ip=["1.2.3.4"]))
    assert first["1.2.3.4"]["listed"] is None
    apiban.fake.fail_status = None
    _, second, _ = await post(client, body([CALL], source_ip=["1.2.3.4"]))
    assert second["1.2.3.4"]["listed"] is True
    _, third, _ = await post(client, body([CALL], source_ip=["1.2.3.4"]))
    assert third["1.2.3.4"]["source"] == "cache"
    assert apiban.fake.request_count("check") == 2


async def test_50_concurrent_requests_for_10_new_ips_cost_10_upstream_requests(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    ips = [f"45.{i}.{i}.{i}" for i in range(1, 11)]
    for ip in ips[:3]:
        apiban.fake.add(ip)
    apiban.fake.delay = 0.2  # keep the first requests in flight while the others arrive
    client = await agent()
    payload = body([CALL], source_ip=ips)
    answers = await asyncio.gather(*(post(client, payload) for _ in range(50)))
    assert all(status == 200 for status, _, _ in answers)
    assert all(answer[CALL]["listed"] == ips[:3] for _, answer, _ in answers)
    assert apiban.fake.request_count("check") == 10
    assert all(r.status != 429 for r in apiban.fake.requests)


async def test_budget_is_never_exceeded(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.rate_limit = (5, 120.0)
    client = await agent(HEPSUB_APIBAN_RATE_LIMIT="5/120")
    ips = [f"46.0.0.{i}" for i in range(1, 21)]
    answers = await asyncio.gather(
        *(post(client, body([CALL], source_ip=ips[i : i + 4])) for i in range(0, 20, 2))
    )
    assert apiban.fake.request_count() == 5
    assert all(r.status != 429 for r in apiban.fake.requests)
    unknown = {ip for _, answer, _ in answers for ip in answer[CALL].get("unknown", [])}
    assert len(unknown) == 15
    status = await (await client.get("/api/v1/status")).json()
    assert status["apiban"]["budget"]["used"] == 5


async def test_key_is_redacted_from_status_and_errors(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.keys = {"another-key"}
    client = await agent()
    await post(client, body([CALL], source_ip=["1.2.3.4"]))
    raw = await (await client.get("/api/v1/status")).text()
    assert APIBAN_KEY not in raw
    status = orjson.loads(raw)
    assert "refused the key" in status["apiban"]["last_error"]["message"]
    assert (await (await client.get("/metrics")).text()).count(APIBAN_KEY) == 0
