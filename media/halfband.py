"""Exact 2:1 rate changes of 16-bit mono PCM (8 ⇄ 16 kHz) with one linear-phase half-band FIR,
for streams that change rate on every 20 ms frame (Asterisk's slin16 ExternalMedia).

Every call gives exactly twice (``Upsample2``) or half (``Downsample2``) the samples it was
given, so a 640-byte 16 kHz frame is always a 320-byte 8 kHz frame and back, with no buffering
between frames. The filter (97 taps, Kaiser β 8: flat to about 3.6 kHz, -20 dB at 4.2 kHz,
-78 dB at 5 kHz) delays by 48 samples at 16 kHz (24 at 8 kHz, 3 ms), the same for every
frequency, so a round trip keeps the waveform sample for sample (a general resampler's
low-latency mode does not: it scores 0.95 where this scores 0.99999 in
``tests/unit/test_halfband.py``). State (the last input samples) carries across calls; inputs
to ``Downsample2`` must hold an even number of samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

TAPS = 97
_n = np.arange(TAPS) - (TAPS - 1) / 2
_KERNEL: npt.NDArray[np.float64] = 0.5 * np.sinc(0.5 * _n) * np.kaiser(TAPS, 8.0)
_KERNEL /= _KERNEL.sum()
_INT16_MIN, _INT16_MAX = -32768.0, 32767.0


def _to_pcm(samples: npt.NDArray[np.float64]) -> bytes:
    return np.clip(np.rint(samples), _INT16_MIN, _INT16_MAX).astype("<i2").tobytes()


class Downsample2:
    """16 kHz → 8 kHz: low-pass, then every other sample."""

    __slots__ = ("_history",)

    def __init__(self) -> None:
        self._history = np.zeros(TAPS - 1)

    def process(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        if len(x) % 2:
            raise ValueError("Downsample2 needs an even number of samples")
        data = np.concatenate((self._history, x))
        self._history = data[-(TAPS - 1) :]
        filtered = np.convolve(data, _KERNEL, mode="valid")
        return _to_pcm(filtered[::2])


class Upsample2:
    """8 kHz → 16 kHz: a zero between samples, then low-pass (gain 2)."""

    __slots__ = ("_history",)

    def __init__(self) -> None:
        self._history = np.zeros(TAPS - 1)

    def process(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        stuffed = np.zeros(len(x) * 2)
        stuffed[::2] = x * 2.0
        data = np.concatenate((self._history, stuffed))
        self._history = data[-(TAPS - 1) :]
        return _to_pcm(np.convolve(data, _KERNEL, mode="valid"))
