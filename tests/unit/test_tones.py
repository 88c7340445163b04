"""In-band DTMF (ITU-T Q.23/Q.24) and voicemail-beep detection on synthetic numpy signals."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from media.tones import (
    COLUMN_FREQUENCIES,
    KEYPAD,
    ROW_FREQUENCIES,
    BeepDetector,
    BeepEvent,
    InbandDtmfDetector,
)

Signal = npt.NDArray[np.float64]
RATE = 8000
ALL_DIGITS = "".join(KEYPAD)


def silence(ms: float, rate: int = RATE) -> Signal:
    return np.zeros(int(rate * ms / 1000))


def sine(
    frequency: float, ms: float, amplitude: float, rate: int = RATE, phase: float = 0
) -> Signal:
    t = np.arange(int(rate * ms / 1000)) / rate
    return amplitude * np.sin(2 * np.pi * frequency * t + phase)


def dtmf(
    digit: str,
    ms: float,
    amplitude: float = 6000.0,
    twist_db: float = 0.0,
    rate: int = RATE,
    phase: float = 0.0,
) -> Signal:
    """A key's two tones; ``twist_db`` is the column tone's level relative to the row tone."""
    row = next(r for r, keys in enumerate(KEYPAD) if digit in keys)
    column = KEYPAD[row].index(digit)
    return sine(ROW_FREQUENCIES[row], ms, amplitude, rate, phase) + sine(
        COLUMN_FREQUENCIES[column], ms, amplitude * 10 ** (twist_db / 20), rate, 2.1 * phase
    )


def speech_like(seconds: float, rng: np.random.Generator, rate: int = RATE) -> Signal:
    """Voiced syllables (gliding pitch, harmonics shaped by three formants) and fricative noise."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    pitch = 110 + 40 * np.sin(2 * np.pi * 0.6 * t) + 15 * np.sin(2 * np.pi * 3.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    formants = [(rng.uniform(400, 850), 90.0), (rng.uniform(900, 1700), 120.0), (2500.0, 200.0)]
    voiced = np.zeros(n)
    for k in range(1, 32):
        gain = sum(np.exp(-0.5 * ((k * pitch - f) / width) ** 2) for f, width in formants)
        voiced += gain * np.sin(k * phase) / np.sqrt(k)
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) ** 0.6
    fricatives = rng.normal(0, 0.3, n) * (syllables < 0.05)
    signal: Signal = voiced * syllables + fricatives
    signal *= 12000 / np.max(np.abs(signal))
    return signal


def pcm(signal: Signal) -> bytes:
    return np.clip(np.round(signal), -32768, 32767).astype("<i2").tobytes()


def detect_dtmf(
    signal: Signal, chunk_bytes: int = 320, detector: InbandDtmfDetector | None = None
) -> str:
    detector = detector or InbandDtmfDetector()
    data = pcm(signal)
    found = []
    for start in range(0, len(data), chunk_bytes):
        found += detector.feed(data[start : start + chunk_bytes], start / 16000)
    return "".join(found)


def detect_beeps(
    signal: Signal, chunk_bytes: int = 320, detector: BeepDetector | None = None, rate: int = RATE
) -> list[BeepEvent]:
    detector = detector or BeepDetector(rate)
    data = pcm(signal)
    found = []
    for start in range(0, len(data), chunk_bytes):
        event = detector.feed(data[start : start + chunk_bytes], start / (2 * rate))
        if event is not None:
            found.append(event)
    return found


class TestItuQ23DtmfFrequencies:
    def test_keypad_layout(self) -> None:
        assert ROW_FREQUENCIES == (697.0, 770.0, 852.0, 941.0)
        assert COLUMN_FREQUENCIES == (1209.0, 1336.0, 1477.0, 1633.0)
        assert ALL_DIGITS == "123A456B789C*0#D"


class TestInbandDtmfDetection:
    @pytest.mark.parametrize("digit", ALL_DIGITS)
    def test_every_digit(self, digit: str) -> None:
        assert detect_dtmf(np.concatenate((silence(100), dtmf(digit, 100), silence(100)))) == digit

    def test_a_sequence_with_short_gaps(self) -> None:
        signal = np.concatenate([np.concatenate((dtmf(d, 60), silence(50))) for d in ALL_DIGITS])
        assert detect_dtmf(signal) == ALL_DIGITS

    @pytest.mark.parametrize("chunk_bytes", [2, 75, 160, 320, 1000, 16000])
    def test_chunking_does_not_matter(self, chunk_bytes: int) -> None:
        signal = np.concatenate([np.concatenate((dtmf(d, 70), silence(60))) for d in "159#0"])
        assert detect_dtmf(signal, chunk_bytes) == "159#0"

    def test_held_key_is_reported_once(self) -> None:
        assert detect_dtmf(np.concatenate((dtmf("8", 3000), silence(100)))) == "8"

    def test_same_key_twice_is_two_presses(self) -> None:
        signal = np.concatenate((dtmf("2", 80), silence(60), dtmf("2", 80), silence(60)))
        assert detect_dtmf(signal) == "22"

    def test_40_ms_tones_are_found_at_any_alignment(self) -> None:
        rng = np.random.default_rng(40)
        for trial in range(64):
            digit = ALL_DIGITS[trial % 16]
            offset = silence(trial * 0.4)  # shift across a whole block
            signal = np.concatenate(
                (offset, dtmf(digit, 40, rng.uniform(1500, 12000), phase=rng.uniform(0, 6)))
            )
            assert detect_dtmf(np.concatenate((signal, silence(60)))) == digit, trial

    def test_tones_under_23_ms_are_rejected(self) -> None:
        for trial in range(64):
            signal = np.concatenate((silence(trial * 0.4), dtmf("5", 20), silence(60)))
            assert detect_dtmf(signal) == "", trial

    def test_with_noise_at_20_db_snr(self) -> None:
        rng = np.random.default_rng(20)
        signal = np.concatenate([np.concatenate((dtmf(d, 60), silence(60))) for d in ALL_DIGITS])
        noise = rng.normal(0, 6000 / 10, len(signal))  # each tone's RMS is 6000 / sqrt(2)
        assert detect_dtmf(signal + noise) == ALL_DIGITS

    @pytest.mark.parametrize("twist_db", [-7.5, -4.0, 0.0, 3.5])
    def test_allowed_twist(self, twist_db: float) -> None:
        assert detect_dtmf(np.concatenate((dtmf("6", 80, twist_db=twist_db), silence(60)))) == "6"

    @pytest.mark.parametrize("twist_db", [-10.0, 6.0])
    def test_excessive_twist_is_rejected(self, twist_db: float) -> None:
        assert detect_dtmf(np.concatenate((dtmf("6", 80, twist_db=twist_db), silence(60)))) == ""

    def test_quiet_tones_below_the_level_are_ignored(self) -> None:
        quiet = 32768 * 10 ** (-40 / 20)
        assert detect_dtmf(np.concatenate((dtmf("1", 100, quiet), silence(60)))) == ""
        loud_enough = 32768 * 10 ** (-30 / 20)
        assert detect_dtmf(np.concatenate((dtmf("1", 100, loud_enough), silence(60)))) == "1"

    def test_16_khz(self) -> None:
        signal = np.concatenate((dtmf("*", 80, rate=16000), silence(60, 16000)))
        assert detect_dtmf(signal, 640, InbandDtmfDetector(16000)) == "*"

    @pytest.mark.parametrize(("second_at", "expected"), [(0.02, ["3"]), (1.0, [])])
    def test_time_gap_restarts_detection(self, second_at: float, expected: list[str]) -> None:
        # 40 ms of one tone in two 20 ms chunks: one press if they follow each other, else none.
        tone = pcm(dtmf("3", 40))
        detector = InbandDtmfDetector()
        assert detector.feed(tone[:320], 0.0) == []
        found = detector.feed(tone[320:], second_at)
        assert found + detector.feed(pcm(silence(60)), second_at + 0.02) == expected

    def test_large_chunks_with_their_own_times_are_not_gaps(self) -> None:
        detector = InbandDtmfDetector()
        assert detector.feed(pcm(silence(1000)), 0.0) == []
        assert detector.feed(pcm(dtmf("9", 60)), 1.0) == ["9"]

    def test_reset(self) -> None:
        detector = InbandDtmfDetector()
        assert detector.feed(pcm(dtmf("4", 60)), 0.0) == ["4"]
        detector.reset()
        assert detector.feed(pcm(dtmf("4", 60)), 0.06) == ["4"]


class TestInbandDtmfRejection:
    def test_white_noise(self) -> None:
        rng = np.random.default_rng(1)
        for level in (300.0, 3000.0, 12000.0):
            assert detect_dtmf(rng.normal(0, level, RATE * 5)) == ""

    def test_speech_like_signals(self) -> None:
        rng = np.random.default_rng(2)
        for _ in range(12):
            assert detect_dtmf(speech_like(3.0, rng) + rng.normal(0, 30, 3 * RATE)) == ""

    def test_single_tones(self) -> None:
        for frequency in (350.0, 440.0, 697.0, 1000.0, 1209.0, 1400.0, 2100.0):
            assert detect_dtmf(sine(frequency, 500, 8000)) == ""

    def test_three_tones(self) -> None:
        assert detect_dtmf(dtmf("5", 200) + sine(852, 200, 6000)) == ""

    def test_odd_byte_is_carried(self) -> None:
        data = pcm(np.concatenate((dtmf("7", 80), silence(60))))
        detector = InbandDtmfDetector()
        found = detector.feed(data[:101], 0.0) + detector.feed(data[101:], 0.01)
        assert found == ["7"]


class TestBeepDetection:
    def test_1khz_500_ms_beep(self) -> None:
        signal = np.concatenate((silence(200), sine(1000, 500, 8000), silence(200)))
        beeps = detect_beeps(signal)
        assert len(beeps) == 1
        assert beeps[0].frequency == pytest.approx(1000, abs=2)
        assert beeps[0].duration_ms == pytest.approx(500, abs=20)

    @pytest.mark.parametrize("frequency", [400.0, 440.0, 852.0, 1400.0, 2000.0])
    def test_common_beep_frequencies(self, frequency: float) -> None:
        signal = np.concatenate((sine(frequency, 400, 5000, phase=1.0), silence(100)))
        beeps = detect_beeps(signal, chunk_bytes=266)
        assert [round(b.frequency) for b in beeps] == [round(frequency)]

    def test_beep_with_noise(self) -> None:
        rng = np.random.default_rng(3)
        signal = np.concatenate((silence(300), sine(1000, 600, 4000), silence(300)))
        beeps = detect_beeps(signal + rng.normal(0, 100, len(signal)))
        assert len(beeps) == 1
        assert beeps[0].duration_ms == pytest.approx(600, abs=20)

    def test_beep_after_speech(self) -> None:
        rng = np.random.default_rng(4)
        signal = np.concatenate((speech_like(2.0, rng), silence(100), sine(1000, 500, 8000)))
        beeps = detect_beeps(np.concatenate((signal, silence(100))))
        assert [round(b.frequency) for b in beeps] == [1000]

    def test_reported_when_the_tone_ends(self) -> None:
        detector = BeepDetector()
        assert detector.feed(pcm(sine(1000, 1000, 8000)), 0.0) is None
        event = detector.feed(pcm(silence(20)), 1.0)
        assert event is not None
        assert event.duration_ms == 1000

    def test_too_short_is_not_a_beep(self) -> None:
        assert detect_beeps(np.concatenate((sine(1000, 200, 8000), silence(100)))) == []

    def test_a_long_tone_is_reported_once_at_max_ms(self) -> None:
        detector = BeepDetector(max_ms=1000)
        events = detect_beeps(np.concatenate((sine(2100, 3000, 8000), silence(100))), 320, detector)
        assert events == [BeepEvent(2100.0, 1000)]

    def test_16_khz(self) -> None:
        signal = np.concatenate((sine(1000, 500, 8000, rate=16000), silence(100, 16000)))
        beeps = detect_beeps(signal, 640, rate=16000)
        assert [round(b.frequency) for b in beeps] == [1000]

    @pytest.mark.parametrize(
        ("second_at", "expected"), [(0.3, None), (5.0, BeepEvent(1000.0, 300))]
    )
    def test_time_gap_ends_the_tone(self, second_at: float, expected: BeepEvent | None) -> None:
        tone = pcm(sine(1000, 320, 8000))
        detector = BeepDetector()
        assert detector.feed(tone[:4800], 0.0) is None
        assert detector.feed(tone[4800:], second_at) == expected

    def test_reset_forgets_the_tone(self) -> None:
        detector = BeepDetector()
        detector.feed(pcm(sine(1000, 400, 8000)), 0.0)
        detector.reset()
        assert detector.feed(pcm(silence(100)), 0.4) is None

    def test_limits_must_be_ordered(self) -> None:
        with pytest.raises(ValueError, match="min_ms"):
            BeepDetector(min_ms=500, max_ms=400)


class TestBeepRejection:
    @pytest.mark.parametrize("digit", ALL_DIGITS)
    def test_dtmf_is_not_a_beep(self, digit: str) -> None:
        assert detect_beeps(np.concatenate((dtmf(digit, 800), silence(100)))) == []

    def test_white_noise(self) -> None:
        rng = np.random.default_rng(5)
        assert detect_beeps(rng.normal(0, 4000, RATE * 5)) == []

    def test_speech_like_signals(self) -> None:
        rng = np.random.default_rng(6)
        for _ in range(12):
            assert detect_beeps(speech_like(3.0, rng)) == []

    def test_dial_tone_and_ringback(self) -> None:
        dial_tone = sine(350, 1500, 5000) + sine(440, 1500, 5000)
        ringback = sine(440, 2000, 5000) + sine(480, 2000, 5000)
        uk_ringback = sine(400, 1000, 5000) + sine(450, 1000, 5000)
        for tone in (dial_tone, ringback, uk_ringback):
            assert detect_beeps(np.concatenate((tone, silence(100)))) == []

    def test_quiet_tone_below_the_level(self) -> None:
        quiet = 32768 * 10 ** (-45 / 20)
        assert detect_beeps(np.concatenate((sine(1000, 500, quiet), silence(100)))) == []

    def test_out_of_band_tone(self) -> None:
        assert detect_beeps(np.concatenate((sine(200, 600, 8000), silence(100)))) == []

    def test_gliding_tone_is_not_a_beep(self) -> None:
        t = np.arange(RATE) / RATE
        chirp = 8000 * np.sin(2 * np.pi * (500 * t + 400 * t**2))  # 500 -> 1300 Hz in 1 s
        assert detect_beeps(np.concatenate((chirp, silence(100)))) == []
