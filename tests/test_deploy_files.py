"""The deployment files stay consistent with the code and with each other.

``docker-compose.yml``, ``config/hepsub-apiban.service``, ``config/kamailio-siptrace.cfg`` and
``config/heplify.md`` are not run by the other tests. These checks read them the way their users'
tools would where that is cheap (argparse for the unit's ExecStart, the agent's own settings loader
for the compose environment, ``systemd-analyze verify`` and a real Kamailio when installed, PyYAML
when importable) and otherwise by plain text: no dependency is added for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from hepsub_apiban.cli import build_parser
from hepsub_apiban.core.config import KEYS, LEGACY_ENV, Settings, load_settings

from .kamailio import (
    HOST,
    READY_USER,
    TRACE_FLAG,
    _stop,
    _wait_ready,
    core_settings,
    free_udp_port,
    installation,
    kamailio_available,
    render_config,
    sip_exchange,
    start_kamailio,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
UNIT = ROOT / "config" / "hepsub-apiban.service"
KAMAILIO_CFG = ROOT / "config" / "kamailio-siptrace.cfg"
HEPLIFY_DOC = ROOT / "config" / "heplify.md"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
RUNNING_DOC = ROOT / "docs" / "compose.md"  # the container, docker compose, systemd
SITE_DOC = ROOT / "docs" / "site-api.md"
# heplify-server has the default HEP port, 9060, on the HOMER host: every example that runs the
# agent takes HEP on this one on the host instead.
HOST_HEP_PORT = 9061

SETTING_ENV = {key.env for key in KEYS}
LEGACY_NAMES = set(LEGACY_ENV) | {"HOMER_IP", "HOMER_PORT"}  # HOMER_IP + HOMER_PORT make homer.url
ENV_NAME = re.compile(r"\b(HEPSUB_[A-Z0-9_]+|PUBLIC_IP|HOMER_IP|HOMER_PORT|HOMER_TOKEN|APIBAN_KEY)\b")
SERVICES = {"db", "heplify-server", "homer-webapp", "hepsub-apiban", "hepsub-apiban-b", "heplify"}
DEFAULTS = Settings()


# --- docker-compose.yml, read as text (its own layout: services indented by two spaces)


def compose_services(text: str) -> dict[str, str]:
    """Each service's lines, by service name."""
    services: dict[str, str] = {}
    in_services = False
    current: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            in_services, current = line.startswith("services:"), None
            continue
        if not in_services:
            continue
        name = re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line)
        if name:
            current = name.group(1)
            services[current] = ""
        elif current is not None:
            services[current] += line + "\n"
    return services


def compose_env(block: str) -> dict[str, str]:
    """The ``environment:`` list entries (``- NAME=value``, optionally quoted) of one service."""
    pattern = re.compile(r'^\s+-\s+"?([A-Z][A-Z0-9_]*)=([^"\n]*)"?\s*$', re.MULTILINE)
    return {m.group(1): m.group(2) for m in pattern.finditer(block)}


def compose_value(block: str, key: str) -> str:
    match = re.search(rf"^    {re.escape(key)}:[ \t]*(\S.*?)\s*$", block, re.MULTILINE)
    assert match, f"no {key}: in\n{block}"
    return match.group(1)


@dataclass(frozen=True)
class Port:
    host_ip: str
    published: int
    target: int
    protocol: str


def compose_ports(block: str) -> list[Port]:
    """The quoted ``ports:`` entries: [HOST_IP:]PUBLISHED:TARGET[/PROTOCOL]."""
    ports = []
    for m in re.finditer(r'^\s+-\s+"(?:([\d.]+):)?(\d+):(\d+)(?:/(udp|tcp))?"\s*$', block, re.MULTILINE):
        ports.append(Port(m.group(1) or "0.0.0.0", int(m.group(2)), int(m.group(3)), m.group(4) or "tcp"))
    return ports


def published(ports: list[Port], host_port: int, protocol: str) -> Port:
    found = [p for p in ports if p.published == host_port and p.protocol == protocol]
    assert len(found) == 1, (host_port, protocol, ports)
    return found[0]


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    return compose_services(COMPOSE.read_text())


def test_compose_has_the_homer7_docker_services_and_the_agent(services: dict[str, str]) -> None:
    assert set(services) == SERVICES
    assert compose_value(services["db"], "image") == "postgres:11-alpine"
    assert compose_value(services["heplify-server"], "image") == "sipcapture/heplify-server"
    assert compose_value(services["homer-webapp"], "image") == "sipcapture/webapp"
    assert compose_value(services["heplify"], "image") == "sipcapture/heplify"
    assert compose_value(services["hepsub-apiban"], "build") == "."
    # homer7-docker's database settings, the same on the three sides that use them.
    assert "POSTGRES_USER: root" in services["db"]
    assert "POSTGRES_PASSWORD: homerSeven" in services["db"]
    server = compose_env(services["heplify-server"])
    assert server["HEPLIFYSERVER_DBSHEMA"] == "homer7"
    assert server["HEPLIFYSERVER_DBADDR"] == "db:5432"
    assert (server["HEPLIFYSERVER_DBUSER"], server["HEPLIFYSERVER_DBPASS"]) == ("root", "homerSeven")
    webapp = compose_env(services["homer-webapp"])
    assert (webapp["DB_HOST"], webapp["DB_USER"], webapp["DB_PASS"]) == ("db", "root", "homerSeven")


def test_compose_parses_as_yaml_the_same_way() -> None:
    yaml = pytest.importorskip("yaml")
    document = yaml.safe_load(COMPOSE.read_text())
    assert set(document["services"]) == SERVICES
    text_services = compose_services(COMPOSE.read_text())
    for name, service in document["services"].items():
        environment = service.get("environment", [])
        if isinstance(environment, list):
            assert dict(item.split("=", 1) for item in environment) == compose_env(text_services[name])
    agent = document["services"]["hepsub-apiban"]
    assert agent["build"] == "."
    assert "healthcheck" not in agent  # the Dockerfile's HEALTHCHECK applies
    assert set(document["volumes"]) >= {"hepsub-state"}


def test_env_names_in_the_deploy_files_are_settings() -> None:
    for path in (COMPOSE, UNIT):
        names = set(ENV_NAME.findall(path.read_text()))
        assert names, path
        unknown = names - SETTING_ENV - LEGACY_NAMES
        assert not unknown, f"{path.name} names settings the agent does not read: {sorted(unknown)}"
    assert {"PUBLIC_IP", "HOMER_TOKEN", "APIBAN_KEY"} <= set(LEGACY_ENV)


def test_compose_environment_configures_the_agent(services: dict[str, str]) -> None:
    env = compose_env(services["hepsub-apiban"])
    assert set(env) >= {"APIBAN_KEY", "HOMER_TOKEN", "HOMER_IP", "HOMER_PORT", "PUBLIC_IP"}
    # The two secrets must be given: compose stops with the message after ":?".
    assert re.fullmatch(r"\$\{APIBAN_KEY:\?[^}]+\}", env["APIBAN_KEY"])
    assert re.fullmatch(r"\$\{HOMER_TOKEN:\?[^}]*Preferences -> AUTH TOKEN\}", env["HOMER_TOKEN"])
    given = {"APIBAN_KEY": "the-apiban-key", "HOMER_TOKEN": "the-homer-token"}
    resolved = {name: given.get(name, value) for name, value in env.items()}

    settings = load_settings(None, resolved)

    # homer-app as the agent reaches it: the service name and the port homer-app listens on inside
    # its container, i.e. the target of homer-webapp's published port.
    homer_app_port = published(compose_ports(services["homer-webapp"]), 9080, "tcp").target
    assert settings.homer.url == f"http://homer-webapp:{homer_app_port}"
    # The agent as homer-app reaches it: its service name on the compose network.
    assert settings.agent.host == "hepsub-apiban"
    assert settings.agent.host in services
    assert (settings.apiban.key, settings.homer.token) == ("the-apiban-key", "the-homer-token")


def test_compose_second_agent_shares_homers_postgresql_with_the_first(services: dict[str, str]) -> None:
    given = {"APIBAN_KEY": "the-apiban-key", "HOMER_TOKEN": "the-homer-token"}
    agents = {}
    for name in ("hepsub-apiban", "hepsub-apiban-b"):
        env = {key: given.get(key, value) for key, value in compose_env(services[name]).items()}
        agents[name] = load_settings(None, env)
    a, b = agents["hepsub-apiban"], agents["hepsub-apiban-b"]
    # One store: HOMER's database service, with its credentials, in a database of the agents' own.
    db = dict(re.findall(r"^      (POSTGRES_\w+): (\S+)$", services["db"], re.MULTILINE))
    store = urlsplit(a.store.url)
    assert a.store.url == b.store.url
    assert (store.hostname, store.port) == ("db", 5432)
    assert (store.username, store.password) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"])
    assert store.path.lstrip("/") not in {"homer_config", "homer_data", "postgres"}
    # Two HEPSUB agents to homer-app: each its own address, node and uuid (state volume).
    assert b.agent.host == "hepsub-apiban-b"
    assert b.agent.host in services
    assert a.agent.node != b.agent.node
    assert (a.apiban.key, a.homer.url) == (b.apiban.key, b.homer.url)
    volumes = [re.findall(r"^\s+- (hepsub-state[\w-]*):", services[name], re.MULTILINE) for name in agents]
    assert volumes[0] != volumes[1]
    assert all(len(v) == 1 for v in volumes)
    # Published ports of all services on one host do not clash; the second agent only in its profile.
    taken = [(p.published, p.protocol) for block in services.values() for p in compose_ports(block)]
    assert len(taken) == len(set(taken))
    assert published(compose_ports(services["hepsub-apiban-b"]), 9062, "udp").target == 9060
    assert compose_value(services["hepsub-apiban-b"], "profiles") == '["second-agent"]'
    assert "profiles" not in services["hepsub-apiban"]


def image_env() -> dict[str, str]:
    """The environment the Dockerfile's ENV lines give the agent."""
    env: dict[str, str] = {}
    for value in re.findall(r"^ENV ((?:.*\\\n)*.*)$", DOCKERFILE.read_text(), re.MULTILINE):
        env.update(item.split("=", 1) for item in shlex.split(value.replace("\\\n", " ")))
    return env


def image_config(tmp_path: Path) -> Path:
    """The image's TOML: the example file through the Dockerfile's sed."""
    sed = re.search(r"sed 's\|(.+?)\|(.+?)\|' config/hepsub-apiban.toml", DOCKERFILE.read_text())
    assert sed, "no sed of the example file in the Dockerfile"
    example = (ROOT / "config" / "hepsub-apiban.toml").read_text()
    text, changed = re.subn(sed.group(1), sed.group(2), example, flags=re.MULTILINE)
    assert changed == 1, "the Dockerfile's sed no longer matches the example file"
    path = tmp_path / "image.toml"
    path.write_text(text)
    return path


def test_the_image_keeps_its_state_on_its_volume_and_a_mounted_toml_decides(
    services: dict[str, str], tmp_path: Path
) -> None:
    volume = re.search(r"^VOLUME (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert volume
    env = {**image_env(), "HEPSUB_APIBAN_KEY": "k"}
    assert "HEPSUB_STATE_DIR" not in env  # it would win over any TOML's state.dir
    assert load_settings(image_config(tmp_path), env).state.dir == Path(volume.group(1))
    assert f"- hepsub-state:{volume.group(1)}\n" in services["hepsub-apiban"]
    # A TOML of the operator's own, mounted over the image's, decides where the state goes.
    mounted = tmp_path / "mounted.toml"
    mounted.write_text('[state]\ndir = "/data/hepsub"\n')
    assert load_settings(mounted, env).state.dir == Path("/data/hepsub")
    # Without state.dir: ./state in the image's working directory, which is the volume.
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    assert workdir == volume.group(1)


def test_compose_ports_line_up(services: dict[str, str]) -> None:
    agent = compose_ports(services["hepsub-apiban"])
    server = compose_ports(services["heplify-server"])
    # The agent's API and HEP listeners on their default ports inside the container.
    assert published(agent, 18088, "tcp").target == DEFAULTS.agent.port
    assert published(agent, 18088, "tcp").host_ip == "127.0.0.1"
    assert DEFAULTS.hep.udp is not None
    assert DEFAULTS.hep.tcp is not None
    assert published(agent, 9061, "udp").target == DEFAULTS.hep.udp.port
    assert published(agent, 9061, "tcp").target == DEFAULTS.hep.tcp.port
    # heplify-server listens where its published port points.
    server_env = compose_env(services["heplify-server"])
    assert published(server, 9060, "udp").target == int(server_env["HEPLIFYSERVER_HEPADDR"].rsplit(":")[-1])
    assert published(server, 9060, "tcp").target == int(
        server_env["HEPLIFYSERVER_HEPTCPADDR"].rsplit(":")[-1]
    )
    # heplify, in host network mode, sends each packet to both published HEP ports over UDP.
    heplify = services["heplify"]
    assert compose_value(heplify, "network_mode") == "host"
    argv = shlex.split(compose_value(heplify, "command"))
    assert argv[argv.index("-nt") + 1] == "udp"
    targets = argv[argv.index("-hs") + 1].split(",")
    assert targets == ["127.0.0.1:9060", "127.0.0.1:9061"]
    assert published(server, 9060, "udp").host_ip == "0.0.0.0"
    assert published(agent, 9061, "udp").host_ip == "0.0.0.0"


def test_heplify_doc_matches_the_compose_command(services: dict[str, str]) -> None:
    doc = HEPLIFY_DOC.read_text()
    assert '-hs "HOMER:9060,AGENT:9060"' in doc
    assert "-hin udp:0.0.0.0:9060" in doc
    argv = shlex.split(compose_value(services["heplify"], "command"))
    assert shlex.join(argv[1:]).replace("'", "") in doc.replace('"', "")


# --- the systemd unit


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order."""
    entries = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key: str, section: str = "Service") -> str:
    values = [v for s, k, v in unit_entries(UNIT.read_text()) if (s, k) == (section, key)]
    assert len(values) == 1, (key, values)
    return values[0]


def test_unit_runs_serve_with_the_config_file() -> None:
    argv = shlex.split(unit_value("ExecStart"))
    assert argv[0] == "/opt/hepsub-apiban/venv/bin/hepsub-apiban"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == Path("/etc/hepsub-apiban/hepsub-apiban.toml")
    # The same file the container image reads.
    assert '"--config", "/etc/hepsub-apiban/hepsub-apiban.toml"' in DOCKERFILE.read_text()


def unit_environment() -> dict[str, str]:
    """What the unit's Environment= lines set (several may each set several, shell-quoted)."""
    env: dict[str, str] = {}
    for section, key, value in unit_entries(UNIT.read_text()):
        if (section, key) == ("Service", "Environment"):
            env.update(item.split("=", 1) for item in shlex.split(value))
    return env


def test_unit_state_dir_and_restart_policy() -> None:
    state_directory = unit_value("StateDirectory")
    assert unit_environment()["HEPSUB_STATE_DIR"] == f"/var/lib/{state_directory}"
    assert unit_value("EnvironmentFile") == "-/etc/hepsub-apiban/env"
    assert unit_value("User") == "hepsub-apiban"
    assert unit_value("Restart") == "on-failure"
    assert unit_value("RestartPreventExitStatus") == "2"
    assert unit_value("CapabilityBoundingSet") == ""
    assert unit_value("AmbientCapabilities") == ""
    # No capability is needed because every port the agent binds by default is unprivileged.
    assert DEFAULTS.hep.udp is not None
    assert DEFAULTS.hep.tcp is not None
    assert min(DEFAULTS.agent.port, DEFAULTS.hep.udp.port, DEFAULTS.hep.tcp.port) >= 1024


def test_a_config_mistake_exits_with_the_status_the_unit_does_not_restart(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hepsub_apiban", "serve", "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HEPSUB_APIBAN_KEY": "k"},
        check=False,
    )
    assert result.returncode == int(unit_value("RestartPreventExitStatus")), result.stderr
    assert "Traceback" not in result.stderr


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify also checks that ExecStart's program exists: point it at this checkout's.
    program = Path(sys.executable).with_name("hepsub-apiban")
    if not program.exists():
        program = Path(sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/hepsub-apiban/venv/bin/hepsub-apiban", str(program)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if UNIT.name in line or str(unit) in line]
    assert not ours, output
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify failed on something other than this unit: {output[-500:]}")


# --- the Kamailio siptrace snippet


def without_comment(line: str) -> str:
    return re.sub(r"\s+#(?!!).*$", "", line).strip()


def defines(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#!define\s+(\w+)\s+(.+?)\s*$", text, re.MULTILINE))


def modparams(text: str) -> dict[str, str]:
    pattern = re.compile(r'^modparam\("siptrace",\s*"(\w+)",\s*(.+?)\)\s*(?:#.*)?$', re.MULTILINE)
    return {name: value.strip() for name, value in pattern.findall(text)}


def harness_config() -> str:
    return render_config(
        sip_port=5060, hep_host="192.0.2.1", hep_port=9060, hep_version=3, capture_id=1, module_dir="/m"
    )


def test_kamailio_snippet_sets_siptrace_as_the_harness_does() -> None:
    snippet = KAMAILIO_CFG.read_text()
    macros = defines(snippet)
    ours = {name: macros.get(value, value) for name, value in modparams(snippet).items()}
    harness = modparams(harness_config())
    assert set(harness) <= set(ours)
    for name in ("hep_mode_on", "hep_version", "trace_to_database", "trace_on"):
        assert ours[name] == harness[name], name
    assert ours["hep_mode_on"] == "1"
    assert ours["trace_flag"] == harness["trace_flag"] == str(TRACE_FLAG)
    uri = re.compile(r'"sip:[^:"]+:\d+"')
    assert uri.fullmatch(harness["duplicate_uri"])
    assert uri.fullmatch(ours["duplicate_uri"])
    assert uri.fullmatch(macros["HEP_AGENT_URI"])
    assert ours["hep_capture_id"].isdigit()
    # Lines marked [harness] set only what the harness sets.
    for line in snippet.splitlines():
        if line.startswith("modparam(") and "[harness]" in line:
            name = re.search(r'"siptrace",\s*"(\w+)"', line)
            assert name
            assert name.group(1) in harness


def test_kamailio_snippet_loads_siptrace_and_traces_to_both() -> None:
    lines = [without_comment(line) for line in KAMAILIO_CFG.read_text().splitlines()]
    code = [line for line in lines if line and not (line.startswith("#") and not line.startswith("#!"))]
    assert 'loadmodule "siptrace.so"' in code
    # tm and sl are left to the operator's config: loading a module twice stops Kamailio.
    assert 'loadmodule "tm.so"' not in code
    assert 'loadmodule "sl.so"' not in code
    route = "\n".join(code[code.index("route[HEP_MIRROR] {") :])
    assert re.search(r"setflag\(FLT_HEP\);\s*sip_trace\(\);\s*sip_trace\(HEP_AGENT_URI\);", route)


# --- the Kamailio snippet, run: which destination receives what


@dataclass
class Sink(asyncio.DatagramProtocol):
    """Receives HEP; keeps the SIP payload (chunk 0x000f) of each HEPv3 packet."""

    payloads: list[bytes] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int) -> None:
        while len(self.payloads) < count:
            self.arrived.clear()
            await self.arrived.wait()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert data[:4] == b"HEP3"
        offset, total = 6, struct.unpack_from("!H", data, 4)[0]
        while offset < total:
            _vendor, kind, length = struct.unpack_from("!HHH", data, offset)
            if kind == 0x000F:
                self.payloads.append(data[offset + 6 : offset + length])
            offset += length
        self.arrived.set()

    def seen(self, call_id: str) -> list[str]:
        """First line of each traced message of one call, sorted."""
        marker = f"Call-ID: {call_id}\r\n".encode()
        lines = [p.split(b"\r\n", 1)[0].decode() for p in self.payloads if marker in p]
        return sorted(line.split(" sip:", 1)[0] if not line.startswith("SIP/2.0") else line for line in lines)


class Uas(asyncio.DatagramProtocol):
    """Answers every request 200 OK, for the requests Kamailio relays."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if data.startswith(b"SIP/2.0") or data.startswith(b"ACK "):
            return
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        keep = [h for h in head[1:] if re.match(rb"(?i)(via|from|to|call-id|cseq)\s*:", h)]
        self.transport.sendto(b"\r\n".join([b"SIP/2.0 200 OK", *keep, b"Content-Length: 0", b"", b""]), addr)


def merged_config(*, sip_port: int, homer_port: int, agent_port: int, uas_port: int, module_dir: str) -> str:
    """An operator's kamailio.cfg with the snippet merged in as its comments say."""
    return f"""#!KAMAILIO
{core_settings(sip_port, module_dir)}

#!define HEP_HOMER_URI "sip:{HOST}:{homer_port}"
#!define HEP_AGENT_URI "sip:{HOST}:{agent_port}"

loadmodule "tm.so"
loadmodule "sl.so"

{KAMAILIO_CFG.read_text()}

request_route {{
    if (uri =~ "^sip:{READY_USER}@") {{
        sl_send_reply("200", "Ready");
        exit;
    }}
    route(HEP_MIRROR);
    if (method == "REGISTER") {{
        t_newtran();
        t_reply("401", "Unauthorized");
        exit;
    }}
    if (method == "INVITE") {{
        sl_send_reply("403", "Forbidden");
        exit;
    }}
    t_relay_to_udp("{HOST}", "{uas_port}");
    exit;
}}
"""


@contextlib.asynccontextmanager
async def endpoint(factory: Any) -> AsyncIterator[tuple[Any, int]]:
    """A UDP endpoint on HOST: (protocol, port)."""
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        factory, local_addr=(HOST, 0)
    )
    try:
        yield protocol, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


@pytest.mark.skipif(kamailio_available() is not None, reason=f"Kamailio not usable: {kamailio_available()}")
async def test_kamailio_snippet_sends_to_homer_and_to_the_agent(tmp_path: Path) -> None:
    inst = installation()
    async with (
        endpoint(Sink) as (homer, homer_port),
        endpoint(Sink) as (agent, agent_port),
        endpoint(Uas) as (_uas, uas_port),
    ):
        sip_port = free_udp_port()
        config = tmp_path / "kamailio.cfg"
        config.write_text(
            merged_config(
                sip_port=sip_port,
                homer_port=homer_port,
                agent_port=agent_port,
                uas_port=uas_port,
                module_dir=inst.module_dir,
            )
        )
        log_path = tmp_path / "kamailio.log"
        process = await start_kamailio(config, tmp_path, log_path)
        try:
            failure = await _wait_ready(process, sip_port, 15.0)
            assert failure is None, f"{failure}\n{log_path.read_text(errors='replace')[-3000:]}"
            relayed = await sip_exchange(sip_port, "OPTIONS", call_id=f"relayed@{HOST}")
            stateful = await sip_exchange(sip_port, "REGISTER", call_id=f"stateful@{HOST}")
            stateless = await sip_exchange(sip_port, "INVITE", call_id=f"stateless@{HOST}")
            assert (relayed.status, stateful.status, stateless.status) == (200, 401, 403)
            # relayed: 4 (request and reply, in and out); stateful: 2; stateless: 2, or 1 (request only)
            expected_homer, expected_agent = 4 + 2 + 2, 4 + 2 + 1
            async with asyncio.timeout(5):
                await homer.wait_for(expected_homer)
                await agent.wait_for(expected_agent)
            await asyncio.sleep(0.3)  # nothing more should come
        finally:
            await _stop(process, 5.0)
        log = log_path.read_text(errors="replace")
        assert "ERROR" not in log, log[-3000:]

    # A relayed request and its reply, each as received and as sent on: both destinations.
    both = ["OPTIONS", "OPTIONS", "SIP/2.0 200 OK", "SIP/2.0 200 OK"]
    assert homer.seen(f"relayed@{HOST}") == both
    assert agent.seen(f"relayed@{HOST}") == both
    # A local reply sent statefully (t_newtran after route(HEP_MIRROR)): both destinations.
    assert homer.seen(f"stateful@{HOST}") == ["REGISTER", "SIP/2.0 401 Unauthorized"]
    assert agent.seen(f"stateful@{HOST}") == ["REGISTER", "SIP/2.0 401 Unauthorized"]
    # A stateless local reply (sl_send_reply) goes to duplicate_uri only, as the snippet says.
    assert homer.seen(f"stateless@{HOST}") == ["INVITE", "SIP/2.0 403 Forbidden"]
    assert agent.seen(f"stateless@{HOST}") == ["INVITE"]


# --- ports and restart policies, the same in every example


def doc_section(doc: Path, heading: str) -> str:
    """The ``## heading`` section of a Markdown file, up to the next ``##`` heading."""
    text = doc.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def docker_run(text: str) -> list[str]:
    """The argv of the first ``docker run`` in ``text``: its line and the continuation lines after it
    (a leading comment mark taken off, as in the Dockerfile's header)."""
    lines = [line.lstrip("#").strip() for line in text.splitlines()]
    start = next(n for n, line in enumerate(lines) if line.startswith("docker run "))
    command = []
    for line in lines[start:]:
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))


def docker_ports(argv: list[str]) -> list[Port]:
    ports = []
    for flag, value in itertools.pairwise(argv):
        if flag == "-p":
            m = re.fullmatch(r"(?:([\d.]+):)?(\d+):(\d+)(?:/(udp|tcp))?", value)
            assert m, value
            ports.append(Port(m.group(1) or "0.0.0.0", int(m.group(2)), int(m.group(3)), m.group(4) or "tcp"))
    return ports


def exported(block: str) -> dict[str, str]:
    """NAME=value of every ``export`` line of a shell block."""
    env: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("export "):
            words = shlex.split(line, comments=True)[1:]
            env.update(word.split("=", 1) for word in words)
    return env


def test_every_example_takes_hep_on_a_port_heplify_server_does_not_use(services: dict[str, str]) -> None:
    assert DEFAULTS.hep.udp is not None
    assert DEFAULTS.hep.tcp is not None
    server = compose_ports(services["heplify-server"])
    assert published(server, DEFAULTS.hep.udp.port, "udp")  # heplify-server holds the default
    assert DEFAULTS.hep.udp.port != HOST_HEP_PORT
    # compose and the two docker run examples: 9060 inside the container, 9061 on the host.
    docs_run = docker_run(doc_section(RUNNING_DOC, "Run it in a container"))
    dockerfile_run = docker_run(DOCKERFILE.read_text().split("\nFROM ", 1)[0])
    for ports in (
        compose_ports(services["hepsub-apiban"]),
        docker_ports(docs_run),
        docker_ports(dockerfile_run),
    ):
        assert published(ports, HOST_HEP_PORT, "udp").target == DEFAULTS.hep.udp.port
        assert published(ports, HOST_HEP_PORT, "tcp").target == DEFAULTS.hep.tcp.port
        assert published(ports, 18088, "tcp").target == DEFAULTS.agent.port
    # "Run it for real" and the systemd unit: the agent itself listens on 9061.
    run_for_real = exported(sh_blocks(doc_section(README, "Run it for real"))[0])
    for env in (run_for_real, unit_environment()):
        settings = load_settings(None, {**env, "HEPSUB_APIBAN_KEY": "k"})
        assert settings.hep.udp == replace(DEFAULTS.hep.udp, port=HOST_HEP_PORT)
        assert settings.hep.tcp == replace(DEFAULTS.hep.tcp, port=HOST_HEP_PORT)
    # The start line the README shows is the one that set-up gives.
    assert f"HEP on udp 0.0.0.0:{HOST_HEP_PORT}, tcp 0.0.0.0:{HOST_HEP_PORT};" in doc_section(
        README, "Run it for real"
    )


def test_restart_policies_do_not_loop_on_a_configuration_mistake(services: dict[str, str]) -> None:
    # systemd can leave out exit 2; Docker cannot, so it gives up after a few tries.
    assert unit_value("Restart") == "on-failure"
    assert unit_value("RestartPreventExitStatus") == "2"
    for name in ("hepsub-apiban", "hepsub-apiban-b"):
        assert compose_value(services[name], "restart") == "on-failure:5"
    container = doc_section(RUNNING_DOC, "Run it in a container")
    for argv in (docker_run(container), docker_run(DOCKERFILE.read_text())):
        assert argv[argv.index("--restart") + 1] == "on-failure:5"
    assert "`--restart on-failure:5`" in container


def test_the_health_check_asks_the_agent_where_serve_listens() -> None:
    text = DOCKERFILE.read_text()
    check = re.search(r"^HEALTHCHECK .*?\\\n\s+CMD (\[.*\])$", text, re.MULTILINE)
    assert check, "no exec-form HEALTHCHECK CMD"
    argv = json.loads(check.group(1))
    assert argv[0] == "hepsub-apiban"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "health"
    # The file serve reads (CMD), so agent.port and agent.bind come from the same place.
    serve = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert serve
    assert build_parser().parse_args(json.loads(serve.group(1))).config == args.config
    assert "18088" not in check.group(0)


def test_the_api_published_on_loopback_is_said_to_be_unreachable_from_the_site(
    services: dict[str, str],
) -> None:
    api = published(compose_ports(services["hepsub-apiban"]), 18088, "tcp")
    assert api.host_ip == "127.0.0.1"
    site = SITE_DOC.read_text().split("\n## ", 1)[0]  # the page up to its CrowdSec section
    beside = doc_section(RUNNING_DOC, "Run it beside HOMER 7 (docker compose)")
    for section in (site, beside):
        assert "127.0.0.1" in section
        assert '"10.0.0.20:18088:18088"' in section
    assert "cannot reach it" in site
    assert "cannot reach it" in beside


def test_the_kamailio_site_client_ticks_as_the_site_api_page_recommends() -> None:
    cfg = (ROOT / "config" / "apiban-kamailio.cfg").read_text()
    intervals = re.findall(r'^modparam\("rtimer", "timer", "name=apiban;interval=(\d+);', cfg, re.MULTILINE)
    assert len(intervals) == 1
    recommended = re.search(r"an `interval` of (\d+)-(\d+) s", SITE_DOC.read_text())
    assert recommended
    assert int(recommended.group(1)) <= int(intervals[0]) <= int(recommended.group(2))
    assert f"`interval={intervals[0]}`" in SITE_DOC.read_text()
