"""One call's media pipeline, sans-I/O: what happens to the caller's frame and the agent's audio
within one 20 ms tick (8 kHz 16-bit PCM at the leg side).

The tick has two halves, which the session may run at different moments of the 20 ms (right
after the caller's frame falls due, and right after the agent's audio usually arrives):

``take_caller(caller, now)``, the caller's half:
1. taps on the caller's frame: VAD and barge-in (only with ``barge_in``), the voicemail beep
   detector (the first minute, outbound calls), in-band DTMF (legs without RFC 4733);
2. the caller's audio, resampled to the agent sink's rate, to the agent (``mono``).

``next_out()`` then ``after_send(caller, out)``, the half towards the caller:
3. the frame the caller hears: the playout buffer (streamed agent audio, marks) mixed with the
   current prompt; a barge-in detected in step 1 has already silenced it;
4. once the leg has sent it: ``mixed``/``stereo`` frames (the caller with what they heard) to
   the agent;
5. the recorder (caller left, what the caller heard right).

What happened (interruption, beep, digit, marks reached) is appended to ``events``, which the
session drains after the tick; nothing here calls out or awaits. With a ``timer`` (the session
passes ``time.perf_counter``) the recorder's time is summed in ``recorder_seconds`` (and its
frames in ``recorder_frames``), for the metrics to read at scrape time: two clock reads and
two additions a tick, nothing formatted.

Agent side, between ticks: ``agent_audio`` (streamed audio at any rate → resample → playout
buffer), ``mark``, ``clear``, ``play`` (a prompt, 8 kHz). An agent that streams in real time
(a frame every 20 ms) sends at a steady moment of the 20 ms: ``agent_due`` says when, from the
last arrivals, so the session can send right after it; and when some of its frames came late
and left frames waiting at every tick since, ``next_out`` trims them after a second
(``STANDING_TICKS``) so the rest of the call is not heard that much late. How much: the queue
that stood all that second when it stood still; when its frames came so near the tick that it
moved by a frame, as much of it as the silence that went out in their place (``_owed_ms``: each
tick the agent's audio ran dry mid-stream, forgotten after ``DRY_TICKS`` dry ticks in a row, the
end of its speech), so audio an agent sent ahead of time is never cut. While silence is owed, a
quiet frame (``QUIET_PEAK``) of an agent's waiting behind a late one is dropped at once instead:
the caller hears nothing of it, and the rest of the agent's audio is on time again at its next
pause.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from media.playout import PlayoutBuffer
from media.recorder import StereoMp3Recorder
from media.resample import Resampler
from media.tones import BeepDetector, InbandDtmfDetector
from media.vad import VoiceActivityDetector
from worker.agent.listen_audio import mix_saturating
from worker.legs import FRAME_BYTES, FRAME_MS
from worker.legs import SAMPLE_RATE as RATE

SILENCE = bytes(FRAME_BYTES)
BEEP_WINDOW_TICKS = 60 * 50  # answering machines beep early: listen for 60 s only
TICK_S = FRAME_MS / 1000
ARRIVALS = 25
"""Real-time agent audio arrivals ``agent_due`` looks at (half a second of frames)."""
ARRIVAL_SPREAD_S = 0.008
"""Arrivals spread wider over the 20 ms than this have no moment to send after."""
STANDING_TICKS = 50
"""Frames left waiting after every tick for this many ticks in a row (1 s), their number never
changing by a whole frame, are a standing queue, not a burst or a sender running ahead: they
are trimmed (``PlayoutBuffer.trim``); moving by exactly a frame (its frames come right at the
tick), when the agent streams in real time (``_real_time``)."""
DRY_TICKS = 5
"""Ticks in a row without agent audio after which the silence played is the end of its speech,
not frames late: nothing is owed back from it."""
OWED_MAX_MS = 200.0
"""The most silence remembered as owed (a frame late, played later than its moment)."""
QUIET_PEAK = 256
"""A frame whose samples all lie within this (-42 dBFS) is quiet: while silence is owed, such a
frame of an agent's (audio with arrival times: it came over the network) waiting behind a late
one is dropped at once (the caller hears nothing of it) rather than after ``STANDING_TICKS``.
Not the echo route's nor a dial bridge's (no arrival times): the echo is the caller's own audio,
played back as it came, since an echo test compares it."""


@dataclass(frozen=True, slots=True)
class Interruption:
    """The caller spoke over agent audio; ``cleared_marks`` were flushed with it."""

    at: float
    cleared_marks: tuple[str, ...]
    cleared_ms: float


@dataclass(frozen=True, slots=True)
class BeepDetected:
    at: float
    frequency: float


@dataclass(frozen=True, slots=True)
class InbandDigit:
    digit: str


@dataclass(frozen=True, slots=True)
class MarksReached:
    """The audio before these marks has been sent to the caller."""

    names: tuple[str, ...]


PipelineEvent = Interruption | BeepDetected | InbandDigit | MarksReached


@dataclass(frozen=True, slots=True)
class Cleared:
    """What a ``clear`` flushed: the marks it cleared and the milliseconds of audio."""

    marks: tuple[str, ...]
    ms: float


@dataclass(slots=True)
class _Prompt:
    pcm: bytes
    on_done: Callable[[bool], None]
    offset: int = 0


@dataclass(slots=True)
class AgentSink:
    """Where caller audio goes: ``send(pcm_at_rate)`` at ``rate``. With ``combine`` (the
    listen protocol's ``audio_frame`` for ``mixed``/``stereo``) each frame also carries what the
    caller heard; without it, the caller alone."""

    send: Callable[[bytes], None]
    rate: int
    combine: Callable[[bytes, bytes], bytes] | None = None
    paused: bool = False
    echoes: bool = False
    """``send`` puts the audio straight back into the playout (the echo route): the session
    keeps its tick's two halves together, the caller's first."""
    resampler: Resampler = field(init=False)  # the caller's audio
    out_resampler: Resampler = field(init=False)  # what the caller hears (with ``combine``)

    def __post_init__(self) -> None:
        self.resampler = Resampler(RATE, self.rate)
        self.out_resampler = Resampler(RATE, self.rate)


@dataclass(slots=True)
class MediaPipeline:
    recorder: StereoMp3Recorder | None = None
    barge_in: bool = False
    detect_beep: bool = True
    playout_max_ms: int = 10_000
    sink: AgentSink | None = None
    muted: bool = False
    events: list[PipelineEvent] = field(default_factory=list)
    cleared_ms: float = 0.0  # agent audio flushed by clear() over the call
    ticks: int = 0
    timer: Callable[[], float] | None = None
    recorder_seconds: float = 0.0  # time in the recorder (with a timer): encoding, file writes
    recorder_frames: int = 0
    playout: PlayoutBuffer = field(init=False)
    _vad: VoiceActivityDetector | None = field(init=False)
    _beep: BeepDetector | None = field(init=False)
    _inband: InbandDtmfDetector | None = field(init=False, default=None)
    _prompts: deque[_Prompt] = field(init=False)
    _return: dict[int, Resampler] = field(init=False)
    _arrivals: deque[float] = field(init=False)
    _standing: int = field(init=False, default=0)
    _standing_lo: float = field(init=False, default=0.0)
    _standing_hi: float = field(init=False, default=0.0)
    _owed_ms: float = field(init=False, default=0.0)
    _dry: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.playout = PlayoutBuffer(RATE, 20, self.playout_max_ms)
        self._vad = VoiceActivityDetector(RATE, 2) if self.barge_in else None
        self._beep = BeepDetector(RATE) if self.detect_beep else None
        self._prompts = deque()
        self._return = {}
        self._arrivals = deque(maxlen=ARRIVALS)

    def use_inband_dtmf(self, enabled: bool) -> None:
        """Detect DTMF tones in the caller's audio: for legs that negotiated no telephone-event
        (the trunk sends tones in-band). Off by default: RFC 4733 digits are also audible."""
        if not enabled:
            self._inband = None
        elif self._inband is None:
            self._inband = InbandDtmfDetector(RATE)

    # -- agent → caller (between ticks) -----------------------------------------------------------
    def agent_audio(self, pcm: bytes, rate: int, now: float | None = None) -> None:
        """Streamed audio from the agent at ``rate``, arrived at ``now``; queued for playout
        (bounded)."""
        if now is not None:
            self._arrivals.append(now)
        if rate != RATE:
            resampler = self._return.get(rate)
            if resampler is None:
                resampler = self._return[rate] = Resampler(rate, RATE)
            pcm = resampler.process(pcm)
        if pcm:
            self.playout.write(pcm)

    def mark(self, name: str) -> None:
        """A named mark after the audio written so far (the resampler's tail is pushed out)."""
        for resampler in self._return.values():
            tail = resampler.flush()
            if tail:
                self.playout.write(tail)
        self.playout.mark(name)

    def clear(self) -> Cleared:
        """Drop queued agent audio and prompts (barge-in, killAudio, Twilio ``clear``)."""
        for resampler in self._return.values():
            resampler.clear()
        ms = self.playout.queued_ms
        while self._prompts:
            prompt = self._prompts.popleft()
            ms += (len(prompt.pcm) - prompt.offset) / (2 * RATE) * 1000
            prompt.on_done(False)
        cleared = Cleared(tuple(self.playout.clear()), ms)
        self.cleared_ms += ms
        return cleared

    def play(self, pcm: bytes, on_done: Callable[[bool], None]) -> None:
        """Queue a prompt (8 kHz PCM); ``on_done(True)`` when fully played, False if cleared."""
        self._prompts.append(_Prompt(pcm, on_done))

    def forget_arrivals(self) -> None:
        """The agent's audio will arrive at another moment (the caller's frames moved)."""
        self._arrivals.clear()

    def agent_due(self, now: float) -> float | None:
        """When the agent's next real-time frame (the first after ``now``) is expected to have
        arrived, from its last ``ARRIVALS`` frames: at the moment of the 20 ms the latest of
        them came, if they were all within ``ARRIVAL_SPREAD_S`` of each other and recent. None
        otherwise (the agent is silent, bursts faster than real time, or wanders)."""
        arrivals = self._arrivals
        if len(arrivals) < ARRIVALS or now - arrivals[-1] > 2 * TICK_S:
            return None
        first = arrivals[0]
        lo = hi = 0.0
        for at in arrivals:
            d = math.remainder(at - first, TICK_S)  # in [-10, 10] ms around the first one
            if d < lo:
                lo = d
            elif d > hi:
                hi = d
        if hi - lo > ARRIVAL_SPREAD_S:
            return None
        latest = first + hi
        return latest + math.ceil((now - latest) / TICK_S + 1e-9) * TICK_S

    @property
    def agent_speaking(self) -> bool:
        return bool(self._prompts) or self.playout.playing

    # -- the tick ------------------------------------------------------------------------------
    def take_caller(self, caller: bytes | None, now: float) -> None:
        """Steps 1-2: the taps, and the caller's audio to a ``mono`` agent sink."""
        self.ticks += 1
        if caller is not None:
            self._taps(caller, now)
        sink = self.sink
        if sink is not None and sink.combine is None and not sink.paused:
            up = sink.resampler.process(SILENCE if self.muted or caller is None else caller)
            if up:
                sink.send(up)

    def after_send(self, caller: bytes | None, out: bytes) -> None:
        """Steps 4-5 of the tick, once ``out`` has been sent to the caller."""
        if caller is None:
            caller = SILENCE
        sink = self.sink
        if sink is not None and sink.combine is not None and not sink.paused:
            up = sink.resampler.process(SILENCE if self.muted else caller)
            up = sink.combine(up, sink.out_resampler.process(out))
            if up:
                sink.send(up)
        recorder = self.recorder
        if recorder is not None:
            timer = self.timer
            if timer is None:
                recorder.write_frame(caller, out)
            else:
                started = timer()
                recorder.write_frame(caller, out)
                self.recorder_seconds += timer() - started
            self.recorder_frames += 1

    def next_out(self) -> bytes:
        """Step 3: the frame the caller hears now (streamed audio and prompt, mixed)."""
        playout = self.playout
        streaming = playout.playing
        if (
            self._owed_ms >= FRAME_MS
            and self._arrivals
            and playout.queued_ms >= 2 * FRAME_MS
            and playout.head_is_quiet(QUIET_PEAK)
        ):
            # Silence went out in place of a late frame, so this one waits a frame behind: it
            # is quiet, drop it now (what a playout buffer does in a pause) and be on time.
            self._owed_ms -= playout.trim(FRAME_MS)
        stream, reached = playout.next_frame()
        queued = playout.queued_ms
        if queued >= 20.0:
            self._standing_queue(queued)
        else:
            self._standing = 0
            if playout.playing:
                self._dry = 0
            elif streaming or self._dry:
                # Dry mid-stream: frames late (the silence is owed back), or the end.
                self._dry += 1
                owed = self._owed_ms + FRAME_MS
                self._owed_ms = 0.0 if self._dry >= DRY_TICKS else min(owed, OWED_MAX_MS)
        if reached:
            self.events.append(MarksReached(tuple(mark.name for mark in reached)))
        if not self._prompts:
            return stream
        prompt = self._prompts[0]
        chunk = prompt.pcm[prompt.offset : prompt.offset + FRAME_BYTES]
        prompt.offset += FRAME_BYTES
        if len(chunk) < FRAME_BYTES:
            chunk += bytes(FRAME_BYTES - len(chunk))
        if prompt.offset >= len(prompt.pcm):
            self._prompts.popleft()
            prompt.on_done(True)
        return mix_saturating(chunk, stream) if self.playout.playing else chunk

    def _standing_queue(self, queued: float) -> None:
        """A frame or more left waiting after this tick: trim it once it has stood a second."""
        if self._standing == 0:
            self._standing_lo = self._standing_hi = queued
        elif queued < self._standing_lo:
            self._standing_lo = queued
        elif queued > self._standing_hi:
            self._standing_hi = queued
        self._standing += 1
        spread = self._standing_hi - self._standing_lo
        owed = self._owed_ms
        if spread > 20.0 and not owed:
            self._standing = 0  # it moves: a burst, or a sender running ahead
        elif self._standing >= STANDING_TICKS:
            # Real-time frames came late: catch up. When the queue moved, by the silence
            # played in their place at most; when it moved by one frame and nothing is owed
            # (a stall longer than DRY_TICKS), all of it if the agent streams in real time.
            lo = self._standing_lo
            if spread < 20.0 or (not owed and self._real_time()):
                self._owed_ms = max(0.0, owed - self.playout.trim(lo))
            elif owed:
                self._owed_ms = max(0.0, owed - self.playout.trim(min(lo, owed)))
            self._standing = 0

    def _real_time(self) -> bool:
        """The agent's last ``ARRIVALS`` messages came one a frame, at a steady moment of the
        20 ms (``agent_due``), over as long as they last: it streams in real time, its queue
        is not audio it sent ahead."""
        arrivals = self._arrivals
        if len(arrivals) < ARRIVALS:
            return False
        span = arrivals[-1] - arrivals[0]
        return span >= (ARRIVALS - 1) * TICK_S * 0.9 and self.agent_due(arrivals[-1]) is not None

    def _taps(self, caller: bytes, now: float) -> None:
        vad = self._vad
        if vad is not None:
            edge = vad.process(caller, now)
            if edge is not None and edge.kind == "speech-start" and self.agent_speaking:
                cleared = self.clear()
                self.events.append(Interruption(now, cleared.marks, cleared.ms))
        if self._beep is not None:
            # ~16 µs a tick: stop after the first beep or once the window has passed.
            beep = self._beep.feed(caller, now)
            if beep is not None or self.ticks >= BEEP_WINDOW_TICKS:
                self._beep = None
            if beep is not None:
                self.events.append(BeepDetected(now, beep.frequency))
        if self._inband is not None:
            for digit in self._inband.feed(caller, now):
                self.events.append(InbandDigit(digit))

    def close(self) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        timer = self.timer
        started = timer() if timer is not None else 0.0
        recorder.close()
        if timer is not None:
            self.recorder_seconds += timer() - started
