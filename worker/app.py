"""The composition root: builds the worker's parts once from settings and wires them together.

``Worker`` owns the media pacer, the ingresses (the SIP user agent, the Stasis application in
Asterisk, or both: ``ingress``), the RTP ports they share, the event bus and the routing of new
calls, which is the same for both; ``run_forever`` is what ``aispinner-worker run`` calls.
Routes: ``echo`` answers and returns the caller's audio (like Asterisk's Echo()), ``reject``
refuses with 403, ``agent`` bridges to a voice agent. Echo and agent calls both run as a
``CallSession`` (recorded when the route says so, their events published); only the driver
differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvloop

from worker import gcpause, heap, priority
from worker.ari.client import AriAuthError
from worker.ari.stasis import StasisApp
from worker.backend import Backend, BackendError
from worker.config import RouteSettings, Settings
from worker.errors import ConfigError, WorkerError
from worker.events.bus import EventBus, JsonlSink
from worker.legs import Leg
from worker.log import setup_logging
from worker.metrics import MetricsServer, process_metrics
from worker.pacer import MediaPacer
from worker.rtp import RtpPortPool
from worker.session.clock import LoopClock
from worker.session.drivers import driver_for
from worker.session.fetch import AudioFetcher
from worker.session.session import CallSession, SessionResult, SessionServices, tick_failed
from worker.session.tts import EspeakSynthesizer
from worker.sip.transport import WireFactory
from worker.sip.ua import UserAgent

log = logging.getLogger("worker.app")

SHUTDOWN_GRACE_S = 5.0
"""How long ``Worker.close`` waits for hung-up calls' sessions to tell their agents."""
RECENT_RESULTS = 256
"""How many finished calls' results ``Worker.results`` keeps (the newest)."""


class StartError(Exception):
    """The worker cannot start; the message names the setting to change."""


@dataclass(frozen=True, slots=True)
class Shard:
    """This worker is media process ``index`` of ``processes`` behind the front
    (``worker.front``): its SIP goes through ``wire``, the calls it places get Call-IDs that
    fall on it, its events go to ``events.<index>.jsonl`` and its own spool; its Stasis
    application takes the Asterisk calls that fall on it, from the events the front hands it."""

    index: int
    processes: int
    wire: WireFactory
    new_call_id: Callable[[str | None], str]
    """A Call-ID that falls on this process (``worker.front.shard.owned_call_id``)."""
    owns_ari_id: Callable[[str], bool]
    """Whether an Asterisk channel or bridge id falls on this process (``owns_ari_id``)."""
    new_ari_channel_id: Callable[[], str]
    """A channel id for an originate that falls on this process (``owned_channel_id``)."""


class Worker:
    def __init__(self, settings: Settings, shard: Shard | None = None) -> None:
        self.settings = settings
        self.shard = shard
        self.pacer: MediaPacer | None = None
        self.ua: UserAgent | None = None
        self.stasis: StasisApp | None = None
        self.backend: Backend | None = None
        self.worker_id = settings.worker_id or f"{socket.gethostname()}:{settings.sip.port}"
        if shard is not None:
            self.worker_id += f"/{shard.index}"
        self._tasks: set[asyncio.Task[Any]] = set()
        rtp = settings.rtp
        self.ports = RtpPortPool(rtp.host, rtp.port_min, rtp.port_max, nat_latch=rtp.nat_latch)
        self.bus = EventBus()
        self.sink: JsonlSink | None = None
        self.services: SessionServices | None = None
        self.fetcher: AudioFetcher | None = None
        self.results: deque[SessionResult] = deque(maxlen=RECENT_RESULTS)
        """The newest finished calls (bounded)."""
        self.sessions: dict[str, CallSession] = {}
        """Calls running right now, by call sid."""
        self._sessions_changed = asyncio.Event()
        self._closed = False
        self.metrics_server: MetricsServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.pacer = MediaPacer(loop)
        self.pacer.on_error = tick_failed  # a session whose tick raises ends its call
        shard = self.shard
        if "sip" in self.settings.ingress:
            if shard is None:
                self.ua = UserAgent(self.settings, self.on_incoming, ports=self.ports)
            else:
                self.ua = UserAgent(
                    self.settings,
                    self.on_incoming,
                    ports=self.ports,
                    wire=shard.wire,
                    new_call_id=shard.new_call_id,
                )
        if "ari" in self.settings.ingress:
            if shard is None:
                self.stasis = StasisApp(self.settings, self.ports, self.on_incoming)
            else:  # the front holds the events connection and hands this process its events
                self.stasis = StasisApp(
                    self.settings,
                    self.ports,
                    self.on_incoming,
                    own_events=False,
                    owns=shard.owns_ari_id,
                    new_channel_id=shard.new_ari_channel_id,
                )
        events = "events.jsonl" if shard is None else f"events.{shard.index}.jsonl"
        self.sink = JsonlSink(self.settings.data_dir / events)
        self.bus.subscribe(self.sink)
        if self.settings.store:
            self.backend = Backend(
                self.settings,
                self.bus,
                self.worker_id,
                role="all" if shard is None else "media",
                spool_name=events,
            )
            try:
                await self.backend.start(self.call_out)
            except BackendError as exc:
                await self.close()
                raise StartError(str(exc)) from exc
        metrics = self.settings.metrics
        if metrics.enabled and self.shard is None:  # behind a front, the front serves them
            server = MetricsServer(process_metrics().render, metrics.host, metrics.port)
            try:
                await server.start()
            except OSError as exc:
                await self.close()
                raise StartError(
                    f"cannot serve metrics on {metrics.host}:{metrics.port}"
                    f" ({exc.strerror or exc}): set metrics.host / metrics.port"
                    " (AISPINNER_METRICS__PORT) to a free address, or metrics.enabled = false"
                ) from exc
            self.metrics_server = server
        prompts = self.settings.data_dir / "prompts"
        prompts.mkdir(exist_ok=True)
        self.fetcher = AudioFetcher(
            allowed_root=prompts, allow_private_hosts=self.settings.private_urls_allowed()
        )
        self.services = SessionServices(
            settings=self.settings,
            synthesizer=EspeakSynthesizer(),
            fetcher=self.fetcher,
            publish=self.bus.publish,
            pacer=self.pacer,
            place_call=self.place_call,
            clock=LoopClock(loop),
        )
        sip = self.settings.sip
        if self.ua is not None:
            try:
                await self.ua.start()
            except OSError as exc:
                await self.close()
                raise StartError(
                    f"cannot listen for SIP on {sip.host}:{sip.port} ({exc.strerror or exc}): "
                    "set sip.host / sip.port (AISPINNER_SIP__HOST / AISPINNER_SIP__PORT) "
                    "to a free address"
                ) from exc
        if self.stasis is not None:
            try:
                await self.stasis.start()
            except AriAuthError as exc:
                await self.close()
                raise StartError(exc.advice(self.settings.ari.url)) from exc

    def stop_taking_calls(self) -> None:
        """Draining: a new call gets 503 from the SIP user agent, and one from Asterisk is hung
        up with ``congestion`` (503 to its caller); the calls up go on."""
        if self.ua is not None:
            self.ua.core.draining = True
        if self.stasis is not None:
            self.stasis.draining = True

    async def close(self) -> None:
        """Hang up every call, let their sessions report the end to their agents (bounded by
        ``SHUTDOWN_GRACE_S``), then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._end_sessions()
        for task in list(self._tasks):
            task.cancel()
        if self.backend is not None:
            await self.backend.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.stasis is not None:
            await self.stasis.close()
        if self.ua is not None:
            await self.ua.close()
        if self.pacer is not None:
            self.pacer.close()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        if self.sink is not None:
            await self.sink.close()

    async def wait_idle(self, within_s: float) -> bool:
        """Wait, at most ``within_s``, until no call is running; True if none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self.sessions and loop.time() < deadline:
            self._sessions_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_changed.wait(), deadline - loop.time())
        return not self.sessions

    async def _end_sessions(self) -> None:
        sessions = list(self.sessions.values())
        for session in sessions:
            session.hangup("shutdown", 503)
        if not sessions:
            return
        if not await self.wait_idle(SHUTDOWN_GRACE_S):
            log.warning("sessions still running at shutdown", extra={"count": len(self.sessions)})

    async def on_incoming(self, leg: Leg) -> None:
        route = self.settings.route_for(leg.info.to_user)
        if route is None:  # the UA already answered 404; kept for routes changed at runtime
            leg.hangup("no-route", 404)
            return
        if route.action == "reject":
            leg.hangup("rejected", 403)
        elif route.action == "agent" and route.agent_url is None:
            leg.log.error("agent route without agent_url", extra={"route": route.match})
            leg.hangup("no-agent", 503)
        else:
            await self.run_session(leg, route)

    async def originate(
        self,
        trunk: str,
        number: str,
        route: RouteSettings,
        *,
        from_user: str | None = None,
        ring_timeout_s: float = 60.0,
        session_id: asyncio.Future[str] | None = None,
    ) -> SessionResult:
        """Place a call through ``trunk`` and, once answered, bridge it to the route's agent.
        Returns when the call has ended (unanswered calls end as busy, no-answer or failed).
        A trunk of ``trunks`` goes through the SIP user agent; any other name is an Asterisk
        endpoint (``PJSIP/<number>@<trunk>``) when the ARI ingress is on."""
        if self.ua is not None and trunk in self.settings.trunks:
            leg: Leg = await self.ua.place_call(
                trunk, number, from_user=from_user, ring_timeout_s=ring_timeout_s
            )
        elif self.stasis is not None:
            leg = await self.stasis.place_call(
                trunk, number, from_user=from_user, ring_timeout_s=ring_timeout_s
            )
        else:
            raise ConfigError(f"no trunk named {trunk!r}")
        return await self.run_session(leg, route, session_id)

    async def call_out(
        self, number: str, trunk: str, route_match: str | None, from_user: str | None
    ) -> str:
        """Place an outbound call and run it in the background (the API's ``POST
        /telephony/calls``, ``aispinner-worker call``); returns its call id once its session
        exists. ``route_match``: the route (by its ``match``) whose agent takes the call;
        None: the first agent route."""
        route = self._route_named(route_match)
        loop = asyncio.get_running_loop()
        sid: asyncio.Future[str] = loop.create_future()

        async def run() -> None:
            try:
                await self.originate(trunk, number, route, from_user=from_user, session_id=sid)
            except Exception as exc:
                if not sid.done():
                    sid.set_exception(exc)
                else:
                    log.exception("outbound call failed")

        task = loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await sid

    def _route_named(self, match: str | None) -> RouteSettings:
        for route in self.settings.routes:
            if (match is None and route.action == "agent") or route.match == match:
                return route
        raise ConfigError(
            f"no route {match!r}" if match is not None else "no agent route for outbound calls"
        )

    async def place_call(
        self,
        trunk: str,
        number: str,
        /,
        *,
        from_user: str | None = None,
        ring_timeout_s: float = 60.0,
        near: Leg | None = None,
    ) -> Leg:
        """A ``dial``'s far leg: through Asterisk for an Asterisk call (joined to its bridge
        there, so its audio stays in Asterisk), else through the SIP user agent."""
        if near is not None and self.stasis is not None and self.stasis.owns(near):
            return await self.stasis.place_call(
                trunk, number, from_user=from_user, ring_timeout_s=ring_timeout_s, media=False
            )
        if self.ua is None:
            raise ConfigError("dial from a SIP call needs the sip ingress")
        return await self.ua.place_call(
            trunk, number, from_user=from_user, ring_timeout_s=ring_timeout_s
        )

    async def run_session(
        self, leg: Leg, route: RouteSettings, session_id: asyncio.Future[str] | None = None
    ) -> SessionResult:
        assert self.services is not None
        session = CallSession(leg, route, self.services)
        self.sessions[session.call_sid] = session
        if session_id is not None and not session_id.done():
            session_id.set_result(session.call_sid)
        try:
            result = await session.run(driver_for(session))
        finally:
            del self.sessions[session.call_sid]
            self._sessions_changed.set()
        self.results.append(result)
        counters = result.counters
        leg.log.info(
            "session done",
            extra={
                "status": result.status,
                "duration": result.duration_sec,
                "digits": result.digits,
                "reason": result.reason,
                "agent_audio_dropped_ms": round(counters.playout.dropped_ms),
                "agent_audio_cleared_ms": round(counters.agent_audio_cleared_ms),
                "agent_audio_trimmed_ms": round(counters.playout.trimmed_ms),
                "agent_invalid": counters.invalid_agent_messages,
                "agent_reconnects": counters.reconnects,
                "tick_moves": session.tick_moves,
                "recording": result.recording,
            },
        )
        return result


async def serve(settings: Settings, stop: asyncio.Event, now: asyncio.Event) -> None:
    """One process doing everything until ``stop``; then drain: new calls get 503, live calls
    may go on for ``drain_grace_s`` (or until ``now``), then they are hung up."""
    heap.tune()
    priority.to_realtime(settings.realtime_priority)
    worker = Worker(settings)
    await worker.start()
    frozen = gcpause.settle()
    log.info("started", extra={"gc_frozen_objects": frozen})
    try:
        await stop.wait()
        if worker.sessions and settings.drain_grace_s > 0:
            worker.stop_taking_calls()
            log.info(
                "draining: no new calls",
                extra={"calls": len(worker.sessions), "grace_s": settings.drain_grace_s},
            )
            idle = asyncio.ensure_future(worker.wait_idle(settings.drain_grace_s))
            cut = asyncio.ensure_future(now.wait())
            await asyncio.wait({idle, cut}, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            cut.cancel()
    finally:
        await worker.close()


Serve = Callable[[Settings, asyncio.Event, asyncio.Event], Awaitable[None]]
"""Runs until the first event (drain), or the second (now)."""


def run_forever(settings: Settings, serve_with: Serve | None = None) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code. The first signal drains
    (``drain_grace_s``), a second one ends the calls at once. ``serve_with``: what runs (this
    module's ``serve``, one process; ``aispinner-worker run`` passes the front's for several)."""
    setup_logging(settings.log.level, settings.log.format)
    run = serve_with or serve

    async def main() -> None:
        stop = asyncio.Event()
        now = asyncio.Event()

        def signalled() -> None:
            if stop.is_set():
                now.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, signalled)
        await run(settings, stop, now)

    try:
        uvloop.run(main())
    except (StartError, WorkerError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
