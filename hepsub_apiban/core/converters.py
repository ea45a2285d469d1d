"""The converters of the settings: a raw value (a TOML type, or an environment string) in, the
typed value out, or a ``ValueError`` whose text says what the value must be. A ranged converter
records its bounds (``_RANGES``) so the documentation is written from what the code enforces. A
converter never names the setting nor quotes a secret: ``config`` adds the name and where the value
came from, and leaves out a message that would show a secret value.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .settings import Address, IPNetwork, RateLimit


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


def _prefixes(raw: object) -> tuple[str, ...]:
    prefixes = tuple(_list(raw))
    for prefix in prefixes:
        if not prefix.lstrip("+").isdigit() or len(prefix) > 20:
            raise ValueError(f"each prefix must be digits (a leading + allowed), got {prefix!r}")
    return prefixes
