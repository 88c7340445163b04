"""The example agents (examples/jambonz_agent.py, examples/twilio_agent.py) driven over real
WebSockets on 127.0.0.1 by a test client that plays the platform side by hand."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.typing import Subprotocol

from examples.jambonz_agent import GOODBYE_VERBS, GREETING, JambonzDemoAgent
from examples.twilio_agent import CHUNK_BYTES, TwilioDemoAgent

WAIT = 5.0  # bound on every single wait for a message
CONTROL = [Subprotocol("ws.jambonz.org")]
AUDIO = [Subprotocol("audio.jambonz.org")]
CALL_SID = "9fb35c28-7a64-4bf5-9d2f-0c1b1d1b2c3d"
FRAME = 320  # 20 ms of L16 at 8 kHz


def _session_new(msgid: str = "auuHioXGktYh2ZFYxf3hAA") -> dict[str, Any]:
    """A session:new as jambonz sends it for an inbound SIP call (PROTOCOLS.md §1.4)."""
    return {
        "type": "session:new",
        "msgid": msgid,
        "call_sid": CALL_SID,
        "data": {
            "sip": {
                "headers": {
                    "from": "<sip:+15083084809@54.172.60.3>;tag=a1b2",
                    "call-id": "d8907723-2a44-4b59-a59b-6ff1dbd2aa1c",
                },
                "raw": "INVITE sip:+15083728299@10.0.13.72:5070 SIP/2.0\r\n...",
                "body": "v=0\r\n...",
            },
            "direction": "inbound",
            "caller_name": "",
            "call_sid": CALL_SID,
            "account_sid": "fef61e75-cec3-496c-a7bc-8368e4d9c8f1",
            "application_sid": "0dddaabf-0a30-43e3-84e8-426873b1a78b",
            "from": "+15083084809",
            "to": "+15083728299",
            "call_id": "d8907723-2a44-4b59-a59b-6ff1dbd2aa1c",
            "sbc_callid": "6a0d7c0a-3c44-4a5b-9b6e-2f4d5b0c3e11",
            "sip_status": 100,
            "sip_reason": "Trying",
            "call_status": "trying",
            "originating_sip_ip": "54.172.60.3",
            "originating_sip_trunk_name": "Twilio",
            "local_sip_address": "10.0.13.72:5070",
            "defaults": {
                "synthesizer": {
                    "vendor": "google",
                    "language": "en-US",
                    "voice": "en-US-Wavenet-C",
                },
                "recognizer": {"vendor": "google", "language": "en-US"},
            },
            "env_vars": {},
        },
    }


def _call_info(status: str) -> dict[str, Any]:
    return {
        "call_sid": CALL_SID,
        "direction": "inbound",
        "from": "+15083084809",
        "to": "+15083728299",
        "call_id": "d8907723-2a44-4b59-a59b-6ff1dbd2aa1c",
        "sip_status": 200,
        "sip_reason": "OK",
        "call_status": status,
        "account_sid": "fef61e75-cec3-496c-a7bc-8368e4d9c8f1",
        "application_sid": "0dddaabf-0a30-43e3-84e8-426873b1a78b",
        "fs_sip_address": "10.0.13.72:5070",
    }


def _metadata(sample_rate: int = 8000) -> dict[str, Any]:
    """The listen socket's first text frame: camelCase call info (PROTOCOLS.md §2.2)."""
    return {
        "sampleRate": sample_rate,
        "mixType": "mono",
        "callSid": CALL_SID,
        "direction": "inbound",
        "from": "+15083084809",
        "to": "+15083728299",
        "callId": "d8907723-2a44-4b59-a59b-6ff1dbd2aa1c",
        "sipStatus": 200,
        "sipReason": "OK",
        "callStatus": "in-progress",
        "accountSid": "fef61e75-cec3-496c-a7bc-8368e4d9c8f1",
        "applicationSid": "0dddaabf-0a30-43e3-84e8-426873b1a78b",
        "agent": "aispinner-demo",
    }


def _frames(count: int, size: int = FRAME, first: int = 0) -> list[bytes]:
    """Distinct frames: frame i is filled with the 16-bit sample value ``first + i + 1``."""
    return [(first + i + 1).to_bytes(2, "little") * (size // 2) for i in range(count)]


async def _recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), WAIT)


async def _recv_json(ws: ClientConnection) -> dict[str, Any]:
    message = await _recv(ws)
    assert isinstance(message, str), f"expected text, got {len(message)} binary bytes"
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


# -- jambonz ---------------------------------------------------------------------------------


@pytest.fixture
async def jambonz() -> AsyncIterator[JambonzDemoAgent]:
    agent = JambonzDemoAgent(host="127.0.0.1", port=0, mark_every_frames=10)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def _open_listen(agent: JambonzDemoAgent) -> ClientConnection:
    """Open the listen socket as mod_audio_fork does and consume the agent's transcription."""
    ws = await connect(agent.listen_url, subprotocols=AUDIO, open_timeout=WAIT)
    assert ws.subprotocol == "audio.jambonz.org"
    await ws.send(json.dumps(_metadata()))
    assert await _recv_json(ws) == {
        "type": "transcription",
        "data": {"role": "agent", "text": GREETING, "final": True},
    }
    return ws


async def _echo_back(ws: ClientConnection, total: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Read until ``total`` bytes of audio came back; return them and the text frames seen."""
    audio = bytearray()
    texts: list[dict[str, Any]] = []
    while len(audio) < total:
        message = await _recv(ws)
        if isinstance(message, bytes):
            audio += message
        else:
            texts.append(json.loads(message))
    assert len(audio) == total
    return bytes(audio), texts


async def _press(ws: ClientConnection, digit: str) -> None:
    await ws.send(json.dumps({"event": "dtmf", "dtmf": digit, "duration": "1600"}))


class TestJambonzControl:
    async def test_session_new_is_acked_with_say_and_listen(
        self, jambonz: JambonzDemoAgent
    ) -> None:
        async with connect(jambonz.control_url, subprotocols=CONTROL, open_timeout=WAIT) as ws:
            assert ws.subprotocol == "ws.jambonz.org"
            await ws.send(json.dumps(_session_new()))
            ack = await _recv_json(ws)
        assert ack["type"] == "ack"
        assert ack["msgid"] == "auuHioXGktYh2ZFYxf3hAA"
        say, listen = ack["data"]
        assert say["verb"] == "say"
        assert say["text"] == GREETING
        assert listen == {
            "verb": "listen",
            "url": f"ws://127.0.0.1:{jambonz.port}/listen",
            "mixType": "mono",
            "sampleRate": 8000,
            "passDtmf": True,
            "bidirectionalAudio": {"enabled": True, "streaming": True, "sampleRate": 8000},
            "actionHook": "/listen-done",
            "metadata": {"agent": "aispinner-demo"},
        }
        stats = jambonz.calls[CALL_SID]
        assert (stats.caller, stats.called) == ("+15083084809", "+15083728299")

    async def test_sample_rate_16000(self) -> None:
        agent = JambonzDemoAgent(port=0, sample_rate=16000)
        await agent.start()
        try:
            async with connect(agent.control_url, subprotocols=CONTROL, open_timeout=WAIT) as ws:
                await ws.send(json.dumps(_session_new()))
                listen = (await _recv_json(ws))["data"][1]
        finally:
            await agent.stop()
        assert listen["sampleRate"] == 16000
        assert listen["bidirectionalAudio"]["sampleRate"] == 16000

    async def test_hooks_and_call_status(self, jambonz: JambonzDemoAgent) -> None:
        async with connect(f"{jambonz.base_url}/agent", subprotocols=CONTROL) as ws:
            await ws.send(json.dumps(_session_new("m1")))
            assert (await _recv_json(ws))["msgid"] == "m1"
            # call:status wants no ack: the next message must be the ack of the hook after it.
            await ws.send(
                json.dumps(
                    {
                        "type": "call:status",
                        "msgid": "m2",
                        "call_sid": CALL_SID,
                        "data": _call_info("in-progress"),
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "verb:hook",
                        "msgid": "m3",
                        "call_sid": CALL_SID,
                        "hook": "/something-else",
                        "data": _call_info("in-progress"),
                    }
                )
            )
            assert await _recv_json(ws) == {"type": "ack", "msgid": "m3"}
            await ws.send(
                json.dumps(
                    {
                        "type": "verb:hook",
                        "msgid": "m4",
                        "call_sid": CALL_SID,
                        "hook": "/listen-done",
                        "data": {**_call_info("in-progress"), "digits": "5#"},
                    }
                )
            )
            assert await _recv_json(ws) == {
                "type": "ack",
                "msgid": "m4",
                "data": [{"verb": "say", "text": "Goodbye"}, {"verb": "hangup"}],
            }
            assert GOODBYE_VERBS == [{"verb": "say", "text": "Goodbye"}, {"verb": "hangup"}]
            await ws.send(
                json.dumps(
                    {
                        "type": "session:reconnect",
                        "msgid": "m5",
                        "call_sid": CALL_SID,
                        "data": _session_new()["data"],
                    }
                )
            )
            assert await _recv_json(ws) == {"type": "ack", "msgid": "m5"}
        stats = jambonz.calls[CALL_SID]
        assert stats.hooks == ["/something-else", "/listen-done"]
        assert stats.call_statuses == ["in-progress"]

    async def test_control_path_needs_the_jambonz_subprotocol(
        self, jambonz: JambonzDemoAgent
    ) -> None:
        for offered in ([], AUDIO):
            with pytest.raises(InvalidStatus) as info:
                await connect(jambonz.control_url, subprotocols=offered, open_timeout=WAIT)
            assert info.value.response.status_code == 400

    async def test_unknown_path_is_404(self, jambonz: JambonzDemoAgent) -> None:
        with pytest.raises(InvalidStatus) as info:
            await connect(f"{jambonz.base_url}/nope", subprotocols=CONTROL, open_timeout=WAIT)
        assert info.value.response.status_code == 404


class TestJambonzListen:
    async def test_audio_comes_back_after_one_second_with_marks(
        self, jambonz: JambonzDemoAgent
    ) -> None:
        ws = await _open_listen(jambonz)
        try:
            frames = _frames(50)  # 1 s of audio
            loop = asyncio.get_running_loop()
            sent_at = loop.time()
            for frame in frames:
                await ws.send(frame)
            first = await _recv(ws)
            delay = loop.time() - sent_at
            # A mark tags the next audio frame, so it comes first.
            assert first == json.dumps({"type": "mark", "data": {"name": "echo-1"}})
            assert 0.95 <= delay < 1.5
            audio, texts = await _echo_back(ws, 50 * FRAME)
            assert audio == b"".join(frames)
            assert texts == [{"type": "mark", "data": {"name": f"echo-{n}"}} for n in range(2, 6)]
            for n, event in [(1, "playout"), (2, "playout"), (3, "cleared")]:
                await ws.send(
                    json.dumps({"type": "mark", "data": {"name": f"echo-{n}", "event": event}})
                )
            await _press(ws, "5")
            await _press(ws, "#")
            assert await _recv_json(ws) == {"type": "disconnect"}
        finally:
            await ws.close()
        await asyncio.wait_for(jambonz.stop(), WAIT)  # waits for the handlers: stats are final
        stats = jambonz.calls[CALL_SID]
        assert stats.digits == ["5", "#"]
        assert (stats.marks_sent, stats.marks_played, stats.marks_cleared) == (5, 2, 1)
        assert stats.audio_bytes_in == stats.audio_bytes_out == 50 * FRAME
        assert stats.disconnect_sent
        assert stats.listen_metadata == _metadata()
        assert stats.transcriptions_sent == 1

    async def test_star_kills_audio_and_drops_the_backlog(self, jambonz: JambonzDemoAgent) -> None:
        ws = await _open_listen(jambonz)
        try:
            for frame in _frames(25):
                await ws.send(frame)
            await _press(ws, "*")
            assert await _recv_json(ws) == {"type": "killAudio"}
            fresh = _frames(5, first=100)
            for frame in fresh:
                await ws.send(frame)
            audio, _ = await _echo_back(ws, 5 * FRAME)
            assert audio == b"".join(fresh)
        finally:
            await ws.close()
        stats = jambonz.calls[CALL_SID]
        assert stats.kill_audio_sent == 1
        assert stats.audio_bytes_dropped == 25 * FRAME

    async def test_backlog_is_bounded(self) -> None:
        agent = JambonzDemoAgent(port=0, max_backlog_seconds=1.0)
        await agent.start()
        try:
            ws = await _open_listen(agent)
            try:
                frames = _frames(150)  # 3 s at once; only the last 1 s is kept
                for frame in frames:
                    await ws.send(frame)
                audio, _ = await _echo_back(ws, 50 * FRAME)
                assert audio == b"".join(frames[100:])
                await _press(ws, "#")
                assert await _recv_json(ws) == {"type": "disconnect"}
            finally:
                await ws.close()
        finally:
            await agent.stop()
        stats = agent.calls[CALL_SID]
        assert stats.audio_bytes_dropped == 100 * FRAME
        assert stats.audio_bytes_out == 50 * FRAME

    async def test_end_of_audio_frame_is_not_echoed(self, jambonz: JambonzDemoAgent) -> None:
        ws = await _open_listen(jambonz)
        try:
            await ws.send(b"")
            await ws.send(_frames(1)[0])
            assert await _recv_json(ws) == {"type": "mark", "data": {"name": "echo-1"}}
            assert await _recv(ws) == _frames(1)[0]
        finally:
            await ws.close()
        assert jambonz.calls[CALL_SID].audio_bytes_in == FRAME

    async def test_binary_first_frame_is_refused(self, jambonz: JambonzDemoAgent) -> None:
        async with connect(jambonz.listen_url, subprotocols=AUDIO, open_timeout=WAIT) as ws:
            await ws.send(b"\x00\x01" * 160)
            await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1008

    async def test_drachtio_subprotocol_is_accepted(self, jambonz: JambonzDemoAgent) -> None:
        offered = [Subprotocol("audio.drachtio.org")]
        async with connect(jambonz.listen_url, subprotocols=offered, open_timeout=WAIT) as ws:
            assert ws.subprotocol == "audio.drachtio.org"

    async def test_listen_path_refuses_the_control_subprotocol(
        self, jambonz: JambonzDemoAgent
    ) -> None:
        with pytest.raises(InvalidStatus) as info:
            await connect(jambonz.listen_url, subprotocols=CONTROL, open_timeout=WAIT)
        assert info.value.response.status_code == 400

    async def test_stop_closes_open_sockets(self) -> None:
        agent = JambonzDemoAgent(port=0)
        await agent.start()
        ws = await _open_listen(agent)
        control = await connect(agent.control_url, subprotocols=CONTROL, open_timeout=WAIT)
        await ws.send(_frames(1)[0])
        await asyncio.wait_for(agent.stop(), WAIT)
        await asyncio.wait_for(ws.wait_closed(), WAIT)
        await asyncio.wait_for(control.wait_closed(), WAIT)
        assert ws.close_code == control.close_code == 1001


# -- Twilio ----------------------------------------------------------------------------------

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
TWILIO_CALL_SID = "CA5f2e3b8e0a9c4d6b7a1e2f3d4c5b6a79"
ACCOUNT_SID = "AC25e16e9a716a4a1786a7c83f58e30482"


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioDemoAgent]:
    agent = TwilioDemoAgent(host="127.0.0.1", port=0, mark_every_chunks=5)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


class _TwilioSide:
    """The Twilio end of a Media Stream: numbered messages, as Twilio sends them (§3.2)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.sequence = 0
        self.chunk = 0

    async def send(self, message: dict[str, Any]) -> None:
        if message["event"] != "connected":
            self.sequence += 1
            message = {"sequenceNumber": str(self.sequence), **message}
        await self.ws.send(json.dumps(message))

    async def begin(self) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            {
                "event": "start",
                "streamSid": STREAM_SID,
                "start": {
                    "streamSid": STREAM_SID,
                    "accountSid": ACCOUNT_SID,
                    "callSid": TWILIO_CALL_SID,
                    "tracks": ["inbound"],
                    "customParameters": {"language": "en-US", "agent": "demo"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    async def media(self, payload: bytes) -> None:
        self.chunk += 1
        await self.send(
            {
                "event": "media",
                "streamSid": STREAM_SID,
                "media": {
                    "track": "inbound",
                    "chunk": str(self.chunk),
                    "timestamp": str(20 * (self.chunk - 1)),
                    "payload": base64.b64encode(payload).decode(),
                },
            }
        )

    async def dtmf(self, digit: str) -> None:
        await self.send(
            {
                "event": "dtmf",
                "streamSid": STREAM_SID,
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": name}})

    async def stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "streamSid": STREAM_SID,
                "stop": {"accountSid": ACCOUNT_SID, "callSid": TWILIO_CALL_SID},
            }
        )


def _ulaw_packets(count: int, first: int = 0) -> list[bytes]:
    """20 ms µ-law packets (160 bytes); packet i is filled with byte ``(first + i) % 256``."""
    return [bytes([(first + i) % 256]) * 160 for i in range(count)]


async def _media_back(ws: ClientConnection, total: int) -> tuple[list[bytes], list[str]]:
    """Read until ``total`` µ-law bytes came back; return the payloads and the mark names."""
    payloads: list[bytes] = []
    marks: list[str] = []
    while sum(map(len, payloads)) < total:
        msg = await _recv_json(ws)
        assert msg["streamSid"] == STREAM_SID
        if msg["event"] == "media":
            assert set(msg) == {"event", "streamSid", "media"}
            assert set(msg["media"]) == {"payload"}
            payloads.append(base64.b64decode(msg["media"]["payload"]))
        else:
            assert msg["event"] == "mark"
            marks.append(msg["mark"]["name"])
    assert sum(map(len, payloads)) == total
    return payloads, marks


class TestTwilioMediaStreams:
    async def test_media_comes_back_after_one_second_with_marks(
        self, twilio: TwilioDemoAgent
    ) -> None:
        async with connect(twilio.url, open_timeout=WAIT) as ws:
            side = _TwilioSide(ws)
            await side.begin()
            packets = _ulaw_packets(50)  # 1 s
            loop = asyncio.get_running_loop()
            sent_at = loop.time()
            for packet in packets:
                await side.media(packet)
            first = await _recv_json(ws)
            delay = loop.time() - sent_at
            assert first["event"] == "media"
            assert 0.95 <= delay < 1.5
            rest, marks = await _media_back(ws, 8000 - CHUNK_BYTES)
            chunks = [base64.b64decode(first["media"]["payload"]), *rest]
            assert [len(c) for c in chunks] == [CHUNK_BYTES] * 25  # 40 ms each
            assert b"".join(chunks) == b"".join(packets)
            # A Twilio mark follows the audio it marks: one after every fifth chunk.
            assert marks == ["echo-1", "echo-2", "echo-3", "echo-4"]
            last = await _recv_json(ws)
            assert last == {"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "echo-5"}}
            for name in ["echo-1", "echo-2", "echo-3"]:
                await side.mark(name)
            await side.dtmf("1")
            await side.dtmf("*")
            assert await _recv_json(ws) == {"event": "clear", "streamSid": STREAM_SID}
            await side.stop()
        await asyncio.wait_for(twilio.stop(), WAIT)  # waits for the handler: stats are final
        stats = twilio.calls[TWILIO_CALL_SID]
        assert stats.stopped
        assert stats.stream_sid == STREAM_SID
        assert stats.account_sid == ACCOUNT_SID
        assert stats.custom_parameters == {"language": "en-US", "agent": "demo"}
        assert stats.media_format["encoding"] == "audio/x-mulaw"
        assert stats.digits == ["1", "*"]
        assert stats.marks_sent == 5
        assert stats.marks_returned == ["echo-1", "echo-2", "echo-3"]
        assert stats.clears_sent == 1
        assert (stats.media_in, stats.media_out) == (50, 25)
        assert stats.audio_bytes_in == stats.audio_bytes_out == 8000

    async def test_clear_drops_the_backlog(self, twilio: TwilioDemoAgent) -> None:
        async with connect(twilio.url, open_timeout=WAIT) as ws:
            side = _TwilioSide(ws)
            await side.begin()
            for packet in _ulaw_packets(25):  # 12 whole chunks and half a chunk pending
                await side.media(packet)
            await side.dtmf("*")
            assert await _recv_json(ws) == {"event": "clear", "streamSid": STREAM_SID}
            fresh = _ulaw_packets(4, first=200)
            for packet in fresh:
                await side.media(packet)
            payloads, _ = await _media_back(ws, 4 * 160)
            assert b"".join(payloads) == b"".join(fresh)
        stats = twilio.calls[TWILIO_CALL_SID]
        assert stats.audio_bytes_dropped == 25 * 160

    async def test_pound_closes_the_socket(self, twilio: TwilioDemoAgent) -> None:
        async with connect(twilio.url, open_timeout=WAIT) as ws:
            side = _TwilioSide(ws)
            await side.begin()
            await side.dtmf("#")
            with pytest.raises(ConnectionClosedOK):
                await _recv(ws)
            assert ws.close_code == 1000
        assert twilio.calls[TWILIO_CALL_SID].closed_by_agent

    async def test_media_before_start_is_ignored(self, twilio: TwilioDemoAgent) -> None:
        async with connect(twilio.url, open_timeout=WAIT) as ws:
            side = _TwilioSide(ws)
            await side.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await side.media(_ulaw_packets(1)[0])
            await side.begin()
            packets = _ulaw_packets(2, first=7)
            for packet in packets:
                await side.media(packet)
            payloads, _ = await _media_back(ws, CHUNK_BYTES)
            assert payloads == [b"".join(packets)]
        assert twilio.calls[TWILIO_CALL_SID].audio_bytes_in == 2 * 160

    async def test_backlog_is_bounded(self) -> None:
        agent = TwilioDemoAgent(port=0, max_backlog_seconds=1.0)
        await agent.start()
        try:
            async with connect(agent.url, open_timeout=WAIT) as ws:
                side = _TwilioSide(ws)
                await side.begin()
                packets = _ulaw_packets(150)  # 3 s at once; only the last 1 s is kept
                for packet in packets:
                    await side.media(packet)
                payloads, _ = await _media_back(ws, 8000)
                assert b"".join(payloads) == b"".join(packets[100:])
        finally:
            await agent.stop()
        stats = agent.calls[TWILIO_CALL_SID]
        assert stats.audio_bytes_dropped == 16000
        assert stats.audio_bytes_out == 8000
