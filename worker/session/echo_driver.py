"""``EchoDriver``: the ``echo`` route. It answers and plays the caller's audio back, like
Asterisk's ``Echo()``, through the same session as an agent call (so the call is recorded when
the route says so, and its events are published); the echo is one tick (20 ms) behind."""

from __future__ import annotations

from collections.abc import Sequence

from worker.legs import SAMPLE_RATE
from worker.session.pipeline import AgentSink
from worker.session.session import AgentCounters, CallSession, MarkEvent
from worker.session.status import StatusChange


class EchoDriver:
    def __init__(self, session: CallSession) -> None:
        self.session = session

    @property
    def failure(self) -> str | None:
        return None

    async def run(self) -> None:
        session = self.session
        session.pipeline.sink = AgentSink(self._echo, SAMPLE_RATE, echoes=True)
        await session.answer()
        await session.wait_ended()

    def _echo(self, pcm: bytes) -> None:
        self.session.pipeline.agent_audio(pcm, SAMPLE_RATE)

    def on_status(self, change: StatusChange) -> None:
        return None

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        return None

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        return None

    def counters(self) -> AgentCounters:
        return AgentCounters()

    async def close(self) -> None:
        self.session.pipeline.sink = None
