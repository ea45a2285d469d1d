"""A real HEP sender for tests: Kamailio (Debian's package) with ``siptrace`` in HEP mode.

``async with kamailio(hep_port=p, hep_version=3) as k:`` writes a minimal config into a temporary
folder, starts Kamailio in the foreground on ``udp:127.0.0.1:<free port>`` (``k.sip_port``), waits
until it answers an OPTIONS, and stops it (and every process it forked) on exit. Every SIP request
it receives and every reply it sends are mirrored as HEP (version 1, 2 or 3) to
``127.0.0.1:<hep_port>`` over UDP. The route answers like a small edge proxy being scanned:

* REGISTER → ``401 Unauthorized`` (brute-force target), INVITE → ``403 Forbidden``,
  anything else (OPTIONS, ...) → ``200 OK``; ACK is absorbed.
* The harness's own readiness probes (R-URI user ``kamailio-harness-ready``) are answered but
  not traced, so the HEP stream holds only what the test sent.

Tracing: ``setflag(<trace_flag>)`` + ``sip_trace()`` in ``request_route``. The request is traced
by ``sip_trace()`` and, because ``tm`` is loaded and the flag is set, the stateless reply from
``sl_send_reply`` is traced by siptrace's ``sl`` callback: one HEP packet per request and one per
reply. Without ``tm`` loaded, Kamailio 5.6 traces the request only.

``kamailio_available()`` says why Kamailio cannot be used (``None`` when it can), for
``pytest.skip``. ``send_sip``/``sip_exchange`` are a minimal SIP-over-UDP client from 127.0.0.1
(``sip_exchange(..., source_host="127.0.0.2")`` sends from another loopback address).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
READY_USER = "kamailio-harness-ready"
TRACE_FLAG = 22
REQUIRED_MODULES = ("sl.so", "tm.so", "siptrace.so", "pv.so")
_FALLBACK_BINARIES = ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio")


@dataclass(frozen=True)
class Installation:
    binary: str
    module_dir: str
    version: str


def _find_binary() -> str | None:
    found = shutil.which("kamailio")
    if found:
        return found
    return next((path for path in _FALLBACK_BINARIES if os.access(path, os.X_OK)), None)


@functools.cache
def _probe() -> Installation | str:
    """The usable installation, or why there is none."""
    binary = _find_binary()
    if binary is None:
        return "kamailio binary not found (Debian: apt-get install kamailio)"
    try:
        info = subprocess.run(
            [binary, "-I"], capture_output=True, text=True, timeout=15, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} -I failed: {exc}"
    output = info.stdout + info.stderr
    version = re.search(r"Version:\s*(kamailio\s+\S+)", output)
    paths = re.search(r"Default paths to modules:\s*(\S+)", output)
    candidates = paths.group(1).split(":") if paths else []
    candidates += ["/usr/lib/x86_64-linux-gnu/kamailio/modules", "/usr/lib/kamailio/modules"]
    candidates = list(dict.fromkeys(candidates))
    for module_dir in candidates:
        if all(Path(module_dir, name).is_file() for name in REQUIRED_MODULES):
            return Installation(binary, module_dir, version.group(1) if version else "kamailio (unknown)")
    return f"kamailio modules {', '.join(REQUIRED_MODULES)} not all found in {candidates}"


def kamailio_available() -> str | None:
    """``None`` when Kamailio with siptrace can be run here, else the reason it cannot."""
    probed = _probe()
    return probed if isinstance(probed, str) else None


def installation() -> Installation:
    probed = _probe()
    if isinstance(probed, str):
        raise RuntimeError(probed)
    return probed


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def core_settings(sip_port: int, module_dir: str) -> str:
    """Kamailio core settings for a test instance: foreground-friendly, UDP on loopback only."""
    return (
        "debug=2\nlog_stderror=yes\nfork=yes\nchildren=1\ndisable_tcp=yes\ndisable_sctp=yes\n"
        f'auto_aliases=no\ndns=no\nrev_dns=no\nlisten=udp:{HOST}:{sip_port}\nmpath="{module_dir}"'
    )


def render_config(
    *,
    sip_port: int,
    hep_host: str,
    hep_port: int,
    hep_version: int,
    capture_id: int,
    module_dir: str,
    correlation_id: bool = False,
    auth_key: str | None = None,
) -> str:
    """The kamailio.cfg the harness runs (Kamailio 5.x syntax, core keywords only besides sl/tm/siptrace).

    ``correlation_id=True`` loads ``pv`` and passes ``$ci`` to ``sip_trace()``: HEPv3 requests then
    carry chunk 0x0011 (the Call-ID); the traced ``sl`` replies still do not. ``auth_key`` sets
    ``modparam("siptrace", "auth_key", ...)``: HEPv3 packets then carry it in chunk 0x000e.
    """
    if hep_version not in (1, 2, 3):
        raise ValueError(f"hep_version must be 1, 2 or 3, not {hep_version}")
    duplicate_uri = f"sip:{hep_host}:{hep_port}"
    trace_call = f'sip_trace("{duplicate_uri}", "$ci");' if correlation_id else "sip_trace();"
    pv = 'loadmodule "pv.so"\n' if correlation_id else ""
    key = f'modparam("siptrace", "auth_key", "{auth_key}")\n' if auth_key is not None else ""
    return f"""#!KAMAILIO
# Written by tests/kamailio.py: a scanned edge proxy that mirrors its SIP traffic as HEP.
{core_settings(sip_port, module_dir)}
loadmodule "tm.so"
loadmodule "sl.so"
{pv}loadmodule "siptrace.so"

modparam("siptrace", "duplicate_uri", "{duplicate_uri}")
modparam("siptrace", "hep_mode_on", 1)
modparam("siptrace", "hep_version", {hep_version})
modparam("siptrace", "hep_capture_id", {capture_id})
modparam("siptrace", "trace_to_database", 0)
modparam("siptrace", "trace_flag", {TRACE_FLAG})
modparam("siptrace", "trace_on", 1)
{key}
request_route {{
    if (uri =~ "^sip:{READY_USER}@") {{
        sl_send_reply("200", "Ready");
        exit;
    }}
    setflag({TRACE_FLAG});
    {trace_call}
    if (method == "ACK") {{
        exit;
    }}
    if (method == "REGISTER") {{
        sl_send_reply("401", "Unauthorized");
        exit;
    }}
    if (method == "INVITE") {{
        sl_send_reply("403", "Forbidden");
        exit;
    }}
    sl_send_reply("200", "OK");
    exit;
}}
"""


@dataclass
class Kamailio:
    sip_port: int
    hep_port: int
    hep_version: int
    capture_id: int
    workdir: Path
    config_path: Path
    log_path: Path
    pid: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class SipExchange:
    request: bytes
    reply: bytes
    source_port: int
    call_id: str

    @property
    def status(self) -> int:
        return int(self.reply.split(b" ", 2)[1])


def build_request(
    method: str,
    *,
    port: int,
    source_port: int,
    call_id: str,
    from_user: str = "100",
    to_user: str = "200",
    user_agent: str = "friendly-scanner",
    cseq: int = 1,
    source_host: str = HOST,
) -> bytes:
    """A minimal valid SIP request from source_host:source_port to 127.0.0.1:port."""
    branch = "z9hG4bK" + secrets.token_hex(8)
    tag = secrets.token_hex(4)
    if method == "REGISTER":
        ruri, to_uri = f"sip:{HOST}:{port}", f"sip:{from_user}@{HOST}"
    else:
        ruri, to_uri = f"sip:{to_user}@{HOST}:{port}", f"sip:{to_user}@{HOST}"
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP {source_host}:{source_port};rport;branch={branch}",
        "Max-Forwards: 70",
        f"From: <sip:{from_user}@{HOST}>;tag={tag}",
        f"To: <{to_uri}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    if method in ("REGISTER", "INVITE"):
        lines.append(f"Contact: <sip:{from_user}@{source_host}:{source_port}>")
    lines += [f"User-Agent: {user_agent}", "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def _call_id_of(message: bytes) -> str | None:
    match = re.search(rb"^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", message, re.MULTILINE | re.IGNORECASE)
    return match.group(1).decode(errors="replace") if match else None


async def sip_exchange(
    port: int,
    method: str,
    *,
    from_user: str = "100",
    to_user: str = "200",
    user_agent: str = "friendly-scanner",
    call_id: str | None = None,
    source_port: int | None = None,
    deadline: float = 2.0,
    source_host: str = HOST,
) -> SipExchange:
    """Send one request over UDP from ``source_host`` (default 127.0.0.1; any 127.0.0.0/8 address
    works on Linux) and wait (bounded) for its final reply."""
    call_id = call_id or f"{secrets.token_hex(8)}@{HOST}"
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind((source_host, source_port or 0))
        bound: int = sock.getsockname()[1]
        request = build_request(
            method,
            port=port,
            source_port=bound,
            call_id=call_id,
            from_user=from_user,
            to_user=to_user,
            user_agent=user_agent,
            source_host=source_host,
        )
        await loop.sock_sendto(sock, request, (HOST, port))
        async with asyncio.timeout(deadline):
            while True:
                data, _ = await loop.sock_recvfrom(sock, 65535)
                if not data.startswith(b"SIP/2.0 ") or _call_id_of(data) != call_id:
                    continue
                exchange = SipExchange(request, data, bound, call_id)
                if exchange.status >= 200:
                    return exchange


async def send_sip(
    port: int,
    method: str,
    *,
    from_user: str = "100",
    user_agent: str = "friendly-scanner",
    call_id: str | None = None,
    source_port: int | None = None,
    deadline: float = 2.0,
) -> bytes:
    """Send one request and return its final reply (see ``sip_exchange`` for the request too)."""
    exchange = await sip_exchange(
        port,
        method,
        from_user=from_user,
        user_agent=user_agent,
        call_id=call_id,
        source_port=source_port,
        deadline=deadline,
    )
    return exchange.reply


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the main process (it stops its children), SIGKILL the whole group if it lingers."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            _kill_group(process.pid, signal.SIGKILL)
            await process.wait()
    # Children that outlived the main process (they share its new session's process group).
    _kill_group(process.pid, signal.SIGKILL)


async def _wait_ready(process: asyncio.subprocess.Process, sip_port: int, deadline: float) -> str | None:
    """Poll with OPTIONS until Kamailio answers: None when it does, else why not."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while process.returncode is None:
        if loop.time() >= until:
            return f"kamailio did not answer OPTIONS on {HOST}:{sip_port} within {deadline} s"
        try:
            await sip_exchange(sip_port, "OPTIONS", to_user=READY_USER, deadline=0.2)
        except TimeoutError:
            continue
        except OSError:  # ICMP port unreachable: not listening yet
            await asyncio.sleep(0.05)
            continue
        return None
    return f"kamailio exited with {process.returncode} during startup"


async def start_kamailio(
    config_path: Path, workdir: Path, log_path: Path, private_mb: int = 4
) -> asyncio.subprocess.Process:
    """Kamailio on ``config_path`` in the foreground, logging to ``log_path``, in its own session."""
    argv = [
        installation().binary,
        "-f", str(config_path),
        "-DD",  # do not daemonize: the process we start is Kamailio's main process
        "-E",  # log to stderr (our log file)
        "-P", str(workdir / "kamailio.pid"),
        "-Y", str(workdir),  # runtime dir
        "-w", str(workdir),  # working dir (core files)
        "-m", "32",  # MB of shared memory
        "-M", str(private_mb),  # MB of private memory per process
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )


@contextlib.asynccontextmanager
async def kamailio(
    *,
    hep_port: int,
    hep_version: int = 3,
    hep_host: str = HOST,
    capture_id: int = 4242,
    correlation_id: bool = False,
    auth_key: str | None = None,
    workdir: Path | None = None,
    startup_timeout: float = 15.0,
    stop_timeout: float = 5.0,
    render: Callable[[int], str] | None = None,
) -> AsyncIterator[Kamailio]:
    """Run Kamailio mirroring HEP to ``hep_host:hep_port`` for the duration of the block.

    ``render`` (SIP port → config text) replaces the scanned edge proxy's config with another one
    (tests/pbx.py's registrar); it must listen on ``127.0.0.1:<port>`` and answer the readiness
    probe (R-URI user ``READY_USER``) with a 200."""
    inst = installation()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kamailio-")))
        for attempt in range(3):
            sip_port = free_udp_port()
            config_path = workdir / "kamailio.cfg"
            config_path.write_text(
                render(sip_port)
                if render is not None
                else render_config(
                    sip_port=sip_port,
                    hep_host=hep_host,
                    hep_port=hep_port,
                    hep_version=hep_version,
                    capture_id=capture_id,
                    module_dir=inst.module_dir,
                    correlation_id=correlation_id,
                    auth_key=auth_key,
                )
            )
            log_path = workdir / f"kamailio-{attempt}.log"
            process = await start_kamailio(config_path, workdir, log_path)
            try:
                failure = await _wait_ready(process, sip_port, startup_timeout)
            except BaseException:  # cancelled: do not leave it running
                await _stop(process, stop_timeout)
                raise
            if failure is not None:
                await _stop(process, stop_timeout)
                log = log_path.read_text(errors="replace")
                if "Address already in use" in log and attempt < 2:
                    continue
                raise RuntimeError(f"{failure}; its log:\n{log[-4000:]}")
            try:
                yield Kamailio(
                    sip_port=sip_port,
                    hep_port=hep_port,
                    hep_version=hep_version,
                    capture_id=capture_id,
                    workdir=workdir,
                    config_path=config_path,
                    log_path=log_path,
                    pid=process.pid,
                )
            finally:
                await _stop(process, stop_timeout)
            return
