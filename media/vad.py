"""Voice activity detection for one audio stream: webrtcvad's per-frame verdicts, smoothed into
``speech-start`` / ``speech-stop`` events by a start delay and a hangover.

Timing. ``now`` is the time (seconds, the caller's monotonic clock) at the end of the chunk passed
to ``process``. An event's ``at`` is the media time the transition happened, not when it was
detected: the start of the first voiced frame of the run for ``speech-start`` (detected
``speech_start_ms`` later), the end of the last voiced frame for ``speech-stop`` (detected
``hangover_ms`` later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import webrtcvad

__all__ = ["SUPPORTED_RATES", "VadEvent", "VadEventKind", "VoiceActivityDetector"]

SUPPORTED_RATES = (8000, 16000, 32000, 48000)
_DIRECT_FRAME_MS = (10, 20, 30)  # sizes webrtcvad takes as they are
_REFRAME_MS = 20  # other chunk sizes are cut into frames of this length

VadEventKind = Literal["speech-start", "speech-stop"]


@dataclass(frozen=True, slots=True)
class VadEvent:
    """Speech started or stopped at media time ``at`` (seconds)."""

    kind: VadEventKind
    at: float


class VoiceActivityDetector:
    """webrtcvad over 16-bit mono PCM, with hysteresis; ``process`` returns at most one event.

    Chunks of 10, 20 or 30 ms go to webrtcvad as they are; any other size (odd bytes included) is
    buffered and cut into 20 ms frames. If one chunk holds several transitions, ``process``
    returns the first and the following calls return the rest, in order.
    """

    __slots__ = (
        "_bytes_per_second",
        "_direct_sizes",
        "_events",
        "_frames",
        "_hangover_ms",
        "_invalid",
        "_last_voiced_end",
        "_onset",
        "_pending",
        "_reframe_bytes",
        "_sample_rate",
        "_speaking",
        "_speech_start_ms",
        "_unvoiced_ms",
        "_vad",
        "_voiced_ms",
    )

    def __init__(
        self,
        sample_rate: int = 8000,
        aggressiveness: int = 2,
        *,
        speech_start_ms: float = 60.0,
        hangover_ms: float = 400.0,
    ) -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise ValueError(f"sample_rate must be one of {SUPPORTED_RATES}, not {sample_rate}")
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0..3, not {aggressiveness}")
        if speech_start_ms < 0 or hangover_ms < 0:
            raise ValueError("speech_start_ms and hangover_ms must not be negative")
        self._sample_rate = sample_rate
        self._vad = webrtcvad.Vad(aggressiveness)
        self._speech_start_ms = float(speech_start_ms)
        self._hangover_ms = float(hangover_ms)
        bytes_per_ms = sample_rate * 2 // 1000
        self._bytes_per_second = float(sample_rate * 2)
        self._direct_sizes = frozenset(ms * bytes_per_ms for ms in _DIRECT_FRAME_MS)
        self._reframe_bytes = _REFRAME_MS * bytes_per_ms
        self._pending = bytearray()
        self._events: deque[VadEvent] = deque()
        self._speaking = False
        self._voiced_ms = 0.0
        self._unvoiced_ms = 0.0
        self._onset = 0.0
        self._last_voiced_end = 0.0
        self._frames = 0
        self._invalid = 0

    @property
    def speaking(self) -> bool:
        """True between a ``speech-start`` and the following ``speech-stop``."""
        return self._speaking

    @property
    def frames(self) -> int:
        """Frames classified so far."""
        return self._frames

    @property
    def invalid(self) -> int:
        """Chunks or frames rejected (not bytes, or refused by webrtcvad)."""
        return self._invalid

    def reset(self) -> None:
        """Forget buffered audio, pending events and state (no event is produced)."""
        self._pending.clear()
        self._events.clear()
        self._speaking = False
        self._voiced_ms = 0.0
        self._unvoiced_ms = 0.0

    def process(self, pcm: bytes, now: float) -> VadEvent | None:
        """Classify ``pcm`` (16-bit mono at ``sample_rate``) ending at ``now``; never raises."""
        data: object = pcm  # checked at run time: a bad chunk is counted, not raised
        try:
            now = float(now)
        except (TypeError, ValueError):
            data = None
        if isinstance(data, memoryview):
            data = data.tobytes()  # len() of a typed view counts items, not bytes
        if isinstance(data, bytes | bytearray):
            size = len(data)
            if not self._pending and size in self._direct_sizes:
                self._classify(bytes(data), now)
            elif size:
                self._reframe(data, now)
        else:
            self._invalid += 1
        if self._events:
            return self._events.popleft()
        return None

    def _reframe(self, pcm: bytes | bytearray, now: float) -> None:
        pending = self._pending
        pending += pcm
        step = self._reframe_bytes
        usable = len(pending) - len(pending) % step
        if not usable:
            return
        end_time = now - (len(pending) - step) / self._bytes_per_second
        for offset in range(0, usable, step):
            self._classify(bytes(pending[offset : offset + step]), end_time)
            end_time += step / self._bytes_per_second
        del pending[:usable]

    def _classify(self, frame: bytes, end: float) -> None:
        try:
            voiced = self._vad.is_speech(frame, self._sample_rate)
        except Exception:  # webrtcvad raises its own unexported Error type
            self._invalid += 1
            return
        self._frames += 1
        duration_ms = len(frame) * 1000.0 / self._bytes_per_second
        if voiced:
            if self._speaking:
                self._unvoiced_ms = 0.0
                self._last_voiced_end = end
                return
            if self._voiced_ms == 0.0:
                self._onset = end - duration_ms / 1000.0
            self._voiced_ms += duration_ms
            if self._voiced_ms >= self._speech_start_ms:
                self._speaking = True
                self._unvoiced_ms = 0.0
                self._last_voiced_end = end
                self._events.append(VadEvent("speech-start", self._onset))
        elif self._speaking:
            self._unvoiced_ms += duration_ms
            if self._unvoiced_ms >= self._hangover_ms:
                self._speaking = False
                self._voiced_ms = 0.0
                self._events.append(VadEvent("speech-stop", self._last_voiced_end))
        else:
            self._voiced_ms = 0.0
