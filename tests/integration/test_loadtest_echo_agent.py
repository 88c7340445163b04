"""The load test's echo agent (worker/loadtest/echo_agent.py) against real ``websockets``
clients on 127.0.0.1: jambonz control (``session:new`` acked with a ``listen`` verb), the listen
socket (every binary frame back, in order, from the first one on; DTMF counted; a probe's
markers timed), Twilio Media Streams (``media`` back with the ``streamSid``), bad input closing
only its own socket with 1011, and the write-buffer bound a worker that stops reading meets."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from media.g711 import ulaw_encode
from worker.loadtest.echo_agent import EchoAgent
from worker.loadtest.marker import marker_tone

LISTEN = [Subprotocol("audio.jambonz.org")]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[EchoAgent]:
    with (tmp_path / "markers.jsonl").open("a", encoding="utf-8") as markers:
        echo = EchoAgent("127.0.0.1", 0, markers)
        await echo.start()
        try:
            yield echo
        finally:
            await echo.stop()


def _frames(count: int, size: int = 640) -> list[bytes]:
    return [bytes([i % 256]) * size for i in range(count)]


async def _received(ws: ClientConnection, count: int) -> list[str | bytes]:
    return [await asyncio.wait_for(ws.recv(), 5) for _ in range(count)]


async def _closed(agent: EchoAgent, connections: int) -> None:
    """Until the agent has seen ``connections`` audio sockets close."""
    for _ in range(500):
        closed = [a for a in agent.summary.audio if a.closed_at is not None]
        if len(closed) >= connections:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the agent did not see the sockets close")


async def test_control_acks_session_new_with_a_bidirectional_listen(agent: EchoAgent) -> None:
    async with connect(agent.url, subprotocols=[Subprotocol("ws.jambonz.org")]) as ws:
        new = {"type": "session:new", "msgid": "m1", "call_sid": "c", "data": {"from": "x"}}
        await ws.send(json.dumps(new))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        await ws.send(json.dumps({"type": "verb:hook", "msgid": "m2", "hook": "/h"}))
        second = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert ack["type"] == "ack"
    assert ack["msgid"] == "m1"
    (verb,) = ack["data"]
    assert verb["verb"] == "listen"
    assert verb["url"] == f"{agent.url}listen"
    assert verb["bidirectionalAudio"] == {"enabled": True, "streaming": True, "sampleRate": 16000}
    assert second == {"type": "ack", "msgid": "m2"}


async def test_listen_echoes_every_binary_frame_in_order_from_the_first(agent: EchoAgent) -> None:
    frames = _frames(50)
    async with connect(agent.url + "listen", subprotocols=LISTEN) as ws:
        # The metadata and the first frames in one write: the echo is there before the handler.
        await ws.send(json.dumps({"sampleRate": 16000, "from": "someone"}))
        for frame in frames[:10]:
            await ws.send(frame)
        await ws.send(json.dumps({"event": "dtmf", "dtmf": "5", "duration": 100}))
        for frame in frames[10:]:
            await ws.send(frame)
        await ws.send(b"")  # an empty frame is not audio: nothing comes back
        echoed = await _received(ws, len(frames))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)
    assert echoed == frames
    await _closed(agent, 1)
    summary = agent.summary.as_dict()
    assert summary["frames_in"] == summary["frames_out"] == 50
    assert summary["bytes_in"] == 50 * 640
    assert summary["dtmf_digits"] == 1
    assert summary["connections"][0]["dtmf"] == "5"
    assert summary["frames_dropped"] == 0
    assert summary["errors"] == []


async def test_a_probes_marker_is_timed_as_it_is_echoed(agent: EchoAgent, tmp_path: Path) -> None:
    silence = bytes(640)
    tone = marker_tone(3, 16000)
    async with connect(agent.url + "listen/probe/2", subprotocols=LISTEN) as ws:
        await ws.send(json.dumps({"sampleRate": 16000, "from": "loadtest-probe-2"}))
        audio = silence * 10 + tone + silence * 5
        chunks = [audio[i : i + 640] for i in range(0, len(audio), 640)]
        for chunk in chunks:
            await ws.send(chunk)
        echoed = await _received(ws, len(chunks))
    assert b"".join(m for m in echoed if isinstance(m, bytes)) == audio
    await _closed(agent, 1)
    (line,) = (tmp_path / "markers.jsonl").read_text().splitlines()
    marker = json.loads(line)
    assert marker["probe"] == 2
    assert marker["marker_id"] == 3
    assert agent.summary.as_dict()["markers"] == 1


async def test_twilio_media_comes_back_with_its_stream_sid(agent: EchoAgent) -> None:
    payloads = [base64.b64encode(ulaw_encode(bytes([i]) * 320)).decode() for i in range(5)]
    async with connect(agent.url + "probe/1") as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
        await ws.send(json.dumps({"event": "start", "start": {"streamSid": "MZ1"}}))
        for payload in payloads:
            await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
        await ws.send(json.dumps({"event": "dtmf", "dtmf": {"digit": "7"}}))
        echoed = [json.loads(m) for m in await _received(ws, len(payloads))]
        await ws.send(json.dumps({"event": "stop"}))
        # stop ends the agent's side: it closes the socket
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert echoed == [
        {"event": "media", "streamSid": "MZ1", "media": {"payload": p}} for p in payloads
    ]
    await _closed(agent, 1)
    (twilio,) = agent.summary.as_dict()["connections"]
    assert twilio["kind"] == "twilio"
    assert twilio["probe"] == 1
    assert twilio["frames_in"] == twilio["frames_out"] == 5
    assert twilio["dtmf"] == "7"


@pytest.mark.parametrize(
    ("path", "subprotocols", "bad"),
    [
        ("twilio", None, "{not json"),
        ("twilio", None, json.dumps({"event": "media", "media": None})),
        ("listen", LISTEN, json.dumps([1, 2])),
    ],
    ids=["twilio-malformed-json", "twilio-media-without-payload", "listen-metadata-not-object"],
)
async def test_bad_input_closes_its_own_socket_with_1011_only(
    agent: EchoAgent, path: str, subprotocols: list[Subprotocol] | None, bad: str
) -> None:
    async with connect(agent.url + "listen", subprotocols=LISTEN) as other:
        await other.send(json.dumps({"sampleRate": 16000}))
        async with connect(agent.url + path, subprotocols=subprotocols) as ws:
            await ws.send(bad)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        await other.send(b"\x01" * 640)
        assert await asyncio.wait_for(other.recv(), 5) == b"\x01" * 640
    (error,) = agent.summary.errors
    assert error.startswith(f"/{path}: ")


async def test_a_worker_that_stops_reading_meets_a_bounded_buffer(agent: EchoAgent) -> None:
    frame = bytes(60_000)
    async with connect(
        agent.url + "listen", subprotocols=LISTEN, max_size=None, write_limit=1 << 24
    ) as ws:
        await ws.send(json.dumps({"sampleRate": 16000}))
        await ws.send(b"\x00" * 640)
        await _received(ws, 1)  # the metadata is in
        ws.transport.pause_reading()
        sent = 1
        while sent < 2000 and not agent.summary.audio[0].frames_dropped:
            await ws.send(frame)
            sent += 1
            await asyncio.sleep(0)
        audio = agent.summary.audio[0]
        assert audio.frames_dropped > 0, "the echo never stopped growing the agent's buffer"
        # Every frame read was either echoed or dropped, and counted.
        assert audio.frames_out + audio.frames_dropped == audio.frames_in <= sent
        ws.transport.abort()
