"""A sighting as the store holds it: one row per writer and life of an address, added up on read.

``merge`` adds every writer's rows for the call's addresses to what this agent holds in memory
(``_copy``: the answer's own copy, so other agents' counts never touch the memory), bounding the
samples as the in-memory sightings do; ``_columns`` lays a batch out as the write's arrays. The
writer and reader that use these is store/sightings.py.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from ..core.addresses import Addr, parse_ip
from ..ingest.sighting import CALL_ID_SAMPLE, USER_AGENT_SAMPLE, USER_SAMPLE, Sighting, sampled


def merge(
    ips: Sequence[str], local: Mapping[str, Sighting], rows: Iterable[asyncpg.Record], writer: uuid.UUID
) -> dict[str, Sighting]:
    """Every writer's rows added up per address, this writer's current life taken from memory."""
    wanted = {address.text: ip for ip in ips if (address := parse_ip(ip)) is not None}
    merged = {ip: _copy(sighting) for ip, sighting in local.items()}
    for row in rows:
        address = _address(row["ip"])
        ip = None if address is None else wanted.get(address.text)
        if address is None or ip is None:
            continue
        mine = local.get(ip)
        if mine is not None and row["writer"] == writer and row["first_seen"] == mine.first_seen:
            continue  # the memory is at least as fresh as what this agent last wrote
        _add(merged, ip, address, row)
    return merged


def _address(value: object) -> Addr | None:
    # asyncpg gives an inet with a full prefix as an address, any other as an interface.
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        value = value.ip
    return parse_ip(str(value))


def _copy(sighting: Sighting) -> Sighting:
    """A sighting for one answer: adding other agents' counts must not touch the memory."""
    return Sighting(
        sighting.ip,
        sighting.address,
        sighting.first_seen,
        sighting.last_seen,
        sighting.packets,
        Counter(sighting.methods),
        sighting.user_agents,
        sighting.call_ids,
        sighting.users,
        sighting.verdict,
    )


def _add(merged: dict[str, Sighting], ip: str, address: Addr, row: asyncpg.Record) -> None:
    sighting = merged.get(ip)
    if sighting is None:
        sighting = merged[ip] = Sighting(ip, address, row["first_seen"], row["last_seen"])
    else:
        sighting.first_seen = min(sighting.first_seen, row["first_seen"])
        sighting.last_seen = max(sighting.last_seen, row["last_seen"])
    sighting.packets += row["packets"]
    sighting.count(orjson.loads(row["methods"]))
    sighting.user_agents = _union(sighting.user_agents, row["user_agents"], USER_AGENT_SAMPLE)
    sighting.users = _union(sighting.users, row["users"], USER_SAMPLE)
    sighting.call_ids = _union(sighting.call_ids, row["call_ids"], CALL_ID_SAMPLE)


def _union(items: tuple[str, ...], stored: str, limit: int) -> tuple[str, ...]:
    for value in orjson.loads(stored):
        if len(items) >= limit:
            break
        if isinstance(value, str):
            items = sampled(items, value, limit)
    return items


def _columns(sightings: Sequence[Sighting]) -> tuple[list[Any], ...]:
    """The batch as one array per column, in UPSERT's order of parameters after $2."""
    dumps = orjson.dumps
    return (
        [s.ip for s in sightings],
        [s.first_seen for s in sightings],
        [s.last_seen for s in sightings],
        [s.packets for s in sightings],
        [dumps(s.methods).decode() for s in sightings],
        [dumps(s.user_agents).decode() for s in sightings],
        [dumps(s.users).decode() for s in sightings],
        [dumps(s.call_ids).decode() for s in sightings],
    )
