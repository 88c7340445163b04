"""The jambonz ``listen``/``stream`` audio socket end to end (PROTOCOLS.md §2), and the call
recording: what the agent receives is compared with what SIPp sent (its g711a.pcap, decoded
here), what the agent sends is looked for where the caller is (SIPp's RTP echo), and the MP3 is
decoded with ffmpeg.

The two long talking calls (7 s of SIPp's capture each, at 8 and 16 kHz) run once, together,
in the module fixture ``talk``; several test classes read their outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soxr

from media.resample import Resampler
from tests.e2e.harness import (
    AgentPeer,
    ScriptedAgent,
    agent_call,
    agent_route,
    assert_sipp_ok,
    best_match,
    callee,
    caller,
    decode_mp3,
    envelope,
    pattern,
    pcap_reference,
    running_worker,
    samples,
    sipp_times,
    tone,
    wait_result,
)
from tests.sipp import SippResult
from worker.config import RouteSettings
from worker.events import EventLog
from worker.session.session import SessionResult

pytestmark = [pytest.mark.sipp]

RATE_8K_NUMBER = "+15550000801"
RATE_16K_NUMBER = "+15550001601"
TALK_MS = 7600  # the capture is 7.05 s; SIPp hangs up this long after its ACK
PATTERN_S = 2.0


@dataclass
class TalkCall:
    """One finished talking call: the agent's sockets, the worker's result, SIPp's result."""

    new: dict[str, Any]
    control: AgentPeer
    listen: AgentPeer
    result: SessionResult
    sipp: SippResult
    sent_pattern: bytes


async def _talk_call(
    agent: ScriptedAgent, path: str, verb: dict[str, Any], send_back: bytes
) -> tuple[dict[str, Any], AgentPeer, AgentPeer]:
    ctl = await agent.accept("/app" + path)
    new = await ctl.next_type("session:new")
    await ctl.ack(new, [verb])
    listen = await agent.accept(path)
    await listen.recv()  # the metadata frame
    for offset in range(0, len(send_back), 320):
        await listen.send(send_back[offset : offset + 320])
    await listen.wait_closed(TALK_MS / 1000 + 5)
    return new, ctl, listen


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def talk(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[int, TalkCall]]:
    base = tmp_path_factory.mktemp("talk")
    async with ScriptedAgent() as agent:
        routes = [
            agent_route(RATE_8K_NUMBER, agent.url("/app/l8")),
            agent_route(RATE_16K_NUMBER, agent.url("/app/l16")),
        ]
        verb8 = {
            "verb": "listen",
            "url": agent.url("/l8"),
            "sampleRate": 8000,
            "metadata": {"campaign": "e2e", "callSid": "overridden-by-metadata?"},
            "bidirectionalAudio": {"enabled": True, "streaming": True, "sampleRate": 8000},
        }
        verb16 = {"verb": "stream", "url": agent.url("/l16"), "sampleRate": 16000}
        back = pattern(PATTERN_S)
        async with running_worker(base / "data", routes) as worker:
            sipp8 = caller(base / "s8", worker, "uac_talk_bye", RATE_8K_NUMBER, duration_ms=TALK_MS)
            sipp16 = caller(
                base / "s16", worker, "uac_talk_bye", RATE_16K_NUMBER, duration_ms=TALK_MS
            )
            async with sipp8, sipp16:
                (new8, ctl8, l8), (new16, ctl16, l16) = await asyncio.gather(
                    _talk_call(agent, "/l8", verb8, back), _talk_call(agent, "/l16", verb16, b"")
                )
                res8, res16 = await sipp8.wait(), await sipp16.wait()
            done8 = await wait_result(worker, new8["call_sid"])
            done16 = await wait_result(worker, new16["call_sid"])
    yield {
        8000: TalkCall(new8, ctl8, l8, done8, res8, back),
        16000: TalkCall(new16, ctl16, l16, done16, res16, b""),
    }


@pytest.mark.asyncio(loop_scope="module")
class TestListenFirstFrameMetadata:
    """§2.2: one text frame right after connect, ``{sampleRate, mixType, ...callInfo
    (camelCase), ...metadata}``, on subprotocol ``audio.jambonz.org``."""

    async def test_metadata_frame(self, talk: dict[int, TalkCall]) -> None:
        for rate, call in talk.items():
            assert call.listen.subprotocol == "audio.jambonz.org"
            first = call.listen.frames[0]
            assert isinstance(first.data, str)
            meta = first.json
            assert meta["sampleRate"] == rate
            assert meta["mixType"] == "mono"
            assert meta["callStatus"] == "in-progress"
            assert meta["sipStatus"] == 200
            assert meta["direction"] == "inbound"
            assert meta["to"] == call.new["data"]["to"]
            assert meta["callId"] == call.new["data"]["call_id"]
            assert "call_sid" not in meta
        meta8 = talk[8000].listen.frames[0].json
        assert meta8["campaign"] == "e2e"
        assert meta8["callSid"] == "overridden-by-metadata?"  # metadata is spread last
        assert talk[16000].listen.frames[0].json["callSid"] == talk[16000].new["call_sid"]


@pytest.mark.asyncio(loop_scope="module")
class TestListenCallerAudio:
    """§2.3: binary L16 LE at ``sampleRate``, paced in real time, carrying the caller's audio:
    it matches SIPp's g711a.pcap (decoded from PCMA here) sample for sample at 8 kHz, and after
    resampling at 16 kHz."""

    async def test_8k_matches_the_capture(self, talk: dict[int, TalkCall]) -> None:
        call = talk[8000]
        assert_sipp_ok(call.sipp)
        got = _caller_audio_of(call.listen)
        reference = pcap_reference()
        needle = reference[4000 : 4000 + 6 * 8000]  # 6 s from 0.5 s in
        match = best_match(got, needle)
        assert match.score > 0.99, match  # G.711 decoded the same way: identical samples
        frames = call.listen.binary()
        assert {len(f.data) for f in frames[1:-1]} == {320}  # 20 ms frames
        assert frames[-1].data == b""  # the graceful end of audio
        span = frames[-2].at - frames[0].at
        assert abs(len(got) / 8000 - span) < 0.1, (len(got) / 8000, span)

    async def test_16k_matches_the_capture(self, talk: dict[int, TalkCall]) -> None:
        call = talk[16000]
        assert_sipp_ok(call.sipp)
        got16 = _caller_audio_of(call.listen)
        got = soxr.resample(got16.astype(np.float32), 16000, 8000).astype(np.float64)
        reference = pcap_reference()
        match = best_match(got, reference[4000 : 4000 + 6 * 8000])
        assert match.score > 0.95, match
        frames = call.listen.binary()
        sizes = [len(f.data) for f in frames[5:-1]]
        assert abs(np.mean(sizes) - 640) < 2  # 20 ms at 16 kHz on average
        span = frames[-2].at - frames[0].at
        assert abs(len(got16) / 16000 - span) < 0.1, (len(got16) / 16000, span)


@pytest.mark.asyncio(loop_scope="module")
class TestRecordingMp3:
    """The call's stereo MP3: decodes with ffmpeg, lasts as long as the call did from answer to
    BYE, caller on the left (the capture's energy), agent on the right (what it streamed)."""

    async def test_duration_and_channels(self, talk: dict[int, TalkCall]) -> None:
        call = talk[8000]
        assert call.result.recording is not None
        left, right = decode_mp3(call.result.recording)
        answered = sipp_times(call.sipp, "received", "SIP/2.0 200")[0]
        bye = sipp_times(call.sipp, "sent", "BYE ")[0]
        talked = bye - answered
        seconds = len(left) / 8000
        # The recorder writes one 20 ms frame per media tick, from the first tick after the
        # answer to the last one before the BYE arrived. The call's slot (worker/pacer.py) has
        # its first deadline anywhere from 0 to 20 ms after the answer, and each tick's frame
        # covers the 20 ms from its deadline: so the file is at most one frame longer than the
        # talk and at most two short (loopback adds well under a millisecond). A skipped tick,
        # or a frame written twice, would show here.
        assert -0.04 <= seconds - talked <= 0.022, (seconds, talked)
        # Left: the capture's loudness envelope, 20 ms by 20 ms.
        reference = pcap_reference()
        env_ref = envelope(reference, 8000)
        env_left = envelope(left, 8000)
        match = best_match(env_left, env_ref[25:325])
        assert match.score > 0.95, match
        # Right: the pattern the agent streamed.
        sent = samples(call.sent_pattern)
        match = best_match(right, sent[800:12800])
        assert match.score > 0.9, match


class TestListenBidirectionalStreaming:
    """§2.5/§2.6: with ``bidirectionalAudio.streaming`` the agent's binary frames (at their own
    ``sampleRate``) are played to the far end: on an originated call to SIPp with -rtp_echo the
    agent hears its own audio come back on the same socket."""

    async def test_agent_hears_itself_through_the_echo(self, tmp_path: Path) -> None:
        sent = pattern(1.5, rate=16000)
        async with ScriptedAgent() as agent, callee(tmp_path / "uas") as uas:
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
                    listen_verb = {
                        "verb": "listen",
                        "url": agent.url("/echo"),
                        "sampleRate": 8000,
                        "actionHook": "/listen-done",
                        "bidirectionalAudio": {"streaming": True, "sampleRate": 16000},
                    }
                    await ctl.ack(new, [listen_verb])
                    listen = await agent.accept("/echo")
                    await listen.recv()  # metadata
                    await asyncio.sleep(0.3)
                    for offset in range(0, len(sent), 640):  # 20 ms at 16 kHz, as fast as we can
                        await listen.send(sent[offset : offset + 640])
                    await asyncio.sleep(1.5 + 0.6)
                    await listen.send({"type": "disconnect"})
                    hook = await ctl.next_type("verb:hook")
                    await ctl.ack(hook, [{"verb": "hangup"}])
                    done = await asyncio.wait_for(call, 10)
                finally:
                    call.cancel()
            assert_sipp_ok(await uas.wait())
        heard = _caller_audio_of(listen)
        # The worker's streaming resampler (soxr's variable-rate engine) to 8 kHz, chunk by chunk.
        down = Resampler(16000, 8000)
        expected = samples(
            b"".join(down.process(sent[i : i + 640]) for i in range(0, len(sent), 640))
        )
        match = best_match(heard, expected[800:-800])
        assert match.score > 0.98, match  # µ-law out and back, nothing else changed it
        # It left 0.3 s after the metadata (plus the 100 ms cut from its head): the rest is the
        # trip out to SIPp and back through both jitter buffers.
        round_trip = match.lag / 8000 - 0.3 - 0.1
        assert 0.0 < round_trip < 0.3, round_trip
        assert hook["hook"] == "/listen-done"
        assert done.status == "completed"


def _caller_audio_of(peer: AgentPeer) -> np.ndarray[Any, Any]:
    return samples(b"".join(f.data for f in peer.binary() if isinstance(f.data, bytes)))


async def _send_audio(peer: AgentPeer, pcm: bytes, frame: int = 320) -> None:
    for offset in range(0, len(pcm), frame):
        await peer.send(pcm[offset : offset + frame])


def _mark_events(peer: AgentPeer) -> dict[str, list[tuple[str, float]]]:
    """Mark name -> [(event, arrival time)] from the frames the agent received."""
    out: dict[str, list[tuple[str, float]]] = {}
    for frame in peer.frames:
        if isinstance(frame.data, str):
            msg = frame.json
            if msg.get("type") == "mark":
                out.setdefault(msg["data"]["name"], []).append((msg["data"]["event"], frame.at))
    return out


class TestListenMarks:
    """§2.4/§2.5 marks: ``playout`` comes back only once the audio before the mark has been sent
    to the caller (never before its duration has elapsed), ``cleared`` on ``killAudio``, nothing
    after ``clearMarks``; and ``killAudio`` really stops the audio (the recording shows it)."""

    async def test_playout_timing_kill_and_clear(self, tmp_path: Path) -> None:
        beep = tone(700, 1.0)
        async with agent_call(tmp_path, "uac_wait_bye", "+15550000001") as call:
            ctl, new, agent = call.ctl, call.new, call.agent
            verb = {
                "verb": "listen",
                "url": agent.url("/marks"),
                "actionHook": "/listen-done",
                "bidirectionalAudio": {"streaming": True},
            }
            await ctl.ack(new, [verb])
            listen = await agent.accept("/marks")
            await listen.recv()  # metadata
            loop = asyncio.get_running_loop()
            # 1 s of audio, m1, 0.5 s more, m2, all at once.
            started = loop.time()
            await _send_audio(listen, beep)
            await listen.send({"type": "mark", "data": {"name": "m1"}})
            await _send_audio(listen, beep[:8000])
            await listen.send({"type": "mark", "data": {"name": "m2"}})
            await listen.next(lambda m: m.get("data", {}).get("name") == "m2", what="m2")
            # 3 s queued, m3 and m4 after it, killAudio 0.3 s later.
            await _send_audio(listen, beep * 3)
            await listen.send({"type": "mark", "data": {"name": "m3"}})
            await listen.send({"type": "mark", "data": {"name": "m4"}})
            await asyncio.sleep(0.3)
            killed = loop.time()
            await listen.send({"type": "killAudio"})
            await listen.next(lambda m: m.get("data", {}).get("name") == "m4", what="m4")
            # A mark with nothing queued is reported with the next frame.
            idle = loop.time()
            await listen.send({"type": "mark", "data": {"name": "m5"}})
            await listen.next(lambda m: m.get("data", {}).get("name") == "m5", what="m5")
            # clearMarks: m6 is forgotten, its audio still plays.
            await _send_audio(listen, beep)
            await listen.send({"type": "mark", "data": {"name": "m6"}})
            await listen.send({"type": "clearMarks"})
            await asyncio.sleep(1.2)
            await listen.send({"type": "disconnect"})
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{"verb": "hangup"}])
            _, done = await call.finish()

        marks = _mark_events(listen)
        assert [e for e, _ in marks["m1"]] == ["playout"]
        assert [e for e, _ in marks["m2"]] == ["playout"]
        m1, m2 = marks["m1"][0][1], marks["m2"][0][1]
        # Reported with the tick that sends the last 20 ms frame before it: 49 ticks after the
        # first frame went out, which was no earlier than when we sent it. So never before
        # 0.98 s, and not much later than one tick of alignment beyond that.
        assert 0.98 <= m1 - started <= 1.06, m1 - started
        assert 0.48 <= m2 - m1 <= 0.52, m2 - m1
        assert [e for e, _ in marks["m3"]] == ["cleared"]
        assert [e for e, _ in marks["m4"]] == ["cleared"]
        assert marks["m4"][0][1] - killed < 0.1
        assert [e for e, _ in marks["m5"]] == ["playout"]
        assert marks["m5"][0][1] - idle < 0.1
        assert "m6" not in marks
        assert hook["hook"] == "/listen-done"
        assert done.recording is not None
        _, heard = decode_mp3(done.recording)
        loud = len(np.flatnonzero(envelope(heard, 8000) > 1000)) * 0.02
        # 1.5 s (m1, m2) + 0.3 s before killAudio + 1 s after clearMarks
        assert abs(loud - 2.8) <= 0.1, loud


class TestListenPassDtmf:
    """§2.4: with ``passDtmf`` the caller's RFC 4733 key presses (SIPp's captures 1, 5, #) reach
    the agent as ``{"event":"dtmf","dtmf":"5","duration":"2240"}`` text frames; ``finishOnKey``
    ends the verb and the actionHook gets the key."""

    async def test_digits_on_the_audio_socket(self, tmp_path: Path) -> None:
        async with agent_call(
            tmp_path, "uac_dtmf_wait_bye", "+15550000002", duration_ms=500
        ) as call:
            ctl, new, agent = call.ctl, call.new, call.agent
            verb = {
                "verb": "listen",
                "url": agent.url("/dtmf"),
                "passDtmf": True,
                "finishOnKey": "#",
                "actionHook": "/listen-done",
            }
            await ctl.ack(new, [verb])
            listen = await agent.accept("/dtmf")
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{"verb": "hangup"}])
            _, done = await call.finish()
        digits = [m for m in listen.texts() if m.get("event") == "dtmf"]
        assert [d["dtmf"] for d in digits] == ["1", "5", "#"]
        assert all(d["duration"] == "2240" for d in digits)  # 280 ms in 8 kHz units, a string
        assert hook["data"]["digits"] == "#"
        assert listen.close_code == 1000
        assert done.digits == "15#"


class TestBargeIn:
    """README ``barge_in``: when the caller starts talking over streamed agent audio the worker
    flushes it, reports its marks ``cleared`` and emits ``call.interruption``; the caller stops
    hearing the agent (the recording shows it)."""

    async def test_caller_speech_clears_agent_audio(self, tmp_path: Path) -> None:
        route = {"barge_in": True}
        async with agent_call(tmp_path, "uac_talk_wait_bye", "+15550000003", route=route) as call:
            verb = {
                "verb": "listen",
                "url": call.agent.url("/l"),
                "bidirectionalAudio": {"streaming": True},
            }
            await call.ctl.ack(call.new, [verb])
            listen = await call.agent.accept("/l")
            await listen.recv()
            loop = asyncio.get_running_loop()
            began = loop.time()
            await _send_audio(listen, tone(500, 6.0))
            await listen.send({"type": "mark", "data": {"name": "greeting"}})
            mark = await listen.next(lambda m: m.get("type") == "mark", within=4)
            interrupted = loop.time() - began
            await listen.close()
            _, done = await call.finish()
        assert mark["data"] == {"name": "greeting", "event": "cleared"}
        assert 0.5 <= interrupted <= 2.0, interrupted  # speech starts 0.6 s into the capture
        events = EventLog(tmp_path / "data" / "events.jsonl").for_call(done.call_sid)
        assert [e.type for e in events].count("call.interruption") == 1

        assert done.counters.playout.cleared_ms > 3000
        assert done.recording is not None
        _, heard = decode_mp3(done.recording)
        agent_s = len(np.flatnonzero(envelope(heard, 8000) > 1000)) * 0.02
        assert abs(agent_s - interrupted) < 0.25, (agent_s, interrupted)


class TestListenStatusCommand:
    """§1.6 ``listen:status``: ``pause`` stops the caller audio to the agent, ``resume`` brings it
    back on the same socket (jambonz-feature-server#751)."""

    async def test_pause_and_resume(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", "+15550000004") as call:
            ctl, new, agent = call.ctl, call.new, call.agent
            await ctl.ack(new, [{"verb": "listen", "url": agent.url("/l")}])
            listen = await agent.accept("/l")
            await listen.recv()
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.4)
            paused = loop.time()
            await ctl.send(
                {
                    "type": "command",
                    "command": "listen:status",
                    "data": {"listen_status": "pause"},
                }
            )
            await asyncio.sleep(0.6)
            resumed = loop.time()
            await ctl.send(
                {
                    "type": "command",
                    "command": "listen:status",
                    "data": {"listen_status": "resume"},
                }
            )
            await asyncio.sleep(0.4)
            await listen.send({"type": "disconnect"})
            await call.finish()
        times = [f.at for f in listen.binary() if f.data]
        during = [t for t in times if paused + 0.05 < t < resumed]
        after = [t for t in times if t > resumed + 0.05]
        before = [t for t in times if t < paused]
        assert len(before) >= 15
        assert during == []
        assert 14 <= len(after) <= 22  # 20 ms frames again for the last ~0.35 s
