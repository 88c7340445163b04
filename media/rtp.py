"""RTP packets (RFC 3550 §5.1): parsing, serializing, sequence/timestamp arithmetic, a sender.

Sans-I/O: bytes in, packets out. ``parse_or_count`` is the per-datagram entry point that rejects
and counts bad input instead of raising.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Container
from dataclasses import dataclass

RTP_VERSION = 2
HEADER_SIZE = 12
MAX_CSRCS = 15

_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")
_CSRC_STRUCTS = tuple(struct.Struct(f"!{n}I") for n in range(MAX_CSRCS + 1))


class RtpParseError(ValueError):
    """A datagram is not a valid RTP packet; ``reason`` says why in a few fixed words."""

    TOO_SHORT = "too short"
    BAD_VERSION = "version is not 2"
    CSRC_PAST_END = "CSRC list past end"
    EXTENSION_PAST_END = "header extension past end"
    PADDING_ZERO = "padding count is 0"
    PADDING_PAST_END = "padding past end"

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One RTP packet. ``padding`` counts the padding octets including the final count octet;
    ``extension`` is (profile-defined 16 bits, extension data whose length is a multiple of 4)."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse one datagram; raise ``RtpParseError`` if it is not RTP version 2."""
        size = len(data)
        if size < HEADER_SIZE:
            raise RtpParseError(RtpParseError.TOO_SHORT, f"{size} bytes")
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise RtpParseError(RtpParseError.BAD_VERSION, f"version {first >> 6}")
        offset = HEADER_SIZE
        csrcs: tuple[int, ...] = ()
        csrc_count = first & 0x0F
        if csrc_count:
            offset += 4 * csrc_count
            if offset > size:
                detail = f"{csrc_count} CSRCs in {size} bytes"
                raise RtpParseError(RtpParseError.CSRC_PAST_END, detail)
            csrcs = _CSRC_STRUCTS[csrc_count].unpack_from(data, HEADER_SIZE)
        extension = None
        if first & 0x10:
            if offset + 4 > size:
                raise RtpParseError(RtpParseError.EXTENSION_PAST_END, "no extension header")
            profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
            start = offset + 4
            offset = start + 4 * words
            if offset > size:
                raise RtpParseError(RtpParseError.EXTENSION_PAST_END, f"{words} words")
            extension = (profile, data[start:offset])
        end = size
        padding = 0
        if first & 0x20:
            padding = data[-1]
            if padding == 0:
                raise RtpParseError(RtpParseError.PADDING_ZERO)
            end -= padding
            if end < offset:
                raise RtpParseError(RtpParseError.PADDING_PAST_END, f"{padding} padding octets")
        return cls(
            second & 0x7F,
            sequence,
            timestamp,
            ssrc,
            data[offset:end],
            bool(second & 0x80),
            csrcs,
            extension,
            padding,
        )

    def serialize(self) -> bytes:
        """The packet's wire form; raise ``ValueError`` if a field is out of range."""
        self._check()
        first = RTP_VERSION << 6 | len(self.csrcs)
        parts = [b""]
        if self.csrcs:
            parts.append(_CSRC_STRUCTS[len(self.csrcs)].pack(*self.csrcs))
        if self.extension is not None:
            first |= 0x10
            profile, data = self.extension
            parts.append(_EXTENSION_HEADER.pack(profile, len(data) // 4))
            parts.append(data)
        parts.append(self.payload)
        if self.padding:
            first |= 0x20
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        parts[0] = _HEADER.pack(
            first,
            self.payload_type | (0x80 if self.marker else 0),
            self.sequence,
            self.timestamp,
            self.ssrc,
        )
        return b"".join(parts)

    def _check(self) -> None:
        if not 0 <= self.payload_type <= 0x7F:
            raise ValueError(f"payload type {self.payload_type} is not 0-127")
        if not 0 <= self.sequence <= 0xFFFF:
            raise ValueError(f"sequence {self.sequence} is not 16-bit")
        if not 0 <= self.timestamp <= 0xFFFFFFFF or not 0 <= self.ssrc <= 0xFFFFFFFF:
            raise ValueError("timestamp and SSRC must be 32-bit unsigned")
        if len(self.csrcs) > MAX_CSRCS or not all(0 <= c <= 0xFFFFFFFF for c in self.csrcs):
            raise ValueError("at most 15 CSRCs, each 32-bit unsigned")
        if self.extension is not None:
            profile, data = self.extension
            if not 0 <= profile <= 0xFFFF or len(data) % 4 or len(data) > 4 * 0xFFFF:
                raise ValueError("extension: 16-bit profile, data a multiple of 4 octets")
        if not 0 <= self.padding <= 0xFF:
            raise ValueError(f"padding {self.padding} is not 0-255")


def seq_diff(a: int, b: int) -> int:
    """``a - b`` for 16-bit sequence numbers, taking the shorter way round: -32768..32767."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def seq_newer(a: int, b: int) -> bool:
    """True if sequence number ``a`` comes after ``b`` (within half the 16-bit space)."""
    return seq_diff(a, b) > 0


def ts_diff(a: int, b: int) -> int:
    """``a - b`` for 32-bit RTP timestamps, taking the shorter way round."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


class RtpSender:
    """Numbers the packets of one outgoing stream: sequence +1 per packet, timestamp + samples.

    Initial sequence and timestamp are random unless given (RFC 3550 §5.1).
    """

    __slots__ = ("_clock_rate", "_payload_type", "_sequence", "_ssrc", "_timestamp")

    def __init__(
        self,
        payload_type: int,
        ssrc: int,
        sequence: int | None = None,
        timestamp: int | None = None,
        clock_rate: int = 8000,
    ) -> None:
        if not 0 <= payload_type <= 0x7F:
            raise ValueError(f"payload type {payload_type} is not 0-127")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ValueError(f"SSRC {ssrc} is not 32-bit unsigned")
        self._payload_type = payload_type
        self._ssrc = ssrc
        self._sequence = (secrets.randbits(16) if sequence is None else sequence) & 0xFFFF
        self._timestamp = (secrets.randbits(32) if timestamp is None else timestamp) & 0xFFFFFFFF
        self._clock_rate = clock_rate

    @property
    def clock_rate(self) -> int:
        return self._clock_rate

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def payload_type(self) -> int:
        return self._payload_type

    @payload_type.setter
    def payload_type(self, value: int) -> None:
        """Send later packets with ``value`` (a re-negotiated codec); the numbering goes on."""
        if not 0 <= value <= 0x7F:
            raise ValueError(f"payload type {value} is not 0-127")
        self._payload_type = value

    @property
    def next_sequence(self) -> int:
        """The sequence number the next packet will carry."""
        return self._sequence

    @property
    def next_timestamp(self) -> int:
        """The RTP timestamp of the next sample to be sent."""
        return self._timestamp

    def build(
        self,
        payload: bytes,
        samples: int,
        marker: bool = False,
        *,
        payload_type: int | None = None,
        timestamp: int | None = None,
    ) -> bytes:
        """Serialize the next packet, then advance the timestamp by ``samples``.

        ``payload_type`` and ``timestamp`` override the stream's for this packet only: an RFC 4733
        event is sent with the telephone-event payload type and its start timestamp while the
        stream's clock keeps running.
        """
        if payload_type is None:
            payload_type = self._payload_type
        elif not 0 <= payload_type <= 0x7F:
            raise ValueError(f"payload type {payload_type} is not 0-127")
        header = _HEADER.pack(
            0x80,
            payload_type | 0x80 if marker else payload_type,
            self._sequence,
            self._timestamp if timestamp is None else timestamp & 0xFFFFFFFF,
            self._ssrc,
        )
        self._sequence = (self._sequence + 1) & 0xFFFF
        self._timestamp = (self._timestamp + samples) & 0xFFFFFFFF
        return header + payload

    def skip(self, samples: int) -> None:
        """Advance the timestamp without sending (silence suppressed, or a gap in the source)."""
        self._timestamp = (self._timestamp + samples) & 0xFFFFFFFF


@dataclass(slots=True)
class RtpCounters:
    """What ``parse_or_count`` saw on one receiving stream."""

    datagrams: int = 0
    """Every datagram offered."""
    received: int = 0
    """Valid RTP packets with an accepted payload type (the ones returned)."""
    payload_octets: int = 0
    malformed: int = 0
    unknown_payload_type: int = 0
    rtcp: int = 0
    """RTCP multiplexed on the RTP port (RFC 5761 §4): packet types 192-223, not RTP."""
    last_error: str = ""
    """The reason of the latest malformed datagram."""


def parse_or_count(
    data: bytes, counters: RtpCounters, payload_types: Container[int] | None = None
) -> RtpPacket | None:
    """Parse a datagram, or count why not and return None; never raises.

    With ``payload_types``, packets of any other payload type are counted and dropped.
    """
    counters.datagrams += 1
    if len(data) >= 2 and 192 <= data[1] <= 223 and data[0] >> 6 == RTP_VERSION:
        counters.rtcp += 1
        return None
    try:
        packet = RtpPacket.parse(data)
    except RtpParseError as exc:
        counters.malformed += 1
        counters.last_error = exc.reason
        return None
    if payload_types is not None and packet.payload_type not in payload_types:
        counters.unknown_payload_type += 1
        return None
    counters.received += 1
    counters.payload_octets += len(packet.payload)
    return packet
