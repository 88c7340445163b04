"""The SIP user agent's asyncio adapter: it puts ``core.UserAgentCore`` on real sockets.

It owns the transport (UDP and TCP), the RTP port pool, name resolution, one loop timer for
the core's deadlines, a once-a-second RTP inactivity sweep, and the ``SipLeg`` of each call.
Every input (a message, a parse error, a timer, a resolved name, an opened port, a leg's
request) goes to the core, then ``_pump`` sends what the core wants sent and hands the core's
events to the legs. The rules live in the core; nothing here decides SIP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from worker.config import Settings
from worker.errors import ConfigError
from worker.legs import Address
from worker.rtp import PortsExhaustedError, RtpEndpoint, RtpPortPool
from worker.sip.core import (
    CallEnded,
    CallProgress,
    DtmfReceived,
    IncomingCall,
    MediaNegotiated,
    Registration,
    RegistrationChanged,
    ResolveHost,
    UaCall,
    UaCounters,
    UaEvent,
    UserAgentCore,
)
from worker.sip.leg import SipLeg
from worker.sip.message import Message, SipMessageError, generate_call_id
from worker.sip.transaction import OutgoingMessage, Transport
from worker.sip.transport import SipTransport, SipWire, WireFactory

IncomingHandler = Callable[[SipLeg], Awaitable[None]]

RESOLVE_TIMEOUT_S = 5.0
SWEEP_INTERVAL_S = 1.0
CLOSE_GRACE_S = 2.0
"""How long ``close`` waits for the answers to the BYEs it sends."""
log = logging.getLogger("worker.sip.ua")


class UserAgent:
    """See the module docstring. ``on_incoming(leg)`` decides what to do with each new call."""

    def __init__(
        self,
        settings: Settings,
        on_incoming: IncomingHandler | None = None,
        *,
        ports: RtpPortPool | None = None,
        wire: WireFactory | None = None,
        new_call_id: Callable[[str | None], str] = generate_call_id,
    ) -> None:
        self.settings = settings
        sip = settings.sip
        self.on_incoming = on_incoming
        self.core = UserAgentCore(settings, new_call_id=new_call_id)
        self.transport: SipWire
        if wire is not None:
            self.transport = wire(self._on_message, self._on_parse_error)
        else:
            self.transport = SipTransport.from_settings(sip, self._on_message, self._on_parse_error)
        rtp = settings.rtp
        self.rtp = ports or RtpPortPool(
            rtp.host, rtp.port_min, rtp.port_max, nat_latch=rtp.nat_latch
        )
        self.legs: dict[UaCall, SipLeg] = {}
        self.registration_changed: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pumping = False
        self._again = False
        self._answered: asyncio.Event | None = None  # set while closing

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.transport.start()
        self.core.port = self.transport.port
        for name, trunk in self.settings.trunks.items():
            if trunk.registration:
                self.registration_changed[name] = asyncio.Event()
                self.core.start_registration(name, self.now)
        self._pump()
        self._sweep = self._loop.call_later(SWEEP_INTERVAL_S, self._sweep_inactive)
        log.info(
            "sip user agent listening",
            extra={"host": self.settings.sip.host, "port": self.port, "transports": "udp,tcp"},
        )

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def local_address(self) -> Address:
        return (self.core.host, self.port)

    @property
    def counters(self) -> UaCounters:
        return self.core.counters

    @property
    def calls(self) -> dict[tuple[str, str], UaCall]:
        return self.core.calls

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.core.registrations

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Hang up every call, wait (at most ``grace_s``) for the answers to the BYEs and
        CANCELs that sends, then stop."""
        if self._loop is not None:
            self._answered = asyncio.Event()
            self.core.close(self.now)
            self._pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in (self._timer, self._sweep):
            if handle is not None:
                handle.cancel()
        self._timer = self._sweep = None
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

    # -- inputs ----------------------------------------------------------------------------------
    def _on_message(self, message: Message, source: Address, transport: Transport) -> None:
        with self._pumped("message"):
            self.core.receive(message, source, transport, self.now)

    def _on_parse_error(
        self, error: SipMessageError, source: Address, transport: Transport
    ) -> None:
        with self._pumped("parse error"):
            self.core.parse_error(error, source, transport, self.now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        with self._pumped("timer"):
            self.core.handle_timeout(self.now)

    def _send_failed(self, transaction_id: str, reason: str) -> None:
        with self._pumped("send failure"):
            self.core.transport_failed(transaction_id, reason, self.now)

    @contextlib.contextmanager
    def _pumped(self, what: str) -> Iterator[None]:
        """Run one input through the core, then pump, whatever happened: a bug the input finds
        is logged, and the core's timer is always re-armed."""
        try:
            yield
        except Exception:
            log.exception("sip core failed on an input", extra={"input": what})
        finally:
            self._pump()

    # -- the pump ----------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Send what the core wants sent, hand its events on, re-arm its timer. A leg request
        made while events are being handed on is picked up by the running pump."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            for _ in range(1000):  # bounded: each round handles what the previous one produced
                self._again = False
                for out in self.core.data_to_send():
                    self._send(out)
                events = self.core.events()
                for event in events:
                    try:
                        self._dispatch(event)
                    except Exception:
                        log.exception("sip event handler failed", extra={"event": repr(event)})
                if not events and not self._again:
                    break
        finally:
            self._pumping = False
        if self._answered is not None and not self.core.requests_in_flight:
            self._answered.set()  # closing: every BYE has its answer
        at = self.core.next_timeout()
        if at != self._timer_at and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = None if at is None else self._loop.call_at(at, self._on_timer)

    def _send(self, out: OutgoingMessage) -> None:
        tid = out.transaction_id
        on_failure = None if tid is None else (lambda reason: self._send_failed(tid, reason))
        self.transport.send(out.data, out.destination, out.transport, on_failure)

    def _dispatch(self, event: UaEvent) -> None:
        now = self.now
        if isinstance(event, MediaNegotiated | CallProgress | DtmfReceived):
            leg = self.legs.get(event.call)
            if leg is None:
                return
            if isinstance(event, MediaNegotiated):
                try:
                    leg.apply_media(event.media, now)
                except Exception:
                    # A call whose media cannot be set up ends now (500, or a BYE once
                    # answered) rather than going on without audio.
                    event.call.log.exception("cannot set up the call's media; ending it")
                    self.core.hangup(event.call, "worker-error", 500, "media setup failed", now=now)
            elif isinstance(event, CallProgress):
                leg.progress(event.phase, now)
            else:
                leg.dtmf_info(event.digit, event.duration_ms)
        elif isinstance(event, CallEnded):
            leg = self.legs.pop(event.call, None)
            if leg is not None:
                leg.finish(event.end, now)
                self.rtp.close(leg.endpoint)
        elif isinstance(event, IncomingCall):
            self.spawn(self._setup_inbound(event.call))
        elif isinstance(event, ResolveHost):
            self.spawn(self._resolve(event.host))
        elif isinstance(event, RegistrationChanged):
            changed = self.registration_changed.get(event.registration.trunk)
            if changed is not None:
                changed.set()

    # -- what the core asks for ------------------------------------------------------------------
    async def _resolve(self, host: str) -> None:
        address: str | None = None
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, None, type=socket.SOCK_DGRAM
                )
            address = str(infos[0][4][0]) if infos else None
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            log.warning("name resolution failed", extra={"host": host, "why": str(exc)})
        self.core.host_resolved(host, address, self.now)
        self._pump()

    async def _setup_inbound(self, call: UaCall) -> None:
        try:
            endpoint = await self.rtp.open()
        except (PortsExhaustedError, OSError) as exc:
            call.log.error("cannot open RTP for an incoming call", extra={"why": str(exc)})
            self.core.media_failed(call, self.now)
            self._pump()
            return
        if not self.core.media_opened(call, endpoint.local[1], self.now):
            self.rtp.close(endpoint)  # CANCELled while the port was being opened
            return
        leg = self._new_leg(call, endpoint)
        if self.on_incoming is None:
            self.hangup_call(call, "no-handler", 480, None)
            return
        try:
            await self.on_incoming(leg)
        except Exception:
            call.log.exception("incoming call handler failed")
            self.hangup_call(call, "handler-error", 500, None)

    def _sweep_inactive(self) -> None:
        """Once a second, whatever the media ticks do: RTCP reports that are due, and the end
        of calls whose media cannot be sent, that outlived ``sip.max_call_seconds``, or whose
        peer stopped sending."""
        assert self._loop is not None
        now = self.now
        limit = self.settings.rtp.inactivity_timeout_s
        max_call = self.settings.sip.max_call_seconds
        for call, leg in list(self.legs.items()):
            leg.rtcp_tick(now)
            if leg.media_unsendable():
                leg.log.warning("RTP cannot be sent to the peer's media address")
                self.core.hangup(call, "media-unsendable", now=now)
                continue
            if leg.answered_at is not None and now - leg.answered_at > max_call:
                leg.log.warning("call longer than sip.max_call_seconds")
                self.core.hangup(call, "session-limit", now=now)
                continue
            silent = leg.inactive_for(now)
            if silent > limit:
                leg.log.warning("no RTP from the peer", extra={"seconds": round(silent, 1)})
                self.core.hangup(call, "rtp-timeout", now=now)
        self._pump()
        self._sweep = self._loop.call_later(SWEEP_INTERVAL_S, self._sweep_inactive)

    # -- LegControl: what legs ask -------------------------------------------------------------
    def ring_call(self, call: UaCall, early_media: bool) -> None:
        self.core.ring(call, self.now, early_media=early_media)
        self._pump()

    def answer_call(self, call: UaCall) -> None:
        self.core.answer(call, self.now)
        self._pump()

    def hangup_call(self, call: UaCall, cause: str, status: int, reason: str | None) -> None:
        self.core.hangup(call, cause, status, reason, now=self.now)
        self._pump()

    def send_in_dialog(
        self,
        call: UaCall,
        method: str,
        body: bytes,
        content_type: str | None,
        headers: list[tuple[str, str]],
    ) -> bool:
        sent = self.core.send_in_dialog(call, method, self.now, body, content_type, headers)
        self._pump()
        return sent

    def send_info_dtmf(self, call: UaCall, digit: str, duration_ms: int) -> bool:
        sent = self.core.send_info_dtmf(call, digit, duration_ms, self.now)
        self._pump()
        return sent

    # -- outbound calls ----------------------------------------------------------------------------
    async def place_call(
        self,
        trunk_name: str,
        number: str,
        *,
        from_user: str | None = None,
        caller_name: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        ring_timeout_s: float = 60.0,
    ) -> SipLeg:
        """Send an INVITE through a trunk; returns the leg at once (its events, or the
        ``answered`` / ``ended`` futures, tell what happens)."""
        if trunk_name not in self.settings.trunks:
            raise ConfigError(f"no trunk named {trunk_name!r}")
        endpoint = await self.rtp.open()
        call = self.core.place_call(
            trunk_name,
            number,
            endpoint.local[1],
            self.now,
            from_user=from_user,
            caller_name=caller_name,
            headers=headers or (),
            ring_timeout_s=ring_timeout_s,
        )
        leg = self._new_leg(call, endpoint)
        self._pump()
        return leg

    def _new_leg(self, call: UaCall, endpoint: RtpEndpoint) -> SipLeg:
        leg = SipLeg(
            self, call, endpoint, self.settings.rtp, self.now, ntp_offset=time.time() - self.now
        )
        endpoint.attach(leg)
        self.legs[call] = leg
        return leg


__all__ = ["IncomingHandler", "SipLeg", "UserAgent"]
