"""The worker in jambonz's place, end to end: real SIPp calls into (and out of) an in-process
worker, bridged to a scripted jambonz agent whose every message the test writes by hand.

Class names follow the jambonz rule or section (PROTOCOLS.md §1) they cover; the listen/stream
audio socket is in ``test_session_listen.py``, misbehaving agents in ``test_session_faults.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media.g711 import ulaw_encode
from tests.e2e.harness import (
    SCENARIOS,
    FileServer,
    ScriptedAgent,
    agent_call,
    agent_route,
    assert_sipp_ok,
    best_match,
    callee,
    caller,
    decode_mp3,
    envelope,
    final_statuses,
    live_session,
    rms,
    running_worker,
    sipp_times,
    tone,
    wait_result,
    wav_bytes,
)
from tests.sipp import Sipp, SippResult
from worker.config import RouteSettings
from worker.events import CallDoneEvent, CallStartedEvent, CallStatusEvent, EventLog
from worker.session.session import SessionResult

pytestmark = [pytest.mark.sipp]

CALLED = "+15557654321"
CALL_INFO_KEYS = {
    "call_sid",
    "direction",
    "from",
    "to",
    "call_id",
    "sbc_callid",
    "sip_status",
    "sip_reason",
    "call_status",
    "caller_id",
    "account_sid",
    "application_sid",
    "trace_id",
    "fs_sip_address",
}


def _peak_hz(x: np.ndarray[Any, Any], rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


class TestJambonzSessionNewPayload:
    """§1.4: ``session:new`` carries jambonz's call info and the INVITE under ``sip``; §1.7:
    ``call:status`` on every change, ``duration`` only with ``completed``."""

    async def test_session_new_fields_and_call_status(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", CALLED) as call:
            ctl, new, worker = call.ctl, call.new, call.worker
            await ctl.ack(new, [{"verb": "answer"}, {"verb": "pause", "length": 1.2}])
            statuses = [await ctl.next_type("call:status") for _ in range(3)]
            result, done = await call.finish()

        assert ctl.subprotocol == "ws.jambonz.org"
        data = new["data"]
        assert new["call_sid"] == data["call_sid"] == done.call_sid
        assert isinstance(new["msgid"], str)
        assert new["msgid"]
        call_id = data["call_id"]
        assert data["direction"] == "inbound"
        assert data["from"] == "+15550001000"
        assert data["to"] == CALLED
        assert data["caller_name"] == "E2E Caller"
        assert (data["sip_status"], data["sip_reason"], data["call_status"]) == (
            100,
            "Trying",
            "trying",
        )
        assert data["originating_sip_ip"] == "127.0.0.1"
        assert data["local_sip_address"] == f"127.0.0.1:{worker.settings.sip.port}"
        assert "fs_sip_address" not in data  # session:new copies CallInfo's own fields
        sip = data["sip"]
        assert sip["method"] == "INVITE"
        assert sip["uri"] == f"sip:{CALLED}@127.0.0.1:{worker.settings.sip.port}"
        assert sip["headers"]["call-id"] == call_id
        assert sip["headers"]["from"].startswith('"E2E Caller" <sip:+15550001000@')
        assert sip["headers"]["X-Customer-Id"] == "e2e-1"  # custom headers keep their case
        assert sip["raw"].startswith(f"INVITE sip:{CALLED}@")
        # The INVITE exactly as SIPp sent it, and every header whole (defect 5).
        (sent,) = result.sent("INVITE ")
        assert sip["raw"].replace("\r", "").strip("\n") + "\n" == sent
        assert sip["headers"]["allow"] == "INVITE, ACK, CANCEL, BYE, OPTIONS"
        assert sip["headers"]["supported"] == "replaces, timer"
        assert "m=audio" in sip["body"]
        assert "PCMA/8000" in sip["body"]
        assert sip["payload"] == [{"type": "application/sdp", "content": sip["body"]}]
        assert {"synthesizer", "recognizer"} <= set(data["defaults"])
        assert data["env_vars"] == {}

        assert [s["data"]["call_status"] for s in statuses] == [
            "ringing",
            "in-progress",
            "completed",
        ]
        assert [s["data"]["sip_status"] for s in statuses] == [180, 200, 200]
        for status in statuses:
            assert status["call_sid"] == new["call_sid"]
            assert set(status["data"]) >= CALL_INFO_KEYS
            assert status["data"]["call_id"] == call_id
        assert "duration" not in statuses[0]["data"]
        assert "duration" not in statuses[1]["data"]
        assert statuses[2]["data"]["duration"] == 1
        assert done.status == "completed"
        assert done.duration_sec == 1
        assert final_statuses(result) == [200]
        # The same life cycle on the worker's event stream (events.jsonl).
        events = EventLog(tmp_path / "data" / "events.jsonl").for_call(done.call_sid)
        assert [e.type for e in events] == [
            "call.started",
            "call.status",
            "call.status",
            "call.status",
            "call.done",
        ]
        assert [e.status for e in events if isinstance(e, CallStatusEvent)] == [
            "ringing",
            "in-progress",
            "completed",
        ]
        started, finished = events[0], events[-1]
        assert isinstance(started, CallStartedEvent)
        assert started.to == CALLED
        assert isinstance(finished, CallDoneEvent)
        assert finished.status == "completed"
        assert finished.recording_path == done.recording


class TestJambonzAnswerPauseHangup:
    """Verbs ``answer``, ``pause`` and ``hangup`` (PROTOCOLS.md §1.5, README verbs)."""

    async def test_answer_then_pause_then_hangup(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", CALLED) as call:
            ctl, new = call.ctl, call.new
            await ctl.ack(
                new,
                [
                    {"verb": "answer"},
                    {"verb": "pause", "length": 1.6},
                    {"verb": "hangup"},
                    {"verb": "say", "text": "never said"},
                ],
            )
            completed = await ctl.next(
                lambda m: m.get("data", {}).get("call_status") == "completed"
            )
            result, done = await call.finish()
        answered = sipp_times(result, "received", "SIP/2.0 200")[0]
        bye = sipp_times(result, "received", "BYE ")[0]
        assert 1.58 <= bye - answered <= 1.9, bye - answered
        # Whole seconds, truncated as jambonz does (moment().diff(connectTime, "seconds")).
        assert completed["data"]["duration"] == 1
        assert done.duration_sec == 1
        assert done.status == "completed"
        assert done.cause == "agent-hangup"
        assert done.transcript == []  # the verb after hangup did not run


class TestJambonzPlayVerb:
    """``play``: a WAV over http and a file under ``data_dir/prompts``, played in order to the
    caller (heard back through SIPp's RTP echo), cached, ``actionHook`` with the playback time."""

    async def test_play_http_and_prompt_file(self, tmp_path: Path) -> None:
        data_dir = tmp_path / "data"
        (data_dir / "prompts").mkdir(parents=True)
        (data_dir / "prompts" / "low.wav").write_bytes(wav_bytes(tone(440, 0.4)))
        files = {"/high.wav": wav_bytes(tone(1000, 0.6))}
        async with (
            FileServer(files) as http,
            agent_call(tmp_path, "uac_echo_wait_bye", CALLED, data_dir=data_dir, echo=True) as call,
        ):
            ctl = call.ctl
            play = {
                "verb": "play",
                "id": "p1",
                "url": [http.url("/high.wav"), "low.wav"],
                "actionHook": "/played",
            }
            await ctl.ack(call.new, [play])
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{**play, "url": http.url("/high.wav"), "id": "p2"}])
            again = await ctl.next_type("verb:hook")
            await ctl.ack(again, [{"verb": "hangup"}])
            _, done = await call.finish()

        assert hook["hook"] == "/played"
        assert hook["data"]["reason"] == "playCompleted"
        assert hook["data"]["verb_id"] == "p1"
        assert 980 <= hook["data"]["playback_milliseconds"] <= 1300
        assert again["data"]["reason"] == "playCompleted"
        assert http.requests == ["/high.wav"]  # the second play came from the cache
        assert done.recording is not None
        caller_heard, played = decode_mp3(done.recording)
        # The agent channel: 0.6 s at 1 kHz, 0.4 s at 440 Hz, then 0.6 s at 1 kHz again.
        loud = np.flatnonzero(envelope(played, 8000) > 1000)
        assert 75 <= len(loud) <= 85, len(loud)  # 80 frames of 20 ms
        start = loud[0] * 160
        assert abs(_peak_hz(played[start + 400 : start + 4400]) - 1000) < 20
        assert abs(_peak_hz(played[start + 5200 : start + 7800]) - 440) < 20
        # ... and the caller got it: SIPp echoed it back, so it is in the caller's channel too.
        match = best_match(caller_heard, played[start : start + 8000])
        assert match.score > 0.9, match
        assert 0 < (match.lag - start) / 8 < 200  # ms: the round trip through the echo


class TestJambonzSayVerb:
    """``say``: espeak-ng speech reaches the caller; the text goes into the transcript."""

    async def test_say_reaches_the_caller(self, tmp_path: Path) -> None:
        text = "Hello from the end to end test."
        async with agent_call(tmp_path, "uac_echo_wait_bye", CALLED, echo=True) as call:
            ctl, new = call.ctl, call.new
            await ctl.ack(new, [{"verb": "say", "text": text}])
            _, done = await call.finish()
        assert [t[:2] for t in done.transcript] == [("agent", text)]
        assert done.recording is not None
        caller_heard, said = decode_mp3(done.recording)
        speech = np.flatnonzero(envelope(said, 8000) > 300)
        assert len(speech) * 0.02 > 0.8, "not a second of speech"
        start = speech[0] * 160
        match = best_match(caller_heard, said[start : start + 8000])
        assert match.score > 0.9, match


class TestJambonzGatherDigits:
    """``gather`` with DTMF: SIPp's RFC 4733 captures 1, 5, # arrive as ``digits`` "15" with
    ``reason`` dtmfDetected at the actionHook; the nested ``say`` is barged in."""

    async def test_gather_finish_on_key(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_dtmf_wait_bye", CALLED, duration_ms=800) as call:
            ctl, new = call.ctl, call.new
            gather = {
                "verb": "gather",
                "id": "g1",
                "input": ["digits"],
                "finishOnKey": "#",
                "timeout": 5,
                "actionHook": "/gathered",
                "say": {"text": "Please enter your account number and then press pound. " * 3},
            }
            await ctl.ack(new, [gather])
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{"verb": "hangup"}])
            _, done = await call.finish()
        assert hook["hook"] == "/gathered"
        assert hook["data"]["digits"] == "15"
        assert hook["data"]["reason"] == "dtmfDetected"
        assert hook["data"]["verb_id"] == "g1"
        assert hook["data"]["call_status"] == "in-progress"
        assert done.digits == "15#"
        assert done.transcript == []  # the prompt was interrupted, never finished


class TestJambonzTagRedirectConfig:
    """``config`` notifyEvents → ``verb:status`` starting/finished (§1.7, code shape);
    ``tag`` data comes back as ``customerData`` in the next hook; ``redirect`` fetches verbs
    from its actionHook and runs them."""

    async def test_tag_then_redirect_with_verb_status(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", CALLED) as call:
            ctl, new = call.ctl, call.new
            await ctl.ack(
                new,
                [
                    {"verb": "config", "notifyEvents": True},
                    {"verb": "answer"},
                    {"verb": "tag", "id": "t1", "data": {"crmId": 42, "Lead_Source": "web"}},
                    {"verb": "redirect", "id": "r1", "actionHook": "/next"},
                    {"verb": "say", "text": "replaced by the redirect"},
                ],
            )
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{"verb": "pause", "id": "p1", "length": 0.2}, {"verb": "hangup"}])
            _, done = await call.finish()

        assert hook["hook"] == "/next"
        assert hook["data"]["customerData"] == {"crmId": 42, "Lead_Source": "web"}  # as written
        assert hook["data"]["verb_id"] == "r1"
        events = [
            (m["data"].get("event"), m["data"].get("name"), m["data"].get("id"))
            for m in ctl.texts()
            if m["type"] == "verb:status"
        ]
        assert ("starting", "tag", "t1") in events
        assert ("finished", "tag", "t1") in events
        assert ("starting", "redirect", "r1") in events
        assert ("starting", "pause", "p1") in events
        assert ("finished", "pause", "p1") in events
        assert events.index(("finished", "tag", "t1")) < events.index(
            ("starting", "redirect", "r1")
        )
        assert done.transcript == []  # the say after the redirect was replaced
        assert done.status == "completed"


class TestJambonzSipDecline:
    """``sip:decline``: the caller gets the status (and the ``reason`` phrase when given);
    ``call:status`` reports it."""

    @pytest.mark.parametrize(
        ("status", "reason", "phrase", "call_status"),
        [(486, None, "Busy Here", "busy"), (603, "Not Today", "Not Today", "failed")],
    )
    async def test_decline(
        self, tmp_path: Path, status: int, reason: str | None, phrase: str, call_status: str
    ) -> None:
        verb: dict[str, Any] = {"verb": "sip:decline", "status": status}
        if reason is not None:
            verb["reason"] = reason
        async with agent_call(tmp_path, "uac_rejected", CALLED) as call:
            ctl, new = call.ctl, call.new
            await ctl.ack(new, [verb])
            reported = await ctl.next(
                lambda m: (
                    m.get("type") == "call:status" and m["data"]["call_status"] not in ("ringing",)
                )
            )
            result, done = await call.finish()
        assert final_statuses(result) == [status]
        assert result.received(f"SIP/2.0 {status} {phrase}")
        assert reported["data"]["call_status"] == call_status
        assert reported["data"]["sip_status"] == status
        assert reported["data"]["sip_reason"] == phrase
        assert "duration" not in reported["data"]
        assert done.status == call_status


class TestJambonzDtmfVerb:
    """``dtmf`` (and the ``dtmf`` command) send RFC 4733 events: the far end (SIPp with
    -rtp_echo) returns them, so the worker decodes its own key presses as the callee's.
    Also ``session:new`` for an originated call: sent after the answer, direction outbound."""

    async def test_dtmf_reaches_the_far_end(self, tmp_path: Path) -> None:
        async with ScriptedAgent() as agent:
            uas = callee(tmp_path / "uas")
            async with uas:
                await uas.ready()
                trunks = {"far": {"host": "127.0.0.1", "port": uas.port, "codecs": ["PCMU"]}}
                route = agent_route("out", agent.url("/app"))
                async with running_worker(tmp_path / "data", [route], trunks) as worker:
                    call = asyncio.create_task(
                        worker.originate("far", "+15550002000", RouteSettings(**route))
                    )
                    try:
                        ctl = await agent.accept("/app")
                        new = await ctl.next_type("session:new")
                        await ctl.ack(
                            new,
                            [
                                {"verb": "dtmf", "dtmf": "1*9", "duration": 160},
                                {"verb": "pause", "length": 0.8},
                            ],
                        )
                        await asyncio.sleep(1.0)
                        await ctl.send(
                            {
                                "type": "command",
                                "command": "dtmf",
                                "data": {"dtmf": {"digit": "#", "duration": 160}},
                            }
                        )
                        done = await asyncio.wait_for(call, 10)
                    finally:
                        call.cancel()
                result = await uas.wait()
        assert_sipp_ok(result)
        data = new["data"]
        assert data["direction"] == "outbound"
        assert data["call_status"] == "in-progress"
        assert data["to"] == "+15550002000"
        assert done.digits == "1*9#"
        assert done.status == "completed"


async def dialled(
    tmp_path: Path, uas: Sipp, dial: dict[str, Any]
) -> tuple[SippResult, dict[str, Any], SessionResult, SippResult]:
    """A SIPp caller whose agent answers with ``dial`` to the far end ``uas`` through the trunk
    ``far``, then hangs up after the actionHook: (caller's result, the hook, the session's result,
    the far end's result), both SIPp runs checked to have passed."""
    async with ScriptedAgent() as agent, uas:
        await uas.ready()
        trunks = {"far": {"host": "127.0.0.1", "port": uas.port, "codecs": ["PCMU"]}}
        routes = [agent_route("*", agent.url("/app"))]
        async with running_worker(tmp_path / "data", routes, trunks) as worker:
            sipp = caller(tmp_path / "sipp", worker, "uac_talk_wait_bye", CALLED)
            async with sipp:
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
                await ctl.ack(new, [dial])
                hook = await ctl.next_type("verb:hook", within=10)
                await ctl.ack(hook, [{"verb": "hangup"}])
                result = await sipp.wait()
            assert_sipp_ok(result)
            done = await wait_result(worker, new["call_sid"])
        far = await uas.wait()
    assert_sipp_ok(far)
    return result, hook, done, far


class TestJambonzDialVerb:
    """``dial`` to a phone number through a trunk: the far end (SIPp, echoing) is bridged to the
    caller, so the caller hears their own voice back from it; ``timeLimit`` ends the leg and the
    actionHook gets ``dial_call_status``, ``dial_sip_status``, ``dial_call_duration``."""

    async def test_dial_bridges_and_reports(self, tmp_path: Path) -> None:
        dial = {
            "verb": "dial",
            "callerId": "+15550001234",
            "target": [{"type": "phone", "number": "+15550002000", "trunk": "far"}],
            "timeLimit": 3,
            "actionHook": "/dialed",
        }
        _result, hook, done, far = await dialled(tmp_path, callee(tmp_path / "uas"), dial)
        invite = far.received("INVITE ")[0]
        assert invite.startswith("INVITE sip:+15550002000@127.0.0.1")
        assert "<sip:+15550001234@" in invite
        data = hook["data"]
        assert data["dial_call_status"] == "completed"
        assert data["dial_sip_status"] == 200
        assert data["dial_call_duration"] == 3
        assert done.recording is not None
        voice, heard = decode_mp3(done.recording)
        assert len(voice) / 8000 == pytest.approx(3.0, abs=0.1)  # timeLimit, then hangup
        match = best_match(heard, voice[4000:16000])  # 1.5 s of the caller, from 0.5 s in
        assert match.score > 0.9, match
        assert 0 < (match.lag - 4000) / 8 < 250  # ms: out to the far end and back


def early_media_callee(workdir: Path) -> Sipp:
    """A far end that sends 1.9 s of a 1 kHz tone as early media (183) before answering."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tone.ulaw").write_bytes(ulaw_encode(tone(1000, 1.9)))
    return Sipp(
        workdir=workdir,
        remote=None,
        args=["-sf", str(SCENARIOS / "uas_early_media.xml"), "-m", "1"],
        timeout_s=40,
    )


class TestJambonzDialEarlyMedia:
    """Defect 2: the dialled side's early media (183 with SDP and RTP before the 200: ringback,
    carrier announcements) reaches the caller, as jambonz bridges it; with ``answerOnBridge``
    the unanswered caller first gets a 183 of their own."""

    @pytest.mark.parametrize("answer_on_bridge", [False, True])
    async def test_far_end_early_media_is_heard(
        self, tmp_path: Path, answer_on_bridge: bool
    ) -> None:
        dial = {
            "verb": "dial",
            "target": [{"type": "phone", "number": "+15550002000", "trunk": "far"}],
            "answerOnBridge": answer_on_bridge,
            "timeLimit": 1,
            "actionHook": "/dialed",
        }
        uas = early_media_callee(tmp_path / "uas")
        result, hook, done, _far = await dialled(tmp_path, uas, dial)
        assert hook["data"]["dial_call_status"] == "completed"
        if answer_on_bridge:
            progress = result.received("SIP/2.0 183")
            assert len(progress) == 1
            assert "m=audio" in progress[0]
        assert done.recording is not None
        _voice, heard = decode_mp3(done.recording)
        # The first 1.5 s the caller heard (before the far end answered) are the tone.
        early = heard[int(0.2 * 8000) : int(1.7 * 8000)]
        assert rms(early) > 1000
        assert abs(_peak_hz(early) - 1000) < 20


class TestJambonzSipRequestCommand:
    """``sip:request`` sends an in-dialog request (both command shapes); a command the worker
    cannot carry out (``redirect`` to an application URL) is answered with ``jambonz:error``."""

    async def test_info_reaches_the_caller_then_hangup(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_info_wait_bye", CALLED) as call:
            ctl, new = call.ctl, call.new
            await ctl.ack(new, [{"verb": "answer"}, {"verb": "pause", "length": 20}])
            await ctl.next(
                lambda m: (
                    m.get("type") == "call:status" and m["data"]["call_status"] == "in-progress"
                )
            )
            await ctl.send(
                {
                    "type": "command",
                    "command": "redirect",
                    "data": {"call_hook": "https://example.invalid/app"},
                }
            )
            error = await ctl.next_type("jambonz:error")
            await ctl.send(
                {
                    "type": "command",
                    "command": "sip:request",
                    "data": {
                        "sip_request": {
                            "method": "INFO",
                            "content_type": "application/json",
                            "content": '{"hello":"caller"}',
                            "headers": {"X-Reason": "e2e"},
                        }
                    },
                }
            )
            await asyncio.sleep(0.3)  # the scenario takes the INFO before the BYE
            await ctl.send(
                {
                    "type": "command",
                    "command": "call:status",
                    "data": {"call_status": "completed"},
                }
            )
            result, done = await call.finish()
        infos = result.received("INFO")
        assert len(infos) == 1
        assert '{"hello":"caller"}' in infos[0]
        assert "X-Reason: e2e" in infos[0]
        assert "application/json" in infos[0]
        assert "not supported" in error["data"]["error"]
        assert done.status == "completed"


class TestJambonzEarlyMedia:
    """``say`` with ``earlyMedia``: the caller gets 183 Session Progress with SDP and hears the
    audio before any answer; when the verbs run out the unanswered call is refused (480)."""

    async def test_say_in_early_media_then_refused(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_rejected", CALLED, echo=True) as call:
            ctl, new, worker = call.ctl, call.new, call.worker
            leg = live_session(worker, new["call_sid"]).leg
            verb = {"verb": "say", "text": "Please hold on.", "earlyMedia": True}
            await ctl.ack(new, [verb])
            result, done = await call.finish()
        progress = result.received("SIP/2.0 183")
        assert len(progress) == 1
        assert "m=audio" in progress[0]
        assert final_statuses(result) == [480]
        quality = leg.quality()
        assert quality.packets_out > 25  # at least half a second of the prompt was sent
        assert quality.packets_in > 0  # SIPp echoed it: the early media path worked
        assert done.status == "no-answer"
