"""The call's events as the hub will see them: a voicemail beep heard on a real call becomes
``call.voicemail_detected``; ``transcription`` messages from the agent's listen socket become the
call's transcript (``SessionResult.transcript`` and ``call.transcript`` events)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from media.g711 import ulaw_encode
from tests.e2e.harness import agent_call
from worker.events import CallTranscriptEvent, CallVoicemailDetectedEvent, EventLog

pytestmark = [pytest.mark.sipp]

CALLED = "+15557654321"


def _answering_machine(path: Path) -> None:
    """1.5 s of a noisy 'greeting', 0.6 s of a 1 kHz beep, 1 s of silence, as raw µ-law."""
    rate = 8000
    rng = np.random.default_rng(3)
    greeting = rng.normal(0, 2500, int(1.5 * rate))
    t = np.arange(int(0.6 * rate)) / rate
    beep = 9000 * np.sin(2 * np.pi * 1000 * t)
    audio = np.concatenate([greeting, beep, np.zeros(rate)])
    pcm = np.clip(audio, -32768, 32767).astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ulaw_encode(pcm))


class TestVoicemailBeepEvent:
    async def test_beep_on_the_line_is_reported_once(self, tmp_path: Path) -> None:
        _answering_machine(tmp_path / "sipp" / "beep.ulaw")
        route = {"voicemail_detection": "always"}  # the default listens on outbound calls only
        async with agent_call(tmp_path, "uac_beep_wait_bye", CALLED, route=route) as call:
            ctl, new, worker = call.ctl, call.new, call.worker
            await ctl.ack(new, [{"verb": "answer"}, {"verb": "pause", "length": 4.5}])
            await call.finish()
        assert worker.sink is not None
        await worker.sink.flush()
        beeps = EventLog(tmp_path / "data" / "events.jsonl").of_type(CallVoicemailDetectedEvent)
        assert [b.call_id for b in beeps] == [new["call_sid"]]
        assert abs(beeps[0].beep_hz - 1000) < 30


class TestListenTranscription:
    async def test_agent_transcription_becomes_the_transcript(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", CALLED) as call:
            ctl, new, worker, agent = call.ctl, call.new, call.worker, call.agent
            listen = {"verb": "listen", "url": agent.url("/listen"), "maxLength": 3}
            await ctl.ack(new, [listen])
            audio = await agent.accept("/listen")
            await audio.recv()  # the metadata frame
            await audio.send(
                {"type": "transcription", "data": {"role": "user", "text": "I need help"}}
            )
            await audio.send(
                {"type": "transcription", "data": {"role": "agent", "text": "Sure, how?"}}
            )
            _, done = await call.finish()
        assert [(role, text) for role, text, _ in done.transcript] == [
            ("user", "I need help"),
            ("agent", "Sure, how?"),
        ]
        assert all(0 <= at < 3.5 for _, _, at in done.transcript)
        assert worker.sink is not None
        await worker.sink.flush()
        turns = EventLog(tmp_path / "data" / "events.jsonl").of_type(CallTranscriptEvent)
        assert [(t.role, t.text) for t in turns] == [
            ("user", "I need help"),
            ("agent", "Sure, how?"),
        ]
