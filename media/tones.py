"""Tone detection in decoded call audio: in-band DTMF digits, and the single sustained tone of a
voicemail beep.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

ROW_FREQUENCIES = (697.0, 770.0, 852.0, 941.0)
COLUMN_FREQUENCIES = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")

_Samples = npt.NDArray[np.float64]
_EMPTY = np.zeros(0, dtype=np.float64)


def _db_to_power_ratio(db: float) -> float:
    return float(10.0 ** (db / 10.0))


def _dbfs_to_amplitude(dbfs: float) -> float:
    return float(32768.0 * 10.0 ** (dbfs / 20.0))


class _SampleStream:
    """Turns PCM chunks into float samples, carrying an odd byte and a partial block over.

    A chunk that comes more than ``max_gap`` seconds after the previous one ended (by the
    previous chunk's ``now`` and length), or before the previous one, breaks the stream.
    """

    __slots__ = ("_carry", "_expected", "_last_now", "_max_gap", "_rest", "_sample_rate")

    def __init__(self, sample_rate: int, max_gap: float) -> None:
        self._sample_rate = sample_rate
        self._max_gap = max_gap
        self._carry = b""
        self._rest = _EMPTY
        self._last_now: float | None = None
        self._expected = 0.0

    def blocks(self, pcm: bytes, now: float, size: int) -> tuple[_Samples, bool]:
        """Whole blocks of ``size`` samples (rows), and whether a time gap broke the stream."""
        gap = self._last_now is not None and (
            now < self._last_now or now - self._expected > self._max_gap
        )
        if gap:
            self._carry = b""
            self._rest = _EMPTY
        if self._carry:
            pcm = self._carry + pcm
            self._carry = b""
        if len(pcm) & 1:
            self._carry = pcm[-1:]
        new = np.frombuffer(pcm, dtype="<i2", count=len(pcm) >> 1).astype(np.float64)
        self._last_now = now
        self._expected = now + len(new) / self._sample_rate
        samples = np.concatenate((self._rest, new)) if len(self._rest) else new
        whole = len(samples) // size * size
        self._rest = samples[whole:]
        return samples[:whole].reshape(-1, size), gap

    def reset(self) -> None:
        self._carry = b""
        self._rest = _EMPTY
        self._last_now = None


class InbandDtmfDetector:
    """Finds DTMF key presses in PCM, each press reported once (ITU-T Q.23/Q.24 style checks).

    The signal is cut into blocks of 12.75 ms (102 samples at 8 kHz). In each block, the power at
    the eight DTMF frequencies is the single-bin DFT that Goertzel's recurrence computes, taken here
    as one matrix product for all eight at once. A block holds a digit when the strongest row and
    column tones are each at least ``min_level_dbfs``, carry together at least 80 % of the block's
    energy, stand 8 dB above the other tones of their group, and differ by no more than the allowed
    twist (column up to 8 dB weaker or 4 dB stronger than row). A digit is reported after two
    consecutive blocks: tones of 40 ms or more are always found, tones under 23 ms never. It is
    released after two blocks without it, so a key held down is reported once.
    """

    __slots__ = (
        "_basis",
        "_block",
        "_candidate",
        "_hits",
        "_max_twist",
        "_min_power",
        "_min_twist",
        "_quiet",
        "_reported",
        "_stream",
    )

    _HITS_TO_REPORT = 2
    _QUIET_TO_RELEASE = 2
    _MIN_FRACTION = 0.8
    _RELATIVE_PEAK = 10.0**-0.8  # 8 dB

    def __init__(self, sample_rate: int = 8000, min_level_dbfs: float = -36.0) -> None:
        self._block = round(sample_rate * 0.01275)
        n = np.arange(self._block)[:, np.newaxis]
        frequencies = np.array(ROW_FREQUENCIES + COLUMN_FREQUENCIES)
        angles = 2.0 * np.pi * n * frequencies / sample_rate
        self._basis = np.concatenate((np.cos(angles), np.sin(angles)), axis=1)
        # A sine of amplitude A gives a single-bin power of (A * N / 2) ** 2.
        self._min_power = (_dbfs_to_amplitude(min_level_dbfs) * self._block / 2.0) ** 2
        self._min_twist = _db_to_power_ratio(-8.0)  # column weaker than row: "normal" twist
        self._max_twist = _db_to_power_ratio(4.0)  # column stronger than row: "reverse" twist
        self._stream = _SampleStream(sample_rate, max_gap=0.25)
        self._candidate: str | None = None
        self._hits = 0
        self._reported: str | None = None
        self._quiet = 0

    def feed(self, pcm: bytes, now: float) -> list[str]:
        """Take the next chunk of PCM; return the digits whose press was confirmed in it.

        ``now`` is used only to notice a gap in the stream (more than 0.25 s after the previous
        chunk ended), which restarts detection.
        """
        blocks, gap = self._stream.blocks(pcm, now, self._block)
        if gap:
            self._reset_state()
        if not len(blocks):
            return []
        found: list[str] = []
        for digit in self._classify(blocks):
            if digit is not None and digit == self._candidate:
                self._hits += 1
            else:
                self._candidate = digit
                self._hits = 1
            if self._reported is not None:
                if digit == self._reported:
                    self._quiet = 0
                else:
                    self._quiet += 1
                    if self._quiet >= self._QUIET_TO_RELEASE:
                        self._reported = None
            if self._reported is None and digit is not None and self._hits >= self._HITS_TO_REPORT:
                found.append(digit)
                self._reported = digit
                self._quiet = 0
        return found

    def reset(self) -> None:
        """Forget everything heard so far."""
        self._stream.reset()
        self._reset_state()

    def _reset_state(self) -> None:
        self._candidate = None
        self._hits = 0
        self._reported = None
        self._quiet = 0

    def _classify(self, blocks: _Samples) -> list[str | None]:
        projections = blocks @ self._basis
        powers = (projections[:, :8] ** 2 + projections[:, 8:] ** 2).tolist()
        energies = np.einsum("ij,ij->i", blocks, blocks).tolist()
        return [self._digit(p, e) for p, e in zip(powers, energies, strict=True)]

    def _digit(self, powers: list[float], energy: float) -> str | None:
        rows = powers[:4]
        columns = powers[4:]
        row_power = max(rows)
        column_power = max(columns)
        if (
            row_power < self._min_power
            or column_power < self._min_power
            or 2.0 * (row_power + column_power) < self._MIN_FRACTION * self._block * energy
            or column_power < self._min_twist * row_power
            or column_power > self._max_twist * row_power
        ):
            return None
        row = rows.index(row_power)
        column = columns.index(column_power)
        limit = self._RELATIVE_PEAK * row_power
        if any(power > limit for index, power in enumerate(rows) if index != row):
            return None
        limit = self._RELATIVE_PEAK * column_power
        if any(power > limit for index, power in enumerate(columns) if index != column):
            return None
        return KEYPAD[row][column]


@dataclass(frozen=True, slots=True)
class BeepEvent:
    """A single sustained tone that has ended: its frequency in Hz and how long it lasted."""

    frequency: float
    duration_ms: int


class BeepDetector:
    """Detects a voicemail beep: one steady tone between ``min_hz`` and ``max_hz``.

    Every 20 ms block is windowed (Hann) and its spectrum searched for a peak that holds at least
    90 % of the block's energy within ±100 Hz, at ``min_level_dbfs`` or above, within 30 Hz of the
    tone's frequency so far. Once such blocks have lasted ``min_ms``, the last ``min_ms`` (at most
    240 ms) of audio are checked again at a finer resolution, so that two tones closer than 100 Hz
    (a 440+480 Hz ringback) are not taken for one. The event is reported when the tone ends, or
    once it has lasted ``max_ms``. Dual tones (DTMF, dial tone), speech and noise fail the test.
    """

    __slots__ = (
        "_band",
        "_bin_hz",
        "_block",
        "_blocks_to_confirm",
        "_blocks_to_report",
        "_fft_size",
        "_history",
        "_last_db",
        "_min_power",
        "_peak_half_width",
        "_ready",
        "_reported",
        "_sample_rate",
        "_stream",
        "_tone_blocks",
        "_tone_frequency",
        "_verified",
        "_window",
    )

    _MIN_FRACTION = 0.9
    _PEAK_HALF_WIDTH_HZ = 100.0
    _MAX_DRIFT_HZ = 30.0
    _MAX_STEP_DB = 6.0
    _VERIFY_MS = 240

    def __init__(
        self,
        sample_rate: int = 8000,
        min_ms: int = 250,
        max_ms: int = 4000,
        min_hz: float = 300.0,
        max_hz: float = 3000.0,
        min_level_dbfs: float = -40.0,
    ) -> None:
        if not 0 < min_ms <= max_ms:
            raise ValueError(f"need 0 < min_ms <= max_ms, got {min_ms}, {max_ms}")
        self._sample_rate = sample_rate
        self._block = sample_rate // 50
        self._fft_size = 1 << (2 * self._block - 1).bit_length()
        self._window = np.hanning(self._block)
        self._bin_hz = sample_rate / self._fft_size
        self._band = (math.ceil(min_hz / self._bin_hz), math.floor(max_hz / self._bin_hz) + 1)
        self._peak_half_width = round(self._PEAK_HALF_WIDTH_HZ / self._bin_hz)
        # Mean square of a sine at the given level.
        self._min_power = _dbfs_to_amplitude(min_level_dbfs) ** 2 / 2.0
        self._blocks_to_confirm = -(-min_ms // 20)
        self._blocks_to_report = max_ms // 20
        history_blocks = min(self._blocks_to_confirm, self._VERIFY_MS // 20)
        self._history: deque[_Samples] = deque(maxlen=history_blocks)
        self._stream = _SampleStream(sample_rate, max_gap=0.25)
        self._ready: deque[BeepEvent] = deque()
        self._tone_blocks = 0
        self._tone_frequency = 0.0
        self._last_db = 0.0
        self._verified = False
        self._reported = False

    def feed(self, pcm: bytes, now: float) -> BeepEvent | None:
        """Take the next chunk of PCM; return a beep that ended in it (or reached ``max_ms``).

        ``now`` is used only to notice a gap in the stream (more than 0.25 s after the previous
        chunk ended), which ends any tone in progress.
        """
        blocks, gap = self._stream.blocks(pcm, now, self._block)
        if gap:
            self._end_tone()
        for block in blocks:
            self._step(block)
        return self._ready.popleft() if self._ready else None

    def reset(self) -> None:
        """Forget everything heard so far, including beeps not yet returned."""
        self._stream.reset()
        self._ready.clear()
        self._drop_tone()

    def _step(self, block: _Samples) -> None:
        frequency, level_db = self._dominant_tone(block)
        if frequency is None:
            self._end_tone()
            return
        if (
            self._tone_blocks
            and abs(frequency - self._tone_frequency) <= self._MAX_DRIFT_HZ
            and abs(level_db - self._last_db) <= self._MAX_STEP_DB
        ):  # the tone goes on: keep a running mean of the per-block estimates
            self._tone_frequency += (frequency - self._tone_frequency) / (self._tone_blocks + 1)
        else:
            self._end_tone()
            self._tone_frequency = frequency
        self._tone_blocks += 1
        self._last_db = level_db
        self._history.append(block)
        if self._tone_blocks == self._blocks_to_confirm:
            self._verified = self._single_tone(np.concatenate(self._history))
        if self._tone_blocks == self._blocks_to_report and self._verified:
            self._report()

    def _dominant_tone(self, block: _Samples) -> tuple[float | None, float]:
        """The in-band frequency holding most of the block's energy, and the block's level."""
        mean_square = float(np.dot(block, block)) / len(block)
        if mean_square < self._min_power:
            return None, 0.0
        spectrum = np.abs(np.fft.rfft(block * self._window, self._fft_size)) ** 2
        low, high = self._band
        peak = low + int(np.argmax(spectrum[low:high]))
        width = self._peak_half_width
        if spectrum[max(peak - width, 0) : peak + width + 1].sum() < self._MIN_FRACTION * float(
            spectrum.sum()
        ):
            return None, 0.0
        frequency = peak * self._bin_hz
        if 0 < peak < len(spectrum) - 1:  # parabolic interpolation on the log spectrum
            left, centre, right = np.log(spectrum[peak - 1 : peak + 2] + 1e-12).tolist()
            denominator = left - 2.0 * centre + right
            if denominator < 0.0:
                frequency += 0.5 * (left - right) / denominator * self._bin_hz
        return frequency, 10.0 * math.log10(mean_square)

    def _single_tone(self, samples: _Samples) -> bool:
        """Whether one spectral line, near the tone's frequency, holds the samples' energy."""
        size = 1 << (4 * len(samples) - 1).bit_length()
        spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples)), size)) ** 2
        frequencies = np.fft.rfftfreq(size, 1.0 / self._sample_rate)
        around = np.abs(frequencies - self._tone_frequency) <= self._MAX_DRIFT_HZ
        peak = frequencies[int(np.argmax(np.where(around, spectrum, 0.0)))]
        half_width = 2.5 * self._sample_rate / len(samples)  # Hann main lobe, with some margin
        near = np.abs(frequencies - peak) <= half_width
        return bool(spectrum[near].sum() >= self._MIN_FRACTION * spectrum.sum())

    def _report(self) -> None:
        self._ready.append(BeepEvent(round(self._tone_frequency, 1), self._tone_blocks * 20))
        self._reported = True

    def _end_tone(self) -> None:
        if self._verified and not self._reported:
            self._report()
        self._drop_tone()

    def _drop_tone(self) -> None:
        self._tone_blocks = 0
        self._verified = False
        self._reported = False
        self._history.clear()
