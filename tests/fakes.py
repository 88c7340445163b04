"""Typed test doubles for driving a ``CallSession`` without sockets: a ``Leg`` that reports
what the session asks of it, a synthesizer, a prompt fetcher and a jambonz control channel;
``make_session`` wires them with a ``ManualClock``."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.agent.connection import AckOutcome, AgentConnectError
from worker.agent.jambonz import AckReceived
from worker.agent.verbs import Hook, Verb, hook_url
from worker.config import RouteSettings, Settings, load_settings
from worker.events import models as ev
from worker.legs import (
    FRAME_BYTES,
    Direction,
    Leg,
    LegAnswered,
    LegEarlyMedia,
    LegEnd,
    LegEnded,
    LegEvent,
    LegInfo,
    LegObserver,
    LegRinging,
    MediaQuality,
)
from worker.log import CallLogger, call_logger
from worker.session.clock import ManualClock
from worker.session.jambonz_driver import JambonzDriver
from worker.session.session import CallSession, SessionServices
from worker.session.verbs import VERB_HANDLERS, handle_command

FRAME = FRAME_BYTES


class FakeLeg:
    """A ``Leg`` whose far end does what it is told at once: ``answer`` answers, ``hangup``
    ends. Tests read what the session asked (``hangups``, ``dtmf_sent``, ``frames_sent``) and
    feed it with ``emit`` and ``incoming``."""

    def __init__(
        self,
        *,
        direction: Direction = "inbound",
        telephone_event: bool = True,
        clock: ManualClock | None = None,
    ) -> None:
        self._info = LegInfo(
            call_id="cid",
            direction=direction,
            from_user="alice",
            to_user="100",
            caller_name="",
            local_address=("127.0.0.1", 5060),
            remote_address=("127.0.0.1", 5062),
            codec="PCMU",
        )
        self._log = call_logger("cid", "test.session")
        self.clock = clock
        self.telephone_event = telephone_event
        self.observer: LegObserver | None = None
        self.answered = False
        self.ended = False
        self.rang: list[bool] = []
        self.native_bridge = False  # whether connect() bridges inside the carrier
        self.connected_to: list[Leg] = []
        self.hangups: list[str] = []
        self.hangup_statuses: list[int] = []
        self.dtmf_sent: list[tuple[str, int, float]] = []
        self.requests: list[tuple[str, str | None, str | None]] = []
        self.frames_sent: list[bytes] = []
        self.incoming: deque[bytes] = deque()
        self.due: float | None = None  # what frame_due() says
        self._pulled_at: float | None = None

    @property
    def info(self) -> LegInfo:
        return self._info

    @property
    def log(self) -> CallLogger:
        return self._log

    def attach(self, observer: LegObserver) -> None:
        self.observer = observer

    def emit(self, event: LegEvent) -> None:
        assert self.observer is not None
        self.observer.on_leg_event(event)

    def ring(self, early_media: bool = False) -> None:
        if self.answered or self.ended:
            return
        self.rang.append(early_media)
        self.emit(LegEarlyMedia("PCMU", self.telephone_event) if early_media else LegRinging())

    def answer(self) -> None:
        if self.answered or self.ended:
            return
        self.answered = True
        self.emit(LegAnswered("PCMU", self.telephone_event))

    def far_end_answers(self) -> None:
        """The far end answers (an outbound leg)."""
        self.answer()

    def hangup(
        self, cause: str = "local-hangup", status: int = 480, reason: str | None = None
    ) -> None:
        if self.ended:
            return
        self.hangups.append(cause)
        self.hangup_statuses.append(status)
        self.end(LegEnd(cause, None if self.answered else status, reason))

    def end(self, end: LegEnd) -> None:
        """The far end (or the network) ends the leg."""
        if self.ended:
            return
        self.ended = True
        self.emit(LegEnded(end))

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        now = self.clock.now() if self.clock is not None else 0.0
        self.dtmf_sent.append((digit, duration_ms, now))
        return True

    def send_request(
        self,
        method: str,
        content_type: str | None = None,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        if not self.answered or self.ended:
            return False
        self.requests.append((method, content_type, content))
        return True

    def pull_frame(self, now: float) -> bytes | None:
        """The next incoming frame, one per tick (``now``): a frame is due once per 20 ms."""
        if not self.incoming or now == self._pulled_at:
            return None
        self._pulled_at = now
        return self.incoming.popleft()

    def send_frame(self, pcm: bytes) -> None:
        self.frames_sent.append(pcm)

    def frame_due(self) -> float | None:
        return self.due

    def arrive(self, frame: bytes, now: float) -> None:
        """The caller's next frame arrives at ``now`` (after that moment's tick, if any)."""
        self.incoming.append(frame)
        self._pulled_at = None
        if self.observer is not None:
            self.observer.on_caller_audio(now)

    def quality(self) -> MediaQuality:
        return MediaQuality(packets_in=len(self.frames_sent))

    def connect(self, other: Leg) -> bool:
        self.connected_to.append(other)
        return self.native_bridge


class FakeFetcher:
    def __init__(self, frames: int = 2) -> None:
        self.fetches = 0
        self.frames = frames

    async def fetch(self, url: str, rate: int) -> bytes:
        self.fetches += 1
        return b"\x10\x00" * (FRAME // 2) * self.frames


class FakeSynth:
    def __init__(self) -> None:
        self.calls = 0

    async def synthesize(
        self,
        text: str,
        *,
        language: str | None = None,
        voice: str | None = None,
        sample_rate: int = 8000,
    ) -> bytes:
        self.calls += 1
        return b"\x10\x00" * (FRAME // 2) * 2


class FakeControl:
    """The jambonz control socket as the driver uses it: hooks are acked empty at once."""

    def __init__(
        self,
        verbs: Sequence[Verb] = (),
        *,
        ack: AckOutcome | None = None,
        refuse: bool = False,
    ) -> None:
        self.hooks: list[tuple[str, dict[str, Any]]] = []
        self.hook_verbs: deque[tuple[Verb, ...]] = deque()
        """Verbs to return in the acks of the next hooks (one tuple per hook)."""
        self.errors: list[tuple[str, str]] = []
        self.statuses: list[tuple[str, float | None]] = []
        self.verb_events: list[tuple[str, str]] = []
        self.session_new_data: dict[str, Any] | None = None
        self.notify_events = False
        self.closed = False
        self._ack = ack or AckReceived(
            msgid="s", for_type="session:new", verbs=tuple(verbs), request_msgid="s"
        )
        self._refuse = refuse

    async def connect(self) -> None:
        if self._refuse:
            raise AgentConnectError("ws://agent.test", "refused", "connection refused")

    async def session_new(self, data: Mapping[str, Any]) -> AckOutcome:
        self.session_new_data = dict(data)
        return self._ack

    async def verb_hook(
        self,
        hook: Hook,
        call_info: Mapping[str, Any],
        results: Mapping[str, Any] | None = None,
        verb_id: str | None = None,
    ) -> AckOutcome:
        self.hooks.append((hook_url(hook), dict(results or {})))
        verbs = self.hook_verbs.popleft() if self.hook_verbs else None
        return AckReceived(msgid="m", for_type="verb:hook", verbs=verbs, request_msgid="m")

    def call_status(self, call_info: Mapping[str, Any], duration: float | None = None) -> object:
        self.statuses.append((call_info["call_status"], duration))
        return None

    def verb_status(self, event: str, *, verb: str, verb_id: str | None = None) -> object:
        self.verb_events.append((event, verb))
        return None

    def verb_error(self, error: str, *, verb: str, verb_id: str | None = None) -> object:
        self.errors.append((verb, error))
        return None

    def counters(self) -> tuple[int, int, int]:
        return 1, 2, 3

    async def close(self) -> None:
        self.closed = True


@dataclass
class Harness:
    """A session on a fake leg with a manual clock, and its jambonz driver."""

    session: CallSession
    leg: FakeLeg
    driver: JambonzDriver
    control: FakeControl
    clock: ManualClock
    fetcher: FakeFetcher
    synth: FakeSynth
    events: list[ev.Event] = field(default_factory=list)

    async def run_ticks(self, ticks: int) -> None:
        """Run the media clock for ``ticks`` ticks, letting the verbs react between ticks."""
        for _ in range(ticks):
            self.session.tick(self.clock.now())
            await self.clock.advance(0.02)


def settings_for(tmp_path: Path) -> Settings:
    return load_settings(None, data_dir=tmp_path)


def make_harness(
    tmp_path: Path,
    *,
    place_call: Any = None,
    answered: bool = True,
    route: RouteSettings | None = None,
    leg: FakeLeg | None = None,
    control: FakeControl | None = None,
    pacer: Any = None,
) -> Harness:
    clock = ManualClock()
    leg = leg or FakeLeg(clock=clock)
    leg.clock = clock
    fetcher = FakeFetcher()
    synth = FakeSynth()
    events: list[ev.Event] = []
    services = SessionServices(
        settings=settings_for(tmp_path),
        synthesizer=synth,
        fetcher=fetcher,
        publish=events.append,
        place_call=place_call,
        clock=clock,
        pacer=pacer,
    )
    route = route or RouteSettings(match="*", agent_url="ws://x", record=False, trunk="t")
    session = CallSession(leg, route, services)
    control = control or FakeControl()
    driver = JambonzDriver(session, VERB_HANDLERS, handle_command, control=control)
    session.driver = driver
    if answered:
        leg.answer()
    return Harness(session, leg, driver, control, clock, fetcher, synth, events)


def _is_leg(leg: FakeLeg) -> Leg:
    """Type check: ``FakeLeg`` is a ``Leg``."""
    return leg
