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


_CENTRE = (TAPS - 1) // 2
_ODD: npt.NDArray[np.float64] = _KERNEL[1::2].copy()
"""The kernel's odd taps: a half-band filter's even taps are zero but the centre one, so each
output sample needs only these 48 products (or one, the centre tap) and the zeros are skipped
(polyphase: a quarter of the direct convolution's work)."""
_ODD_UP: npt.NDArray[np.float64] = 2.0 * _ODD
_CENTRE_UP = 2.0 * float(_KERNEL[_CENTRE])
_CENTRE_DOWN = float(_KERNEL[_CENTRE])
_HALF = _CENTRE // 2  # 24: the delay in input samples at 8 kHz


_rint, _minimum, _maximum, _multiply = np.rint, np.minimum, np.maximum, np.multiply


def _to_pcm(samples: npt.NDArray[np.float64]) -> bytes:
    # The ufuncs themselves, in place: np.clip's Python layers cost more than its work here.
    _rint(samples, out=samples)
    _minimum(samples, _INT16_MAX, out=samples)
    _maximum(samples, _INT16_MIN, out=samples)
    return samples.astype("<i2").tobytes()


class _Window:
    """One buffer per filter: the last ``keep`` input samples, then the newest frame's
    (reallocated only when the frame size changes), so a frame costs no concatenation."""

    __slots__ = ("buffer", "frame", "keep")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.frame = 0
        self.buffer: npt.NDArray[np.float64] = np.zeros(keep)

    def fill(self, x: npt.NDArray[np.int16]) -> npt.NDArray[np.float64]:
        """The history followed by ``x`` (converted to float)."""
        n = len(x)
        buffer = self.buffer
        if n != self.frame:
            grown = np.zeros(self.keep + n)
            grown[: self.keep] = buffer[: self.keep]  # the history slide() kept
            self.buffer = buffer = grown
            self.frame = n
        buffer[self.keep :] = x
        return buffer

    def slide(self) -> None:
        """Keep the last ``keep`` samples as the next frame's history."""
        buffer = self.buffer
        buffer[: self.keep] = buffer[self.frame :]


class Downsample2:
    """16 kHz → 8 kHz: low-pass, then every other sample (only the kept ones are computed)."""

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window = _Window(TAPS - 1)

    def process(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2")
        n = len(x)
        if n % 2:
            raise ValueError("Downsample2 needs an even number of samples")
        data = self._window.fill(x)
        half = n // 2
        # y[m] = centre * data[2m + 48] + sum_i odd[i] * data[2m + 2i + 1]
        out = np.correlate(data[1 : n + TAPS - 2 : 2], _ODD, "valid")
        out += _CENTRE_DOWN * data[_CENTRE : _CENTRE + n : 2]
        self._window.slide()
        assert len(out) == half
        return _to_pcm(out)


class Upsample2:
    """8 kHz → 16 kHz: a zero between samples, then low-pass (gain 2), computed polyphase: the
    even outputs are the input delayed (the centre tap), the odd ones the odd taps' products."""

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window = _Window(_CENTRE)

    def process(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2")
        n = len(x)
        data = self._window.fill(x)
        out = np.empty(2 * n)
        # y[2p] = 2 * centre * data[p + 24]; y[2p + 1] = sum_i 2 * odd[i] * data[p + i + 1]
        _multiply(data[_HALF : _HALF + n], _CENTRE_UP, out=out[0::2])
        out[1::2] = np.correlate(data[1:], _ODD_UP, "valid")
        self._window.slide()
        return _to_pcm(out)
