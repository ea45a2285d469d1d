"""Real peers for the detection tests: a Kamailio registrar/PBX under attack, SIPVicious, SIPp.

``render_pbx_config`` is a Kamailio config (Debian's package: tm, sl, pv, auth, siptrace) that
behaves like a small PBX and mirrors every request it receives and every reply it sends as HEP to
the agent's UDP port:

* it listens on ``udp:127.0.0.1..127.0.0.5:<port>`` (``PBX_HOSTS``): five addresses of the site,
  so that svmap scanning 127.0.0.1-127.0.0.5 reaches five of our addresses;
* REGISTER: users 1000-1199 (``USERS``), each with the password ``password(user)``, held in a
  variable (no database): a request without credentials, or with wrong ones, gets a 401 digest
  challenge (qop=auth, a fresh nonce each time), the right credentials a 200; any other user a
  404, which is how svwar tells users that exist from those that do not;
* INVITE: from a trunk address (``trunks``, authenticated by address) a 200, then the ACK is
  absorbed and the BYE gets its 200; to an unknown user a 404; to a known user, a caller who is
  not a known user a 403, one without (right) credentials a 407 challenge, and with them a 480
  (nobody is registered for real: the registrar keeps no location);
* OPTIONS: 200 to the server itself or a known user, 404 to an unknown user; anything else 405.
  The harness's readiness probe (R-URI user ``READY_USER``) is answered and not traced.

``global_addresses`` puts global addresses on ``lo`` for the duration of a test (root only; an
address already there is left alone), so that the tools can send from an address the agent does
not skip as non-routable while the traffic stays on this host. ``run_sipvicious`` runs a
SIPVicious tool from that address: svmap binds itself (``-b``); Debian's svwar and svcrack 0.3.3
parse ``-b`` but never pass it on, so they run through ``BOUND_LAUNCHER``, which starts the
tool's own ``main()`` with the bind address handed to its scanner class (what ``-b`` would do):
every packet is still the tool's own. ``run_sipp`` runs SIPp on a scenario of ``SIPP_DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .kamailio import HOST, READY_USER, TRACE_FLAG

PBX_HOSTS = tuple(f"127.0.0.{n}" for n in range(1, 6))
REALM = "pbx.test"
USERS = range(1000, 1200)
USER_PATTERN = "^1[01][0-9][0-9]$"  # USERS, for Kamailio's regex match
PBX_MODULES = ("tm.so", "sl.so", "pv.so", "auth.so", "siptrace.so")
SIPP_DIR = Path(__file__).resolve().parent / "sipp"
SIPVICIOUS_TOOLS = ("svmap", "svwar", "svcrack")


def password(user: int | str) -> str:
    """The password of a PBX user: Kamailio computes the same from the user name."""
    return f"pw-{user}"


def render_pbx_config(
    *,
    sip_port: int,
    hep_port: int,
    module_dir: str,
    trunks: Sequence[str] = (),
    hep_host: str = HOST,
    capture_id: int = 4343,
) -> str:
    """The kamailio.cfg of the PBX (module docstring); ``trunks``: addresses whose INVITEs are
    answered 200 without authentication."""
    listen = "\n".join(f"listen=udp:{host}:{sip_port}" for host in PBX_HOSTS)
    from_trunk = " || ".join(f'$si == "{trunk}"' for trunk in trunks) or "0"
    return f"""#!KAMAILIO
# Written by tests/pbx.py: a small registrar/PBX under attack that mirrors its SIP traffic as HEP.
debug=2
log_stderror=yes
fork=yes
children=1
disable_tcp=yes
disable_sctp=yes
auto_aliases=no
dns=no
rev_dns=no
{listen}
mpath="{module_dir}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "auth.so"
loadmodule "siptrace.so"

modparam("auth", "secret", "{secrets.token_hex(16)}")
modparam("siptrace", "duplicate_uri", "sip:{hep_host}:{hep_port}")
modparam("siptrace", "hep_mode_on", 1)
modparam("siptrace", "hep_version", 3)
modparam("siptrace", "hep_capture_id", {capture_id})
modparam("siptrace", "trace_to_database", 0)
modparam("siptrace", "trace_flag", {TRACE_FLAG})
modparam("siptrace", "trace_on", 1)

request_route {{
    if ($rU == "{READY_USER}") {{
        sl_send_reply("200", "Ready");
        exit;
    }}
    # Traced: the request here, the stateless replies by siptrace's sl callback (tm is loaded).
    setflag({TRACE_FLAG});
    sip_trace();
    if (method == "ACK") {{
        exit;
    }}
    if (method == "REGISTER") {{
        route(REGISTRAR);
    }}
    if (method == "INVITE") {{
        route(CALL);
    }}
    if (method == "BYE") {{
        sl_send_reply("200", "OK");
        exit;
    }}
    if (method == "OPTIONS") {{
        if ($rU == $null || $rU =~ "{USER_PATTERN}") {{
            sl_send_reply("200", "OK");
        }} else {{
            sl_send_reply("404", "Not Found");
        }}
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
    exit;
}}

# The registering user is the To user; its password is derived from it, the way password() does.
route[REGISTRAR] {{
    if (!($tU =~ "{USER_PATTERN}")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    $var(password) = "pw-" + $tU;
    # checks=1: the credentials' user name must be the To user.
    if (!pv_auth_check("{REALM}", "$var(password)", "0", "1")) {{
        auth_challenge("{REALM}", "1");
        exit;
    }}
    sl_send_reply("200", "OK");
    exit;
}}

route[CALL] {{
    if ({from_trunk}) {{
        sl_send_reply("200", "OK");
        exit;
    }}
    if (!($rU =~ "{USER_PATTERN}")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    if (!($fU =~ "{USER_PATTERN}")) {{
        sl_send_reply("403", "Forbidden");
        exit;
    }}
    $var(password) = "pw-" + $fU;
    # checks=1: the credentials' user name must be the From user; the challenge is a 407.
    if (!pv_auth_check("{REALM}", "$var(password)", "0", "1")) {{
        auth_challenge("{REALM}", "1");
        exit;
    }}
    sl_send_reply("480", "Temporarily Unavailable");
    exit;
}}
"""


def pbx_modules_missing(module_dir: str) -> list[str]:
    """The modules render_pbx_config loads that are not in ``module_dir``."""
    return [name for name in PBX_MODULES if not Path(module_dir, name).is_file()]


# --- global addresses on lo ----------------------------------------------------------------------


def _can_bind(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
        return True


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("ip") or "/usr/sbin/ip"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=10, check=False, stdin=subprocess.DEVNULL
    )


@contextlib.contextmanager
def global_addresses(addresses: Iterable[str]) -> Iterator[str | None]:
    """Each of ``addresses`` on ``lo`` (``ip addr add A/32 dev lo``) for the block, removed after it
    unless it was there before. Yields None, or the reason the addresses cannot be had (not root,
    no ``ip``, ``ip`` refused), for ``pytest.skip``."""
    added: list[str] = []
    reason: str | None = None
    try:
        for address in addresses:
            if _can_bind(address):
                continue
            if os.geteuid() != 0:
                reason = f"{address} is not on this host and only root can add it to lo"
                break
            try:
                result = _ip("addr", "add", f"{address}/32", "dev", "lo")
            except (OSError, subprocess.TimeoutExpired) as exc:
                reason = f"cannot run ip to add {address} to lo: {exc}"
                break
            if result.returncode != 0 or not _can_bind(address):
                reason = f"ip addr add {address}/32 dev lo failed: {result.stderr.strip()}"
                break
            added.append(address)
        yield reason
    finally:
        for address in added:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _ip("addr", "del", f"{address}/32", "dev", "lo")


# --- running the tools ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolRun:
    argv: list[str]
    returncode: int | None  # None: still running at its deadline, then stopped
    output: str  # stdout and stderr, interleaved
    seconds: float


@dataclass
class RunningTool:
    argv: list[str]
    process: asyncio.subprocess.Process
    log_path: Path
    started: float

    async def finish(self, deadline: float) -> ToolRun:
        """Wait for the tool to end by itself, at most ``deadline`` s; then stop it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await self.process.wait()
        return await self.stop()

    async def stop(self) -> ToolRun:
        """The run so far; the tool is stopped (SIGTERM, then SIGKILL) if it still runs."""
        returncode = self.process.returncode
        seconds = time.monotonic() - self.started
        if returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return ToolRun(self.argv, returncode, self.log_path.read_text(errors="replace"), seconds)


async def start_tool(argv: list[str], log_path: Path, cwd: Path) -> RunningTool:
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=cwd
        )
    return RunningTool(argv, process, log_path, time.monotonic())


# Starts a SIPVicious tool's own main() with its scanner bound to an address: Debian's svwar and
# svcrack 0.3.3 parse -b but do not hand it to the scanner class, which has the parameter and
# binds its socket to it (and puts it in Via/Contact, as -b does for svmap).
BOUND_LAUNCHER = """
import importlib, sys
tool_dir, tool, address, *args = sys.argv[1:]
sys.path.insert(0, tool_dir)
module = importlib.import_module("sipvicious." + tool)
scanner = getattr(module, {"svwar": "TakeASip", "svcrack": "ASipOfRedWine"}[tool])
unbound = scanner.__init__
def bound(self, *a, **kw):
    kw["bindingip"] = address
    unbound(self, *a, **kw)
scanner.__init__ = bound
sys.argv = [tool, *args]
sys.exit(module.main())
"""
BOUND_TOOLS = ("svwar", "svcrack")


@dataclass(frozen=True)
class Sipvicious:
    interpreter: str
    tool_dir: str
    svmap: str


def _interpreter(script: str) -> str | None:
    try:
        with open(script, "rb") as handle:
            first = handle.readline(200)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    return parts[0] if parts and os.access(parts[0], os.X_OK) else None


@functools.cache
def _probe_sipvicious() -> Sipvicious | str:
    paths = {tool: shutil.which(tool) for tool in SIPVICIOUS_TOOLS}
    missing = [tool for tool, path in paths.items() if path is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install sipvicious)"
    svwar = os.path.realpath(str(paths["svwar"]))
    interpreter = _interpreter(svwar)
    if interpreter is None:
        return f"cannot tell which Python runs {svwar}"
    tool_dir = os.path.dirname(svwar)
    check = f"import sys; sys.path.insert(0, {tool_dir!r}); import sipvicious.svwar, sipvicious.svcrack"
    try:
        result = subprocess.run(
            [interpreter, "-c", check], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot import SIPVicious' modules: {exc}"
    if result.returncode != 0:
        return f"cannot import SIPVicious' modules from {tool_dir}: {result.stderr.strip()[-300:]}"
    return Sipvicious(interpreter, tool_dir, str(paths["svmap"]))


def sipvicious_available() -> str | None:
    probed = _probe_sipvicious()
    return probed if isinstance(probed, str) else None


def sipvicious_argv(tool: str, bind: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``tool`` with ``args``, its socket bound to ``bind``."""
    probed = _probe_sipvicious()
    if isinstance(probed, str):
        raise RuntimeError(probed)
    if tool == "svmap":
        return [probed.svmap, "-b", bind, *args]
    if tool not in BOUND_TOOLS:
        raise ValueError(f"no bound launcher for {tool}")
    return [probed.interpreter, "-c", BOUND_LAUNCHER, probed.tool_dir, tool, bind, *args]


def sipp_available() -> str | None:
    return None if shutil.which("sipp") else "sipp not found (Debian: apt-get install sip-tester)"


def sipp_argv(scenario: str, target: str, local_ip: str, *args: str) -> list[str]:
    """SIPp on ``SIPP_DIR/scenario`` from ``local_ip`` (bound, and written in Via/Contact)."""
    sipp = shutil.which("sipp") or "sipp"
    return [sipp, "-sf", str(SIPP_DIR / scenario), "-i", local_ip, "-nostdin", *args, target]


def write_users_csv(path: Path, users: Iterable[int]) -> Path:
    """A SIPp injection file, one line per user taken in order: the user, then the
    ``[authentication ...]`` keyword with its credentials (register_auth.xml's [field1])."""
    lines = (f"{user};[authentication username={user} password={password(user)}]\n" for user in users)
    path.write_text("SEQUENTIAL\n" + "".join(lines))
    return path
