"""One call's media pipeline, sans-I/O: what happens to the caller's frame and the agent's audio
within one 20 ms tick (8 kHz 16-bit PCM at the leg side).

The tick is two calls around the leg's send, so what the caller hears leaves as early as
possible:

``process(caller, now)`` -> the frame the caller hears:
1. taps on the caller's frame: VAD and barge-in (only with ``barge_in``), the voicemail beep
   detector (the first minute), in-band DTMF (legs without RFC 4733);
2. the caller's audio, resampled to the agent sink's rate, to the agent (``mono``);
3. the frame the caller hears: the playout buffer (streamed agent audio, marks) mixed with the
   current prompt; a barge-in detected in step 1 has already silenced it.

``after_send(caller, out)``, once the leg has sent ``out``:
4. ``mixed``/``stereo`` frames (the caller with what they heard) to the agent;
5. the recorder (caller left, what the caller heard right).

What happened (interruption, beep, digit, marks reached) is appended to ``events``, which the
session drains after the tick; nothing here calls out or awaits. With a ``timer`` (the session
passes ``time.perf_counter``) the recorder's time is summed in ``recorder_seconds`` (and its
frames in ``recorder_frames``), for the metrics to read at scrape time: two clock reads and
two additions a tick, nothing formatted.

Agent side, between ticks: ``agent_audio`` (streamed audio at any rate → resample → playout
buffer), ``mark``, ``clear``, ``play`` (a prompt, 8 kHz).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from media.playout import PlayoutBuffer
from media.recorder import StereoMp3Recorder
from media.resample import Resampler
from media.tones import BeepDetector, InbandDtmfDetector
from media.vad import VoiceActivityDetector
from worker.agent.listen_audio import mix_saturating
from worker.legs import FRAME_BYTES
from worker.legs import SAMPLE_RATE as RATE

SILENCE = bytes(FRAME_BYTES)
BEEP_WINDOW_TICKS = 60 * 50  # answering machines beep early: listen for 60 s only


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

    def __post_init__(self) -> None:
        self.playout = PlayoutBuffer(RATE, 20, self.playout_max_ms)
        self._vad = VoiceActivityDetector(RATE, 2) if self.barge_in else None
        self._beep = BeepDetector(RATE) if self.detect_beep else None
        self._prompts = deque()
        self._return = {}

    def use_inband_dtmf(self, enabled: bool) -> None:
        """Detect DTMF tones in the caller's audio: for legs that negotiated no telephone-event
        (the trunk sends tones in-band). Off by default: RFC 4733 digits are also audible."""
        if not enabled:
            self._inband = None
        elif self._inband is None:
            self._inband = InbandDtmfDetector(RATE)

    # -- agent → caller (between ticks) -----------------------------------------------------------
    def agent_audio(self, pcm: bytes, rate: int) -> None:
        """Streamed audio from the agent at ``rate``; queued for playout (bounded)."""
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

    @property
    def agent_speaking(self) -> bool:
        return bool(self._prompts) or self.playout.playing

    # -- the tick ------------------------------------------------------------------------------
    def process(self, caller: bytes | None, now: float) -> bytes:
        """Steps 1-3 of the tick (see the module docstring); the frame the caller hears."""
        self.ticks += 1
        if caller is not None:
            self._taps(caller, now)
        sink = self.sink
        if sink is not None and sink.combine is None and not sink.paused:
            up = sink.resampler.process(SILENCE if self.muted or caller is None else caller)
            if up:
                sink.send(up)
        return self.next_out()

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
        stream, reached = self.playout.next_frame()
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
