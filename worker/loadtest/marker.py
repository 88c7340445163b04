"""The timing marker the probe phones put in their audio, and its detector, sans-I/O.

A marker is a 60 ms burst of one loud tone after at least 100 ms of quiet. Its frequency, one of
``FREQUENCIES``, says which marker it is (``marker_id``: the probe's marker count modulo 8), so a
late or lost marker never shifts the pairing of the others. It survives what the worker does to
audio (G.711, 8 ↔ 16 kHz resampling, the jitter and playout buffers): the detector looks for the
first loud sample after the quiet (an energy edge, so a few ms of filter delay only move it) and
reads the frequency from 20 ms of the tone after it. A detection is timed by the chunk that held
the onset: its receipt time is what the caller passes as ``at`` (the frame a phone or an agent
received), so the latency it gives includes every queue and the tick's batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FREQUENCIES: tuple[float, ...] = (500.0, 850.0, 1200.0, 1550.0, 1900.0, 2250.0, 2600.0, 2950.0)
"""Marker ``i``'s tone; 350 Hz apart, inside the telephone band, away from its edges."""
TONE_S = 0.060
AMPLITUDE = 12000.0
RAMP_S = 0.001
ONSET_LEVEL = 4000
"""A sample at least this loud, after the quiet, is a marker's onset."""
QUIET_LEVEL = 1500
"""Samples below this are quiet (the probes' background noise is far below it)."""
REARM_S = 0.100
"""Quiet needed before an onset counts: the tail of the previous marker cannot start another."""
GUARD_S = 0.004
"""The tone's rising edge: samples this close before the onset may be between the levels."""
SKIP_S = 0.002
ANALYSIS_S = 0.020
"""The frequency is read from this much tone, starting ``SKIP_S`` after the onset."""
MAX_ERROR_HZ = 150.0
_FFT_SIZE = 8192

Samples = npt.NDArray[np.int32]


def marker_id(count: int) -> int:
    """The id of a probe's ``count``-th marker (0, 1, 2 ...)."""
    return count % len(FREQUENCIES)


def marker_tone(marker: int, rate: int) -> bytes:
    """Marker ``marker``'s burst as 16-bit little-endian PCM at ``rate``, with 1 ms ramps."""
    n = round(TONE_S * rate)
    t = np.arange(n) / rate
    envelope = np.ones(n)
    ramp = max(1, round(RAMP_S * rate))
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
    envelope[-ramp:] = np.linspace(1.0, 0.0, ramp)
    tone = AMPLITUDE * envelope * np.sin(2 * np.pi * FREQUENCIES[marker] * t)
    return np.round(tone).astype("<i2").tobytes()


@dataclass(frozen=True, slots=True)
class Detection:
    """A marker heard: its id, the ``at`` of the chunk that held its onset, the tone's measured
    frequency and where in that chunk the onset was (seconds from the chunk's first sample)."""

    marker_id: int
    at: float
    frequency_hz: float
    offset_s: float


@dataclass(slots=True)
class _Pending:
    at: float
    offset_s: float
    needed: int
    tone: list[Samples]


class MarkerDetector:
    """Finds markers in a stream of 16-bit PCM at ``rate``, fed in chunks of any size.

    ``feed(pcm, at)`` returns the markers whose tone is complete (a detection may come one chunk
    after its onset, still timed by the onset's chunk). An onset whose tone matches none of
    ``FREQUENCIES`` is counted in ``rejected``.
    """

    __slots__ = (
        "_analysis",
        "_guard",
        "_last_loud",
        "_last_onset",
        "_pending",
        "_position",
        "_rearm",
        "_skip",
        "rate",
        "rejected",
    )

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._rearm = round(REARM_S * rate)
        self._guard = round(GUARD_S * rate)
        self._skip = round(SKIP_S * rate)
        self._analysis = round(ANALYSIS_S * rate)
        self._position = 0  # the stream index of the chunk's first sample
        self._last_loud = -(1 << 40)
        self._last_onset = -(1 << 40)
        self._pending: _Pending | None = None
        self.rejected = 0

    def feed(self, pcm: bytes, at: float) -> list[Detection]:
        x = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2).astype(np.int32)
        start = self._position
        self._position += len(x)
        out: list[Detection] = []
        if self._pending is not None:
            self._collect(x, out)
        magnitude = np.abs(x)
        loud = np.flatnonzero(magnitude >= QUIET_LEVEL)
        strong = np.flatnonzero(magnitude >= ONSET_LEVEL)
        if strong.size:
            # The loud sample before each strong one's guard band (in this chunk or earlier).
            before = np.searchsorted(loud, strong - self._guard)
            previous = np.where(before > 0, loud[before - 1] + start, self._last_loud)
            onsets = strong[previous < strong + start - self._rearm]
            for index in onsets.tolist():
                if start + index <= self._last_onset + self._rearm:
                    continue
                self._last_onset = start + index
                self._pending = _Pending(at, index / self.rate, self._skip + self._analysis, [])
                self._collect(x[index:], out)
        if loud.size:
            self._last_loud = start + int(loud[-1])
        return out

    def _collect(self, x: Samples, out: list[Detection]) -> None:
        pending = self._pending
        assert pending is not None
        have = sum(len(part) for part in pending.tone)
        pending.tone.append(x[: max(0, pending.needed - have)])
        if have + len(x) < pending.needed:
            return
        self._pending = None
        tone = np.concatenate(pending.tone)[self._skip : pending.needed].astype(np.float64)
        frequency = _peak_frequency(tone, self.rate)
        errors = [abs(frequency - f) for f in FREQUENCIES]
        best = int(np.argmin(errors))
        if errors[best] > MAX_ERROR_HZ:
            self.rejected += 1
            return
        out.append(Detection(best, pending.at, round(frequency, 1), pending.offset_s))


def _peak_frequency(tone: npt.NDArray[np.float64], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone)), _FFT_SIZE))
    return float(np.argmax(spectrum)) * rate / _FFT_SIZE
