"""The settings as the agent uses them: one frozen dataclass per section of the TOML file
(``AgentSettings`` for ``[agent]``, ...), gathered in ``Settings``, each field with its default.
The detection rules are named here (``RULES``) with their defaults (``DEFAULT_RULES``), and the
store URL's password is kept out of sight (``redact_store_url``, ``Settings.secrets()``). Values
reach these classes only through ``config.load_settings``, already converted and checked by the
converters of ``KEYS`` (``setting_keys``); nothing here reads a file or the environment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
