"""RFC 6455 §5.2-5.3 for the frames ``LaneSocket.write_message`` writes (worker/agent/
lanesocket.py): each parses back, with the library's own parser as a server reads it, to the
message given; the mask bit is set; every frame has its own masking key, drawn from a pool of
``os.urandom`` that is refilled when used up; what the protocol itself had to write goes first."""

from __future__ import annotations

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from worker.agent.lanesocket import MASK_POOL, LaneSocket


class _Transport:
    """Keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _socket() -> tuple[LaneSocket, _Transport]:
    sock = LaneSocket(ClientProtocol(parse_uri("ws://127.0.0.1:1/")))
    transport = _Transport()
    sock.transport = transport  # type: ignore[assignment]
    return sock, transport


def _parse(wire: bytes) -> tuple[Frame, bytes]:
    """The frame a server reads from ``wire`` (it must be masked), and the masking key."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
    else:  # pragma: no cover - the whole frame was fed
        raise AssertionError("the parser wanted more data than the frame")
    header = 2 + (0 if wire[1] & 0x7F < 126 else 2 if wire[1] & 0x7F == 126 else 8)
    return frame, wire[header : header + 4]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 640, 65535, 65536, 70000])
@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_5_2_each_length_encoding_parses_back_to_the_message(size: int, text: bool) -> None:
    sock, transport = _socket()
    data = (b"a" if text else b"\x81") * size
    sock.write_message(data, text=text)
    (wire,) = transport.written
    assert wire[1] & 0x80, "a client's frame must be masked"
    frame, _ = _parse(wire)
    assert frame.fin
    assert frame.opcode is (Opcode.TEXT if text else Opcode.BINARY)
    assert bytes(frame.data) == data
    assert len(wire) == len(data) + 4 + (2 if size < 126 else 4 if size < 65536 else 10)


async def test_5_3_every_frame_has_its_own_key_across_pool_refills() -> None:
    sock, transport = _socket()
    count = MASK_POOL // 4 * 2 + 3  # through two refills of the pool
    for i in range(count):
        sock.write_message(i.to_bytes(4, "big") * 160, text=False)
    keys = []
    for i, wire in enumerate(transport.written):
        frame, key = _parse(wire)
        assert bytes(frame.data) == i.to_bytes(4, "big") * 160
        keys.append(key)
    assert len(keys) == count
    # 32-bit keys from os.urandom: a repeat among ~2,000 has a chance of about 1 in 2,000,000.
    assert len(set(keys)) == count
    assert b"\x00\x00\x00\x00" not in keys


async def test_what_the_protocol_had_to_write_goes_first() -> None:
    sock, transport = _socket()
    sock.protocol.writes.append(b"pong-from-the-protocol")
    sock.write_message(b"\x00" * 10, text=False)
    assert transport.written[0] == b"pong-from-the-protocol"
    frame, _ = _parse(transport.written[1])
    assert bytes(frame.data) == b"\x00" * 10
