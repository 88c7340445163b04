"""Tests of media.playout: exact frames from any chunking, marks, clear, underrun and the bound."""

from __future__ import annotations

import numpy as np
import pytest

from media.playout import MAX_MARK_NAME_LENGTH, MarkReached, PlayoutBuffer

RATE = 8000
FRAME = 320  # bytes in 20 ms at 8 kHz


def ramp(samples: int, start: int = 1) -> bytes:
    """Distinct non-zero samples, so any byte slip or silence shows."""
    return (np.arange(start, start + samples, dtype=np.int64) % 30000 + 1).astype("<i2").tobytes()


def drain(buffer: PlayoutBuffer, frames: int) -> tuple[bytes, list[list[str]]]:
    audio = b""
    marks = []
    for _ in range(frames):
        frame, reached = buffer.next_frame()
        assert len(frame) == FRAME
        audio += frame
        marks.append([m.name for m in reached])
    return audio, marks


class TestPlayoutFraming:
    @pytest.mark.parametrize("chunk", [1, 3, 159, 320, 321, 641, 1999])
    def test_any_chunk_size_comes_out_as_exact_frames(self, chunk: int) -> None:
        pcm = ramp(8000)  # one second
        buffer = PlayoutBuffer(RATE)
        for offset in range(0, len(pcm), chunk):
            buffer.write(pcm[offset : offset + chunk])
        audio, _ = drain(buffer, 50)
        assert audio == pcm
        assert buffer.queued_ms == 0.0

    def test_odd_trailing_byte_waits_for_its_other_half(self) -> None:
        pcm = ramp(160)
        buffer = PlayoutBuffer(RATE)
        buffer.write(pcm[:101])
        assert buffer.queued_ms == pytest.approx(100 / 16)  # 50 samples; the 101st byte waits
        buffer.write(pcm[101:])
        assert buffer.queued_ms == 20.0
        assert buffer.next_frame()[0] == pcm

    def test_frame_size_follows_rate_and_frame_ms(self) -> None:
        buffer = PlayoutBuffer(16000, frame_ms=30)
        assert buffer.frame_bytes == 960
        assert len(buffer.next_frame()[0]) == 960

    @pytest.mark.parametrize(
        ("rate", "frame_ms", "max_ms"), [(8000, 0, 1000), (0, 20, 1000), (11025, 10, 1000)]
    )
    def test_impossible_framing_is_rejected(self, rate: int, frame_ms: int, max_ms: int) -> None:
        with pytest.raises(ValueError, match="whole number"):
            PlayoutBuffer(rate, frame_ms, max_ms)


class TestPlayoutUnderrun:
    def test_empty_buffer_sends_silence(self) -> None:
        buffer = PlayoutBuffer(RATE)
        assert buffer.next_frame() == (bytes(FRAME), [])
        assert buffer.counters.silent_frames == 1

    def test_partial_frame_waits_one_tick_then_goes_out_padded(self) -> None:
        pcm = ramp(240)  # 30 ms
        buffer = PlayoutBuffer(RATE)
        buffer.write(pcm)
        assert buffer.next_frame()[0] == pcm[:FRAME]
        assert buffer.next_frame()[0] == bytes(FRAME)  # 10 ms queued: wait for more
        assert buffer.next_frame()[0] == pcm[FRAME:] + bytes(160)  # nothing came: send it
        assert buffer.counters.padded_frames == 1

    def test_partial_frame_completed_in_time_is_not_padded(self) -> None:
        first, second = ramp(240), ramp(240, 1000)
        buffer = PlayoutBuffer(RATE)
        buffer.write(first)
        buffer.next_frame()
        assert buffer.next_frame()[0] == bytes(FRAME)
        buffer.write(second)
        audio, _ = drain(buffer, 2)
        assert audio == first[FRAME:] + second
        assert buffer.counters.padded_frames == 0

    def test_audio_after_an_underrun_starts_on_a_frame_boundary(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(160))
        drain(buffer, 5)
        later = ramp(320, 7)
        buffer.write(later)
        audio, _ = drain(buffer, 2)
        assert audio == later


class TestPlayoutMarks:
    def test_mark_is_reported_only_once_its_audio_has_gone_out(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(400))  # 50 ms
        buffer.mark("m1")
        buffer.write(ramp(160, 900))
        _, marks = drain(buffer, 5)
        # 50 ms of audio: frames 1-2 full, the rest rides in frame 3 with the next write's start.
        assert marks == [[], [], ["m1"], [], []]
        assert buffer.counters.marks_reached == 1

    def test_mark_on_an_empty_buffer_is_reported_with_the_next_frame(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.mark("now")
        assert buffer.outstanding_marks == ("now",)
        frame, reached = buffer.next_frame()
        assert (frame, reached) == (bytes(FRAME), [MarkReached("now")])

    def test_mark_after_a_partial_frame_flushes_it_without_waiting(self) -> None:
        pcm = ramp(100)
        buffer = PlayoutBuffer(RATE)
        buffer.write(pcm)
        buffer.mark("end-of-sentence")
        frame, reached = buffer.next_frame()
        assert frame == pcm + bytes(FRAME - 200)
        assert reached == [MarkReached("end-of-sentence")]

    def test_marks_come_back_in_order_including_marks_at_the_same_place(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(160))
        buffer.mark("a")
        buffer.mark("b")
        buffer.write(ramp(320))
        buffer.mark("c")
        _, marks = drain(buffer, 4)
        assert marks == [["a", "b"], [], ["c"], []]

    @pytest.mark.parametrize("name", ["", "x" * (MAX_MARK_NAME_LENGTH + 1), None, 5, b"m"])
    def test_bad_names_are_rejected(self, name: object) -> None:
        with pytest.raises(ValueError, match="mark name"):
            PlayoutBuffer(RATE).mark(name)  # type: ignore[arg-type]

    def test_outstanding_marks_are_bounded(self) -> None:
        buffer = PlayoutBuffer(RATE, max_marks=3)
        for name in "abc":
            buffer.mark(name)
        with pytest.raises(ValueError, match="too many"):
            buffer.mark("d")
        buffer.next_frame()
        buffer.mark("d")

    def test_forget_marks_drops_them_without_events(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(160))
        buffer.mark("a")
        assert buffer.forget_marks() == 1
        assert buffer.next_frame()[1] == []


class TestPlayoutClear:
    def test_clear_drops_audio_and_returns_outstanding_marks(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(800))
        buffer.mark("m1")
        buffer.write(ramp(800))
        buffer.mark("m2")
        buffer.next_frame()
        assert buffer.clear() == ["m1", "m2"]
        assert buffer.queued_ms == 0.0
        assert buffer.outstanding_marks == ()
        assert buffer.next_frame() == (bytes(FRAME), [])
        counters = buffer.counters
        assert counters.marks_cleared == 2
        assert counters.cleared_ms == pytest.approx(200.0 - 20.0)

    def test_clear_drops_a_carried_odd_byte(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(b"\x01")
        buffer.clear()
        pcm = ramp(160)
        buffer.write(pcm)
        assert buffer.next_frame()[0] == pcm

    def test_clear_on_empty_buffer_returns_nothing(self) -> None:
        assert PlayoutBuffer(RATE).clear() == []


class TestPlayoutBound:
    def test_overflow_drops_the_oldest_audio_and_counts_it(self) -> None:
        buffer = PlayoutBuffer(RATE, max_ms=1000)
        pcm = ramp(12000)  # 1.5 s
        buffer.write(pcm)
        assert buffer.queued_ms == 1000.0
        assert buffer.counters.dropped_ms == 500.0
        assert buffer.next_frame()[0] == pcm[8000 : 8000 + FRAME]

    def test_overflow_can_drop_the_newest_audio_instead(self) -> None:
        buffer = PlayoutBuffer(RATE, max_ms=1000, overflow="drop-newest")
        pcm = ramp(12000)
        buffer.write(pcm[:5000])
        buffer.write(pcm[5000:])
        assert buffer.queued_ms == 1000.0
        assert buffer.counters.dropped_ms == 500.0
        audio, _ = drain(buffer, 50)
        assert audio == pcm[:16000]

    def test_marks_inside_dropped_audio_are_reported_with_the_next_frame(self) -> None:
        buffer = PlayoutBuffer(RATE, max_ms=100)
        buffer.write(ramp(400))
        buffer.mark("dropped")
        buffer.write(ramp(800))
        assert buffer.next_frame()[1] == [MarkReached("dropped")]

    def test_latency_stays_bounded_under_a_steady_flood(self) -> None:
        buffer = PlayoutBuffer(RATE, max_ms=200)
        for _ in range(100):
            buffer.write(ramp(320))  # 40 ms written per 20 ms tick
            buffer.next_frame()
            assert buffer.queued_ms <= 200.0

    def test_bad_writes_are_counted_not_raised(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write("pcm")  # type: ignore[arg-type]
        buffer.write(None)  # type: ignore[arg-type]
        buffer.write(b"")
        assert buffer.counters.invalid_writes == 2
        assert buffer.queued_ms == 0.0


class TestPlayoutPlaying:
    def test_playing_tracks_real_audio_going_out(self) -> None:
        buffer = PlayoutBuffer(RATE)
        states = [buffer.playing]
        buffer.write(ramp(160))
        states.append(buffer.playing)
        buffer.next_frame()
        states.append(buffer.playing)  # the frame that just went out was speech
        buffer.next_frame()
        states.append(buffer.playing)
        buffer.write(ramp(320))
        buffer.clear()
        states.append(buffer.playing)
        assert states == [False, True, True, False, False]

    def test_counters_add_up(self) -> None:
        buffer = PlayoutBuffer(RATE)
        buffer.write(ramp(400))  # 50 ms: two frames, then 10 ms that waits a tick
        drain(buffer, 5)
        counters = buffer.counters
        assert counters.frames == 5
        assert (counters.audio_frames, counters.padded_frames, counters.silent_frames) == (3, 1, 2)
        assert counters.written_ms == 50.0


class TestPlayoutTrim:
    def test_trim_drops_whole_frames_from_the_head_and_counts_them(self) -> None:
        buffer = PlayoutBuffer(8000)
        audio = ramp(160 * 3 + 40)
        buffer.write(audio)
        assert buffer.trim(30.0) == 20.0  # whole frames only
        frame, _ = buffer.next_frame()
        assert frame == audio[320:640]
        assert buffer.counters.trimmed_ms == 20.0
        assert buffer.counters.dropped_ms == 0.0

    def test_trim_never_takes_a_partial_frame_or_more_than_is_queued(self) -> None:
        buffer = PlayoutBuffer(8000)
        buffer.write(ramp(100))
        assert buffer.trim(20.0) == 0.0
        assert buffer.queued_ms == 12.5

    def test_a_mark_whose_audio_was_trimmed_is_reported_with_the_next_frame(self) -> None:
        buffer = PlayoutBuffer(8000)
        buffer.write(ramp(320))
        buffer.mark("a")
        buffer.write(ramp(160))
        assert buffer.trim(40.0) == 40.0
        _, reached = buffer.next_frame()  # the third frame: the mark's audio went before it
        assert reached == [MarkReached("a")]

    @pytest.mark.parametrize(
        ("head", "quiet"),
        [
            ([0] * 160, True),
            ([256, -256] * 80, True),  # the bound itself is quiet
            ([0] * 159 + [257], False),
            ([0] * 80 + [-257] + [0] * 79, False),
            ([-32768] + [0] * 159, False),
        ],
        ids=["silence", "at-the-bound", "one-sample-over", "one-sample-under", "int16-min"],
    )
    def test_head_is_quiet_looks_at_the_next_whole_frame_only(
        self, head: list[int], quiet: bool
    ) -> None:
        buffer = PlayoutBuffer(8000)
        buffer.write(np.array(head, dtype="<i2").tobytes() + ramp(160, start=5000))
        assert buffer.head_is_quiet(256) is quiet
        buffer.next_frame()
        assert buffer.head_is_quiet(256) is False  # the loud ramp is next
        assert buffer.queued_ms == 20.0  # looking took nothing

    def test_less_than_a_frame_is_never_quiet(self) -> None:
        buffer = PlayoutBuffer(8000)
        buffer.write(bytes(318))
        assert buffer.head_is_quiet(256) is False


class TestPlayoutMemory:
    def test_a_real_time_stream_keeps_no_played_audio(self) -> None:
        """Per call memory: a frame in, a frame out, every tick: nothing piles up behind."""
        buffer = PlayoutBuffer(8000)
        for _ in range(1000):
            buffer.write(ramp(160))
            buffer.next_frame()
        assert len(buffer._buf) == 0

    def test_played_audio_is_reclaimed_while_more_waits(self) -> None:
        buffer = PlayoutBuffer(8000)
        buffer.write(ramp(80))  # half a frame always waiting
        for _ in range(1000):
            buffer.write(ramp(160))
            buffer.next_frame()
        assert len(buffer._buf) < 2 * 16 * 1024
        assert buffer.queued_ms == 10.0
