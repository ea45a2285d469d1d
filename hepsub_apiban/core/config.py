"""Settings: one TOML file, then the legacy sipcapture env names, then ``HEPSUB_*`` env.

Every key is declared once in ``KEYS`` (``setting_keys``) with its converter (``converters``) and
the default of its dataclass field (``settings``), so the file parser, the env reader, the example
config and the error messages cannot drift apart. This module reads the file and the environment
(``load_settings``) and checks settings against each other; a bad value raises ``ConfigError``
naming the setting and where the value came from, and the CLI turns that into a one-line message
and exit code 2. Everything the other modules declare is importable from here too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .converters import _host, _int_between, http_url, ip_of_host
from .setting_keys import KEYS, KEYS_BY_NAME, Key
from .settings import (
    DEFAULT_RULES,
    MAX_HEP_WORKERS,
    RULE_FIELDS,
    RULES,
    Address,
    AgentSettings,
    AllowSettings,
    ApibanSettings,
    DetectSettings,
    EnrichmentSettings,
    HepSettings,
    HomerSettings,
    IPNetwork,
    LogSettings,
    RateLimit,
    RuleSettings,
    Settings,
    SightingsSettings,
    SiteSettings,
    StateSettings,
    StoreSettings,
    redact_store_url,
)

__all__ = [
    "DEFAULT_RULES",
    "KEYS",
    "KEYS_BY_NAME",
    "LEGACY_ENV",
    "MAX_HEP_WORKERS",
    "RULES",
    "RULE_FIELDS",
    "Address",
    "AgentSettings",
    "AllowSettings",
    "ApibanSettings",
    "ConfigError",
    "DetectSettings",
    "EnrichmentSettings",
    "HepSettings",
    "HomerSettings",
    "IPNetwork",
    "Key",
    "LogSettings",
    "RateLimit",
    "RuleSettings",
    "Settings",
    "SightingsSettings",
    "SiteSettings",
    "StateSettings",
    "StoreSettings",
    "http_url",
    "ip_of_host",
    "load_settings",
    "redact_store_url",
    "require_apiban_key",
    "setting_warnings",
]


class ConfigError(Exception):
    """A setting has a value the agent cannot use."""

    def __init__(self, key: str, problem: str, origin: str = "") -> None:
        where = f" (from {origin})" if origin else ""
        super().__init__(f"{key}: {problem}{where}")
        self.key = key


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
