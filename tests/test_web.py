"""The agent's own HTTP API through the real HTTP stack: lookups, errors, status, metrics, routes."""

from __future__ import annotations

import io
import uuid
from typing import Any

import orjson
import pytest

from .conftest import HOMER_BODY_1, AgentFactory, ApibanPeer, assert_no_secret

CALL = "a84b4c76e66710@pc33.example.com"


async def get(client: Any, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    raw = await response.read()
    assert response.headers["Content-Type"].startswith("application/json")
    assert_no_secret(raw.decode())
    return response.status, orjson.loads(raw)


async def post(client: Any, path: str, payload: bytes | io.BytesIO) -> tuple[int, Any]:
    response = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
    raw = await response.read()
    assert response.headers["Content-Type"].startswith("application/json")
    return response.status, orjson.loads(raw)


async def metrics(client: Any) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text: str = await response.text()
    return text


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz_in_check_mode(agent: AgentFactory, apiban: ApibanPeer) -> None:
    client = await agent(HEPSUB_APIBAN_MODE="check")
    assert await get(client, "/healthz") == (200, {"status": "ok"})
    status, body = await get(client, "/readyz")
    assert status == 200
    assert body["ready"] is True
    assert apiban.fake.request_count() == 0  # readiness costs no APIBAN request


# --------------------------------------------------------------------------- lookups


async def test_check_one_listed_address(agent: AgentFactory, apiban: ApibanPeer) -> None:
    entry_id = apiban.fake.add("1.2.3.4")
    client = await agent()
    status, verdict = await get(client, "/api/v1/check/1.2.3.4")
    assert status == 200
    assert verdict["ip"] == "1.2.3.4"
    assert verdict["listed"] is True
    assert verdict["source"] == "check"
    assert verdict["ID"] == entry_id
    assert isinstance(verdict["last_reported"], int)
    assert apiban.fake.request_count("check") == 1


async def test_check_one_clean_address_has_no_id(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("1.2.3.4")
    client = await agent()
    status, verdict = await get(client, "/api/v1/check/8.8.8.8")
    assert status == 200
    assert verdict == {"ip": "8.8.8.8", "listed": False, "source": "check"}


async def test_check_one_private_address_stays_local(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("10.0.0.1")
    client = await agent()
    status, verdict = await get(client, "/api/v1/check/10.0.0.1")
    assert status == 200
    assert verdict == {"ip": "10.0.0.1", "listed": False, "source": "private"}
    assert apiban.fake.request_count() == 0


@pytest.mark.parametrize("text", ["nonsense", "999.1.1.1", "1.2.3.4.5"])
async def test_check_one_rejects_a_non_ip(agent: AgentFactory, apiban: ApibanPeer, text: str) -> None:
    client = await agent()
    status, body = await get(client, f"/api/v1/check/{text}")
    assert status == 400
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert apiban.fake.request_count() == 0


async def test_check_many_keeps_the_order(agent: AgentFactory, apiban: ApibanPeer) -> None:
    entry_id = apiban.fake.add("1.2.3.4")
    client = await agent()
    status, body = await post(client, "/api/v1/check", b'{"ips": ["1.2.3.4", "nope", "::1"]}')
    assert status == 200
    results = body["results"]
    assert [r["ip"] for r in results] == ["1.2.3.4", "nope", "::1"]
    assert (results[0]["listed"], results[0]["source"], results[0]["ID"]) == (True, "check", entry_id)
    assert results[1]["source"] == "invalid"
    assert results[1]["listed"] is None
    assert (results[2]["listed"], results[2]["source"]) == (False, "private")
    assert apiban.fake.request_count("check") == 1


async def test_addresses_are_canonical_and_looked_up_once(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("1.2.3.4")
    client = await agent()
    status, verdict = await get(client, "/api/v1/check/::ffff:1.2.3.4")
    assert status == 200
    assert (verdict["ip"], verdict["listed"]) == ("1.2.3.4", True)
    payload = b'{"ips": ["1.2.3.4", "::ffff:1.2.3.4", "[2a01:04f8::5]", "2a01:4f8::5"]}'
    status, body = await post(client, "/api/v1/check", payload)
    assert status == 200
    assert [r["ip"] for r in body["results"]] == ["1.2.3.4", "1.2.3.4", "2a01:4f8::5", "2a01:4f8::5"]
    assert [r["listed"] for r in body["results"]] == [True, True, False, False]
    assert apiban.fake.request_count("check") == 2  # 1.2.3.4 once, then from the cache; the IPv6 once


async def test_check_many_accepts_exactly_1000(agent: AgentFactory, apiban: ApibanPeer) -> None:
    ips = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]
    client = await agent()
    status, body = await post(client, "/api/v1/check", orjson.dumps({"ips": ips}))
    assert status == 200
    assert [r["ip"] for r in body["results"]] == ips
    assert apiban.fake.request_count() == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"ips": "1.2.3.4"}',
        b'{"ip": ["1.2.3.4"]}',
        orjson.dumps({"ips": ["10.0.0.1"] * 1001}),
    ],
    ids=["empty", "not-json", "not-utf8", "array", "no-ips", "ips-not-a-list", "misspelt", "1001-ips"],
)
async def test_check_many_bad_bodies_get_400(agent: AgentFactory, apiban: ApibanPeer, payload: bytes) -> None:
    client = await agent()
    status, body = await post(client, "/api/v1/check", payload)
    assert status == 400
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert apiban.fake.request_count() == 0


async def test_check_many_oversized_body_gets_a_json_error(agent: AgentFactory, apiban: ApibanPeer) -> None:
    client = await agent()
    payload = io.BytesIO(b'{"ips": ["' + b"x" * (3 * 1024 * 1024) + b'"]}')
    status, body = await post(client, "/api/v1/check", payload)
    assert 400 <= status < 500
    assert set(body) == {"error"}
    assert apiban.fake.request_count() == 0


# --------------------------------------------------------------------------- routing errors


@pytest.mark.parametrize("path", ["/nope", "/api/v1/check/", "/api/v1/unknown", "/get"])
async def test_unknown_route_is_a_json_404(agent: AgentFactory, path: str) -> None:
    client = await agent()
    status, body = await get(client, path)
    assert status == 404
    assert set(body) == {"error"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/check"), ("DELETE", "/healthz"), ("GET", "/get/cdr"), ("POST", "/api/v1/status")],
)
async def test_wrong_method_is_a_json_405(agent: AgentFactory, method: str, path: str) -> None:
    client = await agent()
    response = await client.request(method, path)
    assert response.status == 405
    assert response.headers["Content-Type"].startswith("application/json")
    assert method not in response.headers["Allow"]
    assert response.headers["Allow"]
    body = await response.json()
    assert set(body) == {"error"}


async def test_non_string_ips_are_echoed_as_json_text(agent: AgentFactory) -> None:
    client = await agent()
    response = await client.post("/api/v1/check", json={"ips": [None, {"a": 1}, 7]})
    results = (await response.json())["results"]
    assert [r["ip"] for r in results] == ["null", '{"a":1}', "7"]
    assert {r["source"] for r in results} == {"invalid"}


# --------------------------------------------------------------------------- status and uuid


async def test_status_reports_budget_and_disabled_registration(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    apiban.fake.add("1.2.3.4")
    client = await agent()
    _, before = await get(client, "/api/v1/status")
    assert before["apiban"]["budget"]["used"] == 0
    await get(client, "/api/v1/check/1.2.3.4")
    status, body = await get(client, "/api/v1/status")
    assert status == 200
    assert body["apiban"]["budget"]["used"] == 1
    assert body["apiban"]["mode"] == "check"
    assert body["apiban"]["key_configured"] is True
    registration = body["registration"]
    assert registration["state"] == "disabled"
    assert registration["homer_url"] is None


async def test_uuid_is_persisted_and_reused(agent: AgentFactory) -> None:
    first = await agent()
    _, status = await get(first, "/api/v1/status")
    agent_uuid = status["registration"]["uuid"]
    assert str(uuid.UUID(agent_uuid)) == agent_uuid
    assert (agent.tmp_path / "state" / "uuid").read_text(encoding="ascii").strip() == agent_uuid
    second = await agent()  # a second instance with the same state dir
    _, again = await get(second, "/api/v1/status")
    assert again["registration"]["uuid"] == agent_uuid


async def test_agent_uuid_setting_wins_over_the_state_dir(agent: AgentFactory) -> None:
    _, status = await get(await agent(), "/api/v1/status")
    stored = status["registration"]["uuid"]
    chosen = uuid.uuid4()
    _, status = await get(await agent(HEPSUB_AGENT_UUID=str(chosen).upper()), "/api/v1/status")
    assert status["registration"]["uuid"] == str(chosen)
    assert stored != str(chosen)
    assert (agent.tmp_path / "state" / "uuid").read_text(encoding="ascii").strip() == stored


# --------------------------------------------------------------------------- metrics


async def test_metrics_count_upstream_requests_and_enrichments(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    apiban.fake.add("1.2.3.4")
    client = await agent()
    upstream = 'hepsub_apiban_upstream_requests_total{endpoint="check",outcome="ok"}'
    enrichment = 'hepsub_apiban_enrichment_requests_total{outcome="ok"}'
    text = await metrics(client)
    assert upstream not in text
    await get(client, "/api/v1/check/1.2.3.4")
    text = await metrics(client)
    assert f"{upstream} 1.0" in text.splitlines()
    assert enrichment not in text
    status, _ = await post(client, "/get/cdr", HOMER_BODY_1)
    assert status == 200
    text = await metrics(client)
    assert f"{enrichment} 1.0" in text.splitlines()
    assert f"{upstream} 1.0" in text.splitlines()  # fixture 1 holds no routable address


# --------------------------------------------------------------------------- settings that change answers


async def test_allow_list_overrides_apiban(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("1.2.3.4")
    client = await agent(HEPSUB_ALLOW_CIDRS="1.2.3.0/24")
    status, verdict = await get(client, "/api/v1/check/1.2.3.4")
    assert status == 200
    assert verdict == {"ip": "1.2.3.4", "listed": False, "source": "allowlist"}
    status, body = await post(client, "/api/v1/check", b'{"ips": ["1.2.3.4", "1.2.4.4"]}')
    assert [r["source"] for r in body["results"]] == ["allowlist", "check"]
    assert apiban.fake.request_count() == 1  # only the address outside the allow-list


async def test_enrichment_path_follows_agent_path(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_AGENT_PATH="/hepsub/")
    status, answer = await post(client, "/hepsub/cdr", HOMER_BODY_1)
    assert status == 200
    assert answer[CALL]["checked"] == ["192.168.1.10", "203.0.113.7"]
    status, body = await post(client, "/get/cdr", HOMER_BODY_1)
    assert status == 404
    assert set(body) == {"error"}
