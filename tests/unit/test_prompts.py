"""Tests of media.prompts: WAV, MP3 and OGG files made by FFmpeg and SoX decode to mono PCM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from media.prompts import PromptDecodeError, decode_audio_file

pytestmark = pytest.mark.ffmpeg

SECONDS = 1.5
FREQ = 440.0
SOX_SINE = ("synth", str(SECONDS), "sine", f"{FREQ:g}", "vol", "0.5")


def dominant_frequency(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


@pytest.fixture(scope="module")
def sine_files(ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1.5 s 440 Hz sine as 44.1 kHz stereo WAV, MP3, OGG (FFmpeg; left at half scale, right
    at quarter scale), and as a 16 kHz mono WAV at half scale (SoX)."""
    folder = tmp_path_factory.mktemp("prompts")
    wave = f"sin(2*PI*{FREQ:g}*t)"
    source = f"aevalsrc=0.5*{wave}|0.25*{wave}:s=44100:d={SECONDS}"
    files = {}
    for name, codec in (
        ("wav", "pcm_s16le"),
        ("mp3", "libmp3lame"),
        ("ogg", "libvorbis"),
        ("m4a", "aac"),
        ("au", "pcm_s16be"),  # a format FFmpeg reads but prompts do not accept
    ):
        path = folder / f"sine.{name}"
        subprocess.run(
            [ffmpeg, "-v", "error", "-f", "lavfi", "-i", source, "-c:a", codec, str(path)],
            check=True,
        )
        files[name] = path
    sox = shutil.which("sox")
    if sox is None:
        pytest.fail("sox is missing: run `make test` (it installs sox)")
    files["sox-wav"] = folder / "sox.wav"
    subprocess.run(
        [sox, "-n", "-r", "16000", "-c", "1", "-b", "16", str(files["sox-wav"]), *SOX_SINE],
        check=True,
    )
    return files


class TestPromptDecoding:
    @pytest.mark.parametrize("kind", ["wav", "mp3", "ogg", "m4a", "sox-wav"])
    @pytest.mark.parametrize("rate", [8000, 16000, 24000])
    def test_decodes_to_mono_pcm_at_the_requested_rate(
        self, sine_files: dict[str, Path], kind: str, rate: int
    ) -> None:
        pcm = decode_audio_file(sine_files[kind], rate)
        assert len(pcm) % 2 == 0
        # WAV and LAME-tagged MP3 are exact; Vorbis may differ by a few samples, AAC by up to
        # one frame of encoder priming (1024 samples at 44.1 kHz).
        tolerance = 1024 / 44100 if kind == "m4a" else 0.005
        assert abs(len(pcm) / 2 - SECONDS * rate) <= tolerance * rate
        assert dominant_frequency(pcm, rate) == pytest.approx(FREQ, abs=2.0)
        # Stereo is averaged to mono (3/8 of full scale), not summed or reduced to one side.
        samples = np.frombuffer(pcm, dtype="<i2").astype(float)
        middle = samples[len(samples) // 4 : 3 * len(samples) // 4]
        amplitude = np.sqrt(np.mean(middle**2)) * np.sqrt(2)
        assert amplitude == pytest.approx(16384 if kind == "sox-wav" else 12288, rel=0.05)

    def test_wav_is_exact(self, sine_files: dict[str, Path]) -> None:
        pcm = decode_audio_file(sine_files["sox-wav"], 16000)
        assert len(pcm) == int(SECONDS * 16000) * 2

    @pytest.mark.parametrize("kind", ["wav", "mp3", "ogg"])
    def test_bytes_decode_like_the_file(self, sine_files: dict[str, Path], kind: str) -> None:
        path = sine_files[kind]
        assert decode_audio_file(path.read_bytes(), 8000) == decode_audio_file(path, 8000)

    def test_string_path_is_accepted(self, sine_files: dict[str, Path]) -> None:
        assert decode_audio_file(str(sine_files["wav"]), 8000)


class TestPromptDecodeErrors:
    @pytest.mark.parametrize("data", [b"", b"not audio at all" * 100, bytes(4096)])
    def test_unreadable_bytes(self, data: bytes) -> None:
        with pytest.raises(PromptDecodeError):
            decode_audio_file(data, 8000)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(PromptDecodeError, match=r"missing\.wav"):
            decode_audio_file(tmp_path / "missing.wav", 8000)

    def test_file_without_audio(self, ffmpeg: str, tmp_path: Path) -> None:
        video = tmp_path / "red.mkv"  # an allowed container holding one video frame
        red = ("-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1", "-c:v", "ffv1")
        subprocess.run([ffmpeg, "-v", "error", *red, str(video)], check=True)
        with pytest.raises(PromptDecodeError, match="no audio"):
            decode_audio_file(video, 8000)

    def test_url_is_not_fetched(self) -> None:
        with pytest.raises(PromptDecodeError, match="cannot read"):
            decode_audio_file("http://127.0.0.1:9/prompt.wav", 8000)

    def test_demuxer_outside_the_allowed_list(self, sine_files: dict[str, Path]) -> None:
        with pytest.raises(PromptDecodeError, match="cannot decode"):
            decode_audio_file(sine_files["au"], 8000)

    def test_truncated_header(self, sine_files: dict[str, Path]) -> None:
        with pytest.raises(PromptDecodeError):
            decode_audio_file(sine_files["ogg"].read_bytes()[:30], 8000)

    def test_longer_than_the_limit(self, sine_files: dict[str, Path]) -> None:
        with pytest.raises(PromptDecodeError, match="longer than"):
            decode_audio_file(sine_files["wav"], 8000, max_seconds=1.0)

    def test_error_is_a_value_error(self) -> None:
        assert issubclass(PromptDecodeError, ValueError)

    @pytest.mark.parametrize("rate", [0, -8000, 8000.0])
    def test_bad_sample_rate(self, sine_files: dict[str, Path], rate: object) -> None:
        with pytest.raises(ValueError, match="sample_rate"):
            decode_audio_file(sine_files["wav"], rate)  # type: ignore[arg-type]
