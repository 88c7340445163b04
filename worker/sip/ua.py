"""The worker's SIP user agent: admission (trunk sources, digest, rate and call limits), inbound
and outbound INVITE, CANCEL, BYE, re-INVITE (hold/resume), OPTIONS, INFO DTMF and REGISTER with
refresh, on top of the sans-I/O transaction layer and the asyncio ``SipTransport``.

Every input (a message, a parse error, a timer) goes through ``_pump``: the transaction layer
takes it, then the bytes it wants sent go out and the events it produced are handled here.
A peer's bad input is answered on the wire and counted; it never raises out of a handler.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from worker.config import Settings, TrunkSettings
from worker.pacer import MediaPacer
from worker.rtp import PortsExhaustedError, RtpPortPool
from worker.sip.auth import (
    AuthError,
    AuthOutcome,
    DigestClient,
    DigestServer,
    challenge_header_names,
    choose_challenge,
)
from worker.sip.call import CallEnd, CallState, SipCall
from worker.sip.dialog import Dialog, OutOfOrderRequestError
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
    NoCommonCodecError,
    SdpParseError,
    SessionDescription,
    negotiate,
    process_answer,
)
from worker.sip.transaction import (
    AckTimeout,
    RequestReceived,
    ResponseReceived,
    Timers,
    TransactionEvent,
    TransactionLayer,
    TransactionTimeout,
    Transport,
    TransportFailure,
)
from worker.sip.transport import SipTransport

Address = tuple[str, int]
IncomingHandler = Callable[[SipCall], Awaitable[None]]

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE"
SUPPORTED = "replaces"
SDP = "application/sdp"
log = logging.getLogger("worker.sip.ua")

# Final status of an outbound INVITE -> the call's end cause.
_FAILURE_CAUSES = {486: "busy", 600: "busy", 408: "no-answer", 480: "no-answer", 487: "cancelled"}


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


@dataclass(slots=True)
class _Client:
    """What to do with the responses of one client transaction we started."""

    on_response: Callable[[SipResponse], None]
    on_failure: Callable[[str], None] = lambda reason: None


@dataclass(slots=True)
class _PendingInvite:
    """A new INVITE not answered yet: ``call`` is None while its RTP port is being opened."""

    invite: SipRequest
    call: SipCall | None = None


@dataclass(slots=True)
class Registration:
    """The REGISTER state of one trunk."""

    trunk: str
    registered: bool = False
    expires: int = 0
    refreshes: int = 0
    last_status: int | None = None
    failures: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class UserAgent:
    """See the module docstring. ``on_incoming(call)`` decides what to do with each new call."""

    def __init__(
        self,
        settings: Settings,
        on_incoming: IncomingHandler | None = None,
        *,
        pacer: MediaPacer | None = None,
    ) -> None:
        self.settings = settings
        sip = settings.sip
        self.on_incoming = on_incoming
        self.host = sip.public_host or sip.host
        self.layer = TransactionLayer(
            timers=Timers(t1=sip.t1_ms / 1000, t2=sip.t2_ms / 1000, t4=sip.t4_ms / 1000)
        )
        self.transport = SipTransport(
            sip.host,
            sip.port,
            self._on_message,
            self._on_parse_error,
            max_message_bytes=sip.max_message_bytes,
            transports=tuple(sip.transports),
        )
        self.rtp = RtpPortPool(settings.rtp.host, settings.rtp.port_min, settings.rtp.port_max)
        self.limits = TokenBuckets(sip.rate_limit_per_second, sip.rate_limit_burst)
        self.digest = (
            DigestServer(sip.auth_realm, secrets.token_bytes(32), dict(sip.users))
            if sip.users
            else None
        )
        self.counters = UaCounters()
        self.calls: dict[tuple[str, str], SipCall] = {}  # (Call-ID, our tag)
        self._pending_invites: dict[str, _PendingInvite] = {}  # by INVITE transaction id
        self._clients: dict[str, _Client] = {}
        self.registrations: dict[str, Registration] = {}
        self._trunk_sources = [
            (name, [ipaddress.ip_network(s, strict=False) for s in trunk.inbound_sources])
            for name, trunk in settings.trunks.items()
        ]
        self._trunk_sources.append(
            ("(trusted)", [ipaddress.ip_network(s, strict=False) for s in sip.trusted_sources])
        )
        self._pacer = pacer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resolved: dict[str, str] = {}

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._pacer is None:
            self._pacer = MediaPacer(self._loop)
        await self.transport.start()
        for name, trunk in self.settings.trunks.items():
            if trunk.registration:
                reg = Registration(name)
                self.registrations[name] = reg
                reg.task = self.spawn(self._register_loop(name, trunk, reg))
        log.info(
            "sip user agent listening",
            extra={"host": self.settings.sip.host, "port": self.port, "transports": "udp,tcp"},
        )

    @property
    def port(self) -> int:
        return self.transport.port

    async def close(self) -> None:
        for call in list(self.calls.values()):
            await call.hangup("shutdown", 503)
        for reg in self.registrations.values():
            if reg.task is not None:
                reg.task.cancel()
        self._pump()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await self.transport.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task owned by the UA (cancelled on close, errors logged)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sip task failed", exc_info=task.exception())

    @property
    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- the pump ------------------------------------------------------------------------------
    def _on_message(self, message: Message, source: Address, transport: Transport) -> None:
        self.layer.receive(message, source, transport, self.now)
        self._pump()

    def _on_parse_error(
        self, error: SipMessageError, source: Address, transport: Transport
    ) -> None:
        response = error_response(error, to_tag=generate_tag())
        if response is None:
            self.counters.malformed_dropped += 1
            log.info("dropped unparseable message", extra={"source": source, "why": error.reason})
            return
        self.counters.malformed_answered += 1
        log.info(
            "answered malformed request",
            extra={"source": source, "status": response.status, "why": error.reason},
        )
        self.layer.send_stateless(response, source, transport)
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.layer.handle_timeout(self.now)
        self._pump()

    def _pump(self) -> None:
        layer = self.layer
        for _ in range(1000):  # bounded: each round handles what the previous one produced
            for out in layer.data_to_send():
                self.transport.send(out.data, out.destination, out.transport)
            events = layer.events_received()
            if not events:
                break
            for event in events:
                try:
                    self._handle(event)
                except Exception:
                    log.exception("sip event handler failed", extra={"event": type(event).__name__})
        at = layer.next_timeout()
        if at != self._timer_at and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = None if at is None else self._loop.call_at(at, self._on_timer)

    def _handle(self, event: TransactionEvent) -> None:
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, ResponseReceived):
            client = self._clients.get(event.transaction_id)
            if client is not None:
                if event.response.status >= 200:
                    del self._clients[event.transaction_id]
                client.on_response(event.response)
            elif event.response.is_success and event.request.method == "INVITE":
                # A 2xx retransmission after we gave up on the call: ACK and BYE it.
                self._ack_and_bye_stray(event.request, event.response, event.transaction_id)
        elif isinstance(event, TransactionTimeout | TransportFailure):
            client = self._clients.pop(event.transaction_id, None)
            reason = "timeout" if isinstance(event, TransactionTimeout) else event.reason
            if client is not None:
                client.on_failure(reason)
        elif isinstance(event, AckTimeout):
            # The INVITE carries no To tag (a first INVITE); our 2xx does: find the call by it.
            call = self._call_for(event.response)
            if call is not None and not call.is_ended:
                self.spawn(call.hangup("ack-timeout"))
        # UnmatchedResponse: a stray response (no transaction of ours) is dropped.

    # -- helpers -------------------------------------------------------------------------------
    def _via(self, transport: Transport) -> Via:
        return Via.new(transport.value, self.host, self.port)

    def _contact(self, transport: Transport, user: str = "worker") -> NameAddr:
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
        *,
        to_tag: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> SipResponse:
        response = make_response(
            request,
            status,
            reason,
            to_tag=to_tag or (generate_tag() if status > 100 else None),
            headers=[*self._common_headers(), *(headers or [])],
            body=body,
            content_type=content_type,
        )
        self.layer.send_response(response, self.now)
        return response

    def _call_for(self, message: SipRequest | SipResponse) -> SipCall | None:
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

    async def _resolve(self, host: str) -> str:
        try:
            ipaddress.ip_address(host.strip("[]"))
            return host.strip("[]")
        except ValueError:
            pass
        cached = self._resolved.get(host)
        if cached is not None:
            return cached
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        address = str(infos[0][4][0])
        self._resolved[host] = address
        return address

    def release_media(self, call: SipCall) -> None:
        if self._pacer is not None:
            self._pacer.remove(call)
        self.rtp.close(call.endpoint)
        self.calls.pop((call.call_id, call.local_tag), None)

    def _start_media(self, call: SipCall) -> None:
        if self._pacer is not None and call.stream is not None:
            self._pacer.add(call, call.tick)

    # -- requests ------------------------------------------------------------------------------
    def _request(self, event: RequestReceived) -> None:
        request = event.request
        method = request.method
        try:
            to_tag = request.to_tag
        except SipParseError as exc:
            self._respond(request, 400, exc.reason)
            return
        if method == "ACK":
            self._ack(request)
            return
        if method == "CANCEL":
            self._cancel(request)
            return
        if to_tag is not None:
            self._in_dialog(request, to_tag)
            return
        # A new request from outside any dialog: admission control first.
        source = event.source[0]
        if not self.limits.allow(source, self.now):
            self.counters.rate_limited += 1
            retry = str(self.limits.retry_after(source))
            self._respond(request, 503, "Rate Limited", headers=[("Retry-After", retry)])
            return
        try:
            max_forwards = request.max_forwards
        except SipParseError as exc:
            self._respond(request, 400, exc.reason)
            return
        if max_forwards == 0:
            self._respond(request, 483)
            return
        if method == "INVITE":
            self._new_invite(event)
        elif method == "OPTIONS":
            self._respond(request, 200, headers=[("Accept", SDP)])
        elif method in ("BYE", "INFO", "UPDATE", "PRACK"):
            self.counters.no_dialog += 1
            self._respond(request, 481)
        else:
            self._respond(request, 405, headers=[("Allow", ALLOW)])

    def _admit(self, event: RequestReceived) -> tuple[bool, str | None]:
        """Whether this INVITE may place a call: from a trunk's source, or digest-authenticated.
        Sends the 401/403 itself when not."""
        request = event.request
        trunk = self._trunk_for_source(event.source[0])
        if trunk is not None:
            return True, trunk
        if self.digest is None:
            self.counters.forbidden += 1
            log.warning("INVITE from an unknown source refused", extra={"source": event.source})
            self._respond(request, 403, "Source Not Allowed")
            return False, None
        header = request.headers.get("Authorization")
        if header is not None:
            result = self.digest.verify(header, request.method, self.now, body=request.body)
            if result.outcome is AuthOutcome.OK:
                return True, None
            if result.outcome is AuthOutcome.REJECTED:
                self.counters.forbidden += 1
                self._respond(request, 403, "Authentication Failed")
                return False, None
            stale = result.outcome is AuthOutcome.STALE
        else:
            stale = False
        self.counters.challenged += 1
        challenges = [
            ("WWW-Authenticate", c) for c in self.digest.challenges(self.now, stale=stale)
        ]
        self._respond(request, 401, headers=challenges)
        return False, None

    def _new_invite(self, event: RequestReceived) -> None:
        request = event.request
        tid = event.transaction_id
        assert tid is not None
        admitted, _trunk = self._admit(event)
        if not admitted:
            return
        setting_up = sum(1 for p in self._pending_invites.values() if p.call is None)
        if len(self.calls) + setting_up >= self.settings.sip.max_calls:
            self.counters.over_capacity += 1
            self._respond(request, 503, "Too Many Calls", headers=[("Retry-After", "5")])
            return
        require = request.headers.get("Require")
        if require:
            self._respond(request, 420, headers=[("Unsupported", require)])
            return
        if request.contact is None:
            self._respond(request, 400, "Missing Contact")
            return
        user = request.uri.user or ""
        if self.settings.route_for(user) is None:
            self.counters.no_route += 1
            self._respond(request, 404, "No Route")
            return
        offer: SessionDescription | None = None
        if request.body:
            if request.content_type != SDP:
                self._respond(request, 415, headers=[("Accept", SDP)])
                return
            try:
                offer = SessionDescription.parse(request.body)
                negotiate(offer, ("PCMU", "PCMA"), address=self.settings.rtp.host, port=9)
            except NoCommonCodecError as exc:
                self.counters.no_common_codec += 1
                self._respond(request, 488, str(exc)[:80])
                return
            except SdpParseError as exc:
                self._respond(request, 400, f"Bad SDP: {exc}"[:80])
                return
        self._pending_invites[tid] = _PendingInvite(request)
        self.spawn(self._setup_inbound(event, offer))

    async def _setup_inbound(
        self, event: RequestReceived, offer: SessionDescription | None
    ) -> None:
        request = event.request
        tid = event.transaction_id
        assert tid is not None
        call: SipCall | None = None
        try:
            endpoint = await self.rtp.open(
                lambda p, now: call.rtp_received(p, now) if call else None
            )
        except Exception as exc:
            if isinstance(exc, PortsExhaustedError):
                log.error("no RTP port for an incoming call", extra={"call_id": request.call_id})
            else:
                log.exception("cannot open RTP for an incoming call")
            if self._pending_invites.pop(tid, None) is not None:  # not CANCELled meanwhile
                self._respond(request, 503, "No Media Port")
                self._pump()
            return
        pending = self._pending_invites.get(tid)
        if pending is None:  # CANCELled while the port was being opened
            self.rtp.close(endpoint)
            return
        local_sdp = LocalSdp(self.settings.rtp.host)
        call = SipCall(
            self,
            call_id=request.call_id,
            direction="inbound",
            local_tag=generate_tag(),
            remote=event.source,
            transport=event.transport,
            endpoint=endpoint,
            local_sdp=local_sdp,
        )
        call.invite = request
        call.from_user = request.from_.uri.user or ""
        call.caller_name = request.from_.display_name or ""
        call.to_user = request.uri.user or ""
        call.offer = offer
        pending.call = call
        self.calls[(call.call_id, call.local_tag)] = call
        self.counters.calls_in += 1
        call.log.info(
            "incoming call",
            extra={"from": call.from_user, "to": call.to_user, "source": event.source},
        )
        if self.on_incoming is None:
            self._finish_unanswered(call, 480, "no-handler")
            return
        try:
            await self.on_incoming(call)
        except Exception:
            call.log.exception("incoming call handler failed")
            if not call.is_ended:
                await call.hangup("handler-error", 500)

    def _answer_sdp(self, call: SipCall) -> bytes:
        offer: SessionDescription | None = call.offer
        if offer is None:  # late offer: we offer in the 2xx, the answer comes in the ACK
            codecs = ("PCMU", "PCMA")
            return call.local_sdp.offer(call.endpoint.local[1], codecs=codecs).serialize()
        answer, media = call.local_sdp.answer(offer, call.endpoint.local[1])
        call.apply_media(media)
        return answer.serialize()

    def send_provisional(self, call: SipCall, early_media: bool) -> None:
        # 180 only before anything else; 183 with SDP also after a 180 (early media on demand).
        allowed = (CallState.INCOMING, CallState.RINGING) if early_media else (CallState.INCOMING,)
        if call.invite is None or call.direction != "inbound" or call.state not in allowed:
            return
        if early_media and call.offer is not None:
            body = self._answer_sdp(call)
            call.answered_at = self.now  # media starts with the 183
            self._respond(
                call.invite, 183, to_tag=call.local_tag, body=body, content_type=SDP,
                headers=[("Contact", str(self._contact(call.transport)))],
            )  # fmt: skip
            call.set_state(CallState.EARLY_MEDIA)
            self._start_media(call)
        else:
            self._respond(
                call.invite, 180, to_tag=call.local_tag,
                headers=[("Contact", str(self._contact(call.transport)))],
            )  # fmt: skip
            call.set_state(CallState.RINGING)
        self._pump()

    def answer_call(self, call: SipCall) -> None:
        if call.invite is None or call.direction != "inbound" or call.is_ended:
            return
        if call.state is CallState.ANSWERED:
            return
        if call.state is CallState.EARLY_MEDIA and call.offer is not None:
            body = call.local_sdp.answer(call.offer, call.endpoint.local[1])[0].serialize()
        else:
            body = self._answer_sdp(call)
        contact = self._contact(call.transport)
        call.answered_at = self.now  # before the 200 leaves: its timers (H) start from here
        response = self._respond(
            call.invite, 200, to_tag=call.local_tag, body=body, content_type=SDP,
            headers=[("Contact", str(contact))],
        )  # fmt: skip
        call.dialog = Dialog.from_uas(call.invite, response, contact)
        self._forget_pending(call)
        call.set_state(CallState.ANSWERED)
        if not call.answered.done():
            call.answered.set_result(None)
        self._start_media(call)
        call.log.info("answered", extra={"codec": call.media.codec if call.media else None})
        self._pump()

    def _forget_pending(self, call: SipCall) -> None:
        for tid, pending in list(self._pending_invites.items()):
            if pending.call is call:
                del self._pending_invites[tid]

    def _finish_unanswered(
        self, call: SipCall, status: int, cause: str, reason: str | None = None
    ) -> None:
        if call.invite is not None and not self.layer.invite_answered(call.invite):
            self._respond(call.invite, status, reason, to_tag=call.local_tag)
        self._forget_pending(call)
        call.finish(CallEnd(cause, status))
        self._pump()

    def _ack(self, request: SipRequest) -> None:
        call = self._call_for(request)
        if call is None or call.dialog is None:
            return
        call.dialog.confirm()
        if request.body and call.media is None:  # the answer to our offer in a late-offer 2xx
            try:
                offer = call.local_sdp.offer(call.endpoint.local[1])
                call.apply_media(process_answer(offer, SessionDescription.parse(request.body)))
                self._start_media(call)
            except (SdpParseError, NoCommonCodecError) as exc:
                call.log.warning("bad SDP answer in ACK", extra={"why": str(exc)})
                self.spawn(call.hangup("bad-sdp"))
        elif call.reoffer_pending and request.body:
            call.reoffer_pending = False
            try:
                offer = call.local_sdp.offer(call.endpoint.local[1])
                call.apply_media(process_answer(offer, SessionDescription.parse(request.body)))
            except (SdpParseError, NoCommonCodecError) as exc:
                call.log.warning("bad SDP answer in ACK", extra={"why": str(exc)})

    def _cancel(self, request: SipRequest) -> None:
        invite = self.layer.find_cancelled_invite(request)
        if invite is None:
            self._respond(request, 481)
            return
        self._respond(request, 200)
        if self.layer.invite_answered(invite):
            return
        for tid, pending in list(self._pending_invites.items()):
            if pending.invite is not invite:
                continue
            if pending.call is None:
                # Still opening its RTP port: answer 487 now; the setup finds itself gone.
                del self._pending_invites[tid]
                self._respond(invite, 487)
                return
            pending.call.log.info("cancelled by the caller")
            self._finish_unanswered(pending.call, 487, "cancelled")
            return
        self._respond(invite, 487)

    def _in_dialog(self, request: SipRequest, to_tag: str) -> None:
        call = self.calls.get((request.call_id, to_tag))
        if call is None or call.dialog is None or call.is_ended:
            self.counters.no_dialog += 1
            self._respond(request, 481)
            return
        try:
            call.dialog.receive_request(request)
        except OutOfOrderRequestError as exc:
            self._respond(
                request, 500, exc.reason if hasattr(exc, "reason") else "CSeq Out Of Order"
            )
            return
        method = request.method
        if method == "BYE":
            self._respond(request, 200)
            call.log.info("caller hung up")
            call.finish(CallEnd("remote-bye"))
        elif method == "INVITE":
            self._reinvite(call, request)
        elif method == "INFO":
            self._info(call, request)
        elif method in ("OPTIONS", "UPDATE"):
            self._respond(request, 200, headers=[("Accept", SDP)])
        else:
            self._respond(request, 405, headers=[("Allow", ALLOW)])

    def _reinvite(self, call: SipCall, request: SipRequest) -> None:
        contact = [("Contact", str(self._contact(call.transport)))]
        if not request.body:
            offer = call.local_sdp.offer(call.endpoint.local[1])
            call.reoffer_pending = True
            self._respond(request, 200, body=offer.serialize(), content_type=SDP, headers=contact)
            return
        try:
            remote = SessionDescription.parse(request.body)
            answer, media = call.local_sdp.answer(remote, call.endpoint.local[1])
        except NoCommonCodecError as exc:
            self._respond(request, 488, str(exc)[:80])
            return
        except SdpParseError as exc:
            self._respond(request, 400, f"Bad SDP: {exc}"[:80])
            return
        call.offer = remote
        call.apply_media(media)
        call.log.info("re-INVITE", extra={"hold": call.on_hold, "direction": str(media.direction)})
        self._respond(request, 200, body=answer.serialize(), content_type=SDP, headers=contact)
        if call.on_state is not None:
            call.on_state(call)

    def _info(self, call: SipCall, request: SipRequest) -> None:
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
            self._respond(request, 200)  # an INFO keep-alive
            return
        else:
            self._respond(
                request, 415, headers=[("Accept", "application/dtmf-relay, application/dtmf")]
            )
            return
        if digit is None or len(digit) != 1 or digit.upper() not in "0123456789*#ABCD":
            self._respond(request, 400, "Bad DTMF")
            return
        self._respond(request, 200)
        call.dtmf_received(digit.upper(), duration, "sip-info")

    # -- hanging up ----------------------------------------------------------------------------
    async def hangup_call(
        self, call: SipCall, cause: str, status: int, reason: str | None = None
    ) -> None:
        if call.is_ended:
            return
        if call.direction == "inbound" and call.dialog is None:
            self._finish_unanswered(call, status, cause, reason)
            return
        if call.direction == "outbound" and call.dialog is None:
            self._cancel_outbound(call, cause)
            return
        assert call.dialog is not None
        bye = call.dialog.create_request(
            "BYE", self._via(call.transport), headers=self._common_headers()
        )
        destination = await self._next_hop(call)
        self._send_client(bye, destination, call.transport, _Client(lambda r: None))
        call.finish(CallEnd(cause))
        self._pump()

    async def _next_hop(self, call: SipCall) -> Address:
        assert call.dialog is not None
        uri = call.dialog.next_hop()
        if call.direction == "inbound" and call.transport is Transport.TCP:
            return call.remote  # reuse the caller's connection
        host = await self._resolve(uri.address)
        return (host, uri.port or 5060)

    def _send_client(
        self, request: SipRequest, destination: Address, transport: Transport, client: _Client
    ) -> str:
        tid = self.layer.send_request(request, destination, transport, self.now)
        self._clients[tid] = client
        return tid

    def send_info_dtmf(self, call: SipCall, digit: str, duration_ms: int) -> bool:
        body = f"Signal={digit}\r\nDuration={duration_ms}\r\n".encode()
        return self.send_in_dialog(call, "INFO", body, "application/dtmf-relay")

    def send_in_dialog(
        self,
        call: SipCall,
        method: str,
        body: bytes = b"",
        content_type: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> bool:
        """Send an in-dialog request (INFO, NOTIFY, MESSAGE, OPTIONS); False without a dialog.
        The response is not awaited (jambonz's ``sip:request`` does not report it either)."""
        if call.dialog is None or call.is_ended:
            return False
        request = call.dialog.create_request(
            method,
            self._via(call.transport),
            body=body,
            content_type=content_type,
            headers=headers or (),
        )
        destination = call.remote if call.direction == "inbound" else call.destination
        self._send_client(request, destination, call.transport, _Client(lambda r: None))
        self._pump()
        return True

    # -- outbound calls ------------------------------------------------------------------------
    async def place_call(
        self,
        trunk_name: str,
        number: str,
        *,
        from_user: str | None = None,
        caller_name: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        ring_timeout_s: float = 60.0,
    ) -> SipCall:
        """Send an INVITE through a trunk; returns the call at once (await ``call.answered``)."""
        trunk = self.settings.trunks.get(trunk_name)
        if trunk is None:
            from worker.errors import ConfigError

            raise ConfigError(f"no trunk named {trunk_name!r}")
        transport = Transport.TCP if trunk.transport == "tcp" else Transport.UDP
        destination = (await self._resolve(trunk.host), trunk.port)
        call: SipCall | None = None
        endpoint = await self.rtp.open(lambda p, now: call.rtp_received(p, now) if call else None)
        local_sdp = LocalSdp(self.settings.rtp.host)
        call = SipCall(
            self,
            call_id=generate_call_id(self.host),
            direction="outbound",
            local_tag=generate_tag(),
            remote=destination,
            transport=transport,
            endpoint=endpoint,
            local_sdp=local_sdp,
        )
        call.destination = destination
        call.from_user = from_user or trunk.from_user or "worker"
        call.to_user = number
        call.caller_name = caller_name or ""
        domain = trunk.from_domain or trunk.host
        uri = SipUri(user=number, host=trunk.host, port=trunk.port)
        if transport is Transport.TCP:
            uri = uri.with_param("transport", "tcp")
        offer = local_sdp.offer(endpoint.local[1], codecs=tuple(trunk.codecs))
        call.offer = offer
        invite = SipRequest("INVITE", uri)
        h = invite.headers
        h.add("Via", str(self._via(transport)))
        h.add("Max-Forwards", "70")
        h.add(
            "From",
            str(
                NameAddr(
                    SipUri(user=call.from_user, host=domain),
                    call.caller_name or None,
                    (("tag", call.local_tag),),
                )
            ),
        )
        h.add("To", str(NameAddr(SipUri(user=number, host=domain))))
        h.add("Call-ID", call.call_id)
        h.add("CSeq", "1 INVITE")
        h.add("Contact", str(self._contact(transport)))
        for name, value in [*self._common_headers(), *(headers or [])]:
            h.add(name, value)
        h.add("Content-Type", SDP)
        invite.body = offer.serialize()
        call.invite = invite
        self.calls[(call.call_id, call.local_tag)] = call
        self.counters.calls_out += 1
        call.log.info("calling", extra={"to": number, "trunk": trunk_name})
        self._send_invite(call, invite, trunk, auth_tries=0)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(ring_timeout_s, lambda: self.spawn(self._ring_timeout(call)))
        call.ended.add_done_callback(lambda _: timer.cancel())
        call.answered.add_done_callback(lambda _: timer.cancel())
        self._pump()
        return call

    async def _ring_timeout(self, call: SipCall) -> None:
        if call.dialog is None and not call.is_ended:
            call.log.info("no answer in time")
            self._cancel_outbound(call, "no-answer")

    def _send_invite(
        self, call: SipCall, invite: SipRequest, trunk: TrunkSettings, auth_tries: int
    ) -> None:
        destination: Address = call.destination

        def on_response(response: SipResponse) -> None:
            self._invite_response(call, invite, trunk, auth_tries, response)

        def on_failure(reason: str) -> None:
            if not call.is_ended:
                call.finish(CallEnd("timeout" if reason == "timeout" else "transport-error", 408))

        tid = self._send_client(
            invite, destination, call.transport, _Client(on_response, on_failure)
        )
        call.invite_tid = tid

    def _invite_response(
        self, call: SipCall, invite: SipRequest, trunk: TrunkSettings, auth_tries: int,
        response: SipResponse,
    ) -> None:  # fmt: skip
        status = response.status
        if status < 200:
            if status in (180, 183):
                if response.body and call.media is None and self._apply_answer(call, response.body):
                    call.set_state(CallState.EARLY_MEDIA)
                    self._start_media(call)
                    return
                call.set_state(CallState.RINGING)
            return
        if 200 <= status < 300:
            dialog = Dialog.from_uac(invite, response)
            call.dialog = dialog
            ack = dialog.create_ack(self._via(call.transport))
            self.layer.send_ack(ack, call.destination, call.transport, self.now, call.invite_tid)
            if call.is_ended:  # we cancelled, but the 200 crossed the CANCEL: end it properly
                bye = dialog.create_request("BYE", self._via(call.transport))
                self._send_client(bye, call.destination, call.transport, _Client(lambda r: None))
                return
            if call.media is None and response.body:
                self._apply_answer(call, response.body)
            if call.media is None:
                call.log.warning("2xx without a usable SDP answer")
                self.spawn(call.hangup("bad-sdp"))
                return
            call.set_state(CallState.ANSWERED)
            call.answered_at = self.now
            if not call.answered.done():
                call.answered.set_result(None)
            self._start_media(call)
            call.log.info("answered", extra={"codec": call.media.codec})
            return
        if status in (401, 407) and trunk.username and trunk.password and auth_tries < 2:
            _, authorization = challenge_header_names(status)
            challenge_name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            try:
                challenge = choose_challenge(response.headers.get_all(challenge_name))
                client: DigestClient = call.digest or DigestClient(trunk.username, trunk.password)
                call.digest = client
                value = client.authorize(challenge, "INVITE", str(invite.uri), body=invite.body)
            except AuthError as exc:
                call.log.warning("cannot answer the challenge", extra={"why": str(exc)})
                call.finish(CallEnd("auth-failed", status, response.reason))
                return
            retry = SipRequest("INVITE", invite.uri, invite.headers.copy(), invite.body)
            retry.headers.set("Via", str(self._via(call.transport)))
            retry.headers.set("CSeq", f"{invite.cseq.number + 1} INVITE")
            retry.headers.remove("Authorization")
            retry.headers.remove("Proxy-Authorization")
            retry.headers.add(authorization, value)
            call.invite = retry
            self._send_invite(call, retry, trunk, auth_tries + 1)
            return
        cause = _FAILURE_CAUSES.get(status, "auth-failed" if status in (401, 407) else "rejected")
        if call.is_ended:
            return
        call.log.info("call failed", extra={"sip_status": status, "reason": response.reason})
        call.finish(CallEnd(cause, status, response.reason))

    def _apply_answer(self, call: SipCall, body: bytes) -> bool:
        try:
            if call.offer is None:
                raise SdpParseError("no offer of ours to match")
            media = process_answer(call.offer, SessionDescription.parse(body))
        except (SdpParseError, NoCommonCodecError) as exc:
            call.log.warning("unusable SDP answer", extra={"why": str(exc)})
            return False
        call.apply_media(media)
        return True

    def _cancel_outbound(self, call: SipCall, cause: str) -> None:
        if call.invite is not None and not call.is_ended:
            cancel = make_cancel(call.invite)
            self._send_client(cancel, call.destination, call.transport, _Client(lambda r: None))
        call.finish(CallEnd(cause, 487))
        self._pump()

    def _ack_and_bye_stray(self, invite: SipRequest, response: SipResponse, tid: str) -> None:
        try:
            dialog = Dialog.from_uac(invite, response)
        except Exception:
            return
        via = Via.new(invite.via.transport, self.host, self.port)
        destination = (invite.uri.address, invite.uri.port or 5060)
        transport = Transport.TCP if invite.via.transport == "TCP" else Transport.UDP
        self.layer.send_ack(dialog.create_ack(via), destination, transport, self.now, tid)
        bye = dialog.create_request("BYE", self._via(transport))
        self._send_client(bye, destination, transport, _Client(lambda r: None))

    # -- registration --------------------------------------------------------------------------
    async def _register_loop(self, name: str, trunk: TrunkSettings, reg: Registration) -> None:
        transport = Transport.TCP if trunk.transport == "tcp" else Transport.UDP
        call_id = generate_call_id(self.host)
        tag = generate_tag()
        user = trunk.username or trunk.from_user or "worker"
        domain = trunk.from_domain or trunk.host
        cseq = 0
        digest = DigestClient(trunk.username or "", trunk.password or "")
        while True:
            destination = (await self._resolve(trunk.host), trunk.port)
            authorization: tuple[str, str] | None = None
            response: SipResponse | None = None
            for _attempt in range(3):
                cseq += 1
                request = SipRequest("REGISTER", SipUri(host=domain, port=trunk.port))
                h = request.headers
                h.add("Via", str(self._via(transport)))
                h.add("Max-Forwards", "70")
                aor = NameAddr(SipUri(user=user, host=domain))
                h.add("From", str(aor.with_tag(tag)))
                h.add("To", str(aor))
                h.add("Call-ID", call_id)
                h.add("CSeq", f"{cseq} REGISTER")
                h.add("Contact", str(self._contact(transport, user)))
                h.add("Expires", str(trunk.registration_expires_s))
                for hname, value in self._common_headers():
                    h.add(hname, value)
                if authorization is not None:
                    h.add(*authorization)
                response = await self._request_and_wait(request, destination, transport)
                if response is None or response.status not in (401, 407):
                    break
                if not (trunk.username and trunk.password):
                    break
                try:
                    challenge = choose_challenge(
                        response.headers.get_all(
                            "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
                        )
                    )
                    value = digest.authorize(challenge, "REGISTER", str(request.uri))
                except AuthError as exc:
                    log.warning(
                        "registration challenge unusable", extra={"trunk": name, "why": str(exc)}
                    )
                    break
                authorization = (challenge_header_names(response.status)[1], value)
            reg.last_status = None if response is None else response.status
            if response is not None and response.is_success:
                expires = _granted_expiry(response, trunk.registration_expires_s)
                if reg.registered:
                    reg.refreshes += 1
                reg.registered = True
                reg.expires = expires
                reg.failures = 0
                reg.changed.set()
                log.info(
                    "registered",
                    extra={"trunk": name, "expires": expires, "refresh": reg.refreshes},
                )
                await asyncio.sleep(_refresh_delay(expires))
            else:
                reg.registered = False
                reg.failures += 1
                reg.changed.set()
                log.warning(
                    "registration failed",
                    extra={"trunk": name, "status": reg.last_status, "failures": reg.failures},
                )
                await asyncio.sleep(min(300.0, 5.0 * 2 ** min(reg.failures, 6)))

    async def _request_and_wait(
        self, request: SipRequest, destination: Address, transport: Transport
    ) -> SipResponse | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SipResponse | None] = loop.create_future()

        def done(value: SipResponse | None) -> None:
            if not future.done():
                future.set_result(value)

        self._send_client(request, destination, transport, _Client(done, lambda reason: done(None)))
        self._pump()
        return await future


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


def _refresh_delay(expires: int) -> float:
    """Refresh well before expiry: at 80 % of the interval, and at least 5 s before it."""
    return max(1.0, min(expires * 0.8, expires - 5.0))


__all__ = ["Registration", "SipCall", "UserAgent"]
