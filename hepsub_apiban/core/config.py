"""Settings: one TOML file, then the legacy sipcapture env names, then ``HEPSUB_*`` env.

Every key is declared once in ``KEYS`` with its default and a converter, so the file
parser, the env reader, the example config and the error messages cannot drift apart.
A bad value raises ``ConfigError`` naming the setting and where the value came from;
the CLI turns that into a one-line message and exit code 2.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A setting has a value the agent cannot use."""

    def __init__(self, key: str, problem: str, origin: str = "") -> None:
        where = f" (from {origin})" if origin else ""
        super().__init__(f"{key}: {problem}{where}")
        self.key = key


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    window: float

    def __str__(self) -> str:
        return f"{self.requests}/{self.window:g}"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    bind: str = "0.0.0.0"
    port: int = 18088
    host: str = ""
    path: str = "/get"
    type: str = "cdr"
    node: str = "apiban"
    gid: int = 10
    uuid: str = ""
    deadline: float = 1.0
    allow_from: tuple[IPNetwork, ...] = ()
    max_connections: int = 1024
    idle_timeout: float = 15.0
    body_timeout: float = 10.0
    max_body_bytes: int = 1024 * 1024
    download: bool = True

    @property
    def registered_type(self) -> str:
        """The type sent to HOMER: with ``download`` it matches homer-app's ``LIKE '%download%'``.

        Joined with "-": homer-app URL-escapes the type of a search before its ``LIKE``, so a
        ";" (as in rtpengine's "pcap;download") becomes "%3B" and the search finds no row.
        """
        if not self.download or "download" in self.type:
            return self.type
        return f"{self.type}-download"


@dataclass(frozen=True, slots=True)
class EnrichmentSettings:
    max_call_ids: int = 100
    max_addresses: int = 500
    max_answer_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HomerSettings:
    url: str = ""
    token: str = field(default="", repr=False)
    ttl: int = 300
    token_access: bool = False
    user: str = ""
    password: str = field(default="", repr=False)
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ApibanSettings:
    url: str = "https://apiban.org"
    key: str = field(default="", repr=False)
    mode: str = "mirror"
    poll_interval: int = 300
    rate_limit: RateLimit = RateLimit(11, 120.0)
    timeout: float = 5.0
    cache_size: int = 10000
    listed_ttl: int = 3600
    unlisted_ttl: int = 900


@dataclass(frozen=True, slots=True)
class StateSettings:
    dir: Path = Path("./state")


MAX_HEP_WORKERS = 64  # hep.workers: more processes than this only contend for the same cores


@dataclass(frozen=True, slots=True)
class HepSettings:
    udp: Address | None = Address("0.0.0.0", 9060)
    tcp: Address | None = Address("0.0.0.0", 9060)
    rcvbuf: int = 4 * 1024 * 1024
    max_connections: int = 256
    idle_timeout: float = 300.0
    allow_from: tuple[IPNetwork, ...] = ()
    auth_key: str = field(default="", repr=False)
    packet_timeout: float = 5.0
    max_connections_per_sender: int = 16
    workers: int = 1


@dataclass(frozen=True, slots=True)
class SightingsSettings:
    max: int = 100_000
    check_share: float = 0.5


@dataclass(frozen=True, slots=True)
class AllowSettings:
    cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class SiteSettings:
    keys: tuple[str, ...] = field(default=(), repr=False)
    rate_limit: RateLimit = RateLimit(600, 60.0)
    auth_failure_limit: RateLimit = RateLimit(10, 60.0)
    include_local: bool = True


RULES = (
    "scanner_ua",
    "auth_failure",
    "user_enumeration",
    "extension_scan",
    "request_flood",
    "toll_fraud",
    "unanswered_invites",
)


@dataclass(frozen=True, slots=True)
class RuleSettings:
    """One detection rule: it fires at the ``threshold``-th event within ``window`` seconds (or at
    ``slow_threshold`` within ``slow_window``: the second, slower trigger some rules have)."""

    action: str = "serve"  # flag: shown only; serve: also listed to the site
    simulate: bool = False  # log and count, neither flag nor serve
    duration: float = 3600.0  # seconds of a first detection; repeats escalate
    threshold: int = 3
    window: float = 60.0
    slow_threshold: int = 0  # 0: the rule has no second trigger
    slow_window: float = 0.0
    prefixes: tuple[str, ...] = ()  # toll_fraud: dialled prefixes that count


# docs/peers/detection-tools.md#rules, with "more than N" written as the event that fires (N + 1).
DEFAULT_RULES: dict[str, RuleSettings] = {
    "scanner_ua": RuleSettings("serve", False, 3600, 3, 60),
    "auth_failure": RuleSettings("serve", False, 4 * 3600, 6, 10, 21, 600),
    "user_enumeration": RuleSettings("serve", False, 4 * 3600, 5, 60, 25, 300),
    "extension_scan": RuleSettings("serve", False, 3600, 20, 120, 5, 60),
    "request_flood": RuleSettings("flag", False, 3600, 101, 60),
    "toll_fraud": RuleSettings("serve", False, 24 * 3600, 3, 600),
    "unanswered_invites": RuleSettings("flag", False, 3600, 30, 300),
}
RULE_FIELDS = ("action", "simulate", "duration", "threshold", "window", "slow_threshold", "slow_window")


@dataclass(frozen=True, slots=True)
class DetectSettings:
    enabled: bool = True
    own: tuple[IPNetwork, ...] = ()
    max_tracked: int = 100_000
    max_new_served: int = 30  # per minute: the circuit breaker
    rules: Mapping[str, RuleSettings] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def rule(self, name: str) -> RuleSettings:
        return self.rules[name]


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = field(default="", repr=False)  # a password may be in it: shown only as ``shown``
    lease_ttl: float = 30.0  # seconds a puller may go silent before another agent takes over

    @property
    def shown(self) -> str:
        return redact_store_url(self.url)

    @property
    def database(self) -> str:
        """The database the URL names (PostgreSQL's default: the user's name)."""
        parts = urlsplit(self.url)
        return unquote(parts.path.lstrip("/")) or self.user

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.url).username or "")

    def secrets(self) -> tuple[str, ...]:
        """The URL and every password in it (in the user part or a ``password=`` parameter)."""
        if not self.url:
            return ()
        parts = urlsplit(self.url)
        passwords = [value for name, value in parse_qsl(parts.query) if name.endswith("password")]
        return tuple(value for value in (self.url, parts.password, *passwords) if value)


def redact_store_url(url: str) -> str:
    """``postgresql://user:***@host:port/db``: what a log, an error or a status page may show.

    The query is left out whole: besides ``password=`` it may name files of keys and certificates.
    """
    if not url:
        return ""
    parts = urlsplit(url)
    user = parts.username or ""
    if parts.password is not None:
        user += ":***"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{user + '@' if user else ''}{host}{port}{parts.path}"


@dataclass(frozen=True, slots=True)
class Settings:
    agent: AgentSettings = AgentSettings()
    enrichment: EnrichmentSettings = EnrichmentSettings()
    homer: HomerSettings = HomerSettings()
    apiban: ApibanSettings = ApibanSettings()
    state: StateSettings = StateSettings()
    hep: HepSettings = HepSettings()
    allow: AllowSettings = AllowSettings()
    site: SiteSettings = SiteSettings()
    log: LogSettings = LogSettings()
    sightings: SightingsSettings = SightingsSettings()
    detect: DetectSettings = DetectSettings()
    store: StoreSettings = StoreSettings()

    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line, an error or a status page."""
        values = (
            self.apiban.key,
            self.homer.token,
            self.homer.password,
            self.hep.auth_key,
            *self.site.keys,
            *self.store.secrets(),
        )
        return tuple(v for v in values if v)


# --- converters: raw value (TOML type or env string) -> typed value, ValueError on bad input


def _str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {type(raw).__name__}")
    return raw.strip()


# The bounds each ranged converter enforces, so the documentation is written from them (value_range).
_RANGES: dict[Callable[[object], Any], tuple[float, float]] = {}


def _int_between(low: int, high: int) -> Callable[[object], int]:
    def convert(raw: object) -> int:
        if isinstance(raw, bool):
            raise ValueError("must be a whole number, got a boolean")
        try:
            value = int(raw) if isinstance(raw, int) else int(_str(raw), 10)
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    _RANGES[convert] = (low, high)
    return convert


def _float_between(low: float, high: float, what: str = "a number of seconds") -> Callable[[object], float]:
    def convert(raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError(f"must be {what}, got a boolean")
        try:
            value = float(raw) if isinstance(raw, int | float) else float(_str(raw))
        except ValueError:
            raise ValueError(f"must be {what}, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    _RANGES[convert] = (low, high)
    return convert


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _str(raw).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _choice(*options: str) -> Callable[[object], str]:
    def convert(raw: object) -> str:
        value = _str(raw).lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return convert


def http_url(raw: object) -> str:
    value = _str(raw).rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ValueError(f"has a bad port: {value!r}") from None
    return value


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host(raw: object) -> str:
    """A host name or IP address another program connects to, as it goes into a URL.

    An IPv6 address comes back in brackets: homer-app builds ``http://{host}:{port}...``.
    """
    value = _str(raw)
    if not value:
        return ""
    if "://" in value or value.startswith(("http:", "https:")):
        raise ValueError(f"must be a host name or IP address, without http:// or https://, got {value!r}")
    address = ip_of_host(value)
    if address is not None:
        return f"[{address.compressed}]" if address.version == 6 else address.compressed
    if _looks_like_host_and_port(value):
        raise ValueError(f"must be a host name or IP address without a port, got {value!r}")
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError(f"must be a host name or IP address such as 10.0.0.20, got {value!r}")
    return value


def _looks_like_host_and_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit())


def _agent_host(raw: object) -> str:
    value = _host(raw)
    address = ip_of_host(value)
    if address is not None and address.is_unspecified:
        raise ValueError(
            f"{value} is a listen-on-every-address value, not one homer-app can connect to: "
            "set the address homer-app reaches this agent by, such as 10.0.0.20"
        )
    return value


def ip_of_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host setting names, or None for a host name."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _store_url(raw: object) -> str:
    # The value is a secret: no message here may quote it.
    value = _str(raw)
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in {"postgresql", "postgres"} or not parts.hostname:
        raise ValueError("must be a postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL, or empty")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ValueError("has a bad port") from None
    return value


def _apiban_url(raw: object) -> str:
    value = http_url(raw)
    if not value:
        raise ValueError("must not be empty")
    return value


def _path_prefix(raw: object) -> str:
    value = "/" + _str(raw).strip("/")
    if value == "/":
        # homer-app calls {path}/{type}: "/" would make it call //cdr, and an empty path
        # makes homer-app store its default /api/search.
        raise ValueError(f"must be a path prefix such as /get, got {raw!r}")
    if any(c in value for c in " ?#{}"):
        raise ValueError(f"must be a plain URL path such as /get, got {raw!r}")
    return value


def _name(raw: object) -> str:
    value = _str(raw)
    if not value or any(c in value for c in " /?#"):
        raise ValueError(f"must be a non-empty word without spaces or slashes, got {raw!r}")
    return value


def _uuid(raw: object) -> str:
    value = _str(raw)
    if not value:
        return ""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"must be a UUID such as {uuid.uuid4()}, got {value!r}") from None


def _rate_limit(raw: object) -> RateLimit:
    text = _str(raw)
    count, sep, window = text.partition("/")
    try:
        limit = RateLimit(int(count), float(window))
    except ValueError:
        limit = RateLimit(0, 0.0)
    if not sep or limit.requests < 1 or limit.window <= 0:
        raise ValueError(f"must be REQUESTS/SECONDS such as 11/120, got {raw!r}")
    return limit


def _listen(raw: object) -> Address | None:
    text = _str(raw)
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT such as 0.0.0.0:9060, or empty to disable, got {raw!r}")
    return Address(host, _int_between(0, 65535)(port))  # 0: any free port (tests, side instances)


def _list(raw: object) -> list[str]:
    if isinstance(raw, list | tuple):
        return [_str(item) for item in raw if _str(item)]
    return [item.strip() for item in _str(raw).split(",") if item.strip()]


def _cidrs(raw: object) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _list(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _keys(raw: object) -> tuple[str, ...]:
    keys = tuple(_list(raw))
    for key in keys:
        # "v1" would be shadowed by the agent's own /api/v1/... routes; a key is one path segment.
        if key == "v1" or any(c in key for c in "/?#% "):
            raise ValueError("each key must be one URL path segment, not the agent's own API version segment")
    return keys


def _dir(raw: object) -> Path:
    value = _str(raw)
    if not value:
        raise ValueError("must not be empty")
    return Path(value)


def _log_level(raw: object) -> str:
    return _choice("debug", "info", "warning", "error")(raw)


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


def _prefixes(raw: object) -> tuple[str, ...]:
    prefixes = tuple(_list(raw))
    for prefix in prefixes:
        if not prefix.lstrip("+").isdigit() or len(prefix) > 20:
            raise ValueError(f"each prefix must be digits (a leading + allowed), got {prefix!r}")
    return prefixes


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

# sipcapture/hepsub-apiban container names, so this agent is a drop-in replacement.
LEGACY_ENV = {"PUBLIC_IP": "agent.host", "HOMER_TOKEN": "homer.token", "APIBAN_KEY": "apiban.key"}


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from defaults < file < legacy env < HEPSUB_* env."""
    raw: dict[str, tuple[object, str]] = {}
    if path is not None:
        raw.update(_read_file(path))
    raw.update(_legacy_env(env or {}))
    for key in KEYS:
        if env and key.env in env:
            raw[key.name] = (env[key.env], key.env)
    return _build(raw)


def _read_file(path: Path) -> dict[str, tuple[object, str]]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{str(path)!r} is not valid TOML: {exc}") from None
    values: dict[str, tuple[object, str]] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "must be a [section] table", str(path))
        for key, value in _flatten(section, table):
            if key not in KEYS_BY_NAME:
                raise ConfigError(key, "is not a known setting", str(path))
            values[key] = (value, str(path))
    return values


def _flatten(prefix: str, table: Mapping[str, object]) -> list[tuple[str, object]]:
    """``[detect.scanner_ua] action = ...`` gives ``detect.scanner_ua.action``."""
    items: list[tuple[str, object]] = []
    for name, value in table.items():
        key = f"{prefix}.{name}"
        if isinstance(value, dict) and prefix == "detect":
            items += _flatten(key, value)
        else:
            items.append((key, value))
    return items


def _legacy_env(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    values: dict[str, tuple[object, str]] = {
        key: (env[name], name) for name, key in LEGACY_ENV.items() if env.get(name)
    }
    if env.get("HOMER_IP") and KEYS_BY_NAME["homer.url"].env not in env:  # else it is overridden
        url = _legacy_homer_url(env["HOMER_IP"], env.get("HOMER_PORT") or "9080")
        values["homer.url"] = (url, "HOMER_IP")
    return values


def _legacy_homer_url(host: str, port: str) -> str:
    """sipcapture's ``http://HOMER_IP:HOMER_PORT``, with an IPv6 address in brackets."""
    try:
        shown = _host(host)
    except ValueError as exc:
        problem = f"{exc}; HOMER_PORT takes the port, HEPSUB_HOMER_URL a full URL"
        raise ConfigError("homer.url", problem, "HOMER_IP") from None
    try:
        number = _int_between(1, 65535)(port)
    except ValueError as exc:
        raise ConfigError("homer.url", f"the port {exc}", "HOMER_PORT") from None
    return f"http://{shown}:{number}"


def _build(raw: Mapping[str, tuple[object, str]]) -> Settings:
    sections: dict[str, dict[str, Any]] = {}
    for name, (value, origin) in raw.items():
        key = KEYS_BY_NAME[name]
        try:
            converted = key.convert(value)
        except ValueError as exc:
            raise ConfigError(
                name, _without_secret(str(exc), value) if key.secret else str(exc), origin
            ) from None
        section, attr = name.split(".", 1)
        sections.setdefault(section, {})[attr] = converted
    settings = Settings(
        agent=AgentSettings(**sections.get("agent", {})),
        enrichment=EnrichmentSettings(**sections.get("enrichment", {})),
        homer=HomerSettings(**sections.get("homer", {})),
        apiban=ApibanSettings(**sections.get("apiban", {})),
        state=StateSettings(**sections.get("state", {})),
        hep=HepSettings(**sections.get("hep", {})),
        allow=AllowSettings(**sections.get("allow", {})),
        site=SiteSettings(**sections.get("site", {})),
        log=LogSettings(**sections.get("log", {})),
        sightings=SightingsSettings(**sections.get("sightings", {})),
        detect=_detect_settings(sections.get("detect", {})),
        store=StoreSettings(**sections.get("store", {})),
    )
    _check_consistency(settings)
    return settings


def _detect_settings(values: Mapping[str, Any]) -> DetectSettings:
    rules = {}
    for rule in RULES:
        prefix = rule + "."
        fields = {name[len(prefix) :]: value for name, value in values.items() if name.startswith(prefix)}
        rules[rule] = replace(DEFAULT_RULES[rule], **fields)
    general = {name: value for name, value in values.items() if "." not in name}
    return DetectSettings(**general, rules=rules)


def _without_secret(message: str, value: object) -> str:
    """The converter's reason, unless it would show any part of a secret value."""
    parts = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(part, str) and part.strip() and part.strip() in message for part in parts):
        return "has a bad value"
    return message


def _check_consistency(settings: Settings) -> None:
    if settings.homer.url and not settings.agent.host:
        raise ConfigError(
            "agent.host", "is required to register with HOMER (set HEPSUB_AGENT_HOST or PUBLIC_IP)"
        )
    if settings.homer.url and not settings.homer.token:
        raise ConfigError("homer.token", "is required to register with HOMER (set HEPSUB_HOMER_TOKEN)")
    if bool(settings.homer.user) != bool(settings.homer.password):
        raise ConfigError("homer.password", "homer.user and homer.password go together")
    site = settings.site
    if site.keys and settings.apiban.mode == "check" and not (settings.detect.enabled and site.include_local):
        raise ConfigError(
            "site.keys",
            "would serve nothing: apiban.mode = check holds no APIBAN list (every site route answers "
            "503) and local detections are off (detect.enabled, site.include_local); "
            "set apiban.mode = mirror",
        )


def require_apiban_key(settings: Settings) -> None:
    """Outside the demo an APIBAN key is required; say so before anything starts."""
    if not settings.apiban.key:
        raise ConfigError(
            "apiban.key", "is required (get one at https://apiban.org/getkey.html; set HEPSUB_APIBAN_KEY)"
        )


def setting_warnings(settings: Settings) -> list[str]:
    """Settings that work but are probably not what the operator meant: one line each, naming it."""
    found = []
    agent, homer_host = settings.agent.host, urlsplit(settings.homer.url).hostname or ""
    if settings.homer.url and _is_loopback(agent) and not _is_loopback(homer_host):
        found.append(
            f"agent.host: {agent} is this machine's loopback address, registered with HOMER at "
            f"{settings.homer.url}: homer-app reaches the agent by it only if it runs on this same "
            "host, outside a container; set the address homer-app can reach"
        )
    if settings.site.keys and settings.apiban.mode == "check":
        found.append(
            "site.keys: apiban.mode = check holds no APIBAN list, so /api/KEY/banned, /api/KEY/check "
            "and /ipset/KEY/list answer 503 'list not loaded yet' for as long as the agent runs; only "
            "the CrowdSec decision stream serves (local detections); set apiban.mode = mirror to serve "
            "the APIBAN list"
        )
    return found


def _is_loopback(host: str) -> bool:
    address = ip_of_host(host)
    if address is not None:
        return address.is_loopback
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")
