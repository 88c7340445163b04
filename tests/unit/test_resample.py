"""Streaming resampling: tones keep frequency and level, chunking changes nothing audible."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from media.resample import COMMON_RATES, HALF_DELAY, Resampler

Signal = npt.NDArray[np.float64]


def sine(frequency: float, rate: int, seconds: float, amplitude: float = 10000.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * frequency * t)).astype("<i2").tobytes()


def samples(pcm: bytes) -> Signal:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def fit_tone(signal: Signal, rate: int, frequency: float) -> tuple[float, float]:
    """Least-squares amplitude of a tone, and the RMS of what is left over."""
    t = np.arange(len(signal)) / rate
    basis = np.stack((np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)), 1)
    coefficients, *_ = np.linalg.lstsq(basis, signal, rcond=None)
    residual = signal - basis @ coefficients
    return float(np.hypot(*coefficients)), float(np.sqrt(np.mean(residual**2)))


def peak_frequency(signal: Signal, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal)), 8 * len(signal)))
    return float(np.fft.rfftfreq(8 * len(signal), 1 / rate)[np.argmax(spectrum)])


def stream(resampler: Resampler, pcm: bytes, chunk: int) -> bytes:
    out = [resampler.process(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk)]
    return b"".join(out) + resampler.flush()


RATE_PAIRS = [(a, b) for a in COMMON_RATES for b in COMMON_RATES if a != b]


def flushed_length(in_samples: int, in_rate: int, out_rate: int) -> int:
    """A stream's output length with its flush: the ratio, plus the half-band filter's 3 ms
    tail for a 2:1 ratio (soxr trims its own delay)."""
    out = in_samples * out_rate // in_rate
    if out_rate == 2 * in_rate or in_rate == 2 * out_rate:
        out += HALF_DELAY * (2 if out_rate > in_rate else 1)
    return out


class TestResamplerTone:
    @pytest.mark.parametrize("low_latency", [True, False])
    def test_1khz_8k_to_16k_to_8k_keeps_frequency_and_amplitude(self, low_latency: bool) -> None:
        up = Resampler(8000, 16000, low_latency=low_latency)
        down = Resampler(16000, 8000, low_latency=low_latency)
        pcm = sine(1000, 8000, 1.0)
        wide = stream(up, pcm, 320)
        back = stream(down, wide, 640)
        assert len(wide) == 2 * flushed_length(len(pcm) // 2, 8000, 16000)
        assert len(back) == 2 * flushed_length(len(wide) // 2, 16000, 8000)
        for signal, rate in ((samples(wide), 16000), (samples(back), 8000)):
            middle = signal[rate // 10 : -rate // 10]
            assert peak_frequency(middle, rate) == pytest.approx(1000, abs=2)
            amplitude, residual = fit_tone(middle, rate, 1000)
            assert amplitude == pytest.approx(10000, rel=0.005)  # within 0.05 dB
            assert residual < 10  # about 60 dB below the tone

    @pytest.mark.parametrize(("in_rate", "out_rate"), RATE_PAIRS)
    def test_every_common_rate_pair(self, in_rate: int, out_rate: int) -> None:
        resampler = Resampler(in_rate, out_rate)
        out = samples(stream(resampler, sine(440, in_rate, 0.5), in_rate // 50 * 2))
        assert len(out) == flushed_length(in_rate // 2, in_rate, out_rate)
        middle = out[out_rate // 10 : -out_rate // 10]
        amplitude, residual = fit_tone(middle, out_rate, 440)
        assert amplitude == pytest.approx(10000, rel=0.005)
        assert residual < 10

    def test_downsampling_removes_what_the_lower_rate_cannot_carry(self) -> None:
        out = samples(stream(Resampler(16000, 8000), sine(5000, 16000, 0.5), 640))
        # A 5 kHz tone would alias to 3 kHz. Measured away from the tone's abrupt start and end,
        # which ring through any filter (the flush pushes the end's ringing out).
        assert np.sqrt(np.mean(out[800:-800] ** 2)) < 5


class TestResamplerStreaming:
    @pytest.mark.parametrize("low_latency", [True, False])
    @pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (48000, 8000)])
    def test_chunked_output_equals_one_piece(
        self, in_rate: int, out_rate: int, low_latency: bool
    ) -> None:
        pcm = sine(700, in_rate, 1.0)
        whole = stream(Resampler(in_rate, out_rate, low_latency=low_latency), pcm, len(pcm))
        for chunk in (2 * in_rate // 50, 154, 1002):
            resampler = Resampler(in_rate, out_rate, low_latency=low_latency)
            assert stream(resampler, pcm, chunk) == whole

    def test_odd_byte_is_carried_to_the_next_chunk(self) -> None:
        pcm = sine(1000, 8000, 0.2) + sine(300, 8000, 0.2)
        whole = stream(Resampler(8000, 16000), pcm, len(pcm))
        assert stream(Resampler(8000, 16000), pcm, 3) == whole
        assert stream(Resampler(8000, 16000), pcm, 321) == whole

    def test_silence_stays_silent(self) -> None:
        out = stream(Resampler(8000, 16000), bytes(8000), 320)
        assert out == bytes(len(out))
        assert len(out) == 2 * flushed_length(4000, 8000, 16000)

    def test_loud_input_is_clipped_not_wrapped(self) -> None:
        square = np.tile(np.array([32767] * 20 + [-32768] * 20, dtype="<i2"), 200).tobytes()
        out = samples(stream(Resampler(8000, 16000), square, 320))
        assert out.max() == 32767
        assert out.min() == -32768

    def test_no_clicks_at_chunk_edges(self) -> None:
        resampler = Resampler(8000, 24000)
        out = samples(stream(resampler, sine(1000, 8000, 1.0), 320))
        steady = out[2400:-2400]
        # A 10000-amplitude 1 kHz tone at 24 kHz moves at most 2*pi*1000/24000*10000 per sample.
        assert np.max(np.abs(np.diff(steady))) <= 2 * np.pi * 1000 / 24000 * 10000 * 1.01

    def test_flush_starts_a_new_stream(self) -> None:
        resampler = Resampler(16000, 8000)
        pcm = sine(500, 16000, 0.3)
        first = stream(resampler, pcm, 640)
        second = stream(resampler, pcm, 640)
        assert first == second

    def test_clear_drops_pending_audio(self) -> None:
        pcm = sine(500, 8000, 0.3)
        fresh = stream(Resampler(8000, 16000), pcm, 320)
        resampler = Resampler(8000, 16000)
        resampler.process(sine(3000, 8000, 0.1) + b"\x01")
        resampler.clear()
        assert stream(resampler, pcm, 320) == fresh

    def test_output_flows_every_chunk_in_low_latency_mode(self) -> None:
        resampler = Resampler(8000, 16000)
        sizes = [len(resampler.process(bytes(320))) for _ in range(50)]
        assert all(size == 640 for size in sizes[5:])
        assert sum(sizes) >= 50 * 640 - 16000 * 2 * 0.05  # less than 50 ms held back


class TestResamplerPassthrough:
    def test_equal_rates_return_the_same_bytes(self) -> None:
        resampler = Resampler(16000, 16000)
        pcm = sine(1000, 16000, 0.02)
        assert resampler.passthrough
        assert resampler.process(pcm) is pcm
        assert resampler.flush() == b""

    def test_equal_rates_still_carry_an_odd_byte(self) -> None:
        resampler = Resampler(8000, 8000)
        assert resampler.process(b"\x01\x02\x03") == b"\x01\x02"
        assert resampler.process(b"\x04") == b"\x03\x04"
        assert resampler.process(b"") == b""

    def test_rates_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            Resampler(0, 8000)

    def test_rates_are_reported(self) -> None:
        resampler = Resampler(8000, 48000)
        assert (resampler.in_rate, resampler.out_rate, resampler.passthrough) == (
            8000,
            48000,
            False,
        )
