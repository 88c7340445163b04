"""Tests of media.recorder: the MP3 is checked by decoding it with FFmpeg, channel by channel."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from media.recorder import StereoMp3Recorder

pytestmark = pytest.mark.ffmpeg

RATE = 8000


def tone(freq: float, seconds: float, amplitude: float = 8000.0) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * freq * t) * amplitude).astype("<i2").tobytes()


def clicks(length: int, positions: list[int], value: int) -> bytes:
    x = np.zeros(length, dtype="<i2")
    x[positions] = value
    return x.tobytes()


def decode(ffmpeg: str, path: Path) -> np.ndarray:
    """The file as FFmpeg decodes it: int16 samples, shape (n, 2)."""
    result = subprocess.run(
        [ffmpeg, "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "2", "-ar", str(RATE), "-"],
        capture_output=True,
        check=True,
    )
    return np.frombuffer(result.stdout, dtype="<i2").reshape(-1, 2)


def probe(path: Path) -> dict[str, object]:
    ffprobe = shutil.which("ffprobe")
    assert ffprobe is not None, "ffprobe ships with ffmpeg"
    result = subprocess.run(
        [ffprobe, "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        check=True,
        text=True,
    )
    streams = json.loads(result.stdout)["streams"]
    assert len(streams) == 1
    stream: dict[str, object] = streams[0]
    return stream


def band_energy(x: np.ndarray, freq: float) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(float))) ** 2
    bins = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spectrum[(bins > freq - 20) & (bins < freq + 20)].sum())


def peak_positions(channel: np.ndarray, around: list[int], window: int = 300) -> list[int]:
    out = []
    for p in around:
        segment = np.abs(channel[p - window : p + window].astype(int))
        out.append(int(np.argmax(segment)) + p - window)
    return out


class TestRecorderStereoLayout:
    def test_caller_on_the_left_agent_on_the_right(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "call.mp3"
        caller, agent = tone(440, 3.0), tone(1000, 3.0)
        with StereoMp3Recorder(path) as recorder:
            for offset in range(0, len(caller), 320):
                recorder.write_frame(caller[offset : offset + 320], agent[offset : offset + 320])
        audio = decode(ffmpeg, path)
        assert abs(len(audio) - 3 * RATE) <= 0.04 * RATE
        left, right = audio[:, 0], audio[:, 1]
        assert band_energy(left, 440) > 100 * band_energy(left, 1000)
        assert band_energy(right, 1000) > 100 * band_energy(right, 440)
        # The tones are where they were written, sample for sample.
        reference = np.frombuffer(caller, dtype="<i2").astype(float)
        n = min(len(left), len(reference))
        assert np.corrcoef(left[:n].astype(float), reference[:n])[0, 1] > 0.95

    def test_a_tick_at_a_time_is_the_same_file_as_two_positioned_writes(
        self, tmp_path: Path
    ) -> None:
        """``write_frame`` (its every-tick path, and the general one when the frames differ in
        length or are odd) writes what ``write`` at the longer lane's end would, byte for byte."""
        caller, agent = tone(440, 4.0), tone(1000, 4.0, 5000.0)
        frames = [(caller[i : i + 320], agent[i : i + 320]) for i in range(0, len(caller), 320)]
        frames[30] = (frames[30][0], frames[30][1][:160])  # a short agent frame
        frames[60] = (frames[60][0][:161], frames[60][1])  # an odd one
        frames[90] = (b"", frames[90][1])
        ticked, positioned = tmp_path / "ticked.mp3", tmp_path / "positioned.mp3"
        with StereoMp3Recorder(ticked) as recorder:
            for c, a in frames:
                recorder.write_frame(c, a)
        with StereoMp3Recorder(positioned) as recorder:
            for c, a in frames:
                end = recorder.end
                recorder.write("caller", c, end)
                recorder.write("agent", a, end)
        assert ticked.read_bytes() == positioned.read_bytes()
        assert ticked.stat().st_size > 10_000

    def test_ffprobe_sees_a_stereo_mp3_with_a_valid_lame_tag(self, tmp_path: Path) -> None:
        path = tmp_path / "call.mp3"
        with StereoMp3Recorder(path) as recorder:
            recorder.write_frame(tone(440, 1.0), tone(1000, 1.0))
        stream = probe(path)
        assert (stream["codec_name"], stream["channels"], stream["sample_rate"]) == (
            "mp3",
            2,
            "8000",
        )
        tags = stream["tags"]
        assert isinstance(tags, dict)
        assert tags["encoder"] == "LAME3.100"  # FFmpeg only reports it when the tag CRC is right

    @pytest.mark.parametrize("seconds", [0.5, 1.23, 7.0])
    def test_decoded_duration_matches_what_was_written(
        self, ffmpeg: str, tmp_path: Path, seconds: float
    ) -> None:
        path = tmp_path / "call.mp3"
        recorder = StereoMp3Recorder(path)
        recorder.write("caller", tone(440, seconds))
        recorder.close()
        assert recorder.duration == pytest.approx(seconds, abs=1 / RATE)
        assert abs(len(decode(ffmpeg, path)) / RATE - seconds) <= 0.04

    def test_16_khz_recording(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "wide.mp3"
        t = np.arange(16000 * 2) / 16000
        pcm = (np.sin(2 * np.pi * 3000 * t) * 8000).astype("<i2").tobytes()
        with StereoMp3Recorder(path, 16000, bitrate_kbps=48) as recorder:
            recorder.write("caller", pcm)
            recorder.write("agent", pcm)
        stream = probe(path)
        assert stream["sample_rate"] == "16000"
        result = subprocess.run(
            [ffmpeg, "-v", "error", "-i", str(path), "-f", "s16le", "-"],
            capture_output=True,
            check=True,
        )
        assert abs(len(result.stdout) / 4 / 16000 - 2.0) <= 0.04


class TestRecorderMediaClockAlignment:
    def test_audio_after_a_gap_appears_at_its_position(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "gap.mp3"
        recorder = StereoMp3Recorder(path)
        recorder.write("caller", tone(440, 1.0), position=RATE)  # nothing in the first second
        recorder.advance_to(3 * RATE)
        recorder.close()
        audio = decode(ffmpeg, path)
        assert len(audio) == 3 * RATE
        left = audio[:, 0]
        assert np.abs(left[: RATE - 80]).max() < 100  # silence (the codec may ring 10 ms early)
        onset = int(np.nonzero(np.abs(left) > 2000)[0][0])
        assert abs(onset - RATE) <= 8  # 1 ms
        assert np.abs(left[2 * RATE + 80 :]).max() < 100
        assert np.abs(audio[:, 1]).max() < 100  # the agent said nothing

    def test_clicks_land_on_their_sample_positions(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "clicks.mp3"
        caller_at, agent_at = [1234, 5000, 9999], [800, 6001, 11000]
        recorder = StereoMp3Recorder(path)
        recorder.write("caller", clicks(12000, caller_at, 20000), position=0)  # 1.5 s at once
        agent = clicks(12000, agent_at, -20000)
        for offset in range(0, len(agent), 320):  # the agent lane in 20 ms pieces
            recorder.write("agent", agent[offset : offset + 320])
        recorder.close()
        audio = decode(ffmpeg, path)
        for channel, expected in ((0, caller_at), (1, agent_at)):
            found = peak_positions(audio[:, channel], expected)
            assert all(abs(f - e) <= 2 for f, e in zip(found, expected, strict=True)), found
            assert np.abs(audio[expected, channel].astype(int)).min() > 5000

    def test_rewriting_a_span_not_yet_encoded_replaces_it(
        self, ffmpeg: str, tmp_path: Path
    ) -> None:
        path = tmp_path / "late.mp3"
        recorder = StereoMp3Recorder(path, batch_ms=1000)
        recorder.advance_to(RATE // 2)  # 500 ms of silence, still pending
        recorder.write("caller", clicks(800, [100], 20000), position=RATE // 4)
        recorder.close()
        audio = decode(ffmpeg, path)
        assert peak_positions(audio[:, 0], [RATE // 4 + 100]) == [RATE // 4 + 100]

    def test_audio_for_an_encoded_span_is_dropped_and_counted(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "late.mp3", batch_ms=200)
        recorder.advance_to(RATE)  # one second is final
        recorder.write("caller", bytes(800), position=RATE - 100)  # 100 samples too late
        assert recorder.counters.late_samples == 100
        assert recorder.lane_end("caller") == RATE + 300
        recorder.close()

    def test_a_lane_far_ahead_pads_the_silent_one(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "one-sided.mp3", max_skew_ms=2000)
        second = tone(440, 1.0)
        for i in range(10):
            recorder.write("caller", second)
            assert recorder.lane_end("caller") == (i + 1) * RATE
            # The agent lane never speaks, yet at most 2 s (+ one batch) wait to be encoded.
            pending = recorder.lane_end("caller") - recorder.counters.encoded_samples
            assert pending <= 2 * RATE + RATE // 5
        recorder.close()
        assert recorder.duration == 10.0

    def test_a_long_hole_is_encoded_in_pieces(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "hole.mp3"
        recorder = StereoMp3Recorder(path)
        recorder.write("caller", tone(440, 0.5))
        recorder.write("agent", tone(1000, 0.5), position=60 * RATE)  # a minute later
        assert recorder.counters.encoded_samples >= 58 * RATE
        recorder.close()
        audio = decode(ffmpeg, path)
        assert abs(len(audio) - int(60.5 * RATE)) <= 0.04 * RATE
        onset = int(np.nonzero(np.abs(audio[:, 1]) > 2000)[0][0])
        assert abs(onset - 60 * RATE) <= 8


class TestRecorderCrashSafety:
    def test_file_cut_at_any_point_still_decodes(self, ffmpeg: str, tmp_path: Path) -> None:
        path = tmp_path / "full.mp3"
        with StereoMp3Recorder(path) as recorder:
            recorder.write_frame(tone(440, 20.0), tone(1000, 20.0))
        data = path.read_bytes()
        rnd = random.Random(2024)
        for _ in range(8):
            cut = rnd.randrange(len(data) // 20, len(data))
            partial = tmp_path / f"cut-{cut}.mp3"
            partial.write_bytes(data[:cut])
            seconds = len(decode(ffmpeg, partial)) / RATE
            assert seconds == pytest.approx(20.0 * cut / len(data), abs=0.2)

    def test_file_of_a_killed_process_decodes_up_to_the_last_batch(
        self, ffmpeg: str, tmp_path: Path
    ) -> None:
        path = tmp_path / "live.mp3"
        recorder = StereoMp3Recorder(path, batch_ms=200)
        marks = [800, 8000, 16000, 30000]
        caller = clicks(5 * RATE, marks, 20000)
        for offset in range(0, len(caller), 320):
            recorder.write_frame(caller[offset : offset + 320], bytes(320))
        snapshot = tmp_path / "snapshot.mp3"
        shutil.copyfile(path, snapshot)  # what the disk holds if the process dies now
        recorder.close()
        audio = decode(ffmpeg, snapshot)
        assert 5.0 - 0.4 <= len(audio) / RATE <= 5.0
        assert peak_positions(audio[:, 0], marks) == marks  # aligned from sample 0


class TestRecorderLifecycle:
    def test_close_is_idempotent_and_later_writes_are_ignored(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "a.mp3")
        recorder.write("caller", tone(440, 0.5))
        recorder.close()
        size = (tmp_path / "a.mp3").stat().st_size
        recorder.close()
        recorder.write("agent", tone(440, 0.5))
        recorder.advance_to(10 * RATE)
        assert recorder.closed
        assert (tmp_path / "a.mp3").stat().st_size == size
        assert recorder.duration == 0.5

    def test_empty_recording_closes_cleanly(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "empty.mp3")
        recorder.close()
        assert recorder.duration == 0.0
        assert recorder.error is None

    def test_bad_arguments_are_local_errors(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "b.mp3")
        with pytest.raises(ValueError, match="channel"):
            recorder.write("robot", bytes(2))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="position"):
            recorder.write("caller", bytes(2), position=-1)
        recorder.close()
        with pytest.raises(ValueError, match="MP3"):
            StereoMp3Recorder(tmp_path / "c.mp3", sample_rate=7000)

    def test_odd_byte_is_dropped_and_counted(self, tmp_path: Path) -> None:
        recorder = StereoMp3Recorder(tmp_path / "odd.mp3")
        recorder.write("caller", bytes(321))
        assert recorder.lane_end("caller") == 160
        assert recorder.counters.odd_bytes == 1
        recorder.close()
