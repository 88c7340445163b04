"""The media pipeline's taps: in-band DTMF is heard only on legs without RFC 4733 (the
session switches it on from the negotiated media when the call is answered); the voicemail
beep is listened for in a window at the start of the call, and reported once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from media.stream import FRAME_BYTES, SAMPLE_RATE
from tests.fakes import FakeLeg, make_harness
from worker.agent.listen_audio import ListenAudioProtocol
from worker.config import RouteSettings
from worker.session import pipeline as pipeline_module
from worker.session.pipeline import (
    AgentSink,
    BeepDetected,
    InbandDigit,
    MediaPipeline,
)
from worker.session.session import detects_voicemail


def _tone_frames(low: float, high: float, seconds: float = 0.12) -> list[bytes]:
    """A DTMF key press (two sines) followed by as much silence, in 20 ms frames."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 6000 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    pcm = np.concatenate([tone, np.zeros(t.size)]).astype("<i2").tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


_t = np.arange(FRAME_BYTES // 2) / SAMPLE_RATE
SPEECH = (3000 * np.sin(2 * np.pi * 400 * _t)).astype("<i2").tobytes()
"""A frame of the agent speaking: 20 ms of a 400 Hz tone (whole periods), far above
``QUIET_PEAK``."""


def _feed(pipeline: MediaPipeline, frames: list[bytes]) -> None:
    for index, frame in enumerate(frames):
        pipeline.take_caller(frame, index * 0.02)
        out = pipeline.next_out()
        pipeline.after_send(frame, out)


class TestInbandDtmfTap:
    def test_off_by_default_and_on_when_asked(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        events = pipeline.events
        _feed(pipeline, _tone_frames(770, 1336))
        assert [e for e in events if isinstance(e, InbandDigit)] == []
        pipeline.use_inband_dtmf(True)
        _feed(pipeline, _tone_frames(770, 1336))
        assert [e for e in events if isinstance(e, InbandDigit)] == [InbandDigit("5")]
        pipeline.use_inband_dtmf(False)
        _feed(pipeline, _tone_frames(697, 1209))
        assert [e.digit for e in events if isinstance(e, InbandDigit)] == ["5"]


class TestSessionSwitchesInbandDtmf:
    async def test_answer_without_telephone_event_hears_tones(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, leg=FakeLeg(telephone_event=False))
        h.leg.incoming.extend(_tone_frames(852, 1477))  # "9"
        await h.run_ticks(len(h.leg.incoming))
        assert h.session.digits == ["9"]

    async def test_answer_with_telephone_event_ignores_tones(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, leg=FakeLeg(telephone_event=True))
        h.leg.incoming.extend(_tone_frames(852, 1477))
        await h.run_ticks(len(h.leg.incoming))
        assert h.session.digits == []


def _beep_frames(seconds: float = 0.6) -> list[bytes]:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pcm = np.concatenate([9000 * np.sin(2 * np.pi * 1000 * t), np.zeros(SAMPLE_RATE // 2)])
    data = pcm.astype("<i2").tobytes()
    return [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]


class TestVoicemailBeepWindow:
    def test_beep_inside_the_window_is_reported_once(self) -> None:
        pipeline = MediaPipeline()
        _feed(pipeline, _beep_frames() + _beep_frames())
        events = pipeline.events
        assert [round(e.frequency) for e in events if isinstance(e, BeepDetected)] == [1000]

    def test_beep_after_the_window_is_not_listened_for(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(pipeline_module, "BEEP_WINDOW_TICKS", 10)
        pipeline = MediaPipeline()
        _feed(pipeline, [bytes(FRAME_BYTES)] * 10 + _beep_frames())
        assert [e for e in pipeline.events if isinstance(e, BeepDetected)] == []


class TestVoicemailDetectionByDirection:
    @pytest.mark.parametrize(
        ("setting", "action", "direction", "listens"),
        [
            ("outbound", "agent", "outbound", True),
            ("outbound", "agent", "inbound", False),
            ("always", "agent", "inbound", True),
            ("always", "agent", "outbound", True),
            ("off", "agent", "outbound", False),
            ("always", "echo", "outbound", False),
        ],
    )
    def test_route_setting_and_direction_decide(
        self, setting: str, action: str, direction: str, listens: bool
    ) -> None:
        route = RouteSettings.model_validate(
            {
                "match": "*",
                "action": action,
                "agent_url": "ws://127.0.0.1:1/",
                "voicemail_detection": setting,
            }
        )
        assert detects_voicemail(route, direction) is listens

    def test_unknown_setting_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="voicemail_detection"):
            RouteSettings.model_validate(
                {"match": "*", "action": "agent", "agent_url": "ws://x/", "voicemail_detection": 1}
            )


class TestListenMixTypes:
    """jambonz ``mixType``: the frame the agent gets carries the caller (left / first) and what
    the caller heard (right), interleaved for ``stereo`` and summed for ``mixed``."""

    @staticmethod
    def _run(mix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        protocol = ListenAudioProtocol(sample_rate=SAMPLE_RATE, mix_type=mix)  # type: ignore[arg-type]
        sent: list[bytes] = []
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.sink = AgentSink(sent.append, SAMPLE_RATE, protocol.audio_frame)
        caller = np.full(FRAME_BYTES // 2, 1000, "<i2")
        heard = np.full(FRAME_BYTES // 2, -3000, "<i2")
        pipeline.agent_audio(heard.tobytes(), SAMPLE_RATE)  # what the caller hears this tick
        pipeline.take_caller(caller.tobytes(), 0.0)
        out = pipeline.next_out()
        assert out == heard.tobytes()
        pipeline.after_send(caller.tobytes(), out)
        return np.frombuffer(b"".join(sent), "<i2"), caller, heard

    def test_stereo_interleaves_caller_left_heard_right(self) -> None:
        frame, caller, heard = self._run("stereo")
        assert frame.size == 2 * caller.size
        assert (frame[0::2] == caller).all()
        assert (frame[1::2] == heard).all()

    def test_mixed_sums_both(self) -> None:
        frame, caller, heard = self._run("mixed")
        assert (frame == caller + heard).all()


class TestAgentArrivalPhase:
    """``agent_due``: when a real-time agent's frames arrive in the 20 ms, from the last 25."""

    def _arrive(self, pipeline: MediaPipeline, times: list[float]) -> None:
        for at in times:
            pipeline.agent_audio(bytes(FRAME_BYTES), SAMPLE_RATE, at)
            pipeline.next_out()

    def test_steady_arrivals_give_the_latest_of_them(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        jitter = [0.0, 0.0011, 0.0004, 0.0023, 0.0]  # within the 8 ms spread allowed
        times = [100.003 + 0.020 * i + jitter[i % 5] for i in range(25)]
        self._arrive(pipeline, times)
        now = times[-1] + 0.005
        due = pipeline.agent_due(now)
        assert due is not None
        assert math.remainder(due - 100.003, 0.020) == pytest.approx(0.0023)
        assert now < due <= now + 0.020  # the next frame's arrival

    def test_too_few_stale_or_scattered_arrivals_give_none(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        self._arrive(pipeline, [100.0 + 0.020 * i for i in range(24)])
        assert pipeline.agent_due(100.5) is None  # 24 arrivals only
        self._arrive(pipeline, [100.48])
        assert pipeline.agent_due(100.49) is not None
        assert pipeline.agent_due(100.60) is None  # the agent stopped sending
        pipeline.forget_arrivals()
        assert pipeline.agent_due(100.49) is None
        scattered = [200.0 + 0.020 * i + (0.009 if i % 2 else 0.0) for i in range(25)]
        self._arrive(pipeline, scattered)
        assert pipeline.agent_due(scattered[-1]) is None

    def test_without_a_time_arrivals_are_not_counted(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        for _ in range(30):
            pipeline.agent_audio(bytes(FRAME_BYTES), SAMPLE_RATE)
        assert pipeline.agent_due(0.0) is None


class TestStandingPlayoutQueue:
    """The agent speaking (no frame quiet enough to drop unheard, ``QUIET_PEAK``)."""

    def test_one_frame_left_waiting_for_a_second_is_trimmed_once(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.agent_audio(SPEECH, SAMPLE_RATE)  # one late frame's legacy
        for tick in range(pipeline_module.STANDING_TICKS):
            pipeline.agent_audio(SPEECH, SAMPLE_RATE)
            pipeline.next_out()
            expected = 0.0 if tick == pipeline_module.STANDING_TICKS - 1 else 20.0
            assert pipeline.playout.queued_ms == expected
        assert pipeline.playout.counters.trimmed_ms == 20.0
        for _ in range(3 * pipeline_module.STANDING_TICKS):
            pipeline.agent_audio(SPEECH, SAMPLE_RATE)
            pipeline.next_out()
        assert pipeline.playout.counters.trimmed_ms == 20.0

    def test_three_frames_standing_are_trimmed_together(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.agent_audio(SPEECH * 3, SAMPLE_RATE)  # the agent caught up at once
        for _ in range(pipeline_module.STANDING_TICKS):
            pipeline.agent_audio(SPEECH, SAMPLE_RATE)
            pipeline.next_out()
        assert pipeline.playout.counters.trimmed_ms == 60.0
        assert pipeline.playout.queued_ms == 0.0

    def test_a_sender_running_ahead_is_not_trimmed(self) -> None:
        """A frame more every ten ticks: the queue grows, it does not stand."""
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.agent_audio(SPEECH, SAMPLE_RATE)
        for tick in range(5 * pipeline_module.STANDING_TICKS):
            frames = 2 if tick % 10 == 0 else 1
            pipeline.agent_audio(SPEECH * frames, SAMPLE_RATE)
            pipeline.next_out()
        assert pipeline.playout.counters.trimmed_ms == 0.0

    @staticmethod
    def _ticks(pipeline: MediaPipeline, frames_per_tick: list[int]) -> list[float]:
        """Each tick: that many agent frames arrive, then one goes out; what is left."""
        left = []
        for frames in frames_per_tick:
            if frames:
                pipeline.agent_audio(SPEECH * frames, SAMPLE_RATE)
            pipeline.next_out()
            left.append(pipeline.playout.queued_ms)
        return left

    def test_frames_late_near_the_tick_are_caught_up_by_the_silence_played(self) -> None:
        """One frame late: silence went out in its place, and from then on the agent's frames
        come so near the tick that the queue moves between one frame and two. The frame of
        latency it stands at is trimmed after a second, and no more."""
        pipeline = MediaPipeline(detect_beep=False)
        assert self._ticks(pipeline, [1, 0, 2]) == [0.0, 0.0, 20.0]
        wobble = self._ticks(pipeline, [2, 0] * (pipeline_module.STANDING_TICKS // 2))
        assert set(wobble[:-1]) == {20.0, 40.0}
        assert pipeline.playout.counters.trimmed_ms == 20.0
        after = self._ticks(pipeline, [2, 0] * pipeline_module.STANDING_TICKS)
        assert set(after) == {0.0, 20.0}
        assert pipeline.playout.counters.trimmed_ms == 20.0

    def test_a_stall_is_caught_up_by_as_many_frames_as_went_out_silent(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        assert self._ticks(pipeline, [1, 0, 0, 0, 4]) == [0.0, 0.0, 0.0, 0.0, 60.0]
        self._ticks(pipeline, [2, 0] * (pipeline_module.STANDING_TICKS // 2))
        assert pipeline.playout.counters.trimmed_ms == 60.0

    def test_audio_sent_ahead_after_a_late_frame_loses_only_the_silence(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        self._ticks(pipeline, [1, 0, 100])  # late, then 2 s sent ahead
        self._ticks(pipeline, [2, 0] * pipeline_module.STANDING_TICKS)
        assert pipeline.playout.counters.trimmed_ms == 20.0

    def test_the_end_of_the_agents_speech_is_not_owed(self) -> None:
        """Dry for ``DRY_TICKS`` ticks: the agent stopped; its next speech, moving near the
        tick, is not trimmed."""
        pipeline = MediaPipeline(detect_beep=False)
        self._ticks(pipeline, [10] + [0] * (9 + pipeline_module.DRY_TICKS))
        self._ticks(pipeline, [2] + [2, 0] * pipeline_module.STANDING_TICKS)
        assert pipeline.playout.counters.trimmed_ms == 0.0

    @pytest.mark.parametrize("timed", [True, False])
    def test_a_queue_a_frame_apart_behind_a_real_time_agent_is_trimmed(self, timed: bool) -> None:
        """The agent stalled past ``DRY_TICKS`` (nothing owed), then sent what it held and
        streams in real time again, its frames right at the tick: the queue moves between
        three frames and four for good. Trimmed after a second when the arrivals show a
        real-time agent; without their times (nothing to tell it from audio sent ahead), not."""
        pipeline = MediaPipeline(detect_beep=False)
        self._ticks(pipeline, [1] + [0] * (pipeline_module.DRY_TICKS + 5))
        left = []
        for tick in range(pipeline_module.STANDING_TICKS + 30):
            now = 100.0 + 0.02 * tick
            # Two frames every other tick: one came 0.5 ms after the tick before, one 0.5 ms
            # before this one.
            arrivals = [now] * 4 if tick == 0 else [now - 0.0195, now - 0.0005] if tick % 2 else []
            for at in arrivals:
                pipeline.agent_audio(SPEECH, SAMPLE_RATE, at if timed else None)
            pipeline.next_out()
            left.append(pipeline.playout.queued_ms)
        assert set(left[:20]) == {60.0, 80.0}
        assert pipeline.playout.counters.trimmed_ms == (60.0 if timed else 0.0)

    def test_a_burst_faster_than_real_time_is_never_trimmed(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.agent_audio(SPEECH * 200, SAMPLE_RATE)  # 4 s of TTS at once
        for _ in range(199):
            pipeline.next_out()
        assert pipeline.playout.counters.trimmed_ms == 0.0
        assert pipeline.playout.queued_ms == 20.0


class TestQuietFramesBehindALateOne:
    """While silence is owed (a frame came late, silence went out in its place), a quiet frame
    (``QUIET_PEAK``) waiting behind it is dropped at once: the caller hears nothing of it and the
    agent's audio is on time again at its next pause, not a second later."""

    QUIET = np.random.default_rng(7).integers(-40, 41, FRAME_BYTES // 2).astype("<i2").tobytes()

    @staticmethod
    def _ticks(
        pipeline: MediaPipeline, arrivals: list[list[bytes]], timed: bool = True
    ) -> tuple[list[float], list[bytes]]:
        """Each tick: those frames arrive (from an agent over the network: with their arrival
        times; without, as the echo route's), then one goes out; what is left, and what went
        out."""
        left, heard = [], []
        for tick, frames in enumerate(arrivals):
            for frame in frames:
                pipeline.agent_audio(frame, SAMPLE_RATE, 100.0 + 0.02 * tick if timed else None)
            heard.append(pipeline.next_out())
            left.append(pipeline.playout.queued_ms)
        return left, heard

    def test_a_quiet_late_frame_is_dropped_at_the_next_tick(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        q = self.QUIET
        left, _ = self._ticks(pipeline, [[q], [], [q, q]] + [[q]] * 10)
        assert left == [0.0] * 13  # on time again at once, not after STANDING_TICKS
        assert pipeline.playout.counters.trimmed_ms == 20.0

    def test_speech_is_played_whole_and_the_first_quiet_frame_after_it_goes(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        q, s = self.QUIET, SPEECH
        left, heard = self._ticks(pipeline, [[s], [], [s, s]] + [[s]] * 5 + [[q]] * 5)
        # The late frame is speech: it is played, and the queue stands a frame behind through
        # the speech (and the tick the first quiet frame arrives behind the last of it); the
        # first quiet frame that reaches the head is the one dropped.
        assert left == [0.0, 0.0] + [20.0] * 7 + [0.0] * 4
        assert heard.count(SPEECH) == 8  # every frame of speech the agent sent
        assert pipeline.playout.counters.trimmed_ms == 20.0

    def test_quiet_audio_sent_ahead_is_never_dropped(self) -> None:
        pipeline = MediaPipeline(detect_beep=False)
        pipeline.agent_audio(self.QUIET * 100, SAMPLE_RATE, 100.0)  # 2 s at once: nothing owed
        for _ in range(99):
            pipeline.next_out()
        assert pipeline.playout.counters.trimmed_ms == 0.0
        assert pipeline.playout.queued_ms == 20.0

    def test_nothing_is_owed_after_the_end_of_speech(self) -> None:
        """Dry for ``DRY_TICKS`` ticks: the agent stopped; quiet audio it then sends near the
        tick is not dropped for it."""
        pipeline = MediaPipeline(detect_beep=False)
        q = self.QUIET
        self._ticks(pipeline, [[q]] + [[]] * pipeline_module.DRY_TICKS)
        self._ticks(pipeline, [[q, q]] + [[q, q], []] * 10)
        assert pipeline.playout.counters.trimmed_ms == 0.0

    def test_the_echo_routes_audio_is_never_dropped_for_it(self) -> None:
        """The echo route (no arrival times) plays the caller's own audio back as it came: an
        echo test compares it. Its standing frame waits for the one-second rule instead."""
        pipeline = MediaPipeline(detect_beep=False)
        q = self.QUIET
        left, _ = self._ticks(pipeline, [[q], [], [q, q]] + [[q]] * 10, timed=False)
        assert left == [0.0, 0.0] + [20.0] * 11
        assert pipeline.playout.counters.trimmed_ms == 0.0
