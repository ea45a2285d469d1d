"""Every setting declared once: ``KEYS``, a ``Key`` per setting with its name (``section.name``,
which also gives its ``HEPSUB_*`` environment name), its converter, its one-line description and
whether it is a secret. The file parser, the environment reader, the example config, the
documentation's table (``scripts/config_table.py``) and the error messages all read this one
table, so they cannot drift apart; the detection rules' ``detect.RULE.*`` keys are made from
``RULES`` (``_rule_keys``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .converters import (
    _RANGES,
    _agent_host,
    _apiban_url,
    _bool,
    _choice,
    _cidrs,
    _dir,
    _float_between,
    _int_between,
    _keys,
    _listen,
    _log_level,
    _name,
    _path_prefix,
    _prefixes,
    _rate_limit,
    _store_url,
    _str,
    _uuid,
    http_url,
)
from .settings import DEFAULT_RULES, MAX_HEP_WORKERS, RULES


@dataclass(frozen=True, slots=True)
class Key:
    name: str  # "section.name"
    convert: Callable[[object], Any]
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return "HEPSUB_" + self.name.replace(".", "_").upper()

    def value_range(self) -> str | None:
        """The bounds the setting's value must lie within, both included ("10 to 86400"), if any."""
        bounds = _RANGES.get(self.convert)
        return None if bounds is None else " to ".join(_number(bound) for bound in bounds)


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _rule_keys() -> list[Key]:
    keys = []
    for rule in RULES:
        default = DEFAULT_RULES[rule]
        keys += [
            Key(f"detect.{rule}.action", _choice("flag", "serve"), "flag (shown) or serve (also listed)"),
            Key(f"detect.{rule}.simulate", _bool, "log and count only, neither flag nor serve"),
            Key(f"detect.{rule}.duration", _float_between(60, 7 * 86400), "seconds of a first detection"),
            Key(f"detect.{rule}.threshold", _int_between(1, 100_000), "the event that fires the rule"),
            Key(f"detect.{rule}.window", _float_between(1, 86400), "seconds the threshold counts over"),
        ]
        if default.slow_threshold:
            keys += [
                Key(f"detect.{rule}.slow_threshold", _int_between(1, 100_000), "second trigger: event count"),
                Key(f"detect.{rule}.slow_window", _float_between(1, 86400), "second trigger: seconds"),
            ]
    keys.append(Key("detect.toll_fraud.prefixes", _prefixes, "dialled prefixes that count (empty: rule off)"))
    return keys


KEYS: tuple[Key, ...] = (
    Key("agent.bind", _str, "HTTP listen address"),
    Key("agent.port", _int_between(1, 65535), "HTTP listen port, also registered with HOMER"),
    Key(
        "agent.host",
        _agent_host,
        "host name or IP (no scheme, no port) that homer-app uses to reach the agent (required to register)",
    ),
    Key("agent.path", _path_prefix, "path prefix registered with HOMER; homer-app calls {path}/{type}"),
    Key("agent.type", _name, "registered type"),
    Key("agent.node", _name, "registered node; the HOMER UI tab reads HEPSUB:<node>"),
    Key("agent.gid", _int_between(1, 2**31 - 1), "registered gid (HOMER requires non-zero)"),
    Key("agent.uuid", _uuid, "registered uuid; empty: generated once and kept in state.dir"),
    Key("agent.deadline", _float_between(0.05, 1.8), "seconds an enrichment answer may wait for APIBAN"),
    Key(
        "agent.allow_from",
        _cidrs,
        "CIDRs allowed to use the HTTP API (not /healthz, /readyz or the site API); empty: any",
    ),
    Key("agent.max_connections", _int_between(16, 1_000_000), "HTTP connections served at once"),
    Key(
        "agent.idle_timeout",
        _float_between(1, 3600),
        "seconds an HTTP connection may sit idle or take to send a request's headers",
    ),
    Key("agent.body_timeout", _float_between(1, 600), "seconds a client may take to send a request body"),
    Key("agent.max_body_bytes", _int_between(65536, 64 * 1024 * 1024), "largest HTTP request body, bytes"),
    Key(
        "agent.download",
        _bool,
        "register as <type>-download so HOMER's Download PCAP button reaches the agent",
    ),
    Key(
        "enrichment.max_call_ids",
        _int_between(1, 100_000),
        "distinct Call-IDs examined per enrichment request",
    ),
    Key("enrichment.max_addresses", _int_between(1, 100_000), "distinct IPs examined per enrichment request"),
    Key(
        "enrichment.max_answer_bytes",
        _int_between(16384, 64 * 1024 * 1024),
        "largest enrichment answer, bytes; past it, details are left out and said so",
    ),
    Key("homer.url", http_url, "homer-app base URL, e.g. http://homer:9080; empty: no registration"),
    Key("homer.token", _str, "HOMER Auth-Token (Preferences -> AUTH TOKEN)", secret=True),
    Key("homer.ttl", _int_between(10, 86400), "registration TTL in seconds, refreshed at 0.9 x ttl"),
    Key("homer.token_access", _bool, "homer-app has api_settings.enable_token_access: unregister with it"),
    Key("homer.user", _str, "HOMER user for a JWT to unregister at shutdown (optional)"),
    Key("homer.password", _str, "password of homer.user", secret=True),
    Key("homer.timeout", _float_between(0.1, 60), "seconds per request to homer-app"),
    Key("apiban.url", _apiban_url, "APIBAN base URL"),
    Key("apiban.key", _str, "APIBAN key; never printed or logged", secret=True),
    Key("apiban.mode", _choice("mirror", "check"), "mirror (hold the whole list) or check (per-IP)"),
    Key("apiban.poll_interval", _int_between(10, 86400), "seconds between incremental pulls"),
    Key("apiban.rate_limit", _rate_limit, "request budget per key: REQUESTS/SECONDS"),
    Key("apiban.timeout", _float_between(0.1, 120), "seconds per APIBAN request"),
    Key("apiban.cache_size", _int_between(1, 10_000_000), "check mode: verdicts kept in memory"),
    Key("apiban.listed_ttl", _int_between(1, 604800), "check mode: seconds a 'listed' verdict is reused"),
    Key("apiban.unlisted_ttl", _int_between(1, 604800), "check mode: seconds a clean verdict is reused"),
    Key(
        "state.dir",
        _dir,
        "directory for the uuid, list snapshot and sync position; a relative one is relative to "
        "the directory the agent starts in",
    ),
    Key("hep.udp", _listen, "HEP over UDP listen address; empty disables"),
    Key("hep.tcp", _listen, "HEP over TCP listen address; empty disables"),
    Key("hep.rcvbuf", _int_between(65536, 1 << 30), "UDP receive buffer to ask the kernel for, bytes"),
    Key("hep.max_connections", _int_between(1, 100_000), "HEP TCP connections served at once"),
    Key("hep.idle_timeout", _float_between(1, 86400), "seconds before an idle HEP TCP connection is closed"),
    Key("hep.allow_from", _cidrs, "CIDRs allowed to send HEP (UDP and TCP); empty: any"),
    Key(
        "hep.auth_key",
        _str,
        "HEPv3 packets must carry this key in chunk 0x000e; HEPv1/v2 are then refused",
        secret=True,
    ),
    Key(
        "hep.packet_timeout",
        _float_between(0.5, 3600),
        "seconds a HEP TCP connection may take to deliver each packet, the first included",
    ),
    Key("hep.max_connections_per_sender", _int_between(1, 100_000), "HEP TCP connections per sender address"),
    Key(
        "hep.workers",
        _int_between(1, MAX_HEP_WORKERS),
        "HEP ingest processes sharing the listen ports (SO_REUSEPORT)",
    ),
    Key(
        "sightings.max",
        _int_between(100, 100_000_000),
        "IPs remembered from HEP traffic (least recent unlisted forgotten first)",
    ),
    Key(
        "sightings.check_share",
        _float_between(0, 1, "a fraction between 0 and 1"),
        "check mode: share of the APIBAN budget that lookups of IPs seen in HEP may spend",
    ),
    Key("allow.cidrs", _cidrs, "IPs/CIDRs never reported as listed"),
    Key("site.keys", _keys, "local keys for the APIBAN-compatible API served to the site", secret=True),
    Key("site.rate_limit", _rate_limit, "requests per client and key to the site API: REQUESTS/SECONDS"),
    Key(
        "site.auth_failure_limit",
        _rate_limit,
        "wrong site keys per client address: REQUESTS/SECONDS; past it, 429 to that address",
    ),
    Key(
        "site.include_local",
        _bool,
        "served local detections join the APIBAN entries in the site API and the decision stream",
    ),
    Key("detect.enabled", _bool, "local attacker detection from the HEP stream"),
    Key("detect.own", _cidrs, "CIDRs of the site's own proxies, SBCs, PBXs: never detected"),
    Key("detect.max_tracked", _int_between(100, 10_000_000), "remote addresses whose counters are kept"),
    Key("detect.max_new_served", _int_between(1, 100_000), "new served detections per minute (breaker)"),
    *_rule_keys(),
    Key(
        "store.url",
        _store_url,
        "PostgreSQL shared by several agents: postgresql://USER:PASSWORD@HOST:PORT/DATABASE; "
        "empty: none, all in memory and state.dir",
        secret=True,
    ),
    Key(
        "store.lease_ttl",
        _float_between(2, 300),
        "seconds the APIBAN puller's lease lasts unrenewed (renewed every third): after a puller "
        "dies, another agent takes over within this",
    ),
    Key("log.level", _log_level, "debug, info, warning or error"),
    Key("log.format", _choice("text", "json"), "text, or json: one JSON object per line"),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}
