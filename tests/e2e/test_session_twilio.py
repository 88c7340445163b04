"""The worker in Twilio's place for a bidirectional ``<Connect><Stream>`` (PROTOCOLS.md §3, §9),
end to end: real SIPp calls, the worker in-process, a scripted Media Streams server that checks
every message and answers by hand."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media.g711 import ulaw_decode, ulaw_encode
from tests.e2e.harness import (
    AgentPeer,
    ScriptedAgent,
    agent_route,
    assert_sipp_ok,
    best_match,
    callee,
    caller,
    final_statuses,
    pattern,
    pcap_reference,
    running_worker,
    samples,
    tone,
    wait_results,
)
from tests.sipp import free_port
from worker.config import RouteSettings
from worker.events import CallInterruptionEvent, EventLog

pytestmark = [pytest.mark.sipp]

PARAMS = {"campaign": "e2e", "lang": "en-GB"}


def _twilio_route(match: str, url: str) -> dict[str, Any]:
    return agent_route(match, url, protocol="twilio", custom_parameters=PARAMS)


def _inbound_audio(peer: AgentPeer) -> np.ndarray[Any, Any]:
    media = [m for m in peer.texts() if m.get("event") == "media"]
    return samples(ulaw_decode(b"".join(base64.b64decode(m["media"]["payload"]) for m in media)))


async def _send_media(peer: AgentPeer, stream_sid: str, ulaw: bytes) -> None:
    for offset in range(0, len(ulaw), 160):
        chunk = base64.b64encode(ulaw[offset : offset + 160]).decode()
        await peer.send({"event": "media", "streamSid": stream_sid, "media": {"payload": chunk}})


class TestTwilioStreamMessages:
    """§3.2 and §9 (Pipecat): ``connected`` first, then ``start`` with ``streamSid``,
    ``callSid``, ``customParameters`` and µ-law 8 kHz, then ``media`` every 20 ms carrying the
    caller's audio (SIPp's capture), ``dtmf`` for each key (SIPp's RFC 4733 captures), and
    ``stop`` when the caller hangs up; every counter a string, sequence numbers without gaps."""

    async def test_inbound_call_messages(self, tmp_path: Path) -> None:
        async with ScriptedAgent() as agent:
            routes = [_twilio_route("*", agent.url("/twilio"))]
            async with running_worker(tmp_path / "data", routes) as worker:
                sipp = caller(
                    tmp_path / "sipp", worker, "uac_talk_dtmf_bye", "+15550003000", duration_ms=300
                )
                async with sipp:
                    ws = await agent.accept("/twilio")
                    stop = await ws.next_event("stop", within=15)
                    await ws.wait_closed()
                    result = await sipp.wait()
                assert_sipp_ok(result)
                (done,) = await wait_results(worker, 1)

        assert ws.subprotocol is None
        messages = ws.texts()
        assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        start = messages[1]
        assert start["event"] == "start"
        sid = start["streamSid"]
        assert sid.startswith("MZ")
        assert start["start"]["streamSid"] == sid
        assert start["start"]["callSid"].startswith("CA")
        assert start["start"]["accountSid"]
        assert start["start"]["tracks"] == ["inbound"]
        assert start["start"]["customParameters"] == PARAMS
        assert start["start"]["mediaFormat"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }
        assert messages[-1] == stop
        assert stop["stop"] == {
            "accountSid": start["start"]["accountSid"],
            "callSid": start["start"]["callSid"],
        }
        numbered = messages[1:]
        assert [m["sequenceNumber"] for m in numbered] == [
            str(n) for n in range(1, len(numbered) + 1)
        ]
        assert all(m["streamSid"] == sid for m in numbered)
        media = [m for m in messages if m["event"] == "media"]
        assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, len(media) + 1)]
        assert [m["media"]["timestamp"] for m in media[:3]] == ["0", "20", "40"]
        assert {m["media"]["track"] for m in media} == {"inbound"}
        assert {len(base64.b64decode(m["media"]["payload"])) for m in media} == {160}
        dtmf = [m for m in messages if m["event"] == "dtmf"]
        assert [d["dtmf"] for d in dtmf] == [
            {"track": "inbound_track", "digit": d} for d in ("1", "5", "#")
        ]
        match = best_match(_inbound_audio(ws), pcap_reference()[4000 : 4000 + 6 * 8000])
        assert match.score > 0.99, match
        assert ws.close_code == 1000
        assert done.status == "completed"
        assert done.digits == "15#"


class TestTwilioMarkEcho:
    """§3.3: agent ``media`` is played to the far end (SIPp echoes it, so the agent hears itself
    back on the same stream), a ``mark`` is echoed once the audio before it has played and not
    sooner, ``clear`` drops the buffered audio and echoes every outstanding mark; the agent
    closing the socket ends the call (the worker's documented difference from Twilio)."""

    async def test_media_marks_clear_and_close(self, tmp_path: Path) -> None:
        sent = ulaw_encode(pattern(1.5))
        async with ScriptedAgent() as agent, callee(tmp_path / "uas") as uas:
            await uas.ready()
            trunks = {"far": {"host": "127.0.0.1", "port": uas.port, "codecs": ["PCMU"]}}
            route = _twilio_route("out", agent.url("/twilio"))
            async with running_worker(tmp_path / "data", [route], trunks) as worker:
                call = asyncio.create_task(
                    worker.originate("far", "+15550002000", RouteSettings(**route))
                )
                try:
                    ws = await agent.accept("/twilio")
                    start = await ws.next_event("start")
                    sid = start["streamSid"]
                    loop = asyncio.get_running_loop()
                    began = loop.time()
                    await _send_media(ws, sid, sent)
                    await ws.send({"event": "mark", "streamSid": sid, "mark": {"name": "m1"}})
                    m1 = await ws.next_event("mark")
                    m1_at = loop.time()
                    await asyncio.sleep(0.4)  # let the echo of the end come back
                    await _send_media(ws, sid, ulaw_encode(tone(600, 3.0)))
                    for name in ("m2", "m3"):
                        await ws.send({"event": "mark", "streamSid": sid, "mark": {"name": name}})
                    await asyncio.sleep(0.3)
                    cleared_at = loop.time()
                    await ws.send({"event": "clear", "streamSid": sid})
                    m2 = await ws.next_event("mark")
                    m3 = await ws.next_event("mark")
                    m3_at = loop.time()
                    await ws.close()
                    done = await asyncio.wait_for(call, 10)
                finally:
                    call.cancel()
            far = await uas.wait()
        assert_sipp_ok(far)
        assert m1["mark"] == {"name": "m1"}
        # Echoed with the tick that plays the last of its 75 frames: 74 ticks after the first.
        assert 1.48 <= m1_at - began <= 1.56, m1_at - began
        assert [m2["mark"]["name"], m3["mark"]["name"]] == ["m2", "m3"]
        assert m3_at - cleared_at < 0.1
        heard = _inbound_audio(ws)
        match = best_match(heard, samples(ulaw_decode(sent))[800:-800])
        assert match.score > 0.99, match
        assert done.status == "completed"
        assert done.cause == "agent-finished"
        # The clear is on record (defect 7): an interruption event, and the summary's counter.
        cleared = EventLog(tmp_path / "data" / "events.jsonl").of_type(CallInterruptionEvent)
        assert [(e.call_id, e.reason) for e in cleared] == [(done.call_sid, "agent-clear")]
        assert 2000 <= cleared[0].cleared_ms <= 3000  # 3 s queued, ~0.3 s of it played
        assert done.counters.agent_audio_cleared_ms == cleared[0].cleared_ms


class TestTwilioAgentUnreachable:
    """An unreachable Media Streams server fails the call before it is answered: the caller gets
    480 and the result says why."""

    async def test_refused(self, tmp_path: Path) -> None:
        routes = [_twilio_route("*", f"ws://127.0.0.1:{free_port()}/twilio")]
        async with running_worker(tmp_path / "data", routes) as worker:
            sipp = caller(tmp_path / "sipp", worker, "uac_rejected", "+15550003001")
            result = await sipp.run()
            (done,) = await wait_results(worker, 1)
        assert_sipp_ok(result)
        assert final_statuses(result) == [480]
        assert done.status == "failed"
        assert done.cause == "agent-unreachable"
        assert done.reason is not None
        assert "refused" in done.reason
