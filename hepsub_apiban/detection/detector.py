"""Local attacker detection: the rules of docs/peers/detection-tools.md#rules, run on every captured SIP
packet.

Each rule is keyed by the *remote* address: the source of a request, the destination of the reply
to it. An address is local (never a remote, never detected) when it is in ``detect.own``, sent us
HEP (capture agents run on the site's own proxies), or answered a remote's request with a 401/407
challenge (only servers challenge). Non-routable and ``allow.cidrs`` addresses are never tracked.

Requests are matched to their final replies by Call-ID, CSeq, method and Via branch, per remote, so a
retransmitted request counts once and a failure is known to answer a request that carried
credentials. That is what keeps the rules off the traps docs/peers/detection-tools.md#traps names: the first
401 every phone gets (a request without credentials) counts for nothing, and the authenticated
office behind one NAT address is exempt for a day once one of its phones got a 200 to a request
with credentials (every rule but scanner-ua).

Everything is bounded: at most ``detect.max_tracked`` remotes, least recently active forgotten
first and idle ones after ``IDLE_AFTER`` (active detections live in the book, not here); per
remote, each counter holds at most its threshold of events and at most ``MAX_PENDING``
transactions wait for a reply. What a rule decides goes to ``Detections`` (the book), which
applies the serving safeguards.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from ..core.addresses import Addr, NetworkSet, is_non_routable, parse_ip
from ..core.config import DetectSettings
from ..formats.sip import SipInfo
from . import counters as _counters
from .counters import Events, Report, rule_name

__all__ = [
    "MAX_SIGNATURE_ANSWERS",
    "PROOF_NONCE",
    "PROOF_TCP",
    "SCANNER_SIGNATURE",
    "Detector",
    "Distinct",
    "Events",
    "Finding",
    "Report",
    "rule_name",
]

# What the packet path uses, bound here by assignment rather than imported (as in ingest/sightings.py):
# Detector.observe and the methods it calls keep the bytecode they had before the split.
IDLE_AFTER = _counters.IDLE_AFTER
MAX_PENDING = _counters.MAX_PENDING
TRANSACTION_TIMEOUT = _counters.TRANSACTION_TIMEOUT
MAX_NONCES = _counters.MAX_NONCES
MAX_LOCAL = _counters.MAX_LOCAL
MAX_EXEMPT = _counters.MAX_EXEMPT
AUTH_EXEMPTION = _counters.AUTH_EXEMPTION
SWEEP_EVERY = _counters.SWEEP_EVERY
MAX_SIGNATURE_ANSWERS = _counters.MAX_SIGNATURE_ANSWERS
SCANNER_SIGNATURE = _counters.SCANNER_SIGNATURE
SCANNER_FROM_USERS = _counters.SCANNER_FROM_USERS
CHALLENGES = _counters.CHALLENGES
AUTH_REFUSALS = _counters.AUTH_REFUSALS
NO_SUCH_USER = _counters.NO_SUCH_USER
TOLL_REFUSALS = _counters.TOLL_REFUSALS
SCANNED_METHODS = _counters.SCANNED_METHODS
FLOOD_METHODS = _counters.FLOOD_METHODS
TCP_PROTOCOLS = _counters.TCP_PROTOCOLS
UNANSWERED = _counters.UNANSWERED
SCANNER_UA = _counters.SCANNER_UA
AUTH_FAILURE = _counters.AUTH_FAILURE
USER_ENUMERATION = _counters.USER_ENUMERATION
EXTENSION_SCAN = _counters.EXTENSION_SCAN
REQUEST_FLOOD = _counters.REQUEST_FLOOD
TOLL_FRAUD = _counters.TOLL_FRAUD
UNANSWERED_INVITES = _counters.UNANSWERED_INVITES
PROOF_TCP = _counters.PROOF_TCP
PROOF_NONCE = _counters.PROOF_NONCE
Distinct = _counters.Distinct
Pending = _counters.Pending
Remote = _counters.Remote
Finding = _counters.Finding
DetectorStats = _counters.DetectorStats
_prefixes = _counters._prefixes
_some = _counters._some


class Detector:
    """Local detection's rules, run on every captured SIP packet: counters per remote address.

    Owns the counters of at most ``detect.max_tracked`` remotes, the addresses known to be local (HEP
    senders, servers that challenge) and the authenticated exemptions. Fed by the collector
    (``observe``, ``hep_sender``) or a HEP worker's copy; reports what a rule finds to the book
    (``Detections.report``, the ``report`` callback it is built with).

    Never lists anything itself (the book decides what is served), never tracks a non-routable,
    allow-listed or local address, and never awaits or grows without a bound on the packet path.
    """

    def __init__(
        self,
        settings: DetectSettings,
        report: Report,
        *,
        allow: NetworkSet | None = None,
    ) -> None:
        self._settings = settings
        self._rules = settings.rules
        self._report = report
        self._own = NetworkSet(settings.own)
        self._allow = allow or NetworkSet()
        self._remotes: OrderedDict[str, Remote] = OrderedDict()
        self._never: dict[str, bool] = {}  # ip -> not trackable (cached; cleared when full)
        self._local: OrderedDict[str, None] = OrderedDict()  # HEP senders and learned servers
        self._authenticated: OrderedDict[str, float] = OrderedDict()  # ip -> last success
        self._prefixes = _prefixes(settings.rules[TOLL_FRAUD].prefixes)
        self._signatures: dict[str, bool] = {}  # User-Agent or display name -> scanner signature
        self._since_sweep = 0
        self.stats = DetectorStats()

    # ---------------------------------------------------------------- who is remote

    def hep_sender(self, ip: str) -> None:
        """A capture agent's address: it sits on the site's own proxy, never an attacker."""
        if ip not in self._local:
            self._learn_local(ip)

    def _learn_local(self, ip: str) -> None:
        address = parse_ip(ip)
        if address is None:
            return
        self._local[address.text] = None
        if len(self._local) > MAX_LOCAL:
            self._local.popitem(last=False)
        self._never.pop(address.text, None)
        self._remotes.pop(address.text, None)

    def is_local(self, ip: str) -> bool:
        return ip in self._local

    def _trackable(self, ip: str) -> bool:
        never = self._never.get(ip)
        if never is None:
            never = self._judge(ip, parse_ip(ip))
        return not never and ip not in self._local

    def _judge(self, ip: str, address: Addr | None) -> bool:
        """Whether ``ip`` is never to be tracked (remembered, so the next packet asks a dict)."""
        never = (
            address is None
            or address.text != ip
            or is_non_routable(address)
            or address in self._own
            or address in self._allow
        )
        if len(self._never) >= self._settings.max_tracked:
            self._never.clear()
        self._never[ip] = never
        return never

    def _remote(self, ip: str, now: float) -> Remote | None:
        remote = self._remotes.get(ip)
        if remote is not None:
            self._remotes.move_to_end(ip)
            remote.last = now
            return remote
        never = self._never.get(ip)
        if never or ip in self._local:
            return None
        address = parse_ip(ip)  # once: a new address is judged on the same parse
        if never is None and self._judge(ip, address):
            return None
        assert address is not None
        if len(self._remotes) >= self._settings.max_tracked:
            self._remotes.popitem(last=False)
            self.stats.tracked_evicted += 1
        remote = self._remotes[ip] = Remote(address, now)
        return remote

    def tracked(self) -> int:
        return len(self._remotes)

    # ---------------------------------------------------------------- packets

    def observe(self, src_ip: str, dst_ip: str, sip: SipInfo, ip_proto: int, now: float) -> None:
        """One captured SIP message (``now``: when it was received; a sender's clock is not trusted)."""
        self.stats.packets += 1
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self._since_sweep = 0
            self.forget_idle(now)
        if sip.status is None:
            if sip.method is not None and src_ip not in self._local:
                remote = self._remote(src_ip, now)
                if remote is not None:
                    self._request(remote, dst_ip, sip, ip_proto, now)
        elif dst_ip not in self._local:
            remote = self._remotes.get(dst_ip)
            if remote is not None:
                remote.last = now
                self._reply(remote, src_ip, sip, now)

    def _request(self, remote: Remote, dst_ip: str, sip: SipInfo, ip_proto: int, now: float) -> None:
        method = sip.method or ""
        key = (sip.call_id, sip.cseq, method, sip.branch)
        if key in remote.pending or method == "ACK":
            self.stats.retransmissions += method != "ACK"
            return
        if ip_proto in TCP_PROTOCOLS and remote.proof is None:
            remote.proof = PROOF_TCP
        if sip.credentials and sip.nonce is not None and sip.nonce in remote.nonces:
            remote.proof = PROOF_NONCE
        user = (sip.to_user or sip.from_user) if method == "REGISTER" else sip.request_user
        exempt = self._recently_authenticated(remote.address.text, now)
        if sip.credentials or not exempt:
            # An address that logged in is exempt from every rule but scanner-ua: of its requests
            # only those with credentials are followed, so that a 200 to one renews the exemption.
            self._expire_pending(remote, now)
            remote.pending[key] = Pending(now, method, user, sip.credentials)
            if len(remote.pending) > MAX_PENDING:
                self._timed_out(remote, remote.pending.popitem(last=False)[1], now)
        if self._scanner(sip):
            remote.user_agent = sip.user_agent or sip.from_name or sip.from_user
            self._count(remote, SCANNER_UA, now, f'requests from scanner "{remote.user_agent}"')
        if exempt:
            return
        if method in SCANNED_METHODS:
            self._scan(remote, method, user, dst_ip, now)
        if method in FLOOD_METHODS:
            self._count(remote, REQUEST_FLOOD, now, "REGISTER/INVITE requests")

    def _scan(self, remote: Remote, method: str, user: str | None, dst_ip: str, now: float) -> None:
        rule = self._rules[EXTENSION_SCAN]
        if user:
            users = remote.distinct("scan:users", rule.threshold)
            if users.add(user, now, rule.window) >= rule.threshold:
                evidence = f"{method} to {rule.threshold} users in {rule.window:g} s ({_some(users)})"
                users.clear()
                self._fire(remote, EXTENSION_SCAN, now, evidence)
                return
        addresses = remote.distinct("scan:addresses", rule.slow_threshold)
        if addresses.add(dst_ip, now, rule.slow_window) >= rule.slow_threshold:
            evidence = f"{method} to {rule.slow_threshold} of our addresses in {rule.slow_window:g} s"
            addresses.clear()
            self._fire(remote, EXTENSION_SCAN, now, evidence)

    def _reply(self, remote: Remote, server_ip: str, sip: SipInfo, now: float) -> None:
        status = sip.status or 0
        key = (sip.call_id, sip.cseq, sip.method or "", sip.branch)
        pending = remote.pending.get(key)
        if pending is None:
            return  # a retransmitted reply, or one to a request we never saw
        if status < 200:
            if status in (180, 183) and not pending.progress:
                self._rang(remote, pending)
            return
        del remote.pending[key]
        if status < 300 and pending.method == "INVITE" and not pending.progress:
            self._rang(remote, pending)
        if status in CHALLENGES:
            self._challenged(remote, server_ip, sip.nonce)
        if 200 <= status < 300:
            if pending.credentials:
                self._authenticated_now(remote.address.text, now)
            return
        if pending.credentials and status in AUTH_REFUSALS:
            self._auth_failure(remote, pending, status, now)
        elif status in NO_SUCH_USER and not (status == 403 and pending.credentials):
            self._user_failure(remote, pending, status, now)
        if pending.method == "INVITE":
            self._invite_refused(remote, pending, status, now)

    @staticmethod
    def _rang(remote: Remote, pending: Pending) -> None:
        """A call that rang or connected: a real call, not a probe, so its user is no scan target."""
        pending.progress = True
        users = remote.counters.get("scan:users")
        if isinstance(users, Distinct) and pending.user:
            users.discard(pending.user)

    def _challenged(self, remote: Remote, server_ip: str, nonce: str | None) -> None:
        if server_ip not in self._local and self._trackable(server_ip):
            self._learn_local(server_ip)  # only servers challenge
        if nonce and nonce not in remote.nonces:
            remote.nonces = (*remote.nonces[-(MAX_NONCES - 1) :], nonce)

    def _auth_failure(self, remote: Remote, pending: Pending, status: int, now: float) -> None:
        self._count(remote, AUTH_FAILURE, now, f"refusals of requests with credentials (last {status})")
        self._user_failure(remote, pending, status, now)

    def _user_failure(self, remote: Remote, pending: Pending, status: int, now: float) -> None:
        if not pending.user:
            return
        rule = self._rules[USER_ENUMERATION]
        users = remote.distinct("enum:users", max(rule.threshold, 8))
        distinct = users.add(pending.user, now, max(rule.window, rule.slow_window))
        recent = remote.distinct("enum:recent", rule.threshold)
        if recent.add(pending.user, now, rule.window) >= rule.threshold:
            evidence = f"requests for {rule.threshold} users failed in {rule.window:g} s ({_some(recent)})"
            recent.clear()
            self._fire(remote, USER_ENUMERATION, now, evidence)
            return
        failures = remote.events("enum:failures", rule.slow_threshold)
        if failures.add(now, rule.slow_window) and distinct >= rule.threshold:
            failures.clear()
            window = f"{rule.slow_window:g} s"
            evidence = f"{rule.slow_threshold} failures over {distinct} users in {window} ({_some(users)})"
            self._fire(remote, USER_ENUMERATION, now, evidence)

    def _invite_refused(self, remote: Remote, pending: Pending, status: int, now: float) -> None:
        if (
            self._prefixes
            and status in TOLL_REFUSALS
            and pending.user
            and pending.user.startswith(self._prefixes)
        ):
            self._count(
                remote, TOLL_FRAUD, now, f"refused INVITEs to toll prefixes (last to {pending.user[:32]})"
            )
        if status not in CHALLENGES and not pending.progress:
            self._count(remote, UNANSWERED_INVITES, now, UNANSWERED)

    def _scanner(self, sip: SipInfo) -> bool:
        if sip.user_agent is not None and self._signature(sip.user_agent):
            return True
        if sip.from_name is not None and self._signature(sip.from_name):
            return True
        return sip.from_user in SCANNER_FROM_USERS

    def _signature(self, text: str) -> bool:
        # A site's phones send a handful of User-Agents over and over, and the case-insensitive
        # search costs 2-3 us per packet: each text's answer is remembered (bounded).
        found = self._signatures.get(text)
        if found is None:
            found = SCANNER_SIGNATURE.search(text) is not None
            if len(self._signatures) >= MAX_SIGNATURE_ANSWERS:
                self._signatures.clear()
            self._signatures[text] = found
        return found

    def _timed_out(self, remote: Remote, pending: Pending, now: float) -> None:
        if pending.method == "INVITE" and not pending.progress:
            self._count(remote, UNANSWERED_INVITES, now, UNANSWERED)

    def _expire_pending(self, remote: Remote, now: float) -> None:
        pending = remote.pending
        while pending:
            oldest = next(iter(pending.values()))
            if oldest.at > now - TRANSACTION_TIMEOUT:
                break
            pending.popitem(last=False)
            self._timed_out(remote, oldest, now)

    # ---------------------------------------------------------------- rules

    def _count(self, remote: Remote, rule_key: str, now: float, what: str) -> None:
        rule = self._rules[rule_key]
        if remote.events(rule_key, rule.threshold).add(now, rule.window):
            self._clear(remote, rule_key)
            self._fire(remote, rule_key, now, f"{rule.threshold} {what} in {rule.window:g} s")
        elif rule.slow_threshold and remote.events(rule_key + ":slow", rule.slow_threshold).add(
            now, rule.slow_window
        ):
            self._clear(remote, rule_key)
            self._fire(remote, rule_key, now, f"{rule.slow_threshold} {what} in {rule.slow_window:g} s")

    @staticmethod
    def _clear(remote: Remote, rule_key: str) -> None:
        for key in (rule_key, rule_key + ":slow"):
            counter = remote.counters.get(key)
            if counter is not None:
                counter.clear()

    def _fire(self, remote: Remote, rule: str, now: float, evidence: str) -> None:
        ip = remote.address.text
        if rule != SCANNER_UA and self._recently_authenticated(ip, now):
            self.stats.exempted += 1
            return
        self._report(Finding(ip, rule, evidence, remote.proof, now))

    def _authenticated_now(self, ip: str, now: float) -> None:
        self._authenticated.pop(ip, None)
        self._authenticated[ip] = now
        if len(self._authenticated) > MAX_EXEMPT:
            self._authenticated.popitem(last=False)

    def _recently_authenticated(self, ip: str, now: float) -> bool:
        at = self._authenticated.get(ip)
        return at is not None and now - at < AUTH_EXEMPTION

    def authenticated(self) -> dict[str, float]:
        """Addresses that authenticated in the last day (kept across restarts with the book)."""
        return dict(self._authenticated)

    def restore_authenticated(self, items: Iterable[tuple[str, float]], now: float) -> None:
        for ip, at in items:
            if now - at < AUTH_EXEMPTION:
                self._authenticated_now(ip, at)

    def forget_idle(self, now: float) -> None:
        remotes = self._remotes
        while remotes:
            oldest = next(iter(remotes.values()))
            if oldest.last > now - IDLE_AFTER:
                break
            remotes.popitem(last=False)
            self.stats.idle_forgotten += 1
