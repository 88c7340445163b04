"""``CallSession``: one call leg bridged to one agent driver. The call's core.

The session owns the call's status (the leg's events fed to ``status.py``'s table), its media
tick, pipeline and recorder, the fan-out of DTMF, marks and events, the call's tasks, and its
result. What speaks to the agent is an ``AgentDriver`` (jambonz, Twilio or echo; ``drivers.py``
picks one for the route). The session sees its leg only as a ``worker.legs.Leg``.

The media tick runs every 20 ms from the process-wide pacer once the call has media (early
media or the answer), in two halves the pacer calls separately. ``tick_in``: the leg gives the
caller's frame; a ``dial`` bridge's far leg gives its frame to the playout buffer and gets the
caller's; ``MediaPipeline.take_caller`` runs the taps (VAD/barge-in, beep, in-band DTMF) and
hands the caller's audio to the agent sink. ``tick_out``: ``MediaPipeline.next_out`` takes what
the caller hears from the playout buffer, the leg sends it, and ``MediaPipeline.after_send``
records it with the caller's frame of the last ``tick_in`` (and sends ``mixed``/``stereo``
frames to the agent). Each half then handles the pipeline's events (interruption, beep,
in-band digits, marks reached). The halves start in one pacer slot, ``tick_out`` right after
``tick_in``, so a barge-in silences the very tick that heard it. 200 ms into the media each half
moves to the slot just after what it waits for (``MediaPacer.align``), and later only when a
check (every second) has found it off that moment three times in a row (``ALIGN_CONFIRM``):
``tick_in`` to just after the caller's next frame falls due in the jitter buffer
(``Leg.frame_due``), so the caller's audio leaves for the agent as soon as it may, not up to
20 ms later; ``tick_out``, when the agent streams in real time, to just after its frames
usually arrive (``MediaPipeline.agent_due``), so they are not held up to 20 ms either. ``tick``
runs both halves at once (tests).

Metrics (``worker.metrics``): ``run`` counts the call's setup, then its failure or hangup by
cause; while it runs, a scrape reads its leg's RTP figures and the recorder's time
(``metric_figures``), and at its end they go to the totals once. Nothing on the tick itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

from media.playout import PlayoutBuffer, PlayoutCounters
from media.recorder import StereoMp3Recorder
from worker.config import RouteSettings, Settings
from worker.events import models as ev
from worker.legs import (
    SAMPLE_RATE,
    Leg,
    LegAnswered,
    LegDtmf,
    LegEarlyMedia,
    LegEnd,
    LegEnded,
    LegEvent,
    LegMediaChanged,
    LegRinging,
)
from worker.metrics import CallFigures, WorkerMetrics, process_metrics
from worker.session.clock import Clock, LoopClock, wait_for
from worker.session.pipeline import (
    SILENCE,
    TICK_S,
    BeepDetected,
    Cleared,
    InbandDigit,
    Interruption,
    MarksReached,
    MediaPipeline,
    PipelineEvent,
)
from worker.session.status import CallStatus, CallStatusMachine, Event, StatusChange
from worker.session.tts import Synthesizer
from worker.status_codes import reason_phrase

MarkEvent = Literal["playout", "cleared"]
ALIGN_FIRST_TICK = 10
"""The tick (200 ms into the media) at which a call first moves its tick to just after its
caller's frames fall due, once the jitter buffer has seen a few packets."""
REALIGN_TICKS = 50
"""How often (ticks: 1 s) it checks again: the jitter buffer's delay and the clocks drift."""
IN_MARGIN_S = 0.0005
"""How long after the caller's frame falls due the caller's half of the tick runs (a frame the
jitter buffer holds back a little longer comes with the next one: ``tick_in``)."""
OUT_MARGIN_S = 0.002
"""How long after a real-time agent's frames usually arrive the caller's frame is sent."""
ALIGN_TOLERANCE_S = 0.004
"""A half whose slot already runs at most this long after its moment stays where it is: the
moment wavers (the jitter buffer's delay, the agent's timing) and every move shifts the
caller's RTP once."""
ALIGN_CONFIRM = 3
"""After its first alignment, a half moves only when it has been off its moment on this many
checks in a row (3 s): a moment that wavers under load (the loop's own jitter) must not move
the caller's RTP every second, each move being a step in its timing at the phone."""
ARRIVAL_WAIT_S = 0.002
"""A caller frame arriving at most this long before its call's ``tick_in`` waits for it (and
goes with the other calls of that slot); one arriving earlier goes at once."""
SKIPPED_GAP_S = 0.07
"""Longer than this between two of a half's ticks, the pacer skipped some (a move stretches
one interval by less than 40 ms; the pacer skips only past three ticks behind)."""
PAIRING_FRAMES = 4
"""Frames either half may run ahead of the other before the oldest is dropped unrecorded."""
ANSWER_TIMEOUT_S = 10.0
"""How long ``answer()`` waits for the leg to report the answer (a SIP leg does at once)."""

_END_CAUSE_TO_EVENT = {"busy": Event.BUSY, "no-answer": Event.NO_ANSWER, "cancelled": Event.HANGUP}


log = logging.getLogger("worker.session")


def tick_failed(key: object, exc: BaseException) -> None:
    """The pacer's ``on_error`` for sessions: the session whose half (``tick_in``, keyed by
    the session, or ``tick_out``, keyed by ``(session, "out")``) raised ends its call
    (``CallSession.tick_failed``); anything else is logged."""
    session = key[0] if isinstance(key, tuple) and key else key
    if isinstance(session, CallSession):
        session.tick_failed(exc)
    else:
        log.error(
            "media tick failed; removed",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"key": repr(key)},
        )


class MediaClock(Protocol):
    """The process-wide 20 ms pacer (``worker.pacer.MediaPacer``)."""

    def add(self, key: object, tick: Callable[[float], None], after: object = None) -> None: ...

    def align(self, key: object, due: float, now: float, tolerance: float = 0.0) -> bool: ...

    def remove(self, key: object) -> None: ...

    def misaligned(self, key: object, due: float, tolerance: float = 0.0) -> bool: ...


class PromptSource(Protocol):
    """Audio files for ``play`` (``worker.session.fetch.AudioFetcher``)."""

    async def fetch(self, url: str, rate: int) -> bytes: ...


class PlaceCall(Protocol):
    """Places an outbound call through a trunk (``Worker.place_call``): through the SIP user
    agent, or through Asterisk when ``near`` (the call the new leg is for) is an Asterisk call."""

    def __call__(
        self,
        trunk: str,
        number: str,
        /,
        *,
        from_user: str | None = ...,
        ring_timeout_s: float = ...,
        near: Leg | None = ...,
    ) -> Awaitable[Leg]: ...


@dataclass
class SessionServices:
    """What sessions share: settings, the pacer, synthesizer, fetcher, the event sink, a way to
    place calls (for ``dial``), the clock and the metrics (None: this process's
    ``process_metrics()``)."""

    settings: Settings
    synthesizer: Synthesizer
    fetcher: PromptSource
    publish: Callable[[ev.Event], None]
    pacer: MediaClock | None = None
    place_call: PlaceCall | None = None
    clock: Clock | None = None
    metrics: WorkerMetrics | None = None


@dataclass(frozen=True, slots=True)
class AgentCounters:
    """What the agent did that the worker absorbed (a driver's own count).

    ``ignored_agent_frames``: binary frames on a listen socket whose streaming was off.
    ``invalid_agent_messages``: frames answered with (or, on the audio sockets, logged as)
    invalid. ``late_acks``: acks that came after their hook had timed out. ``reconnects``:
    control socket reconnect attempts. ``agent_audio_dropped_ms``: caller audio the agent's
    socket could not take in time (its bounded send queue)."""

    ignored_agent_frames: int = 0
    invalid_agent_messages: int = 0
    late_acks: int = 0
    reconnects: int = 0
    agent_audio_dropped_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionCounters(AgentCounters):
    """The call's totals: the driver's ``AgentCounters``, the agent-audio playout buffer's
    (``playout.dropped_ms``: audio sent faster than real time beyond the bound), and agent
    audio flushed by barge-in or the agent's own clear/killAudio (``agent_audio_cleared_ms``)."""

    playout: PlayoutCounters = field(default_factory=lambda: PlayoutBuffer(SAMPLE_RATE).counters)
    agent_audio_cleared_ms: float = 0.0


@dataclass
class SessionResult:
    """A finished call. ``cause`` is a short token (``agent-hangup``, ``remote-bye``,
    ``agent-unreachable``, ``agent-no-ack``, ...); ``reason`` says more when there is more to
    say (the connect error, the ack outcome)."""

    call_sid: str
    status: str
    duration_sec: int
    digits: str
    recording: str | None
    cause: str | None
    transcript: list[tuple[str, str, float]] = field(default_factory=list)
    reason: str | None = None
    counters: SessionCounters = field(default_factory=SessionCounters)
    media: ev.MediaQualityFigures | None = None


class AgentDriver(Protocol):
    """What speaks to the agent for a session (see ``drivers.py``)."""

    @property
    def failure(self) -> str | None:
        """Why the agent could not take the call, once it could not."""

    async def run(self) -> None:
        """Drive the call until the agent is done with it (the session then hangs up)."""

    def on_status(self, change: StatusChange) -> None:
        """The call's status changed."""

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        """The caller pressed a key."""

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        """Marks played out, or cleared with the audio before them."""

    def counters(self) -> AgentCounters: ...

    async def close(self) -> None:
        """Close the agent's sockets (idempotent); the call is over."""


def detects_voicemail(route: RouteSettings, direction: str) -> bool:
    """Whether a call listens for an answering machine's beep (``route.voicemail_detection``):
    only agent calls, and by default only the ones the worker placed."""
    if route.action != "agent" or route.voicemail_detection == "off":
        return False
    return route.voicemail_detection == "always" or direction == "outbound"


class CallSession:
    """See the module docstring."""

    def __init__(self, leg: Leg, route: RouteSettings, services: SessionServices) -> None:
        self.leg = leg
        self.route = route
        self.services = services
        self.clock: Clock = services.clock or LoopClock()
        self.metrics = services.metrics if services.metrics is not None else process_metrics()
        self.call_sid = str(uuid.uuid4())
        self.log = leg.log
        self.status = CallStatusMachine(self.clock.now())
        self.sip_status = 100
        self.sip_reason = "Trying"
        self.digits: list[str] = []
        self.transcript: list[tuple[str, str, float]] = []
        self.recording_path: Path | None = None
        self.pipeline = MediaPipeline(
            barge_in=route.barge_in,
            detect_beep=detects_voicemail(route, leg.info.direction),
            timer=time.perf_counter,
        )
        self.bridge: Leg | None = None
        """The far leg of a ``dial`` (``bridge_to``): its audio goes to the caller, the
        caller's to it."""
        self.driver: AgentDriver | None = None
        self._dtmf_listeners: list[Callable[[str], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[LegEnd] = loop.create_future()
        self._connected = asyncio.Event()  # answered, or ended
        self._ticking = False
        self._out_key = (self, "out")  # the pacer's key for tick_out
        # The frames each half made, paired in order for the recorder (the halves may swap
        # order for a tick when one moves; a pacer's stall may skip one more than the other).
        self._heard: deque[bytes | None] = deque(maxlen=PAIRING_FRAMES)  # the caller's
        self._said: deque[bytes] = deque(maxlen=PAIRING_FRAMES)  # what the caller heard
        self._align_tick = ALIGN_FIRST_TICK
        self._out_ticks = 0
        self._last_out: float | None = None  # tick_out's last tick
        self._caller_silent = True  # no frame of the caller for two ticks: silence goes
        self._next_in = 0.0  # when tick_in runs next (about)
        self._lag = 0
        """Ticks of ``tick_in`` the caller's frames are behind (a frame late: its arrival takes
        it), or ahead when below 0 (frames taken on arrival before their tick)."""
        self._out_align_tick = ALIGN_FIRST_TICK
        self._off: dict[object, int] = {}  # a half's checks in a row found off its moment
        self.tick_moves = 0  # how often a half moved (``session done``)
        self._finished = False
        leg.attach(self)

    # -- the leg's events: the only way the call's status changes --------------------------------
    def on_leg_event(self, event: LegEvent) -> None:
        if isinstance(event, LegDtmf):
            self._on_dtmf(event.digit, event.duration_ms, event.method)
        elif isinstance(event, LegRinging):
            self.feed(Event.RING, 180)
        elif isinstance(event, LegEarlyMedia | LegAnswered):
            self.pipeline.use_inband_dtmf(not event.telephone_event)
            self._start_media()
            early = isinstance(event, LegEarlyMedia)
            self.feed(Event.EARLY_MEDIA if early else Event.ANSWER, 183 if early else 200)
            if not early:
                self._connected.set()
        elif isinstance(event, LegMediaChanged):
            self.log.info("media changed", extra={"codec": event.codec, "hold": event.on_hold})
        elif isinstance(event, LegEnded):
            self._stop_media()
            self._connected.set()
            if not self._ended.done():
                self._ended.set_result(event.end)

    def feed(
        self, event: Event, sip_status: int | None = None, reason: str | None = None
    ) -> StatusChange | None:
        """Feed the status table; a change (with its ``sip_status``, when given) is logged,
        published and told to the driver. An event the table ignores changes nothing."""
        change = self.status.feed(event, self.clock.now())
        if change is None:
            return None
        if sip_status is not None:
            self.set_sip_status(sip_status, reason)
        self.log.info("call status", extra={"status": str(change.new)})
        self._publish(
            ev.CallStatusEvent(
                call_id=self.call_sid, status=change.new.value, sip_status=self.sip_status
            )
        )
        if self.driver is not None:
            self.driver.on_status(change)
        return change

    def set_sip_status(self, status: int, reason: str | None = None) -> None:
        self.sip_status = status
        self.sip_reason = reason or reason_phrase(status)

    def fail_unanswered(self, status: int) -> None:
        """The call cannot go on before it was answered: ``failed`` with the status the caller
        is about to get (an answered call keeps its status; its hangup completes it)."""
        if self.status.answered_at is None:
            self.feed(Event.FAIL, status)

    # -- the media tick ------------------------------------------------------------------------
    def _start_media(self) -> None:
        if self._ticking or self._finished:
            return
        self._ticking = True
        if self.route.record and self.pipeline.recorder is None:
            folder = self.services.settings.data_dir / "recordings"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{self.call_sid}.mp3"
            self.recording_path = folder / name
            self.pipeline.recorder = StereoMp3Recorder(self.recording_path, SAMPLE_RATE)
        pacer = self.services.pacer
        if pacer is not None:
            pacer.add(self, self.tick_in)
            pacer.add(self._out_key, self.tick_out, after=self)

    def _stop_media(self) -> None:
        if self._ticking and self.services.pacer is not None:
            self.services.pacer.remove(self)
            self.services.pacer.remove(self._out_key)
        self._ticking = False

    def tick_failed(self, exc: BaseException) -> None:
        """A half of the tick raised (a bug): the pacer has dropped that half. The call ends
        rather than go on without media (the caller hearing silence, the agent hearing
        nothing, the recording stopped, until somebody hangs up): both halves stop and the
        leg hangs up, cause ``worker-error``. Other calls tick on."""
        self.log.error(
            "media tick failed: hanging up",
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self._stop_media()
        if not self.ended:
            self.hangup("worker-error", 500, "media failed")

    def tick(self, now: float) -> None:
        """One whole 20 ms media tick, both halves at once (see the module docstring)."""
        self.tick_in(now)
        self.tick_out(now)

    def tick_in(self, now: float) -> None:
        """The caller's half: their frame to the taps and the agent (and a bridge's far leg)."""
        caller = self.leg.pull_frame(now)
        pipeline = self.pipeline
        bridge = self.bridge
        if bridge is not None:
            far = bridge.pull_frame(now)
            if far is not None:
                pipeline.agent_audio(far, SAMPLE_RATE)
            bridge.send_frame(SILENCE if caller is None else caller)
        # (With a dial bridge the far leg takes the caller's frames one a tick, as they come.)
        if bridge is not None:
            self._take_caller(caller, now, extra=False)
        else:
            self._next_in = now + TICK_S
            lag = self._lag + 1
            if caller is not None:
                self._caller_silent = False
                lag = min(0, lag - self._take_caller(caller, now, extra=True))
            elif self._caller_silent or lag >= 2:
                # No frame for two ticks: the caller is not sending; the agent hears silence.
                self._caller_silent = True
                self._take_caller(None, now, extra=False)
                lag = 0
            # else its frame went ahead of this tick (lag <= 0), or it is late this once, or
            # the jitter buffer's delay grew (a lost one would be concealed, not missing): its
            # arrival takes it (``on_caller_audio``), or the next tick with the next one.
            # Silence here would put an extra 20 ms into the agent's stream (and the
            # recording) for good, so nothing goes this once.
            self._lag = lag
        if pipeline.events:
            self._pipeline_events()
        if caller is not None and pipeline.ticks >= self._align_tick:
            self._align_tick = pipeline.ticks + REALIGN_TICKS
            due = self.leg.frame_due()
            due = None if due is None else due + IN_MARGIN_S
            if self._align(self, due, now):
                pipeline.forget_arrivals()  # the agent's replies move with the caller's frames
                sink = pipeline.sink
                if sink is not None and sink.echoes:
                    # What the caller hears comes from here: the halves move together.
                    self._align(self._out_key, due, now, confirm=False)

    def on_caller_audio(self, now: float) -> None:
        """The leg filed the caller's audio (``LegObserver``): a frame that may go now (the
        jitter buffer's ``early`` release, or it is late) goes to the agent at once when the
        last ``tick_in`` found it missing, or when its tick is more than ``ARRIVAL_WAIT_S``
        away (a frame ahead of its tick: that tick finds nothing, and knows why). A frame
        arriving just before its tick goes with it, several calls at once. Not with a ``dial``
        bridge, nor for a silent caller's first frame. Raising, it hangs the call up as a
        raising tick does."""
        lag = self._lag
        if not self._ticking or self.bridge is not None:
            return
        if lag < 1 and (lag < 0 or self._caller_silent or self._next_in - now <= ARRIVAL_WAIT_S):
            return
        try:
            caller = self.leg.pull_frame(now)
            if caller is None:
                return
            self._lag = min(0, lag - self._take_caller(caller, now, extra=lag >= 1))
            if self.pipeline.events:
                self._pipeline_events()
        except Exception as exc:
            self.tick_failed(exc)

    def _take_caller(self, caller: bytes | None, now: float, extra: bool) -> int:
        """The caller's frame (None: none came) to the taps and the agent, and on to the
        recording; with ``extra``, a second one due at the same time goes too. How many
        frames of the caller went."""
        pipeline = self.pipeline
        pipeline.take_caller(caller, now)
        self._heard.append(caller)
        if caller is None or not extra:
            return 0 if caller is None else 1
        # A frame held back (the tick before, or by a late tick) is due with this one: both go
        # now, so it does not stay behind as latency for the rest of the call.
        second = self.leg.pull_frame(now)
        if second is None:
            return 1
        pipeline.take_caller(second, now)
        self._heard.append(second)
        return 2

    def tick_out(self, now: float) -> None:
        """The half towards the caller: what they hear, sent, then recorded with their frame."""
        pipeline = self.pipeline
        last, self._last_out = self._last_out, now
        if last is not None and now - last > SKIPPED_GAP_S:
            # The pacer skipped this half's ticks (the loop stalled): the audio they would have
            # played is dropped, or it would be heard that much late for the rest of the call.
            pipeline.playout.trim((round((now - last) / TICK_S) - 1) * TICK_S * 1000)
        out = pipeline.next_out()
        self.leg.send_frame(out)
        heard, said = self._heard, self._said
        said.append(out)
        while heard and said:
            pipeline.after_send(heard.popleft(), said.popleft())
        if pipeline.events:
            self._pipeline_events()
        self._out_ticks += 1
        if self._out_ticks >= self._out_align_tick:
            self._out_align_tick = self._out_ticks + REALIGN_TICKS
            due = pipeline.agent_due(now)
            self._align(self._out_key, None if due is None else due + OUT_MARGIN_S, now)

    def _align(self, key: object, due: float | None, now: float, confirm: bool = True) -> bool:
        """Tick ``key`` right after ``due`` from now on (``MediaPacer.align``): at once the
        first time (or without ``confirm``), else once it has been off ``ALIGN_CONFIRM``
        checks in a row. True if it moved."""
        pacer = self.services.pacer
        if due is None or pacer is None or not self._ticking:
            return False
        if not pacer.misaligned(key, due, ALIGN_TOLERANCE_S):
            self._off[key] = 0
            return False
        off = self._off.get(key)  # None: its first check
        if confirm and off is not None and off + 1 < ALIGN_CONFIRM:
            self._off[key] = off + 1
            return False
        self._off[key] = 0
        moved = pacer.align(key, due, now, ALIGN_TOLERANCE_S)
        self.tick_moves += moved
        return moved

    def _pipeline_events(self) -> None:
        pipeline = self.pipeline
        events, pipeline.events = pipeline.events, []
        for event in events:
            self._pipeline_event(event)

    def _pipeline_event(self, event: PipelineEvent) -> None:
        if isinstance(event, MarksReached):
            if self.driver is not None:
                self.driver.on_marks(event.names, "playout")
        elif isinstance(event, Interruption):
            self._interrupted(Cleared(event.cleared_marks, event.cleared_ms), "barge-in")
        elif isinstance(event, BeepDetected):
            self.log.info("voicemail beep", extra={"hz": round(event.frequency)})
            self._publish(
                ev.CallVoicemailDetectedEvent(call_id=self.call_sid, beep_hz=event.frequency)
            )
        elif isinstance(event, InbandDigit):
            self._on_dtmf(event.digit, 100, "inband")

    # -- what drivers use ----------------------------------------------------------------------
    @property
    def answered(self) -> bool:
        return self.status.answered_at is not None

    @property
    def ended(self) -> bool:
        return self._ended.done()

    async def answer(self) -> None:
        """Answer the call if it is not answered yet; returns once it is (or has ended)."""
        if self.answered or self.ended:
            return
        self.leg.answer()
        await wait_for(self.clock, self._connected.wait(), ANSWER_TIMEOUT_S)

    async def open_media(self, early_media: bool) -> None:
        """An audio path for a say/play/listen: the answer, or with ``early_media`` on an
        unanswered inbound call, a 183 Session Progress with our SDP (it stays unanswered)."""
        if not early_media:
            await self.answer()
        elif self.leg.info.direction == "inbound" and self.status.status in (
            CallStatus.TRYING,
            CallStatus.RINGING,
        ):
            self.leg.ring(early_media=True)

    def ring(self) -> None:
        """180 Ringing for an inbound call nobody has answered or alerted yet."""
        if self.leg.info.direction == "inbound" and self.status.status is CallStatus.TRYING:
            self.leg.ring()

    def hangup(self, cause: str, status: int = 480, reason: str | None = None) -> None:
        self.leg.hangup(cause, status, reason)

    def bridge_to(self, leg: Leg | None) -> None:
        """Bridge the caller's audio with ``leg`` (a ``dial``'s far leg): inside the carrier
        when the call's leg can (``Leg.connect``: an Asterisk bridge), else frame by frame from
        the next tick. None ends a frame-by-frame bridge (a carrier's bridge ends with the far
        leg's hangup)."""
        if leg is not None and self.leg.connect(leg):
            self.log.info("bridged inside the carrier")
            self.bridge = None
            return
        self.bridge = leg

    async def wait_ended(self) -> LegEnd:
        return await asyncio.shield(self._ended)

    def _publish(self, event: ev.CallEvent) -> None:
        """Publish one of this call's events, stamped with its route's workspace and node."""
        route = self.route
        self.services.publish(
            event.model_copy(update={"workspace_id": route.workspace_id, "node_id": route.node_id})
        )

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task that belongs to the call: cancelled when the call ends, errors logged."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("call task failed", exc_info=task.exception())

    @contextmanager
    def dtmf_listener(self, listener: Callable[[str], None]) -> Iterator[None]:
        """Give ``listener`` every key the caller presses while the block runs."""
        self._dtmf_listeners.append(listener)
        try:
            yield
        finally:
            self._dtmf_listeners.remove(listener)

    def transcribe(self, role: str, text: str) -> None:
        """One transcript turn: kept for the call's result and published as an event."""
        at = self.in_call_seconds()
        self.transcript.append((role, text, at))
        self._publish(
            ev.CallTranscriptEvent(call_id=self.call_sid, role=role, text=text, at_sec=at)
        )

    def clear_agent_audio(self) -> None:
        """The agent flushed its audio (jambonz ``killAudio``, Twilio ``clear``)."""
        self._interrupted(self.pipeline.clear(), "agent-clear")

    def _interrupted(self, cleared: Cleared, reason: Literal["barge-in", "agent-clear"]) -> None:
        self.log.info(
            "agent audio cleared",
            extra={"reason": reason, "cleared_ms": round(cleared.ms), "marks": len(cleared.marks)},
        )
        self._publish(
            ev.CallInterruptionEvent(call_id=self.call_sid, reason=reason, cleared_ms=cleared.ms)
        )
        if self.driver is not None and cleared.marks:
            self.driver.on_marks(cleared.marks, "cleared")

    async def play_pcm(self, pcm: bytes) -> bool:
        """Play a prompt (8 kHz PCM) to the caller; True when it played to the end, False when
        it was cleared (barge-in, killAudio)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def finished(completed: bool) -> None:
            if not done.done():
                done.set_result(completed)

        self.pipeline.play(pcm, finished)
        try:
            return await done
        except asyncio.CancelledError:
            self.pipeline.clear()
            raise

    def in_call_seconds(self) -> float:
        answered = self.status.answered_at
        return round(self.clock.now() - answered, 2) if answered is not None else 0.0

    def _on_dtmf(self, digit: str, duration_ms: int, method: Any) -> None:
        self.digits.append(digit)
        self._publish(
            ev.CallDtmfEvent(
                call_id=self.call_sid, digit=digit, duration_ms=duration_ms, method=method
            )
        )
        for listener in list(self._dtmf_listeners):
            listener(digit)
        if self.driver is not None:
            self.driver.on_dtmf(digit, duration_ms)

    # -- the run -------------------------------------------------------------------------------
    async def run(self, driver: AgentDriver) -> SessionResult:
        """Drive the call from arrival to the end with ``driver``; returns its summary."""
        self.driver = driver
        info = self.leg.info
        self._publish(
            ev.CallStartedEvent(
                call_id=self.call_sid,
                direction=info.direction,
                from_=info.from_user,
                to=info.to_user,
                route=self.route.match,
            )
        )
        self.metrics.call_started(self, info.direction)
        result: SessionResult | None = None
        try:
            result = await self._run(driver)
            return result
        finally:
            # Also when the worker shuts down and cancels us: no socket or task outlives the call.
            try:
                await self._finish()
            finally:
                self.metrics.call_ended(
                    self,
                    info.direction,
                    result.status if result is not None else None,
                    result.cause if result is not None else None,
                )

    async def _run(self, driver: AgentDriver) -> SessionResult:
        drive = asyncio.ensure_future(self._drive(driver))
        try:
            waiting: set[asyncio.Future[Any]] = {self._ended, drive}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if drive.done() and not drive.cancelled() and drive.exception() is not None:
                self.log.error("agent driver failed", exc_info=drive.exception())
            if not self.ended:
                self.hangup("agent-finished" if self.answered else "agent-failed", 480)
            end = await self._ended
        finally:
            if not drive.done():
                drive.cancel()
            await asyncio.gather(drive, return_exceptions=True)
        # The final status goes out while the agent's socket is still open.
        if self.status.status is CallStatus.IN_PROGRESS:
            self.feed(Event.HANGUP)
        elif not self.status.status.terminal:
            event = _END_CAUSE_TO_EVENT.get(end.cause, event_for_status(end.sip_status))
            # The final response the caller got (487, ...), when there was one.
            self.feed(event, end.sip_status, end.sip_reason)
        await self._finish()
        duration = self.status.duration(self.clock.now())
        recording = self._recording()
        quality = self.leg.quality()
        media = ev.MediaQualityFigures(
            packets_in=quality.packets_in,
            packets_out=quality.packets_out,
            lost=quality.lost,
            late=quality.late,
            jitter_ms=quality.jitter_ms,
            peer_fraction_lost=quality.peer_fraction_lost,
            peer_cumulative_lost=quality.peer_cumulative_lost,
            peer_jitter_ms=quality.peer_jitter_ms,
            round_trip_ms=quality.round_trip_ms,
        )
        result = SessionResult(
            call_sid=self.call_sid,
            status=self.status.status.value,
            duration_sec=duration,
            digits="".join(self.digits),
            recording=recording,
            cause=end.cause,
            transcript=list(self.transcript),
            reason=driver.failure,
            counters=self.counters(),
            media=media,
        )
        self._publish(
            ev.CallDoneEvent(
                call_id=self.call_sid,
                status=result.status,
                duration_sec=duration,
                recording_path=recording,
                cause=end.cause,
                media=media,
            )
        )
        return result

    async def _drive(self, driver: AgentDriver) -> None:
        if self.leg.info.direction == "outbound":
            # An originated call meets its agent once answered (jambonz sends session:new for
            # REST-originated calls after the answer).
            await self._connected.wait()
            if not self.answered:
                return
        await driver.run()

    def _recording(self) -> str | None:
        """The recording's path once it holds audio; an empty file is removed."""
        path = self.recording_path
        if path is None:
            return None
        try:
            if path.stat().st_size > 0:
                return str(path)
            path.unlink()
        except OSError as exc:
            self.log.warning("recording unusable", extra={"path": str(path), "why": str(exc)})
        return None

    def metric_figures(self) -> CallFigures:
        """What the call's media path has counted so far, for ``worker.metrics`` (read at scrape
        time and once at the end)."""
        quality = self.leg.quality()
        pipeline = self.pipeline
        return CallFigures(
            packets_in=quality.packets_in,
            packets_out=quality.packets_out,
            lost=quality.lost,
            late=quality.late,
            concealed_s=quality.concealed_ms / 1000,
            jitter_s=quality.jitter_ms / 1000,
            recorder_s=pipeline.recorder_seconds,
            recorder_frames=pipeline.recorder_frames,
        )

    def counters(self) -> SessionCounters:
        """The call's counters so far (see :class:`SessionCounters`)."""
        agent = self.driver.counters() if self.driver is not None else AgentCounters()
        return SessionCounters(
            **{f.name: getattr(agent, f.name) for f in fields(AgentCounters)},
            playout=self.pipeline.playout.counters,
            agent_audio_cleared_ms=self.pipeline.cleared_ms,
        )

    async def _finish(self) -> None:
        """Stop the call's media and tasks, close the agent's sockets and the recording
        (idempotent)."""
        if self._finished:
            return
        self._finished = True
        self._stop_media()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.driver is not None:
            await self.driver.close()
        self.pipeline.close()


def event_for_status(status: int | None) -> Event:
    if status in (486, 600):
        return Event.BUSY
    if status in (408, 480, 487):
        return Event.NO_ANSWER
    return Event.FAIL


__all__ = [
    "AgentCounters",
    "AgentDriver",
    "CallSession",
    "SessionCounters",
    "SessionResult",
    "SessionServices",
]
