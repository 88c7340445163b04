"""The media pipeline's taps: in-band DTMF is heard only on legs without RFC 4733, and the
session switches it on from the negotiated media when the call is answered."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from media.stream import FRAME_BYTES, SAMPLE_RATE
from tests.unit.test_session_verbs import make_session
from worker.session.pipeline import InbandDigit, MediaPipeline, PipelineEvent
from worker.sip.call import CallState


def _tone_frames(low: float, high: float, seconds: float = 0.12) -> list[bytes]:
    """A DTMF key press (two sines) followed by as much silence, in 20 ms frames."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 6000 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    pcm = np.concatenate([tone, np.zeros(t.size)]).astype("<i2").tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def _feed(pipeline: MediaPipeline, frames: list[bytes]) -> None:
    silence = bytes(FRAME_BYTES)
    for index, frame in enumerate(frames):
        pipeline.after_tick(frame, silence, index * 0.02)


class TestInbandDtmfTap:
    def test_off_by_default_and_on_when_asked(self) -> None:
        events: list[PipelineEvent] = []
        pipeline = MediaPipeline(on_event=events.append, detect_beep=False)
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
        session, leg, _, _ = make_session(tmp_path)
        leg.media = SimpleNamespace(telephone_event_pt=None)  # type: ignore[attr-defined]
        leg.state = CallState.ANSWERED
        session._on_leg_state(leg)  # type: ignore[arg-type]
        _feed(session.pipeline, _tone_frames(852, 1477))  # "9"
        assert session.digits == ["9"]

    async def test_answer_with_telephone_event_ignores_tones(self, tmp_path: Path) -> None:
        session, leg, _, _ = make_session(tmp_path)
        leg.media = SimpleNamespace(telephone_event_pt=101)  # type: ignore[attr-defined]
        leg.state = CallState.ANSWERED
        session._on_leg_state(leg)  # type: ignore[arg-type]
        _feed(session.pipeline, _tone_frames(852, 1477))
        assert session.digits == []
