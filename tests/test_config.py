"""Configuration: defaults, file, env precedence, legacy names, and errors that name the setting."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from hepsub_apiban.core import config
from hepsub_apiban.core.config import KEYS, Address, ConfigError, RateLimit, Settings, load_settings

EXAMPLE = Path(__file__).parent.parent / "config" / "hepsub-apiban.toml"


def test_defaults_match_the_interface() -> None:
    s = load_settings(None, {})
    assert (s.agent.bind, s.agent.port, s.agent.path, s.agent.type, s.agent.node, s.agent.gid) == (
        "0.0.0.0",
        18088,
        "/get",
        "cdr",
        "apiban",
        10,
    )
    assert (s.homer.url, s.homer.ttl, s.apiban.url, s.apiban.mode) == (
        "",
        300,
        "https://apiban.org",
        "mirror",
    )
    assert s.apiban.poll_interval == 300
    assert s.apiban.rate_limit == RateLimit(11, 120.0)
    assert s.hep.udp == Address("0.0.0.0", 9060)
    assert s.hep.tcp == Address("0.0.0.0", 9060)
    assert str(s.state.dir) == "state"
    assert s.allow.cidrs == ()
    assert s.site.keys == ()


def test_every_key_has_its_env_name() -> None:
    for key in KEYS:
        assert key.env == "HEPSUB_" + key.name.replace(".", "_").upper()
    assert {key.env for key in KEYS} >= {
        "HEPSUB_AGENT_BIND",
        "HEPSUB_AGENT_PORT",
        "HEPSUB_AGENT_HOST",
        "HEPSUB_AGENT_PATH",
        "HEPSUB_AGENT_TYPE",
        "HEPSUB_AGENT_NODE",
        "HEPSUB_AGENT_GID",
        "HEPSUB_AGENT_UUID",
        "HEPSUB_HOMER_URL",
        "HEPSUB_HOMER_TOKEN",
        "HEPSUB_HOMER_TTL",
        "HEPSUB_APIBAN_URL",
        "HEPSUB_APIBAN_KEY",
        "HEPSUB_APIBAN_MODE",
        "HEPSUB_APIBAN_POLL_INTERVAL",
        "HEPSUB_APIBAN_RATE_LIMIT",
        "HEPSUB_STATE_DIR",
        "HEPSUB_HEP_UDP",
        "HEPSUB_HEP_TCP",
        "HEPSUB_ALLOW_CIDRS",
        "HEPSUB_SITE_KEYS",
        "HEPSUB_HEP_ALLOW_FROM",
        "HEPSUB_HEP_AUTH_KEY",
        "HEPSUB_AGENT_ALLOW_FROM",
    }


def test_access_settings_parse_and_the_hep_key_is_a_secret() -> None:
    s = load_settings(
        None,
        {
            "HEPSUB_HEP_ALLOW_FROM": "10.0.0.0/24, 2001:db8::/32",
            "HEPSUB_AGENT_ALLOW_FROM": "127.0.0.1",
            "HEPSUB_HEP_AUTH_KEY": "hep-secret",
        },
    )
    assert s.hep.allow_from == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert s.agent.allow_from == (ipaddress.ip_network("127.0.0.1/32"),)
    assert "hep-secret" in s.secrets()
    assert "hep-secret" not in repr(s)
    with pytest.raises(ConfigError, match=r"hep\.allow_from"):
        load_settings(None, {"HEPSUB_HEP_ALLOW_FROM": "10.0.0.0/33"})


def test_file_then_legacy_env_then_hepsub_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[agent]\nport = 18100\nhost = "file-host"\n[homer]\nurl = "http://file:9080"\ntoken = "t"\n'
        '[allow]\ncidrs = ["10.0.0.0/8", "2a01:4f8::/32"]\n'
    )
    assert load_settings(path, {}).agent.port == 18100
    legacy = {
        "PUBLIC_IP": "10.1.1.1",
        "HOMER_IP": "homer",
        "HOMER_PORT": "9090",
        "APIBAN_KEY": "k",
        "HOMER_TOKEN": "x",
    }
    s = load_settings(path, legacy)
    assert (s.agent.host, s.homer.url, s.apiban.key, s.homer.token) == (
        "10.1.1.1",
        "http://homer:9090",
        "k",
        "x",
    )
    s = load_settings(
        path,
        {**legacy, "HEPSUB_AGENT_HOST": "new", "HEPSUB_HOMER_URL": "https://h/", "HEPSUB_AGENT_PORT": "1"},
    )
    assert (s.agent.host, s.homer.url, s.agent.port) == ("new", "https://h", 1)
    assert s.allow.cidrs == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2a01:4f8::/32"))


def test_homer_port_defaults_to_9080_like_the_sipcapture_container() -> None:
    s = load_settings(None, {"HOMER_IP": "10.0.0.9", "PUBLIC_IP": "a", "HOMER_TOKEN": "t"})
    assert s.homer.url == "http://10.0.0.9:9080"


@pytest.mark.parametrize(
    ("homer_ip", "homer_port", "url"),
    [
        ("2001:db8::10", "", "http://[2001:db8::10]:9080"),
        ("[2001:db8::10]", "80", "http://[2001:db8::10]:80"),
        ("homer-webapp", "80", "http://homer-webapp:80"),
    ],
)
def test_legacy_homer_ip_makes_a_working_url(homer_ip: str, homer_port: str, url: str) -> None:
    env = {"HOMER_IP": homer_ip, "HOMER_PORT": homer_port, "PUBLIC_IP": "a", "HOMER_TOKEN": "t"}
    assert load_settings(None, env).homer.url == url


@pytest.mark.parametrize(
    ("homer_ip", "homer_port", "origin"),
    [
        ("http://10.0.0.10", "", "HOMER_IP"),  # was http://http://10.0.0.10:9080
        ("10.0.0.10:9080", "", "HOMER_IP"),
        ("10.0.0.10", "http", "HOMER_PORT"),
        ("10.0.0.10", "0", "HOMER_PORT"),
    ],
)
def test_legacy_homer_ip_mistakes_name_homer_url_and_the_variable(
    homer_ip: str, homer_port: str, origin: str
) -> None:
    env = {"HOMER_IP": homer_ip, "HOMER_PORT": homer_port, "PUBLIC_IP": "a", "HOMER_TOKEN": "t"}
    with pytest.raises(ConfigError, match=rf"^homer\.url: .*\(from {origin}\)$"):
        load_settings(None, env)
    # HEPSUB_HOMER_URL wins over the legacy names, so their mistakes do not matter then.
    assert load_settings(None, {**env, "HEPSUB_HOMER_URL": "http://h:1"}).homer.url == "http://h:1"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"HEPSUB_AGENT_PORT": "http"}, "agent.port"),
        ({"HEPSUB_AGENT_PORT": "70000"}, "agent.port"),
        ({"HEPSUB_AGENT_GID": "0"}, "agent.gid"),
        ({"HEPSUB_AGENT_UUID": "not-a-uuid"}, "agent.uuid"),
        ({"HEPSUB_AGENT_PATH": "/"}, "agent.path"),
        ({"HEPSUB_AGENT_PATH": "/a b"}, "agent.path"),
        ({"HEPSUB_HOMER_URL": "homer:9080", "HEPSUB_AGENT_HOST": "a"}, "homer.url"),
        ({"HEPSUB_HOMER_URL": "http://homer:9080"}, "agent.host"),
        ({"HEPSUB_HOMER_URL": "http://homer:9080", "HEPSUB_AGENT_HOST": "a"}, "homer.token"),
        ({"HEPSUB_HOMER_TTL": "5"}, "homer.ttl"),
        ({"HEPSUB_APIBAN_MODE": "fast"}, "apiban.mode"),
        ({"HEPSUB_APIBAN_RATE_LIMIT": "11"}, "apiban.rate_limit"),
        ({"HEPSUB_APIBAN_RATE_LIMIT": "0/120"}, "apiban.rate_limit"),
        ({"HEPSUB_HEP_UDP": "9060"}, "hep.udp"),
        ({"HEPSUB_ALLOW_CIDRS": "10.0.0.0/8,nope"}, "allow.cidrs"),
        ({"HEPSUB_HOMER_TOKEN_ACCESS": "maybe"}, "homer.token_access"),
        ({"PUBLIC_IP": "http://10.0.0.20"}, "agent.host"),
        ({"HEPSUB_AGENT_HOST": "https://agent.example.com"}, "agent.host"),
        ({"PUBLIC_IP": "10.0.0.20:18088"}, "agent.host"),
        ({"HEPSUB_AGENT_HOST": "agent.example.com:18088"}, "agent.host"),
        ({"PUBLIC_IP": "0.0.0.0"}, "agent.host"),
        ({"HEPSUB_AGENT_HOST": "::"}, "agent.host"),
        ({"PUBLIC_IP": "agent host"}, "agent.host"),
        ({"PUBLIC_IP": "10.0.0.256"}, "agent.host"),
        ({"HEPSUB_AGENT_HOST": "agent/get"}, "agent.host"),
    ],
)
def test_bad_values_name_the_setting_and_origin(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env)
    assert caught.value.key == setting
    assert str(caught.value).startswith(setting + ":")


def test_unknown_key_and_bad_toml_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[agent]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"agent\.prot: is not a known setting"):
        load_settings(path, {})
    path.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", {})


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[apiban]\nkey = 8675309123\n")
    with pytest.raises(ConfigError, match=r"^apiban\.key: must be a string, got int") as caught:
        load_settings(path, {})
    assert "8675309123" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"^site\.keys: each key must be one URL path segment") as caught:
        load_settings(None, {"HEPSUB_SITE_KEYS": "good,has space"})
    assert "has space" not in str(caught.value)


def test_repr_hides_secrets() -> None:
    s = load_settings(
        None, {"HEPSUB_APIBAN_KEY": "sekrit-1", "HEPSUB_HOMER_PASSWORD": "sekrit-2", "HEPSUB_HOMER_USER": "u"}
    )
    assert "sekrit" not in repr(s)
    assert set(s.secrets()) == {"sekrit-1", "sekrit-2"}


def test_example_config_documents_every_key_and_loads_to_the_defaults() -> None:
    text = EXAMPLE.read_text()
    for key in KEYS:
        name = key.name.rsplit(".", 1)[1]
        assert f"{name} =" in text or f"# {name} =" in text, key.name
        assert key.env in text, key.env
    assert load_settings(EXAMPLE, {}) == Settings()


@pytest.mark.parametrize(
    ("given", "registered"),
    [
        ("10.0.0.20", "10.0.0.20"),
        ("agent.example.com", "agent.example.com"),
        ("hepsub_apiban", "hepsub_apiban"),  # a compose service name
        ("2001:db8::20", "[2001:db8::20]"),  # homer-app builds http://{host}:{port}
        ("[2001:DB8::20]", "[2001:db8::20]"),
    ],
)
def test_agent_host_is_registered_as_homer_app_builds_its_url(given: str, registered: str) -> None:
    settings = load_settings(None, {"PUBLIC_IP": given})
    assert settings.agent.host == registered
    assert config.setting_warnings(settings) == []


def test_loopback_agent_host_is_a_warning_only_for_a_homer_elsewhere() -> None:
    token = {"HEPSUB_HOMER_TOKEN": "t"}
    remote = load_settings(
        None, {**token, "PUBLIC_IP": "localhost", "HEPSUB_HOMER_URL": "http://10.0.0.10:9080"}
    )
    assert [line.split(":")[0] for line in config.setting_warnings(remote)] == ["agent.host"]
    local = load_settings(
        None, {**token, "PUBLIC_IP": "127.0.0.1", "HEPSUB_HOMER_URL": "http://127.0.0.1:9080"}
    )
    assert config.setting_warnings(local) == []
    unregistered = load_settings(None, {"PUBLIC_IP": "127.0.0.1"})
    assert config.setting_warnings(unregistered) == []


def test_site_keys_in_check_mode_serve_local_detections_only_or_nothing() -> None:
    keys = {"HEPSUB_SITE_KEYS": "a-site-key-1234", "HEPSUB_APIBAN_MODE": "check"}
    streamed = load_settings(None, keys)
    assert [line.split(":")[0] for line in config.setting_warnings(streamed)] == ["site.keys"]
    assert config.setting_warnings(load_settings(None, {**keys, "HEPSUB_APIBAN_MODE": "mirror"})) == []
    for off in ({"HEPSUB_DETECT_ENABLED": "false"}, {"HEPSUB_SITE_INCLUDE_LOCAL": "false"}):
        with pytest.raises(ConfigError, match=r"^site\.keys: would serve nothing"):
            load_settings(None, {**keys, **off})


RANGED = [key for key in KEYS if key.value_range() is not None]


def _text(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


@pytest.mark.parametrize("key", RANGED, ids=[key.name for key in RANGED])
def test_every_range_is_documented_as_the_code_enforces_it(key: config.Key) -> None:
    shown = key.value_range()
    assert shown is not None
    low, high = (float(bound) for bound in shown.split(" to "))
    for inside in (low, high):
        load_settings(None, {key.env: _text(inside)})
    below = low - 1 if low >= 1 else low - max(low / 2, 0.01)
    for outside in (below, high + 1):
        with pytest.raises(ConfigError, match=f"^{re.escape(key.name)}: must be between"):
            load_settings(None, {key.env: _text(outside)})
    # The example file says it next to the default, each rule's once in [detect]'s comment.
    text = EXAMPLE.read_text()
    if key.name.count(".") == 2:
        setting = key.name.rsplit(".", 1)[1]
        intro = text[text.index("[detect]") : text.index("[detect.", text.index("[detect]") + 1)]
        assert f"{setting} " in intro.replace("\n# ", " ")
        assert shown in intro.replace("\n# ", " ")
    else:
        assert re.search(rf"^# env: {key.env}\b.*; range: {re.escape(shown)}$", text, re.MULTILINE), key.name
