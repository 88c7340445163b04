"""The SIP user agent's rules, sans-I/O: admission, inbound and outbound INVITE, CANCEL,
re-INVITE and UPDATE, BYE, INFO, OPTIONS, in-dialog requests, REGISTER with refresh and digest.

``UserAgentCore`` reads no clock, opens no socket and resolves no name. Feed it what happened
(``receive``, ``parse_error``, ``transport_failed``, ``handle_timeout``, ``host_resolved``,
``media_opened``) and what the TU wants (``place_call``, ``ring``, ``answer``, ``hangup``,
``send_in_dialog``, ``start_registration``), each with ``now``; then take ``data_to_send()`` and
``events()``, and call ``handle_timeout`` at ``next_timeout()``. ``worker.sip.ua`` is the asyncio
adapter; ``tests/unit/test_sip_core.py`` wires two cores together in memory.

Rules, in one place:

1. A new INVITE is admitted (rate, Max-Forwards, source or digest, capacity, Require, Contact,
   route, SDP) before any call exists; refusals are answered at once. An admitted call gets its
   To tag then and is announced with ``IncomingCall``; it waits for its RTP port
   (``media_opened`` / ``media_failed``) before the TU may ring or answer it.
2. Every response to an INVITE after 100 carries the call's one To tag, and so does the 200 to
   a CANCEL of it (§9.2).
3. An outbound INVITE is CANCELled only once a provisional response came (§9.1); before that
   the wish is kept and acted on when one comes. A 2xx that crosses a CANCEL is ACKed, then
   BYEd (§15).
4. A call ends once (``CallEnded``), at once when the TU hangs up (the wire's cleanup goes on
   without it), with the final status that was really sent or received, or None.
5. A 481 or 408 to a request we sent in a dialog, or its timeout, ends the dialog and the call
   (§12.2.1.2).
6. Digest (client): a challenge is answered once; a 401/407 to the credentials just sent fails
   the request at once unless it says ``stale=true`` (then one more try with the new nonce).
7. Host names are never resolved here: ``ResolveHost`` asks the adapter, and the request that
   needs the address waits for ``host_resolved``.
8. Every final non-2xx response we send or receive is logged with its reason (throttled per
   status, with the count of lines skipped).
9. A request whose headers do not parse gets a 400 with the reason, never silence.
10. Responses go only to a request's real source (the transaction layer's rule). Refusals of
    new requests (rate, source, digest, capacity, routing, SDP) are stateless: one response per
    request received, nothing retransmitted, no state kept; a source far over its rate gets no
    answer at all. An INVITE gets its 100 Trying only once admitted.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from worker.config import Settings, TrunkSettings
from worker.log import CallLogger, LogThrottle, call_logger
from worker.sip.auth import (
    AuthError,
    AuthOutcome,
    DigestChallenge,
    DigestClient,
    DigestServer,
    challenge_header_names,
    choose_challenge,
)
from worker.sip.dialog import DIALOG_TERMINATING_STATUSES, Dialog, OutOfOrderRequestError
from worker.sip.limits import TokenBuckets
from worker.sip.message import (
    Message,
    NameAddr,
    SipMessageError,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    error_response,
    generate_call_id,
    generate_tag,
    make_cancel,
    make_response,
)
from worker.sip.sdp import (
    LocalSdp,
    NegotiatedMedia,
    NoCommonCodecError,
    SdpParseError,
    SessionDescription,
    UnusableAddressError,
    negotiate,
    process_answer,
)
from worker.sip.transaction import (
    AckTimeout,
    OutgoingMessage,
    RequestReceived,
    ResponseReceived,
    Timers,
    TransactionEvent,
    TransactionLayer,
    TransactionTimeout,
    Transport,
    TransportFailure,
    UnmatchedResponse,
)

Address = tuple[str, int]

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
SUPPORTED = "replaces"
SDP = "application/sdp"
MAX_RESOLVED_HOSTS = 1024
RESOLVED_TTL_S = 300.0
log = logging.getLogger("worker.sip.ua")

# Final status of an outbound INVITE -> the call's end cause.
_FAILURE_CAUSES = {486: "busy", 600: "busy", 408: "no-answer", 480: "no-answer", 487: "cancelled"}


class CallPhase(enum.StrEnum):
    """Where a call is in SIP terms (the session's call status is its own table)."""

    INCOMING = "incoming"  # INVITE received, not answered
    CALLING = "calling"  # INVITE sent, no answer yet
    RINGING = "ringing"  # 180 sent or received
    EARLY_MEDIA = "early-media"  # 183 with SDP
    ANSWERED = "answered"  # 2xx sent or received
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class CallEnd:
    """Why a call ended (see ``worker.legs.LegEnd``, which the leg reports)."""

    cause: str
    sip_status: int | None = None
    sip_reason: str | None = None


@dataclass(eq=False, slots=True)
class UaCall:
    """One call's SIP state. Owned by the core: the adapter and the leg only read it."""

    call_id: str
    local_tag: str
    direction: Literal["inbound", "outbound"]
    remote: Address  # where the INVITE came from / the trunk's address
    transport: Transport
    invite: SipRequest  # inbound: as received; outbound: the last INVITE sent
    from_user: str
    to_user: str
    caller_name: str
    log: CallLogger
    trunk: str | None = None
    phase: CallPhase = CallPhase.INCOMING
    rtp_port: int = 0
    local_sdp: LocalSdp | None = None
    offer: SessionDescription | None = None  # theirs (inbound) / ours (outbound)
    media: NegotiatedMedia | None = None
    dialog: Dialog | None = None
    server_tid: str | None = None  # inbound INVITE's server transaction
    invite_tid: str | None = None  # outbound INVITE's client transaction
    provisional: bool = False  # outbound: a provisional response (100 included) came
    cancel_wanted: bool = False  # outbound: hung up before any provisional (§9.1)
    digest: DigestClient | None = None
    auth_retries: int = 0
    reoffer_pending: bool = False  # we offered in a 2xx to a re-INVITE without SDP
    ring_deadline: float | None = None
    answered_at: float | None = None
    acked: bool = False  # inbound: the ACK for our 2xx came
    end: CallEnd | None = None

    @property
    def ended(self) -> bool:
        return self.phase is CallPhase.ENDED

    @property
    def on_hold(self) -> bool:
        media = self.media
        return media is not None and (media.remote_hold or not media.direction.sends)


@dataclass(slots=True)
class Registration:
    """The REGISTER state of one trunk; ``next_at`` is when the core acts next."""

    trunk: str
    settings: TrunkSettings
    call_id: str
    tag: str
    digest: DigestClient
    cseq: int = 0
    registered: bool = False
    expires: int = 0
    refreshes: int = 0
    last_status: int | None = None
    failures: int = 0
    next_at: float | None = None
    auth_retries: int = 0
    in_flight: bool = False


# -- events for the adapter -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """An admitted INVITE: open an RTP port, then ``media_opened`` (or ``media_failed``)."""

    call: UaCall


@dataclass(frozen=True, slots=True)
class MediaNegotiated:
    """An offer/answer completed (first time or again): send RTP per ``call.media``."""

    call: UaCall
    media: NegotiatedMedia


@dataclass(frozen=True, slots=True)
class CallProgress:
    """The call reached ``phase`` (RINGING, EARLY_MEDIA or ANSWERED)."""

    call: UaCall
    phase: CallPhase


@dataclass(frozen=True, slots=True)
class CallEnded:
    call: UaCall
    end: CallEnd


@dataclass(frozen=True, slots=True)
class DtmfReceived:
    """A key press in a SIP INFO (application/dtmf-relay or application/dtmf)."""

    call: UaCall
    digit: str
    duration_ms: int


@dataclass(frozen=True, slots=True)
class ResolveHost:
    """Resolve ``host``, then call ``host_resolved`` (with None if it cannot be)."""

    host: str


@dataclass(frozen=True, slots=True)
class RegistrationChanged:
    registration: Registration


UaEvent = (
    IncomingCall
    | MediaNegotiated
    | CallProgress
    | CallEnded
    | DtmfReceived
    | ResolveHost
    | RegistrationChanged
)


@dataclass(slots=True)
class UaCounters:
    malformed_answered: int = 0
    malformed_dropped: int = 0
    rate_limited: int = 0
    over_capacity: int = 0
    forbidden: int = 0
    challenged: int = 0
    no_route: int = 0
    no_common_codec: int = 0
    no_dialog: int = 0
    calls_in: int = 0
    calls_out: int = 0
    unresolved: int = 0
    flood_dropped: int = 0


ResponseHandler = Callable[[SipResponse, float], None]
FailureHandler = Callable[[str, float], None]


@dataclass(slots=True)
class _Client:
    """What to do with the responses of one client transaction we started."""

    on_response: ResponseHandler
    on_failure: FailureHandler


def _ignore_response(response: SipResponse, now: float) -> None:
    return None


def _ignore_failure(reason: str, now: float) -> None:
    return None


class UserAgentCore:
    """See the module docstring. ``port`` is our SIP port as written in Via and Contact."""

    def __init__(
        self,
        settings: Settings,
        *,
        port: int | None = None,
        new_call_id: Callable[[str | None], str] = generate_call_id,
    ) -> None:
        self.settings = settings
        sip = settings.sip
        self.host = sip.public_host or sip.host
        self.port = sip.port if port is None else port
        self.new_call_id = new_call_id
        """Makes the Call-ID of each call and registration this UA starts (a media process
        behind a front picks ones that fall on itself: ``worker.front.shard``)."""
        self.draining = False
        """Set when the worker stops taking calls: new INVITEs get 503 with Retry-After."""
        self.layer = TransactionLayer(
            timers=Timers(t1=sip.t1_ms / 1000, t2=sip.t2_ms / 1000, t4=sip.t4_ms / 1000),
            send_trying=False,  # 100 Trying only once an INVITE is admitted (rule 10)
        )
        self._throttle = LogThrottle()
        self.limits = TokenBuckets(sip.rate_limit_per_second, sip.rate_limit_burst)
        self.digest = (
            DigestServer(sip.auth_realm, secrets.token_bytes(32), dict(sip.users))
            if sip.users
            else None
        )
        self.counters = UaCounters()
        self.calls: dict[tuple[str, str], UaCall] = {}  # (Call-ID, our tag): live calls
        self._by_server_tid: dict[str, UaCall] = {}  # inbound calls not answered yet
        self._cancelling: dict[str, UaCall] = {}  # outbound INVITE tid -> ended, wire pending
        self._clients: dict[str, _Client] = {}
        self.registrations: dict[str, Registration] = {}
        self._trunk_sources = [
            (name, [ipaddress.ip_network(s, strict=False) for s in trunk.inbound_sources])
            for name, trunk in settings.trunks.items()
        ]
        self._trunk_sources.append(
            ("(trusted)", [ipaddress.ip_network(s, strict=False) for s in sip.trusted_sources])
        )
        self._events: list[UaEvent] = []
        self._timers: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._resolved: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._waiting: dict[str, list[Callable[[str | None, float], None]]] = {}

    # -- outputs ---------------------------------------------------------------------------------
    def events(self) -> list[UaEvent]:
        """Everything that happened since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[OutgoingMessage]:
        return self.layer.data_to_send()

    def next_timeout(self) -> float | None:
        at = self.layer.next_timeout()
        heap = self._timers
        while heap:
            when, _, owner = heap[0]
            if self._deadline_of(owner) == when:
                return when if at is None else min(at, when)
            heapq.heappop(heap)
        return at

    def handle_timeout(self, now: float) -> None:
        self.layer.handle_timeout(now)
        self._drain_layer(now)
        heap = self._timers
        while heap and heap[0][0] <= now:
            when, _, owner = heapq.heappop(heap)
            if self._deadline_of(owner) != when:
                continue
            if isinstance(owner, UaCall):
                owner.ring_deadline = None
                self._ring_timeout(owner, now)
            elif isinstance(owner, Registration):
                owner.next_at = None
                self._send_register(owner, now)
        self._drain_layer(now)

    def _deadline_of(self, owner: object) -> float | None:
        if isinstance(owner, UaCall):
            return owner.ring_deadline
        if isinstance(owner, Registration):
            return owner.next_at
        return None

    def _arm(self, owner: UaCall | Registration, at: float) -> None:
        if isinstance(owner, UaCall):
            owner.ring_deadline = at
        else:
            owner.next_at = at
        heapq.heappush(self._timers, (at, next(self._seq), owner))

    # -- inputs from the network -----------------------------------------------------------------
    def receive(self, message: Message, source: Address, transport: Transport, now: float) -> None:
        self.layer.receive(message, source, transport, now)
        self._drain_layer(now)

    def parse_error(
        self, error: SipMessageError, source: Address, transport: Transport, now: float
    ) -> None:
        response = error_response(error, to_tag=generate_tag())
        if response is None:
            self.counters.malformed_dropped += 1
            what = "dropped unparseable message"
        else:
            self.counters.malformed_answered += 1
            what = "answered malformed request"
            self.layer.send_stateless(response, source, transport)
        skipped = self._throttle.allow(what, now)
        if skipped is not None:
            log.info(
                what,
                extra={
                    "source": source,
                    "status": None if response is None else response.status,
                    "why": error.reason,
                    "similar_lines_skipped": skipped,
                },
            )

    def transport_failed(self, transaction_id: str, reason: str, now: float) -> None:
        """The adapter could not send for this transaction (a TCP connect failed, §17.1.4)."""
        self.layer.transport_error(transaction_id, reason)
        self._drain_layer(now)

    def host_resolved(self, host: str, address: str | None, now: float) -> None:
        """The answer to a ``ResolveHost``: an IP address, or None when ``host`` has none."""
        if address is not None:
            self._resolved[host] = (address, now + RESOLVED_TTL_S)
            self._resolved.move_to_end(host)
            while len(self._resolved) > MAX_RESOLVED_HOSTS:
                self._resolved.popitem(last=False)
        else:
            self.counters.unresolved += 1
            log.warning("cannot resolve host", extra={"host": host})
        for waiter in self._waiting.pop(host, []):
            waiter(address, now)
        self._drain_layer(now)

    def _with_address(
        self, host: str, now: float, then: Callable[[str | None, float], None]
    ) -> None:
        """Run ``then(address, now)`` with ``host`` resolved: at once for an IP address or a
        fresh cached answer, else after the adapter's ``host_resolved``."""
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            then(bare, now)
            return
        cached = self._resolved.get(host)
        if cached is not None and cached[1] > now:
            then(cached[0], now)
            return
        waiters = self._waiting.setdefault(host, [])
        waiters.append(then)
        if len(waiters) == 1:
            self._events.append(ResolveHost(host))

    # -- transaction events ------------------------------------------------------------------------
    def _drain_layer(self, now: float) -> None:
        for _ in range(1000):  # bounded: each round handles what the previous one produced
            events = self.layer.events_received()
            if not events:
                return
            for event in events:
                try:
                    self._handle(event, now)
                except SipParseError as exc:  # a response whose headers do not parse
                    log.info("unusable message", extra={"why": exc.reason})

    def _handle(self, event: TransactionEvent, now: float) -> None:
        if isinstance(event, RequestReceived):
            self._request(event, now)
        elif isinstance(event, ResponseReceived):
            client = self._clients.get(event.transaction_id)
            response = event.response
            if response.status >= 300:
                self._log_final(
                    "final response received", event.request, response.status, response.reason, now
                )
            if client is not None:
                if response.status >= 200:
                    del self._clients[event.transaction_id]
                client.on_response(response, now)
            elif response.is_success and event.request.method == "INVITE":
                # A 2xx retransmission after we gave up on the call: ACK and BYE it.
                self._ack_and_bye_stray(event.request, response, event.transaction_id, now)
        elif isinstance(event, TransactionTimeout | TransportFailure):
            client = self._clients.pop(event.transaction_id, None)
            reason = "timeout" if isinstance(event, TransactionTimeout) else event.reason
            if client is not None:
                client.on_failure(reason, now)
        elif isinstance(event, AckTimeout):
            call = self._call_for(event.response)
            if call is not None and not call.ended:
                call.log.warning("no ACK for our 2xx: hanging up")
                self.hangup(call, "ack-timeout", now=now)
        elif isinstance(event, UnmatchedResponse):
            pass  # a stray response (no transaction of ours) is dropped

    # -- helpers -----------------------------------------------------------------------------------
    def via(self, transport: Transport) -> Via:
        return Via.new(transport.value, self.host, self.port)

    def contact(self, transport: Transport, user: str = "worker") -> NameAddr:
        uri = SipUri(user=user, host=self.host, port=self.port)
        if transport is Transport.TCP:
            uri = uri.with_param("transport", "tcp")
        return NameAddr(uri)

    def _common_headers(self) -> list[tuple[str, str]]:
        return [
            ("Allow", ALLOW),
            ("Supported", SUPPORTED),
            ("User-Agent", self.settings.sip.user_agent),
        ]

    def _respond(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        now: float = 0.0,
        *,
        to_tag: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str | None = None,
    ) -> SipResponse:
        response = make_response(
            request,
            status,
            reason,
            to_tag=to_tag or (generate_tag() if status > 100 else None),
            headers=[*self._common_headers(), *headers],
            body=body,
            content_type=content_type,
        )
        if status >= 300:
            self._log_final("final response sent", request, status, response.reason, now)
        self.layer.send_response(response, now)
        return response

    def _call_for(self, message: SipRequest | SipResponse) -> UaCall | None:
        """The call a message of its dialog belongs to: by Call-ID and our tag (the To tag of
        requests we receive and of responses we send)."""
        try:
            key = (message.call_id, message.to_tag or "")
        except SipParseError:
            return None
        return self.calls.get(key)

    def _trunk_for_source(self, host: str) -> str | None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        for name, networks in self._trunk_sources:
            if any(address in net for net in networks):
                return name
        return None

    def _send_client(
        self,
        request: SipRequest,
        destination: Address,
        transport: Transport,
        now: float,
        on_response: ResponseHandler = _ignore_response,
        on_failure: FailureHandler = _ignore_failure,
    ) -> str:
        tid = self.layer.send_request(request, destination, transport, now)
        self._clients[tid] = _Client(on_response, on_failure)
        return tid

    def _end(self, call: UaCall, end: CallEnd) -> None:
        """The one place a call ends (rule 4)."""
        if call.ended:
            return
        call.phase = CallPhase.ENDED
        call.end = end
        call.ring_deadline = None
        if call.dialog is not None:
            call.dialog.terminate()
        self.calls.pop((call.call_id, call.local_tag), None)
        if call.server_tid is not None:
            self._by_server_tid.pop(call.server_tid, None)
        self._events.append(CallEnded(call, end))

    def _negotiated(self, call: UaCall, media: NegotiatedMedia) -> None:
        call.media = media
        self._events.append(MediaNegotiated(call, media))

    def _progress(self, call: UaCall, phase: CallPhase) -> None:
        if call.ended or call.phase is phase:
            return
        call.phase = phase
        self._events.append(CallProgress(call, phase))

    # -- requests ----------------------------------------------------------------------------------
    def _request(self, event: RequestReceived, now: float) -> None:
        request = event.request
        method = request.method
        try:
            to_tag = request.to_tag
            if method == "ACK":
                self._ack(request, now)
            elif method == "CANCEL":
                self._cancel(event, now)
            elif to_tag is not None:
                self._in_dialog(event, to_tag, now)
            else:
                self._new_request(event, now)
        except SipParseError as exc:  # rule 9: a header that does not parse is a 400, never silence
            if method != "ACK":
                self._refuse(event, 400, exc.reason[:80], now)

    def _new_request(self, event: RequestReceived, now: float) -> None:
        """A request from outside any dialog: admission first, every refusal stateless."""
        request = event.request
        source = event.source[0]
        verdict = self.limits.check(source, now)
        if verdict == "drop":
            self.counters.flood_dropped += 1
            if event.transaction_id is not None:
                self.layer.discard(event.transaction_id)
            return
        if verdict == "refuse":
            self.counters.rate_limited += 1
            retry = [("Retry-After", str(self.limits.retry_after(source)))]
            self._refuse(event, 503, "Rate Limited", now, retry)
            return
        if request.max_forwards == 0:
            self._refuse(event, 483, None, now)
        elif request.method == "INVITE":
            self._new_invite(event, now)
        elif request.method == "OPTIONS":
            self._refuse(event, 200, None, now, [("Accept", SDP)])
        elif request.method in ("BYE", "INFO", "UPDATE", "PRACK"):
            self.counters.no_dialog += 1
            self._refuse(event, 481, None, now)
        else:
            self._refuse(event, 405, None, now, [("Allow", ALLOW)])

    def _refuse(
        self,
        event: RequestReceived,
        status: int,
        reason: str | None,
        now: float,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer a request statelessly (rule 10): one response to where it came from, and no
        transaction left behind to retransmit it or hold memory."""
        request = event.request
        response = make_response(
            request,
            status,
            reason,
            to_tag=None if request.to_tag else generate_tag(),
            headers=[*self._common_headers(), *headers],
        )
        if status >= 300:
            self._log_final("final response sent", request, response.status, response.reason, now)
        self.layer.send_stateless(response, event.source, event.transport)
        if event.transaction_id is not None:
            self.layer.discard(event.transaction_id)

    def _log_final(
        self, message: str, request: SipRequest | None, status: int, reason: str, now: float
    ) -> None:
        """Rule 8, throttled per status so that a flood does not become a flood of lines."""
        skipped = self._throttle.allow(f"{message}:{status}", now)
        if skipped is None:
            return
        log.info(
            message,
            extra={
                "method": request.method if request is not None else None,
                "status": status,
                "reason": reason,
                "call_id": request.call_id if request is not None else None,
                "similar_lines_skipped": skipped,
            },
        )

    def _admit(self, event: RequestReceived, now: float) -> tuple[bool, str | None]:
        """Whether this INVITE may place a call: from a trunk's source, or digest-authenticated.
        Sends the 401/403 itself (statelessly) when not."""
        request = event.request
        trunk = self._trunk_for_source(event.source[0])
        if trunk is not None:
            return True, trunk
        if self.digest is None:
            self.counters.forbidden += 1
            self._refuse(event, 403, "Source Not Allowed", now)
            return False, None
        header = request.headers.get("Authorization")
        stale = False
        if header is not None:
            result = self.digest.verify(
                header, request.method, now, body=request.body, request_uri=str(request.uri)
            )
            if result.outcome is AuthOutcome.OK:
                return True, None
            if result.outcome is AuthOutcome.REJECTED:
                self.counters.forbidden += 1
                self._refuse(event, 403, "Authentication Failed", now)
                return False, None
            stale = result.outcome is AuthOutcome.STALE
        self.counters.challenged += 1
        values = self.digest.challenges(
            now, stale=stale, method=request.method, uri=str(request.uri)
        )
        challenges = [("WWW-Authenticate", c) for c in values]
        self._refuse(event, 401, None, now, challenges)
        return False, None

    def _holding_capacity(self, now: float) -> int:
        """Calls that count against ``max_calls``: all but those answered and still not ACKed
        after 4*T1 (they hold a slot at most that long; timer L ends them)."""
        grace = 4 * self.layer.timers.t1
        stale = sum(
            1
            for call in self.calls.values()
            if call.answered_at is not None
            and not call.acked
            and call.direction == "inbound"
            and now - call.answered_at > grace
        )
        return len(self.calls) - stale

    def _new_invite(self, event: RequestReceived, now: float) -> None:
        request = event.request
        tid = event.transaction_id
        assert tid is not None
        admitted, trunk = self._admit(event, now)
        if not admitted:
            return
        if self._holding_capacity(now) >= self.settings.sip.max_calls:
            self.counters.over_capacity += 1
            self._refuse(event, 503, "Too Many Calls", now, [("Retry-After", "5")])
            return
        if self.draining:
            self.counters.over_capacity += 1
            self._refuse(event, 503, "Shutting Down", now, [("Retry-After", "5")])
            return
        require = request.headers.get("Require")
        if require:
            self._refuse(event, 420, None, now, [("Unsupported", require)])
            return
        if request.contact is None:
            self._refuse(event, 400, "Missing Contact", now)
            return
        user = request.uri.user or ""
        if self.settings.route_for(user) is None:
            self.counters.no_route += 1
            self._refuse(event, 404, "No Route", now)
            return
        offer: SessionDescription | None = None
        if request.body:
            if request.content_type != SDP:
                self._refuse(event, 415, None, now, [("Accept", SDP)])
                return
            try:
                offer = SessionDescription.parse(request.body)
                negotiate(offer, ("PCMU", "PCMA"), address=self.settings.rtp.host, port=9)
            except (NoCommonCodecError, UnusableAddressError) as exc:
                self.counters.no_common_codec += 1
                self._refuse(event, 488, str(exc)[:80], now)
                return
            except SdpParseError as exc:
                self._refuse(event, 400, f"Bad SDP: {exc}"[:80], now)
                return
        self._respond(request, 100, None, now)  # admitted: now the transaction is worth keeping
        call = UaCall(
            call_id=request.call_id,
            local_tag=generate_tag(),
            direction="inbound",
            remote=event.source,
            transport=event.transport,
            invite=request,
            from_user=request.from_.uri.user or "",
            to_user=user,
            caller_name=request.from_.display_name or "",
            log=call_logger(request.call_id, "worker.sip.call"),
            trunk=trunk,
            offer=offer,
            server_tid=tid,
        )
        self.calls[(call.call_id, call.local_tag)] = call
        self._by_server_tid[tid] = call
        self.counters.calls_in += 1
        call.log.info(
            "incoming call",
            extra={"from": call.from_user, "to": call.to_user, "source": event.source},
        )
        self._events.append(IncomingCall(call))

    def media_opened(self, call: UaCall, rtp_port: int, now: float) -> bool:
        """The RTP port for an incoming call is bound; False if the call ended meanwhile (the
        adapter closes the port)."""
        if call.ended:
            return False
        call.rtp_port = rtp_port
        call.local_sdp = LocalSdp(self.settings.rtp.host)
        return True

    def media_failed(self, call: UaCall, now: float) -> None:
        """No RTP port could be opened for an incoming call: 503."""
        call.log.error("no RTP port for an incoming call")
        self._finish_unanswered(call, 503, "no-media-port", "No Media Port", now)

    def _answer_sdp(self, call: UaCall, now: float) -> bytes:
        """Our SDP for a 183 or 200: the answer to their offer (the negotiated media applied),
        or, for a late offer, our offer (the answer comes in the ACK)."""
        assert call.local_sdp is not None
        if call.offer is None:
            return call.local_sdp.offer(call.rtp_port).serialize()
        answer, media = call.local_sdp.answer(call.offer, call.rtp_port)
        self._negotiated(call, media)
        return answer.serialize()

    def ring(self, call: UaCall, now: float, *, early_media: bool = False) -> None:
        """180 Ringing, or with ``early_media`` 183 Session Progress with our SDP (also after a
        180). Only for an unanswered inbound call whose media is open."""
        allowed = (CallPhase.INCOMING, CallPhase.RINGING) if early_media else (CallPhase.INCOMING,)
        if call.direction != "inbound" or call.phase not in allowed or call.local_sdp is None:
            return
        contact = [("Contact", str(self.contact(call.transport)))]
        if early_media and call.offer is not None:
            body = self._answer_sdp(call, now)
            call.answered_at = now  # media starts with the 183
            self._respond(
                call.invite, 183, None, now, to_tag=call.local_tag, body=body,
                content_type=SDP, headers=contact,
            )  # fmt: skip
            self._progress(call, CallPhase.EARLY_MEDIA)
        else:
            self._respond(call.invite, 180, None, now, to_tag=call.local_tag, headers=contact)
            self._progress(call, CallPhase.RINGING)

    def answer(self, call: UaCall, now: float) -> None:
        """200 OK with our SDP for an unanswered inbound call whose media is open."""
        if call.direction != "inbound" or call.ended or call.phase is CallPhase.ANSWERED:
            return
        if call.local_sdp is None:
            return
        if call.phase is CallPhase.EARLY_MEDIA and call.offer is not None:
            body = call.local_sdp.answer(call.offer, call.rtp_port)[0].serialize()
        else:
            body = self._answer_sdp(call, now)
        contact = self.contact(call.transport)
        call.answered_at = now  # before the 200 leaves: its timers (L) start from here
        response = self._respond(
            call.invite, 200, None, now, to_tag=call.local_tag, body=body, content_type=SDP,
            headers=[("Contact", str(contact))],
        )  # fmt: skip
        call.dialog = Dialog.from_uas(call.invite, response, contact)
        if call.server_tid is not None:
            self._by_server_tid.pop(call.server_tid, None)
        self._progress(call, CallPhase.ANSWERED)
        call.log.info("answered", extra={"codec": call.media.codec if call.media else None})

    def _finish_unanswered(
        self, call: UaCall, status: int, cause: str, reason: str | None, now: float
    ) -> None:
        if not self.layer.invite_answered(call.invite):
            self._respond(call.invite, status, reason, now, to_tag=call.local_tag)
        self._end(call, CallEnd(cause, status, reason))

    def _ack(self, request: SipRequest, now: float) -> None:
        call = self._call_for(request)
        if call is None or call.dialog is None:
            return
        call.dialog.confirm()
        call.acked = True
        late_answer = call.offer is None and call.media is None
        if request.body and (late_answer or call.reoffer_pending):
            call.reoffer_pending = False
            assert call.local_sdp is not None
            try:
                ours = call.local_sdp.offer(call.rtp_port)
                media = process_answer(
                    ours, SessionDescription.parse(request.body), address=self.settings.rtp.host
                )
            except (SdpParseError, NoCommonCodecError, UnusableAddressError) as exc:
                call.log.warning("bad SDP answer in ACK", extra={"why": str(exc)})
                if late_answer:
                    self.hangup(call, "bad-sdp", now=now)
                return
            self._negotiated(call, media)

    def _cancel(self, event: RequestReceived, now: float) -> None:
        request = event.request
        invite = self.layer.find_cancelled_invite(request)
        if invite is None:
            self._refuse(event, 481, None, now)
            return
        call = next(
            (c for c in self._by_server_tid.values() if c.invite is invite and not c.ended),
            None,
        )
        # §9.2: the 200 to the CANCEL carries the To tag of the INVITE's responses.
        tag = call.local_tag if call is not None else generate_tag()
        self._respond(request, 200, None, now, to_tag=tag)
        if self.layer.invite_answered(invite):
            return
        if call is None:
            self._respond(invite, 487, None, now, to_tag=tag)
            return
        call.log.info("cancelled by the caller")
        self._finish_unanswered(call, 487, "cancelled", None, now)

    def _in_dialog(self, event: RequestReceived, to_tag: str, now: float) -> None:
        request = event.request
        call = self.calls.get((request.call_id, to_tag))
        method = request.method
        # UPDATE may come in an early dialog (RFC 3311 §5.1): the call exists, no dialog yet.
        if call is None or (call.dialog is None and method != "UPDATE"):
            self.counters.no_dialog += 1
            self._refuse(event, 481, None, now)
            return
        if call.dialog is not None:
            try:
                call.dialog.receive_request(request)
            except OutOfOrderRequestError as exc:
                call.log.info("request out of order", extra={"why": str(exc)})
                self._respond(request, 500, "CSeq Out Of Order", now)
                return
        if method == "BYE":
            self._respond(request, 200, None, now)
            call.log.info("caller hung up")
            self._end(call, CallEnd("remote-bye"))
        elif method in ("INVITE", "UPDATE"):
            self._offer_in_dialog(call, request, now)
        elif method == "INFO":
            self._info(call, request, now)
        elif method == "OPTIONS":
            self._respond(request, 200, None, now, headers=[("Accept", SDP)])
        else:
            self._respond(request, 405, None, now, headers=[("Allow", ALLOW)])

    def _offer_in_dialog(self, call: UaCall, request: SipRequest, now: float) -> None:
        """re-INVITE or UPDATE (RFC 3311 §5.2): with an SDP offer, answer it in the 200 and
        use the new media; without one, a re-INVITE gets our offer (answer in the ACK) and an
        UPDATE a plain 200. Both carry our Contact (target refresh)."""
        contact = [("Contact", str(self.contact(call.transport)))]
        if call.local_sdp is None:  # media not open yet: nothing to offer or answer with
            self._respond(request, 491, None, now, headers=[("Retry-After", "1")])
            return
        if not request.body:
            if request.method == "INVITE":
                offer = call.local_sdp.offer(call.rtp_port)
                call.reoffer_pending = True
                self._respond(
                    request, 200, None, now, body=offer.serialize(), content_type=SDP,
                    headers=contact,
                )  # fmt: skip
            else:
                self._respond(request, 200, None, now, headers=contact)
            return
        try:
            remote = SessionDescription.parse(request.body)
            answer, media = call.local_sdp.answer(remote, call.rtp_port)
        except (NoCommonCodecError, UnusableAddressError) as exc:
            self._respond(request, 488, str(exc)[:80], now)
            return
        except SdpParseError as exc:
            self._respond(request, 400, f"Bad SDP: {exc}"[:80], now)
            return
        call.offer = remote
        self._negotiated(call, media)
        call.log.info(
            f"{request.method} offer",
            extra={"hold": call.on_hold, "direction": str(media.direction), "codec": media.codec},
        )
        self._respond(
            request, 200, None, now, body=answer.serialize(), content_type=SDP, headers=contact
        )

    def _info(self, call: UaCall, request: SipRequest, now: float) -> None:
        content_type = request.content_type
        text = request.body.decode("utf-8", "replace")
        digit: str | None = None
        duration = 160
        if content_type == "application/dtmf-relay":
            for line in text.splitlines():
                key, _, value = line.partition("=")
                key = key.strip().lower()
                if key == "signal":
                    digit = value.strip()
                elif key == "duration" and value.strip().isdigit():
                    duration = int(value.strip())
        elif content_type == "application/dtmf":
            digit = text.strip()
        elif not request.body:
            self._respond(request, 200, None, now)  # an INFO keep-alive
            return
        else:
            accept = [("Accept", "application/dtmf-relay, application/dtmf")]
            self._respond(request, 415, None, now, headers=accept)
            return
        if digit is None or len(digit) != 1 or digit.upper() not in "0123456789*#ABCD":
            self._respond(request, 400, "Bad DTMF", now)
            return
        self._respond(request, 200, None, now)
        self._events.append(DtmfReceived(call, digit.upper(), duration))

    # -- requests we send in a dialog ----------------------------------------------------------
    def send_in_dialog(
        self,
        call: UaCall,
        method: str,
        now: float,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """Send an in-dialog request (INFO, NOTIFY, MESSAGE, OPTIONS); False without a dialog.
        A 481 or 408 to it, or its timeout, ends the call (rule 5)."""
        if call.dialog is None or call.ended:
            return False
        request = call.dialog.create_request(
            method.upper(),
            self.via(call.transport),
            body=body,
            content_type=content_type,
            headers=headers,
        )

        def on_response(response: SipResponse, now: float) -> None:
            if call.dialog is not None:
                call.dialog.receive_response(response)
            if response.status in DIALOG_TERMINATING_STATUSES and not call.ended:
                call.log.warning(
                    "in-dialog request answered: the dialog is gone",
                    extra={"method": method, "status": response.status},
                )
                self._end_dialog(call, response.status, now)

        def on_failure(reason: str, now: float) -> None:
            if not call.ended:
                call.log.warning("in-dialog request failed", extra={"why": reason})
                self._end_dialog(call, 408, now)

        self._send_in_dialog_request(call, request, now, on_response, on_failure)
        return True

    def send_info_dtmf(self, call: UaCall, digit: str, duration_ms: int, now: float) -> bool:
        body = f"Signal={digit}\r\nDuration={duration_ms}\r\n".encode()
        return self.send_in_dialog(call, "INFO", now, body, "application/dtmf-relay")

    def _end_dialog(self, call: UaCall, status: int, now: float) -> None:
        """§12.2.1.2: a 481 says the peer has no such dialog (nothing to send); after a 408
        or timeout we still say BYE, in case only that one request was lost."""
        if status == 408 and call.dialog is not None:
            bye = call.dialog.create_request("BYE", self.via(call.transport))
            self._send_in_dialog_request(call, bye, now)
        self._end(call, CallEnd("dialog-gone" if status == 481 else "dialog-timeout", status))

    def _send_in_dialog_request(
        self,
        call: UaCall,
        request: SipRequest,
        now: float,
        on_response: ResponseHandler = _ignore_response,
        on_failure: FailureHandler = _ignore_failure,
    ) -> None:
        assert call.dialog is not None
        if call.direction == "inbound" and call.transport is not Transport.UDP:
            self._send_client(request, call.remote, call.transport, now, on_response, on_failure)
            return  # reuse the caller's connection
        uri = call.dialog.next_hop()
        port = uri.port or 5060

        def send(address: str | None, now: float) -> None:
            if address is None:
                on_failure("unresolvable next hop", now)
                return
            self._send_client(
                request, (address, port), call.transport, now, on_response, on_failure
            )

        self._with_address(uri.address, now, send)

    # -- hanging up ------------------------------------------------------------------------------
    def hangup(
        self,
        call: UaCall,
        cause: str,
        status: int = 480,
        reason: str | None = None,
        *,
        now: float,
    ) -> None:
        """End the call whatever its state (rule 4): BYE when connected; ``status`` for an
        unanswered inbound call; CANCEL (now or after the first provisional, rule 3) for an
        unanswered outbound one."""
        if call.ended:
            return
        if call.dialog is None:
            if call.direction == "inbound":
                self._finish_unanswered(call, status, cause, reason, now)
            else:
                self._cancel_outbound(call, cause, now)
            return
        bye = call.dialog.create_request(
            "BYE", self.via(call.transport), headers=self._common_headers()
        )
        self._send_in_dialog_request(call, bye, now)
        self._end(call, CallEnd(cause))

    def _cancel_outbound(self, call: UaCall, cause: str, now: float) -> None:
        tid = call.invite_tid
        if tid is not None:
            self._cancelling[tid] = call
            if call.provisional:
                self._send_cancel(call, now)
            else:
                call.cancel_wanted = True
        self._end(call, CallEnd(cause))

    def _send_cancel(self, call: UaCall, now: float) -> None:
        cancel = make_cancel(call.invite)
        self._send_client(cancel, call.remote, call.transport, now)

    # -- outbound calls ----------------------------------------------------------------------
    def place_call(
        self,
        trunk_name: str,
        number: str,
        rtp_port: int,
        now: float,
        *,
        from_user: str | None = None,
        caller_name: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        ring_timeout_s: float = 60.0,
    ) -> UaCall:
        """Send an INVITE through a trunk (after resolving its host, rule 7)."""
        trunk = self.settings.trunks[trunk_name]
        transport = Transport.TCP if trunk.transport == "tcp" else Transport.UDP
        local_tag = generate_tag()
        call_id = self.new_call_id(self.host)
        caller = from_user or trunk.from_user or "worker"
        domain = trunk.from_domain or trunk.host
        uri = SipUri(user=number, host=trunk.host, port=trunk.port)
        if transport is Transport.TCP:
            uri = uri.with_param("transport", "tcp")
        local_sdp = LocalSdp(self.settings.rtp.host)
        offer = local_sdp.offer(rtp_port, codecs=tuple(trunk.codecs))
        invite = SipRequest("INVITE", uri)
        h = invite.headers
        h.add("Via", str(self.via(transport)))
        h.add("Max-Forwards", "70")
        from_ = NameAddr(SipUri(user=caller, host=domain), caller_name or None)
        h.add("From", str(from_.with_tag(local_tag)))
        h.add("To", str(NameAddr(SipUri(user=number, host=domain))))
        h.add("Call-ID", call_id)
        h.add("CSeq", "1 INVITE")
        h.add("Contact", str(self.contact(transport)))
        for name, value in [*self._common_headers(), *headers]:
            h.add(name, value)
        h.add("Content-Type", SDP)
        invite.body = offer.serialize()
        call = UaCall(
            call_id=call_id,
            local_tag=local_tag,
            direction="outbound",
            remote=(trunk.host, trunk.port),
            transport=transport,
            invite=invite,
            from_user=caller,
            to_user=number,
            caller_name=caller_name or "",
            log=call_logger(call_id, "worker.sip.call"),
            trunk=trunk_name,
            phase=CallPhase.CALLING,
            rtp_port=rtp_port,
            local_sdp=local_sdp,
            offer=offer,
        )
        self.calls[(call_id, local_tag)] = call
        self.counters.calls_out += 1
        call.log.info("calling", extra={"to": number, "trunk": trunk_name})
        self._arm(call, now + ring_timeout_s)

        def send(address: str | None, now: float) -> None:
            if call.ended:
                return
            if address is None:
                self._end(call, CallEnd("unresolvable", None, f"cannot resolve {trunk.host}"))
                return
            call.remote = (address, trunk.port)
            self._send_invite(call, invite, now)

        self._with_address(trunk.host, now, send)
        return call

    def _send_invite(self, call: UaCall, invite: SipRequest, now: float) -> None:
        call.invite = invite

        def on_response(response: SipResponse, now: float) -> None:
            self._invite_response(call, invite, response, now)

        def on_failure(reason: str, now: float) -> None:
            self._cancelling.pop(call.invite_tid or "", None)
            if not call.ended:
                cause = "timeout" if reason == "timeout" else "transport-error"
                call.log.warning("no answer to the INVITE", extra={"why": reason})
                self._end(call, CallEnd(cause, 408 if reason == "timeout" else 503, reason))

        call.invite_tid = self._send_client(
            invite, call.remote, call.transport, now, on_response, on_failure
        )

    def _ring_timeout(self, call: UaCall, now: float) -> None:
        if call.dialog is None and not call.ended:
            call.log.info("no answer in time")
            self._cancel_outbound(call, "no-answer", now)

    def _invite_response(
        self, call: UaCall, invite: SipRequest, response: SipResponse, now: float
    ) -> None:
        status = response.status
        if status < 200:
            call.provisional = True  # 100 Trying included (§9.1: any provisional response)
            if call.cancel_wanted:  # rule 3: the CANCEL we held back can go now
                call.cancel_wanted = False
                self._send_cancel(call, now)
                return
            if call.ended or status == 100:
                return
            if response.body and call.media is None and self._apply_answer(call, response.body):
                self._progress(call, CallPhase.EARLY_MEDIA)
                return
            if call.phase is CallPhase.CALLING:
                self._progress(call, CallPhase.RINGING)
            return
        if call.invite_tid is not None:
            self._cancelling.pop(call.invite_tid, None)
        if 200 <= status < 300:
            self._invite_answered(call, invite, response, now)
            return
        if status in (401, 407) and self._retry_with_credentials(call, invite, response, now):
            return
        if call.ended:
            return
        cause = _FAILURE_CAUSES.get(status, "auth-failed" if status in (401, 407) else "rejected")
        call.log.info("call failed", extra={"sip_status": status, "reason": response.reason})
        self._end(call, CallEnd(cause, status, response.reason))

    def _invite_answered(
        self, call: UaCall, invite: SipRequest, response: SipResponse, now: float
    ) -> None:
        dialog = Dialog.from_uac(invite, response)
        ack = dialog.create_ack(self.via(call.transport))
        self.layer.send_ack(ack, call.remote, call.transport, now, call.invite_tid)
        if call.ended:  # we cancelled, but the 200 crossed the CANCEL: end it properly
            bye = dialog.create_request("BYE", self.via(call.transport))
            self._send_client(bye, call.remote, call.transport, now)
            return
        call.dialog = dialog
        if call.media is None and response.body:
            self._apply_answer(call, response.body)
        if call.media is None:
            call.log.warning("2xx without a usable SDP answer")
            self.hangup(call, "bad-sdp", now=now)
            return
        call.ring_deadline = None
        call.answered_at = now
        self._progress(call, CallPhase.ANSWERED)
        call.log.info("answered", extra={"codec": call.media.codec})

    def _retry_with_credentials(
        self, call: UaCall, invite: SipRequest, response: SipResponse, now: float
    ) -> bool:
        """Answer a 401/407 once (rule 6); False when the call fails with it."""
        trunk = self.settings.trunks.get(call.trunk or "")
        if call.ended or trunk is None or not (trunk.username and trunk.password):
            return False
        status = response.status
        _, header = challenge_header_names(status)
        try:
            challenge = choose_challenge(response.headers.get_all(_challenge_name(status)))
        except AuthError as exc:
            call.log.warning("cannot answer the challenge", extra={"why": str(exc)})
            return False
        if not _may_retry(invite, header, challenge, call.auth_retries):
            call.log.warning(
                "credentials refused", extra={"sip_status": status, "user": trunk.username}
            )
            return False
        client = call.digest or DigestClient(trunk.username, trunk.password)
        call.digest = client
        try:
            value = client.authorize(challenge, "INVITE", str(invite.uri), body=invite.body)
        except AuthError as exc:
            call.log.warning("cannot answer the challenge", extra={"why": str(exc)})
            return False
        call.auth_retries += 1
        retry = SipRequest("INVITE", invite.uri, invite.headers.copy(), invite.body)
        retry.headers.set("Via", str(self.via(call.transport)))
        retry.headers.set("CSeq", f"{invite.cseq.number + 1} INVITE")
        retry.headers.remove("Authorization")
        retry.headers.remove("Proxy-Authorization")
        retry.headers.add(header, value)
        self._send_invite(call, retry, now)
        return True

    def _apply_answer(self, call: UaCall, body: bytes) -> bool:
        try:
            if call.offer is None:
                raise SdpParseError("no offer of ours to match")
            media = process_answer(
                call.offer, SessionDescription.parse(body), address=self.settings.rtp.host
            )
        except (SdpParseError, NoCommonCodecError, UnusableAddressError) as exc:
            call.log.warning("unusable SDP answer", extra={"why": str(exc)})
            return False
        self._negotiated(call, media)
        return True

    def _ack_and_bye_stray(
        self, invite: SipRequest, response: SipResponse, tid: str, now: float
    ) -> None:
        try:
            dialog = Dialog.from_uac(invite, response)
        except (SipParseError, ValueError, LookupError) as exc:
            log.info("stray 2xx without a usable dialog", extra={"why": str(exc)})
            return
        via = Via.new(invite.via.transport, self.host, self.port)
        destination = (invite.uri.address, invite.uri.port or 5060)
        transport = Transport.TCP if invite.via.transport == "TCP" else Transport.UDP
        self.layer.send_ack(dialog.create_ack(via), destination, transport, now, tid)
        bye = dialog.create_request("BYE", self.via(transport))
        self._send_client(bye, destination, transport, now)

    # -- registration ----------------------------------------------------------------------------
    def start_registration(self, name: str, now: float) -> Registration:
        """REGISTER the trunk ``name`` now and keep it registered (refresh before expiry,
        back off after failures)."""
        trunk = self.settings.trunks[name]
        reg = Registration(
            trunk=name,
            settings=trunk,
            call_id=self.new_call_id(self.host),
            tag=generate_tag(),
            digest=DigestClient(trunk.username or "", trunk.password or ""),
        )
        self.registrations[name] = reg
        self._arm(reg, now)
        return reg

    def _register_request(
        self, reg: Registration, authorization: tuple[str, str] | None
    ) -> SipRequest:
        trunk = reg.settings
        transport = _transport_of(trunk)
        user = trunk.username or trunk.from_user or "worker"
        domain = trunk.from_domain or trunk.host
        reg.cseq += 1
        request = SipRequest("REGISTER", SipUri(host=domain, port=trunk.port))
        h = request.headers
        h.add("Via", str(self.via(transport)))
        h.add("Max-Forwards", "70")
        aor = NameAddr(SipUri(user=user, host=domain))
        h.add("From", str(aor.with_tag(reg.tag)))
        h.add("To", str(aor))
        h.add("Call-ID", reg.call_id)
        h.add("CSeq", f"{reg.cseq} REGISTER")
        h.add("Contact", str(self.contact(transport, user)))
        h.add("Expires", str(trunk.registration_expires_s))
        for name, value in self._common_headers():
            h.add(name, value)
        if authorization is not None:
            h.add(*authorization)
        return request

    def _send_register(
        self, reg: Registration, now: float, authorization: tuple[str, str] | None = None
    ) -> None:
        if authorization is None:
            reg.auth_retries = 0
        request = self._register_request(reg, authorization)
        trunk = reg.settings
        reg.in_flight = True

        def send(address: str | None, now: float) -> None:
            if address is None:
                self._registration_failed(reg, None, now)
                return
            self._send_client(
                request,
                (address, trunk.port),
                _transport_of(trunk),
                now,
                lambda response, now: self._register_response(reg, request, response, now),
                lambda reason, now: self._registration_failed(reg, None, now),
            )

        self._with_address(trunk.host, now, send)

    def _register_response(
        self, reg: Registration, request: SipRequest, response: SipResponse, now: float
    ) -> None:
        status = response.status
        if status < 200:
            return
        if response.is_success:
            expires = _granted_expiry(response, reg.settings.registration_expires_s)
            if reg.registered:
                reg.refreshes += 1
            reg.registered = True
            reg.in_flight = False
            reg.expires = expires
            reg.failures = 0
            reg.last_status = status
            log.info(
                "registered",
                extra={"trunk": reg.trunk, "expires": expires, "refresh": reg.refreshes},
            )
            self._arm(reg, now + refresh_delay(expires))
            self._events.append(RegistrationChanged(reg))
            return
        trunk = reg.settings
        if status in (401, 407) and trunk.username and trunk.password:
            _, header = challenge_header_names(status)
            try:
                challenge = choose_challenge(response.headers.get_all(_challenge_name(status)))
                if not _may_retry(request, header, challenge, reg.auth_retries):
                    raise AuthError("the credentials were refused")
                value = reg.digest.authorize(challenge, "REGISTER", str(request.uri))
            except AuthError as exc:
                log.warning(
                    "registration challenge not answered",
                    extra={"trunk": reg.trunk, "why": str(exc)},
                )
            else:
                reg.auth_retries += 1
                self._send_register(reg, now, (header, value))
                return
        self._registration_failed(reg, status, now)

    def _registration_failed(self, reg: Registration, status: int | None, now: float) -> None:
        reg.in_flight = False
        reg.registered = False
        reg.failures += 1
        reg.last_status = status
        log.warning(
            "registration failed",
            extra={"trunk": reg.trunk, "status": status, "failures": reg.failures},
        )
        self._arm(reg, now + min(300.0, 5.0 * 2 ** min(reg.failures, 6)))
        self._events.append(RegistrationChanged(reg))

    # -- shutting down ----------------------------------------------------------------------------
    @property
    def requests_in_flight(self) -> int:
        """Requests we sent that have no final response (or failure) yet."""
        return len(self._clients)

    def close(self, now: float) -> None:
        """Hang up every live call (503 for unanswered inbound ones) and stop registering."""
        for call in list(self.calls.values()):
            self.hangup(call, "shutdown", 503, now=now)
        for reg in self.registrations.values():
            reg.next_at = None


def _challenge_name(status: int) -> str:
    return "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"


def _transport_of(trunk: TrunkSettings) -> Transport:
    return Transport.TCP if trunk.transport == "tcp" else Transport.UDP


def _may_retry(request: SipRequest, header: str, challenge: DigestChallenge, retries: int) -> bool:
    """Rule 6: answer a challenge when the request carried no credentials; after credentials,
    only when the server says the nonce was stale (once more at most)."""
    if request.headers.get(header) is None:
        return retries == 0 or challenge.stale
    return challenge.stale and retries < 2


def _granted_expiry(response: SipResponse, asked: int) -> int:
    for contact in response.contacts:
        value = dict(contact.params).get("expires")
        if value is not None and value.isdigit():
            return int(value)
    try:
        expires = response.expires
    except SipParseError:
        expires = None
    return expires if expires is not None else asked


def refresh_delay(expires: int) -> float:
    """Refresh well before expiry: at 80 % of the interval, and at least 5 s before it."""
    return max(1.0, min(expires * 0.8, expires - 5.0))
