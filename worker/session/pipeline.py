"""One call's media pipeline between the leg (8 kHz PCM, one frame per 20 ms tick) and the agent.

Caller side, after each tick: recorder (left), VAD (barge-in), beep detector (voicemail),
in-band DTMF (``use_inband_dtmf``, for legs without RFC 4733), resample to the agent's rate,
hand to the agent sink. Agent side: streamed audio at any rate → resample → playout buffer
(marks, clear); prompts (say/play) → their own queue; the frame the caller hears mixes both.
Sans-I/O: the session calls ``next_out(now)`` and ``after_tick(caller, out, now)``; nothing
here awaits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from media.playout import MarkReached, PlayoutBuffer
from media.recorder import StereoMp3Recorder
from media.resample import Resampler
from media.stream import FRAME_BYTES
from media.stream import SAMPLE_RATE as RATE
from media.tones import BeepDetector, InbandDtmfDetector
from media.vad import VoiceActivityDetector
from worker.agent.listen_audio import mix_saturating

SILENCE = bytes(FRAME_BYTES)


@dataclass(frozen=True, slots=True)
class Interruption:
    """The caller spoke over agent audio; ``cleared_marks`` were flushed with it."""

    at: float
    cleared_marks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BeepDetected:
    at: float
    frequency: float


@dataclass(frozen=True, slots=True)
class InbandDigit:
    digit: str


@dataclass(frozen=True, slots=True)
class SpeechEdge:
    kind: str  # speech-start | speech-stop
    at: float


PipelineEvent = Interruption | BeepDetected | InbandDigit | SpeechEdge


@dataclass(slots=True)
class _Prompt:
    pcm: bytes
    on_done: Callable[[bool], None]
    offset: int = 0


@dataclass(slots=True)
class PipelineCounters:
    ticks: int = 0
    frames_to_agent: int = 0
    caller_silence_frames: int = 0
    interruptions: int = 0
    agent_bytes_in: int = 0


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
    beep_window_ticks: int = 60 * 50  # answering machines beep early: listen for 60 s only
    playout_max_ms: int = 10_000
    on_event: Callable[[PipelineEvent], None] | None = None
    on_marks: Callable[[list[MarkReached]], None] | None = None
    sink: AgentSink | None = None
    muted: bool = False
    counters: PipelineCounters = field(default_factory=PipelineCounters)
    playout: PlayoutBuffer = field(init=False)
    _vad: VoiceActivityDetector = field(init=False)
    _beep: BeepDetector | None = field(init=False)
    _inband: InbandDtmfDetector | None = field(init=False, default=None)
    _prompts: deque[_Prompt] = field(init=False)
    _return: dict[int, Resampler] = field(init=False)

    def __post_init__(self) -> None:
        self.playout = PlayoutBuffer(RATE, 20, self.playout_max_ms)
        self._vad = VoiceActivityDetector(RATE, 2)
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

    # -- agent → caller ------------------------------------------------------------------------
    def agent_audio(self, pcm: bytes, rate: int) -> None:
        """Streamed audio from the agent at ``rate``; queued for playout (bounded)."""
        self.counters.agent_bytes_in += len(pcm)
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

    def clear(self) -> list[str]:
        """Drop queued agent audio and prompts (barge-in, killAudio); the marks it cleared."""
        for resampler in self._return.values():
            resampler.clear()
        while self._prompts:
            self._prompts.popleft().on_done(False)
        return self.playout.clear()

    def play(self, pcm: bytes, on_done: Callable[[bool], None]) -> None:
        """Queue a prompt (8 kHz PCM); ``on_done(True)`` when fully played, False if cleared."""
        self._prompts.append(_Prompt(pcm, on_done))

    @property
    def agent_speaking(self) -> bool:
        return bool(self._prompts) or self.playout.playing

    def next_out(self, now: float) -> bytes:
        """The 20 ms the caller hears now: prompt and streamed audio, mixed when both play."""
        stream, reached = self.playout.next_frame()
        if reached and self.on_marks is not None:
            self.on_marks(reached)
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

    # -- caller → agent ------------------------------------------------------------------------
    def after_tick(self, caller: bytes | None, out: bytes, now: float) -> None:
        """Everything that needs the tick's caller frame and what the caller heard."""
        self.counters.ticks += 1
        if caller is None:
            self.counters.caller_silence_frames += 1
            caller = SILENCE
        else:
            self._analyse(caller, now)
        if self.recorder is not None:
            self.recorder.write_frame(caller, out)
        sink = self.sink
        if sink is None or sink.paused:
            return
        heard = SILENCE if self.muted else caller
        up = sink.resampler.process(heard)
        if sink.combine is not None:
            up = sink.combine(up, sink.out_resampler.process(out))
        if up:
            self.counters.frames_to_agent += 1
            sink.send(up)

    def _analyse(self, caller: bytes, now: float) -> None:
        emit = self.on_event
        vad = self._vad.process(caller, now)
        if vad is not None:
            if emit is not None:
                emit(SpeechEdge(vad.kind, vad.at))
            if vad.kind == "speech-start" and self.barge_in and self.agent_speaking:
                cleared = self.clear()
                self.counters.interruptions += 1
                if emit is not None:
                    emit(Interruption(now, tuple(cleared)))
        if self._beep is not None:
            # ~16 µs a tick: stop after the first beep or once the window has passed.
            beep = self._beep.feed(caller, now)
            if beep is not None or self.counters.ticks >= self.beep_window_ticks:
                self._beep = None
            if beep is not None and emit is not None:
                emit(BeepDetected(now, beep.frequency))
        if self._inband is not None and emit is not None:
            for digit in self._inband.feed(caller, now):
                emit(InbandDigit(digit))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
