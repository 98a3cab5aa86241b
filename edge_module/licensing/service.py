"""The licence gate and its grace state machine (docs/licensing.md draws it).

States:

* ``online``: the last answer of the billing endpoint was a proven Valid: a
  status answer whose signed statement carries this call's nonce, or a usage
  answer whose signed receipt the uploader verified. Serve. A 200 that proves
  nothing counts as ``Unknown``.
* ``grace``: the endpoint cannot be reached (CouldNotConnect), is busy, or
  answered something unexpected (Unknown), and the last signed lease has not
  expired in trusted time. Serve; the time remaining is in ``/status``.
* ``gated``: refuse every request with an ``Unlicensed`` error envelope:
  the key is Invalid, Mismatch or ContainerUseUnauthorized (no grace for
  those), the quota is used up (OutOfQuota, until a later check succeeds), or
  the endpoint is unreachable and there is no lease left (expired, or never
  had one: a module that never reached its endpoint has no grace).

Transitions happen on every answer: the periodic status check, every upload
of usage (Valid only under a signed receipt for records of that upload), and
``GET /status``. The first successful answer returns the module to ``online``
and wakes the uploader so the backlog drains. The grace length is set by the
endpoint in each signed lease, which only a status answer bound to the call's
nonce can bring (and which alone sets the trusted time); the module can never
extend it, and the trusted clock makes rolling the wall clock back useless. A
Valid that no check renewed for two check intervals and a call's deadline stops
counting: the lease's grace decides. And status answers alone cannot keep the
module serving: the oldest usage record still waiting for upload may be at most
one lease length old (the lease's ``expiresAt - issuedAt``, set by the vendor,
not by a setting). Past that, a Valid status no longer counts and the module is
gated until that usage is accepted; the uploader sends oldest first, so the limit
moves only as fast as usage is really billed. A relay that lets status checks
through but blocks (or trickles) uploads earns at most one lease length of use
beyond what was billed. A Valid status while that limit holds the module back
wakes the uploader at once (``on_online``), so an honest module that was offline
longer than a lease serves again as soon as its old usage is uploaded.

Threads: the licensing thread (periodic checks), HTTP handler threads
(``GET /status``), the drain thread (``observe`` of upload answers) and the
pipeline's infer thread (``gate_check``); state changes hold ``_lock``.

Disconnected mode replaces the endpoint by a signed licence file: Valid while
it verifies, is unexpired in trusted time and its transaction quota (if any)
is not used up.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from edge_module.billing_api import Answer, ApiStatus, BillingClient
from edge_module.config import LicensingSettings
from edge_module.errors import ErrorCode
from edge_module.exceptions import Refusal
from edge_module.identity import Identity
from edge_module.licensing.clock import TrustedClock
from edge_module.licensing.lease import Lease, LeaseStore, verify_status
from edge_module.licensing.statuses import explain
from edge_module.logs import get_logger
from edge_module.supervisor import Spawn, start_thread
from edge_module.trust.keys import DEV_SWITCH, TrustedKeys

log = get_logger("licensing")

NO_GRACE = {ApiStatus.INVALID, ApiStatus.MISMATCH, ApiStatus.UNAUTHORIZED}
GRACE_STATUSES = {ApiStatus.COULD_NOT_CONNECT, ApiStatus.BUSY, ApiStatus.UNKNOWN}


class GraceState(StrEnum):
    ONLINE = "online"
    GRACE = "grace"
    GATED = "gated"


@dataclass(frozen=True)
class Decision:
    serve: bool
    state: GraceState
    status: str
    message: str
    remedy: str
    retry_after: float | None
    expires_at_ms: int | None
    remaining_seconds: float | None

    def grace_dict(self) -> dict[str, Any]:
        expires = None
        if self.expires_at_ms is not None:
            expires = datetime.fromtimestamp(self.expires_at_ms / 1000, UTC).isoformat()
        return {"state": self.state.value, "expiresAt": expires,
                "remainingSeconds": self.remaining_seconds}


class LicenseSource(Protocol):
    """What a licence file tells (disconnected mode); see licensing/license_file.py."""

    def status(self, now_ms: int) -> tuple[str, str | None, int | None]:
        """(status, message, expires_at_ms)."""


class Licensing:
    def __init__(self, identity: Identity, settings: LicensingSettings, clock: TrustedClock,
                 lease_store: LeaseStore, keys: TrustedKeys,
                 client: BillingClient | None, license_source: LicenseSource | None = None
                 ) -> None:
        self.identity = identity
        self.settings = settings
        self.clock = clock
        self.lease_store = lease_store
        self.keys = keys
        self.client = client
        self.license_source = license_source
        self.lease: Lease | None = lease_store.load(keys, identity, clock.now_ms())
        if self.lease is not None:
            clock.raise_floor(self.lease.issued_at)  # time never runs before a lease we hold
        self._valid_at = 0.0  # monotonic time of the last Valid answer
        self.status: ApiStatus = ApiStatus.UNKNOWN
        self.status_message = "no status check has completed yet"
        self.retry_after: float | None = None
        self.checked = False
        self.on_online: list[Callable[[], None]] = []
        # The trusted requestTime of the oldest usage record waiting for upload (None:
        # nothing waits); the app wires it to the ledger.
        self.oldest_pending: Callable[[], int | None] = lambda: None
        self._last_answer: Answer | None = None
        self._last_checked = 0.0
        self._state: GraceState | None = None
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # one status call in flight, however many probes
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not keys and license_source is None:
            log.warning("no_trusted_key", effect="no answer can be verified, so the module "
                        "is never Valid and has no offline grace",
                        fix=f"development: set {DEV_SWITCH} to the simulator's public key; "
                        "customers: run the vendor's release image")

    def lease_seconds(self) -> float | None:
        """The held lease's length (``expiresAt - issuedAt``): how old unbilled usage may
        get before the module is gated; None without a lease."""
        lease = self.lease
        return None if lease is None else (lease.expires_at - lease.issued_at) / 1000

    def watch_usage(self, oldest_pending: Callable[[], int | None]) -> None:
        """Wire the ledger: the trusted time of its oldest record waiting for upload."""
        self.oldest_pending = oldest_pending

    @property
    def disconnected(self) -> bool:
        return self.license_source is not None

    # -- answers ----------------------------------------------------------

    def observe(self, answer: Answer, nonce: str | None = None) -> None:
        """Take in any answer of the billing endpoint (status check with its ``nonce``, or
        upload). A 200 counts as Valid only when proven; otherwise it is Unknown."""
        now = self.clock.now_ms()
        # Only a status answer bound to this call's nonce can bring a lease (grace) or set
        # the trusted time: a lease inside any other answer may be a replay of an old one.
        lease: Lease | None = None
        problem: str | None = None
        if answer.ok and nonce is not None:
            lease, problem = verify_status(answer.body, self.keys, self.identity, nonce, now,
                                           self.lease)
        if answer.ok and (lease is None if nonce is not None else not answer.proven):
            why = problem or "the upload answer's receipt did not verify"
            log.warning("valid_not_proven", reason=why, effect="taken as Unknown: the module "
                        "serves only within a grace it already holds",
                        fix="check that Billing points at the vendor's endpoint (not a proxy "
                        "or look-alike that answers for it) and that this image is current")
            answer = Answer(ApiStatus.UNKNOWN, answer.http_status, answer.body,
                            answer.retry_after, f"a 200 answer that proves nothing: {why}",
                            answer.server_date, answer.elapsed)
        with self._lock:
            if lease is not None:
                floor = self.lease.issued_at if self.lease is not None else lease.issued_at
                self.clock.adopt(max(lease.issued_at, floor))
                if self.lease is None or lease.expires_at >= self.lease.expires_at or \
                        lease.issued_at >= self.lease.issued_at:
                    self.lease = lease
                    self.lease_store.save(lease)
            self.status = answer.status
            if answer.status is ApiStatus.VALID:
                self._valid_at = time.monotonic()
            self.status_message = answer.error if not answer.ok and answer.error else \
                explain(answer.status).message
            self.retry_after = answer.retry_after
            self.checked = True
        state = self._transition()
        if answer.status is ApiStatus.VALID and state is not GraceState.ONLINE:
            for callback in self.on_online:  # held back by old usage: upload it now
                callback()

    def check(self, max_age: float = 0.0) -> Answer | None:
        """One status check with the billing endpoint (nothing is metered).

        ``max_age``: reuse an answer at most this old instead of calling again, so
        that frequent probes of GET /status cannot flood the endpoint.
        """
        if self.client is None:
            self._transition()
            return None
        now = time.monotonic()
        if max_age and self._last_answer is not None and \
                now - self._last_checked < max_age:
            return self._last_answer
        if not self._checking.acquire(blocking=not max_age):
            return self._last_answer  # a probe while a call is in flight: report, don't pile up
        try:
            nonce = secrets.token_urlsafe(18)
            answer = self.client.status(self.identity.as_dict(), nonce)
            self._last_answer, self._last_checked = answer, time.monotonic()
            self.observe(answer, nonce)
        finally:
            self._checking.release()
        return answer

    # -- the decision -----------------------------------------------------

    def decide(self) -> Decision:
        now = self.clock.now_ms()
        if self.license_source is not None:
            return self._decide_from_license(now)
        oldest = self.oldest_pending()
        with self._lock:
            status, message, lease = self.status, self.status_message, self.lease
            retry_after = self.retry_after
        expires = lease.expires_at if lease is not None else None
        unaccepted: str | None = None  # why the grace ends before the lease does
        if lease is not None and oldest is not None:
            usage_limit = oldest + (lease.expires_at - lease.issued_at)
            if usage_limit < lease.expires_at:
                expires = usage_limit  # unbilled usage may be one lease length old at most
                unaccepted = (f"usage recorded {(now - oldest) / 1000:.0f} s ago is still "
                              "waiting for upload; the billing endpoint has not accepted it")
            if status is ApiStatus.VALID and now >= usage_limit and unaccepted:
                status = ApiStatus.UNKNOWN
                message = f"status checks pass, but {unaccepted}"
        remaining = max(0.0, (expires - now) / 1000) if expires is not None else None
        remedy = explain(status).remedy
        if status is ApiStatus.VALID and self._valid_is_stale():
            # No proof for longer than the checks allow (a check that hangs, a link that
            # answers nothing): the last Valid no longer counts; the lease's grace does.
            status, message = ApiStatus.UNKNOWN, "no Valid answer for " \
                f"{time.monotonic() - self._valid_at:.0f} s"
            remedy = explain(status).remedy
        if status is ApiStatus.VALID:
            return Decision(True, GraceState.ONLINE, status, message, remedy, None, expires,
                            remaining)
        if status in NO_GRACE:
            return Decision(False, GraceState.GATED, status, message, remedy, None, expires,
                            remaining)
        if status is ApiStatus.OUT_OF_QUOTA:
            return Decision(False, GraceState.GATED, status, message, remedy, retry_after,
                            expires, remaining)
        if expires is not None and now < expires:
            return Decision(True, GraceState.GRACE, status, message,
                            f"{remedy} The module serves within its offline grace meanwhile "
                            f"({remaining:.0f} s left).", None, expires, remaining)
        why = "no lease was ever granted, so there is no offline grace" if expires is None \
            else f"unbilled usage may be one lease length old at most: {unaccepted}" \
            if unaccepted else "the offline grace has expired"
        wait = retry_after if retry_after is not None else self.settings.retry_seconds
        return Decision(False, GraceState.GATED, status, f"{message} ({why})",
                        f"{remedy} The module refuses work until a Valid answer arrives.",
                        wait, expires, remaining)

    def _valid_is_stale(self) -> bool:
        """True when the last Valid answer is older than two check intervals plus the
        call's deadline: a periodic check would have renewed or replaced it by then."""
        s = self.settings
        limit = 2 * s.check_interval_seconds + s.status_timeout_seconds + 1
        return time.monotonic() - self._valid_at > limit

    def _decide_from_license(self, now: int) -> Decision:
        assert self.license_source is not None
        status, message, expires = self.license_source.status(now)
        remaining = max(0.0, (expires - now) / 1000) if expires is not None else None
        explanation = explain(status)
        if status == ApiStatus.VALID:
            return Decision(True, GraceState.ONLINE, status, message or explanation.message,
                            explanation.remedy, None, expires, remaining)
        return Decision(False, GraceState.GATED, status, message or explanation.message,
                        explanation.remedy, None, expires, remaining)

    def _transition(self) -> GraceState:
        decision = self.decide()
        previous, self._state = self._state, decision.state
        if previous != decision.state:
            log.info("licence_state", previous=previous.value if previous else None,
                     state=decision.state.value, status=decision.status,
                     remaining_s=decision.remaining_seconds)
            if decision.state is GraceState.GATED:
                log.error("licence_gated", status=decision.status, reason=decision.message,
                          fix=decision.remedy)
            if decision.state is GraceState.ONLINE and previous is not None:
                for callback in self.on_online:
                    callback()
        return decision.state

    def gate_check(self) -> None:
        """The pipeline's gate: raise Refusal(Unlicensed) when the module may not serve."""
        decision = self.decide()
        if decision.state != self._state:
            self._transition()
        if not decision.serve:
            raise Refusal(ErrorCode.UNLICENSED, f"{decision.message}. {decision.remedy}",
                          status=decision.status, retryAfter=decision.retry_after)

    # -- the periodic check -----------------------------------------------

    def model_key(self, name: str) -> str | None:
        """The AES key for an encrypted model, from the licence file or the signed lease."""
        keys: dict[str, Any] = {}
        source = self.license_source
        license_keys = getattr(getattr(source, "license", None), "model_keys", None)
        if isinstance(license_keys, dict):
            keys = license_keys
        elif self.lease is not None:
            keys = dict(self.lease.raw.get("modelKeys") or {})
        value = keys.get(name)
        return str(value) if value is not None else None

    def start(self, spawn: Spawn = start_thread) -> None:
        self._thread = spawn("licensing", self.run)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self.clock.persist()

    def run(self) -> None:
        """The licensing thread: periodic status checks. An error (a bug, a full disk
        under the trusted clock) is logged and the check is tried again later."""
        while not self._stop.is_set():
            try:
                wait = self._next_check_in()
            except Exception as exc:
                log.exception("licence_check_error", error=f"{type(exc).__name__}: {exc}",
                              fix="report this log line; checks continue")
                wait = self.settings.retry_seconds
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception as exc:
                log.exception("licence_check_error", error=f"{type(exc).__name__}: {exc}",
                              effect="the licence state stays as it was; checked again in "
                              f"{self.settings.retry_seconds} s",
                              fix="report this log line; checks continue")

    def _next_check_in(self) -> float:
        decision = self.decide()
        if decision.state is GraceState.ONLINE:
            return self.settings.check_interval_seconds
        if decision.retry_after is not None:
            return max(0.05, decision.retry_after)
        return self.settings.retry_seconds

    def status_body(self, backlog: dict[str, Any]) -> dict[str, Any]:
        decision = self.decide()
        return {
            "apiStatus": decision.status,
            "apiStatusMessage": decision.message,
            "remedy": decision.remedy,
            "mode": "disconnected" if self.disconnected else "connected",
            "serving": decision.serve,
            "grace": decision.grace_dict(),
            "backlog": backlog,
            "trustedTime": datetime.fromtimestamp(self.clock.now_ms() / 1000, UTC).isoformat(),
            "checkedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
