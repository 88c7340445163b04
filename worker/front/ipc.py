"""The frames between the front and a media process, over one ``SOCK_SEQPACKET`` Unix socket
(the kernel keeps each frame whole and in order; a frame is at most ``MAX_FRAME`` bytes).

Three kinds, told apart by the first byte:

- ``S`` a SIP message: ``S``, the transport (``U`` UDP, ``T`` TCP), the peer's port (2 bytes,
  big-endian), the length of the peer's host (1 byte), the host (ASCII), then the message's
  bytes as they were (or are to be) on the wire. Front → media: received from that peer;
  media → front: to be sent to that peer.
- ``A`` an ARI event: ``A`` and the message as Asterisk sent it on the events WebSocket. Front →
  media only: an event about a call that falls on that process (``worker/front/ari_relay.py``).
- ``J`` a control message: ``J`` and one JSON object with an ``op`` (``settings``, ``ready``,
  ``failed``, ``call``, ``called``, ``metrics``, ``drain``, ``ari``).

Encoding and decoding are pure; a frame that does not decode raises ``FrameError``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from worker.sip.transaction import Transport

MAX_FRAME = 128 * 1024
"""Larger than any SIP message the transport accepts (``sip.max_message_bytes`` <= 65535)."""

_SIP = ord("S")
_CONTROL = ord("J")
_ARI = ord("A")
_HEAD = struct.Struct("!BBHB")
_TRANSPORTS = {Transport.UDP: ord("U"), Transport.TCP: ord("T")}
_BY_CODE = {code: transport for transport, code in _TRANSPORTS.items()}


class FrameError(ValueError):
    """A frame that is not one of the two kinds, or is cut short."""


@dataclass(frozen=True, slots=True)
class SipFrame:
    transport: Transport
    peer: tuple[str, int]
    data: bytes


@dataclass(frozen=True, slots=True)
class ControlFrame:
    message: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.message.get("op", ""))


@dataclass(frozen=True, slots=True)
class AriFrame:
    data: bytes


Frame = SipFrame | ControlFrame | AriFrame


def encode_sip(transport: Transport, peer: tuple[str, int], data: bytes) -> bytes:
    host = peer[0].encode("ascii")
    if len(host) > 255:
        raise FrameError(f"host too long: {peer[0]!r}")
    return _HEAD.pack(_SIP, _TRANSPORTS[transport], peer[1], len(host)) + host + data


def encode_control(message: dict[str, Any]) -> bytes:
    return b"J" + json.dumps(message, separators=(",", ":")).encode()


def encode_ari(message: bytes) -> bytes:
    """An ARI event's frame; ``FrameError`` if it would not fit in one (``MAX_FRAME``)."""
    if len(message) + 1 > MAX_FRAME:
        raise FrameError(f"ARI event of {len(message)} bytes does not fit in a frame")
    return b"A" + message


def decode(frame: bytes) -> Frame:
    if not frame:
        raise FrameError("empty frame")
    if frame[0] == _CONTROL:
        try:
            message = json.loads(frame[1:])
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"control frame is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise FrameError("a control frame is a JSON object")
        return ControlFrame(message)
    if frame[0] == _ARI:
        return AriFrame(frame[1:])
    if frame[0] != _SIP:
        raise FrameError(f"unknown frame kind {frame[0]:#x}")
    if len(frame) < _HEAD.size:
        raise FrameError("SIP frame cut short")
    _, code, port, host_len = _HEAD.unpack_from(frame)
    transport = _BY_CODE.get(code)
    if transport is None:
        raise FrameError(f"unknown transport {code:#x}")
    end = _HEAD.size + host_len
    if len(frame) < end:
        raise FrameError("SIP frame cut short")
    try:
        host = frame[_HEAD.size : end].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("peer host is not ASCII") from None
    return SipFrame(transport, (host, port), frame[end:])
