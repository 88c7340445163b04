"""The composition root: builds the worker's parts once from settings and wires them together.

``Worker`` owns the media pacer, the SIP user agent and the routing of new calls; ``run_forever``
is what ``aispinner-worker run`` calls. Routes: ``echo`` answers and returns the caller's audio
(like Asterisk's Echo()), ``reject`` refuses with 403, ``agent`` bridges to a voice agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import deque

import uvloop

from worker.config import RouteSettings, Settings
from worker.events.bus import EventBus, JsonlSink
from worker.log import setup_logging
from worker.pacer import MediaPacer
from worker.session.fetch import AudioFetcher
from worker.session.session import CallSession, SessionResult, SessionServices
from worker.session.tts import EspeakSynthesizer
from worker.sip.call import SipCall
from worker.sip.ua import UserAgent

log = logging.getLogger("worker.app")

SHUTDOWN_GRACE_S = 5.0
"""How long ``Worker.close`` waits for hung-up calls' sessions to tell their agents."""


class EchoRoute:
    """Returns the caller's audio to the caller, frame for frame (bounded to 200 ms)."""

    def __init__(self, call: SipCall) -> None:
        self._frames: deque[bytes] = deque(maxlen=10)
        call.on_audio = self._on_audio
        call.audio_source = self._next

    def _on_audio(self, frame: bytes, now: float) -> None:
        self._frames.append(frame)

    def _next(self, now: float) -> bytes | None:
        return self._frames.popleft() if self._frames else None


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pacer: MediaPacer | None = None
        self.ua: UserAgent | None = None
        self.bus = EventBus()
        self.sink: JsonlSink | None = None
        self.services: SessionServices | None = None
        self.fetcher: AudioFetcher | None = None
        self.results: list[SessionResult] = []
        self.sessions: dict[str, CallSession] = {}
        """Calls bridged to an agent right now, by call sid."""
        self._sessions_changed = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.pacer = MediaPacer(loop)
        self.ua = UserAgent(self.settings, self.on_incoming, pacer=self.pacer)
        self.sink = JsonlSink(self.settings.data_dir / "events.jsonl")
        self.bus.subscribe(self.sink)
        prompts = self.settings.data_dir / "prompts"
        prompts.mkdir(exist_ok=True)
        self.fetcher = AudioFetcher(allowed_root=prompts)
        self.services = SessionServices(
            settings=self.settings,
            synthesizer=EspeakSynthesizer(),
            fetcher=self.fetcher,
            publish=self.bus.publish,
            place_call=self.ua.place_call,
        )
        await self.ua.start()

    async def close(self) -> None:
        """Hang up every call, let their sessions report the end to their agents (bounded by
        ``SHUTDOWN_GRACE_S``), then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._end_sessions()
        if self.ua is not None:
            await self.ua.close()
        if self.pacer is not None:
            self.pacer.close()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        if self.sink is not None:
            await self.sink.close()

    async def _end_sessions(self) -> None:
        sessions = list(self.sessions.values())
        for session in sessions:
            await session.call.hangup("shutdown", 503)
        if not sessions:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S
        while self.sessions and loop.time() < deadline:
            self._sessions_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sessions_changed.wait(), deadline - loop.time())
        if self.sessions:
            log.warning("sessions still running at shutdown", extra={"count": len(self.sessions)})

    async def on_incoming(self, call: SipCall) -> None:
        route = self.settings.route_for(call.to_user)
        if route is None:  # the UA already answered 404; kept for routes changed at runtime
            await call.hangup("no-route", 404)
            return
        if route.action == "reject":
            await call.hangup("rejected", 403)
        elif route.action == "echo":
            EchoRoute(call)
            await call.answer()
        else:
            await self.bridge_to_agent(call, route)

    async def originate(
        self, trunk: str, number: str, route: RouteSettings, *, from_user: str | None = None
    ) -> SessionResult:
        """Place a call through ``trunk`` and, once answered, bridge it to the route's agent.
        Returns when the call has ended (unanswered calls end as busy, no-answer or failed)."""
        assert self.ua is not None
        call = await self.ua.place_call(trunk, number, from_user=from_user)
        return await self._run_session(call, route)

    async def bridge_to_agent(self, call: SipCall, route: RouteSettings) -> None:
        if route.agent_url is None:
            call.log.error("agent route without agent_url", extra={"route": route.match})
            await call.hangup("no-agent", 503)
            return
        await self._run_session(call, route)

    async def _run_session(self, call: SipCall, route: RouteSettings) -> SessionResult:
        assert self.services is not None
        session = CallSession(call, route, self.services)
        self.sessions[session.call_sid] = session
        try:
            result = await session.run()
        finally:
            del self.sessions[session.call_sid]
            self._sessions_changed.set()
        self.results.append(result)
        call.log.info(
            "session done",
            extra={
                "status": result.status,
                "duration": result.duration_sec,
                "digits": result.digits,
                "reason": result.reason,
                "agent_audio_dropped_ms": round(result.counters.playout.dropped_ms),
                "agent_invalid": result.counters.invalid_agent_messages,
                "agent_reconnects": result.counters.reconnects,
            },
        )
        return result


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    worker = Worker(settings)
    await worker.start()
    try:
        await stop.wait()
    finally:
        await worker.close()


def run_forever(settings: Settings) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code."""
    setup_logging(settings.log.level, settings.log.format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        uvloop.run(main())
    except OSError as exc:  # typically the SIP port is taken
        log.error("cannot start: %s", exc)
        return 1
    return 0
