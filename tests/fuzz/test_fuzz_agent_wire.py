"""A hostile agent on the wire: after a real WebSocket handshake on 127.0.0.1, the agent writes
raw bytes at a ``ListenConnection``: frames with every opcode, reserved bits, masks a server
must not set, lengths at each encoding's edges, fragments in and out of order, control frames
too long or fragmented, text that is not UTF-8, truncated frames and plain garbage (RFC 6455
§5). Whatever comes, the worker's side (``LaneSocket`` and the lane above it) raises nothing
into the event loop, hands over only whole messages it could parse, reports the socket's end
once, and closes within its bound leaving no task behind."""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from worker.agent import listen_audio as la
from worker.agent.connection import ListenClosed, ListenConnection, ListenConnectionEvent

CASES = 150
SEED = 20261205
METADATA = json.dumps({"sampleRate": 8000, "mixType": "mono", "callSid": "fuzz"})


def _frame(rng: random.Random) -> bytes:
    """One frame, mostly plausible, often wrong in one way."""
    opcode = rng.choice([0, 1, 2, 2, 2, 8, 9, 10, rng.randrange(16)])
    fin = rng.random() < 0.8
    rsv = rng.choice([0, 0, 0, 0, 0x10, 0x20, 0x40])
    masked = rng.random() < 0.1  # a server must not mask (§5.1)
    size = rng.choice([0, 1, 2, 125, 126, 320, rng.randrange(2000), 65535, 65536])
    if opcode == 1 and rng.random() < 0.7:
        payload = json.dumps({"type": "mark", "data": {"name": "m"}}).encode()
        if rng.random() < 0.3:
            payload = payload[:-3] + b"\xff\xfe" + payload[-1:]  # not UTF-8
    elif opcode == 8 and rng.random() < 0.5:
        payload = struct.pack("!H", rng.choice([1000, 1002, 1005, 999, 4000])) + b"bye"
    else:
        payload = rng.randbytes(size)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([(0x80 if masked else 0) | length])
    elif length < 65536:
        head += bytes([(0x80 if masked else 0) | 126]) + struct.pack("!H", length)
    else:
        head += bytes([(0x80 if masked else 0) | 127]) + struct.pack("!Q", length)
    if masked:
        head += rng.randbytes(4)
    wire = head + payload
    if rng.random() < 0.05:
        wire = wire[: rng.randrange(len(wire) + 1)]  # cut short
    return wire


def _attack(rng: random.Random) -> list[bytes]:
    """What the agent writes, in the writes it makes them."""
    if rng.random() < 0.1:
        return [rng.randbytes(rng.randrange(1, 300))]  # garbage
    frames = [_frame(rng) for _ in range(rng.randrange(1, 7))]
    if rng.random() < 0.5:
        return [b"".join(frames)]  # all in one read
    return frames


class _HostileAgent:
    def __init__(self) -> None:
        self.attacks: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self.server: Server | None = None

    async def start(self) -> None:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, subprotocols=[Subprotocol("audio.jambonz.org")]
        )

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hostile"

    async def _handler(self, conn: ServerConnection) -> None:
        await asyncio.wait_for(conn.recv(), 5)  # the metadata
        for data in await self.attacks.get():
            conn.transport.write(data)
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        conn.transport.close()


@pytest.fixture
async def hostile() -> AsyncIterator[_HostileAgent]:
    agent = _HostileAgent()
    await agent.start()
    try:
        yield agent
    finally:
        assert agent.server is not None
        agent.server.close()
        await agent.server.wait_closed()


async def test_5_whatever_the_agent_writes_the_lane_stays_whole(hostile: _HostileAgent) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    rng = random.Random(SEED)
    delivered = 0
    try:
        for case in range(CASES):
            events: list[ListenConnectionEvent] = []
            conn = ListenConnection(
                hostile.url,
                la.ListenAudioProtocol(streaming=True),
                METADATA,
                on_event=events.append,
                close_timeout=0.5,
            )
            await conn.connect()
            attack = _attack(rng)
            await hostile.attacks.put(attack)
            for _ in range(300):  # the agent closes its side after the attack
                if any(isinstance(e, ListenClosed) for e in events):
                    break
                await asyncio.sleep(0.01)
            await asyncio.wait_for(conn.close(), 3 * 0.5 + 1)
            closed = [e for e in events if isinstance(e, ListenClosed)]
            assert len(closed) == 1, f"case {case}: {attack!r:.200} ended {closed}"
            assert events[-1] is closed[0], f"case {case}: an event after the close"
            for event in events[:-1]:
                # Only whole, parsed messages: audio of an even length, or a known message.
                if isinstance(event, la.AudioReceived):
                    assert len(event.audio) % 2 == 0
                delivered += 1
            tasks = [
                t
                for t in asyncio.all_tasks()
                if t.get_name().startswith(hostile.url) and not t.done()
            ]
            assert tasks == [], f"case {case}: tasks left {tasks}"
    finally:
        loop.set_exception_handler(None)
    assert loop_errors == []
    assert delivered > 0  # some of what was written was whole, and it was handed over
