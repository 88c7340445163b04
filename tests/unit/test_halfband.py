"""``media.halfband``: exact 2:1 rate changes for slin16 ExternalMedia frames: sizes, the
pass band and stop band, the delay, and a waveform kept through a round trip (where a general
low-latency resampler is not)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from media.halfband import TAPS, Downsample2, Upsample2
from media.resample import Resampler
from tests.e2e.harness import best_match, pattern, samples, tone


def _frames(pcm: bytes, size: int) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def _gain_db(before: bytes, after: bytes, skip: int) -> float:
    a, b = samples(before), samples(after)[skip:]
    return float(20 * np.log10(max(np.sqrt(np.mean(b * b)), 1e-9) / np.sqrt(np.mean(a * a))))


class TestExactSizes:
    def test_every_frame_halves_or_doubles(self) -> None:
        down, up = Downsample2(), Upsample2()
        for size in (640, 4, 1280, 8):
            assert len(down.process(bytes(size))) == size // 2
            assert len(up.process(bytes(size))) == size * 2

    def test_frames_of_any_size_give_the_whole_signals_filter(self) -> None:
        """Streamed in frames whose size changes (smaller and larger than the filter's
        history), the output is the FIR over the whole signal at once, sample for sample."""
        from media.halfband import _KERNEL

        rng = np.random.default_rng(3)
        sizes = [160, 160, 2, 160, 80, 240, 4, 320, 160]
        signal = rng.normal(0, 9000, 2 * sum(sizes)).clip(-32768, 32767).astype("<i2")
        pcm = signal.tobytes()

        up, down = Upsample2(), Downsample2()
        streamed_up = streamed_down = b""
        offset = 0
        for size in sizes:
            streamed_up += up.process(pcm[offset : offset + 2 * size])
            streamed_down += down.process(pcm[2 * offset : 2 * offset + 4 * size])
            offset += 2 * size

        def whole(x: npt.NDArray[np.float64], gain: float) -> npt.NDArray[np.int64]:
            y = np.convolve(x, gain * _KERNEL)[: len(x)]
            return np.clip(np.rint(y), -32768, 32767).astype(np.int64)

        half = signal[: sum(sizes)].astype(np.float64)
        stuffed = np.zeros(2 * len(half))
        stuffed[0::2] = half
        got_up = np.frombuffer(streamed_up, "<i2").astype(np.int64)
        got_down = np.frombuffer(streamed_down, "<i2").astype(np.int64)
        # Summed in another order, a sample exactly at .5 may round the other way: one step.
        assert len(got_up) == len(stuffed)
        assert np.abs(got_up - whole(stuffed, 2.0)).max() <= 1
        assert len(got_down) == len(signal) // 2
        assert np.abs(got_down - whole(signal.astype(np.float64), 1.0)[0::2]).max() <= 1

    def test_odd_sample_count_is_refused(self) -> None:
        with pytest.raises(ValueError, match="even"):
            Downsample2().process(bytes(6))


class TestFrequencyResponse:
    @pytest.mark.parametrize("freq", [300, 1000, 2000, 3000, 3400])
    def test_pass_band_is_flat(self, freq: int) -> None:
        wide = tone(freq, 0.5, 16000)
        narrow = b"".join(Downsample2().process(f) for f in [wide])
        assert abs(_gain_db(wide, narrow, TAPS)) < 0.2
        back = Upsample2().process(tone(freq, 0.5, 8000))
        assert abs(_gain_db(tone(freq, 0.5, 8000), back, TAPS * 2)) < 0.2

    @pytest.mark.parametrize("freq", [5000, 6000, 7500])
    def test_stop_band_is_removed(self, freq: int) -> None:
        wide = tone(freq, 0.5, 16000)
        assert _gain_db(wide, Downsample2().process(wide), TAPS) < -60


class TestRoundTrip:
    def test_waveform_kept_with_an_integer_delay(self) -> None:
        speech = pattern(1.5, seed=3)
        down, up = Downsample2(), Upsample2()
        out = b"".join(down.process(up.process(f)) for f in _frames(speech, 320))
        match = best_match(samples(out), samples(speech)[2000:8000])
        assert match.lag - 2000 == (TAPS - 1) // 2  # 48 at 16 kHz each way: 48 at 8 kHz
        assert match.score > 0.9999

    def test_better_than_the_low_latency_resampler(self) -> None:
        """Why 2:1 rate changes (slin16, a 16 kHz agent) use this and not soxr's variable-rate
        engine, which ``media.resample`` uses for other ratios: it changes the waveform's phase
        (and holds back 25-40 ms); ``Resampler``'s 2:1 path is this filter and keeps it."""
        speech = pattern(1.5, seed=3)
        vr_up = soxr.ResampleStream(8000, 16000, 1, dtype="float32", quality="HQ", vr=True)
        vr_down = soxr.ResampleStream(16000, 8000, 1, dtype="float32", quality="HQ", vr=True)
        out = np.concatenate(
            [
                vr_down.resample_chunk(vr_up.resample_chunk(samples(f).astype(np.float32)))
                for f in _frames(speech, 320)
            ]
        )
        general = best_match(out.astype(np.float64), samples(speech)[2000:8000]).score
        assert general < 0.99  # the waveform is changed (phase), if not the sound
        up, down = Resampler(8000, 16000), Resampler(16000, 8000)
        ours = b"".join(down.process(up.process(f)) for f in _frames(speech, 320))
        assert best_match(samples(ours), samples(speech)[2000:8000]).score > 0.9999
