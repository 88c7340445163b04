"""Tests of media.vad on real speech (espeak-ng, no network) and on silence."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from media.prompts import decode_audio_file
from media.vad import VadEvent, VoiceActivityDetector

SENTENCE = "Hello, this is a test of the voice activity detector."


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is missing: run `make test` (it installs espeak-ng)")
    path = tmp_path_factory.mktemp("vad") / "speech.wav"
    subprocess.run([espeak, "-w", str(path), SENTENCE], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech(speech_wav: Path) -> Callable[[int], bytes]:
    """Mono s16le speech at the given rate, trimmed to where it is audible."""
    cache: dict[int, bytes] = {}

    def at(rate: int) -> bytes:
        if rate not in cache:
            pcm = np.frombuffer(decode_audio_file(speech_wav, rate), dtype=np.int16)
            loud = np.nonzero(np.abs(pcm) > 500)[0]
            cache[rate] = pcm[loud[0] : loud[-1] + 1].tobytes()
        return cache[rate]

    return at


def silence(rate: int, seconds: float) -> bytes:
    return bytes(int(rate * seconds) * 2)


def feed(vad: VoiceActivityDetector, audio: bytes, rate: int, chunk_ms: float) -> list[VadEvent]:
    """Feed ``audio`` in chunks of ``chunk_ms`` (``now`` = end of each chunk); collect events."""
    size = int(rate * chunk_ms / 1000) * 2 or 1
    events = []
    for offset in range(0, len(audio), size):
        chunk = audio[offset : offset + size]
        event = vad.process(chunk, (offset + len(chunk)) / (rate * 2))
        if event is not None:
            events.append(event)
    while (event := vad.process(b"", len(audio) / (rate * 2))) is not None:
        events.append(event)
    return events


class TestVadSpeechEvents:
    @pytest.mark.parametrize("rate", [8000, 16000])
    @pytest.mark.parametrize("frame_ms", [10, 20, 30])
    def test_speech_gives_start_then_stop(
        self, speech: Callable[[int], bytes], rate: int, frame_ms: int
    ) -> None:
        talk = speech(rate)
        audio = silence(rate, 0.5) + talk + silence(rate, 1.5)
        vad = VoiceActivityDetector(rate, 2, speech_start_ms=60, hangover_ms=400)
        events = feed(vad, audio, rate, frame_ms)
        assert [e.kind for e in events] == ["speech-start", "speech-stop"]
        onset = 0.5
        offset = 0.5 + len(talk) / (rate * 2)
        assert events[0].at == pytest.approx(onset, abs=0.03)
        assert offset - 0.03 <= events[1].at <= offset + 0.25
        assert not vad.speaking

    @pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
    def test_silence_gives_nothing(self, aggressiveness: int) -> None:
        vad = VoiceActivityDetector(8000, aggressiveness)
        assert feed(vad, silence(8000, 5.0), 8000, 20) == []
        assert vad.frames == 250
        assert not vad.speaking

    def test_short_pause_is_bridged_by_the_hangover(self, speech: Callable[[int], bytes]) -> None:
        talk = speech(8000)
        audio = silence(8000, 0.3) + talk + silence(8000, 0.2) + talk + silence(8000, 1.0)
        events = feed(VoiceActivityDetector(8000, 2, hangover_ms=400), audio, 8000, 20)
        assert [e.kind for e in events] == ["speech-start", "speech-stop"]

    def test_long_pause_ends_the_turn(self, speech: Callable[[int], bytes]) -> None:
        talk = speech(8000)
        audio = silence(8000, 0.3) + talk + silence(8000, 1.0) + talk + silence(8000, 1.0)
        events = feed(VoiceActivityDetector(8000, 2, hangover_ms=400), audio, 8000, 20)
        assert [e.kind for e in events] == ["speech-start", "speech-stop"] * 2
        assert events[2].at == pytest.approx(0.3 + len(talk) / 16000 + 1.0, abs=0.03)

    def test_voiced_run_shorter_than_speech_start_is_ignored(
        self, speech: Callable[[int], bytes]
    ) -> None:
        talk = speech(8000)
        # 40 ms from the middle of the sentence: webrtcvad's own smoothing calls about 120 ms of
        # it voiced, which is above 60 ms and below 200 ms.
        burst = talk[16000 : 16000 + 640]
        audio = silence(8000, 0.5) + burst + silence(8000, 1.0)
        assert feed(VoiceActivityDetector(8000, 2, speech_start_ms=200), audio, 8000, 20) == []
        started = feed(VoiceActivityDetector(8000, 2, speech_start_ms=60), audio, 8000, 20)
        assert [e.kind for e in started] == ["speech-start", "speech-stop"]


class TestVadReframing:
    @pytest.mark.parametrize("chunk_ms", [7, 17, 25, 45.5, 250])
    def test_other_chunk_sizes_give_the_same_events(
        self, speech: Callable[[int], bytes], chunk_ms: float
    ) -> None:
        audio = silence(8000, 0.5) + speech(8000) + silence(8000, 1.0)
        reference = feed(VoiceActivityDetector(8000, 2), audio, 8000, 20)
        events = feed(VoiceActivityDetector(8000, 2), audio, 8000, chunk_ms)
        assert [e.kind for e in events] == [e.kind for e in reference]
        for got, want in zip(events, reference, strict=True):
            assert got.at == pytest.approx(want.at, abs=1e-9)

    def test_odd_byte_chunks_are_carried_over(self, speech: Callable[[int], bytes]) -> None:
        audio = silence(8000, 0.5) + speech(8000) + silence(8000, 1.0)
        vad = VoiceActivityDetector(8000, 2)
        kinds = []
        for offset in range(0, len(audio), 333):
            chunk = audio[offset : offset + 333]
            if (event := vad.process(chunk, (offset + len(chunk)) / 16000)) is not None:
                kinds.append(event.kind)
        assert kinds == ["speech-start", "speech-stop"]

    def test_one_chunk_with_two_transitions_returns_them_in_turn(
        self, speech: Callable[[int], bytes]
    ) -> None:
        audio = silence(8000, 0.5) + speech(8000) + silence(8000, 1.0)
        vad = VoiceActivityDetector(8000, 2)
        first = vad.process(audio, len(audio) / 16000)
        second = vad.process(b"", len(audio) / 16000)
        assert first is not None
        assert first.kind == "speech-start"
        assert second is not None
        assert second.kind == "speech-stop"
        assert vad.process(b"", len(audio) / 16000) is None

    @pytest.mark.parametrize("chunk", [None, "pcm", 42, [0, 0]])
    def test_non_bytes_are_counted_not_raised(self, chunk: object) -> None:
        vad = VoiceActivityDetector(8000, 2)
        assert vad.process(chunk, 0.0) is None  # type: ignore[arg-type]
        assert vad.invalid == 1

    def test_bad_time_is_counted_not_raised(self) -> None:
        vad = VoiceActivityDetector(8000, 2)
        assert vad.process(bytes(320), "later") is None  # type: ignore[arg-type]
        assert vad.invalid == 1

    def test_reset_forgets_state_without_events(self, speech: Callable[[int], bytes]) -> None:
        vad = VoiceActivityDetector(8000, 2)
        feed(vad, silence(8000, 0.2) + speech(8000)[:8000], 8000, 20)
        speaking_before = vad.speaking
        vad.reset()
        assert (speaking_before, vad.speaking) == (True, False)
        assert feed(vad, silence(8000, 1.0), 8000, 20) == []


class TestVadConfiguration:
    @pytest.mark.parametrize(
        ("rate", "aggressiveness", "extra"),
        [
            (11025, 2, {}),
            (8000, 4, {}),
            (8000, -1, {}),
            (8000, 2, {"speech_start_ms": -1.0}),
            (8000, 2, {"hangover_ms": -5.0}),
        ],
    )
    def test_bad_settings_are_rejected(
        self, rate: int, aggressiveness: int, extra: dict[str, float]
    ) -> None:
        with pytest.raises(ValueError, match="must"):
            VoiceActivityDetector(rate, aggressiveness, **extra)
