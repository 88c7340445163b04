"""``TwilioDriver``: a call driven by a Twilio Media Streams agent (a bidirectional
``<Connect><Stream>``), with the worker in Twilio's place.

While the caller hears ringing it connects and sends ``connected`` and ``start``, then answers
(an agent that cannot be reached fails the call with 480 instead of answering it and hanging up
at once); then µ-law ``media`` every 20 ms, ``dtmf``, and ``stop`` at the end. It takes
``media``, ``mark`` and ``clear`` from the agent: marks are echoed when the audio before them
has played (or was cleared). The agent ends the call by closing the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from media.g711 import ulaw_decode, ulaw_encode
from worker.agent import twilio as tw
from worker.agent.connection import (
    AgentConnectError,
    TwilioClosed,
    TwilioConnection,
    TwilioConnectionEvent,
)
from worker.legs import SAMPLE_RATE
from worker.session.jambonz_driver import LOGGED_INVALID
from worker.session.pipeline import AgentSink
from worker.session.session import AgentCounters, CallSession, MarkEvent
from worker.session.status import StatusChange


class TwilioDriver:
    def __init__(self, session: CallSession) -> None:
        self.session = session
        self.log = session.log
        self.connection: TwilioConnection | None = None
        self._failure: str | None = None
        self._closed = asyncio.Event()
        self._invalid = 0
        self._dropped_ms = 0.0

    @property
    def failure(self) -> str | None:
        return self._failure

    async def run(self) -> None:
        session = self.session
        route = session.route
        stream = tw.stream_for_call(session.call_sid, route.custom_parameters)
        connection = TwilioConnection(
            route.agent_url or "",
            stream,
            on_event=self.on_agent_event,
            logger=self.log,
            metrics=session.metrics,
        )
        session.ring()
        try:
            await connection.connect()
        except AgentConnectError as exc:
            self.log.warning("agent unreachable", extra={"why": str(exc)})
            self._failure = str(exc)
            session.fail_unanswered(480)
            session.hangup("agent-unreachable", 480)
            return
        self.connection = connection
        session.pipeline.sink = AgentSink(self._send_caller_audio, SAMPLE_RATE)
        try:
            await session.answer()
            await self._closed.wait()  # the agent ends the stream by closing the socket
        finally:
            session.pipeline.sink = None

    def _send_caller_audio(self, pcm: bytes) -> None:
        if self.connection is not None:
            self.connection.send_media(ulaw_encode(pcm))

    def on_agent_event(self, event: TwilioConnectionEvent) -> None:
        pipeline = self.session.pipeline
        if isinstance(event, tw.MediaReceived):
            pipeline.agent_audio(ulaw_decode(event.ulaw), SAMPLE_RATE, self.session.clock.now())
        elif isinstance(event, tw.MarkRequested):
            try:
                pipeline.mark(event.name)
            except ValueError as exc:
                self._invalid_from_agent(str(exc))
        elif isinstance(event, tw.Clear):
            self.session.clear_agent_audio()
        elif isinstance(event, tw.InvalidTwilioMessage):
            self._invalid_from_agent(event.reason)
        elif isinstance(event, TwilioClosed):
            self._closed.set()

    def _invalid_from_agent(self, why: str) -> None:
        self._invalid += 1
        if self._invalid <= LOGGED_INVALID:
            self.log.info("invalid message from agent", extra={"why": why})

    def on_status(self, change: StatusChange) -> None:
        return None  # Twilio tells a stream nothing about the call's status

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        if self.connection is not None:
            self.connection.send_dtmf(digit)

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        # Twilio echoes a mark when its audio played, and every outstanding one on clear.
        if self.connection is not None:
            for name in names:
                self.connection.send_mark(name)

    def counters(self) -> AgentCounters:
        dropped = self._dropped_ms
        if self.connection is not None:
            dropped += self.connection.dropped_ms
        return AgentCounters(invalid_agent_messages=self._invalid, agent_audio_dropped_ms=dropped)

    async def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            await connection.close()
            self._dropped_ms += connection.dropped_ms
