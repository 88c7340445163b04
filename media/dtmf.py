"""RFC 4733 telephone-events for DTMF: the 4-octet payload, a receiver that reports each key press
once, and a sender that lays out the packets of one key press on the 20 ms media tick.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from media.rtp import RtpPacket, ts_diff

DIGITS = "0123456789*#ABCD"
"""RFC 4733 §3.2 event codes 0-15, in order."""
DEFAULT_PAYLOAD_TYPE = 101
END_RETRANSMISSIONS = 3
"""RFC 4733 §2.5.1.4: the final packet of an event is sent three times."""

_EVENT = struct.Struct("!BBH")
_SEGMENT_FULL = 0xF000  # a segment this long may be continued by another (RFC 4733 §2.5.1.3)
_SEGMENT_SLACK = 0x0800
_EVENT_CODES = {digit: code for code, digit in enumerate(DIGITS)}


def event_code(digit: str) -> int:
    """The RFC 4733 event code of a DTMF digit (``0-9 * # A-D``, ``a-d`` accepted)."""
    code = _EVENT_CODES.get(digit.upper()) if len(digit) == 1 else None
    if code is None:
        raise ValueError(f"not a DTMF digit: {digit!r}")
    return code


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """The RFC 4733 §2.3 payload: event code, E bit, volume (0-63, -dBm0), duration in samples."""

    event: int
    end: bool
    volume: int
    duration: int

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        """Parse the first 4 octets; raise ``ValueError`` if there are fewer."""
        if len(payload) < _EVENT.size:
            raise ValueError(f"telephone-event payload of {len(payload)} octets, need 4")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def serialize(self) -> bytes:
        if not 0 <= self.event <= 0xFF or not 0 <= self.volume <= 0x3F:
            raise ValueError(f"event {self.event} or volume {self.volume} out of range")
        if not 0 <= self.duration <= 0xFFFF:
            raise ValueError(f"duration {self.duration} is not 16-bit")
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)

    @property
    def digit(self) -> str | None:
        """The DTMF digit, or None for the other telephone events (flash, tones...)."""
        return DIGITS[self.event] if self.event < len(DIGITS) else None


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    """A key press, reported once: the digit, how long it lasted, its event's RTP timestamp."""

    digit: str
    duration_ms: int
    timestamp: int


@dataclass(slots=True)
class _Pending:
    ssrc: int
    timestamp: int  # of the current segment
    digit: str
    duration: int  # of the current segment
    last_seen: float
    start: int  # timestamp of the first segment
    earlier: int = 0  # duration of the segments before the current one


class DtmfReceiver:
    """Turns a stream of telephone-event packets into one ``DtmfDigit`` per key press.

    Feed it only packets of the negotiated telephone-event payload type. An event is identified by
    its SSRC and RTP timestamp (the segments of an event longer than the 16-bit duration field are
    joined). It is reported when its first end packet arrives (later retransmissions are ignored),
    when a packet of a newer event arrives first, or by ``poll(now)`` once no packet has come for
    ``end_timeout`` seconds (all end packets lost). An event heard only through its end packets is
    reported too. Malformed payloads and non-DTMF events are counted, never raised.

    ``feed`` and ``poll`` return one digit at a time; in the rare case that one packet completes
    two (an event whose end was lost, then an end-only event), ``next_timeout()`` is in the past
    and ``poll`` returns the second.
    """

    __slots__ = (
        "_clock_rate",
        "_done",
        "_end_timeout",
        "_pending",
        "_ready",
        "malformed",
        "other_events",
    )

    def __init__(self, clock_rate: int = 8000, end_timeout: float = 0.3) -> None:
        self._clock_rate = clock_rate
        self._end_timeout = end_timeout
        self._pending: _Pending | None = None
        self._done: deque[tuple[int, int]] = deque(maxlen=8)
        self._ready: deque[DtmfDigit] = deque()
        self.malformed = 0
        self.other_events = 0

    def feed(self, packet: RtpPacket, now: float) -> DtmfDigit | None:
        """Take one telephone-event packet; return a digit if one is complete. Never raises."""
        self._take(packet, now)
        return self._ready.popleft() if self._ready else None

    def _take(self, packet: RtpPacket, now: float) -> None:
        payload = packet.payload
        if len(payload) < 4:
            self.malformed += 1
            return
        code, flags, duration = _EVENT.unpack_from(payload)
        if code >= len(DIGITS):
            self.other_events += 1
            return
        key = (packet.ssrc, packet.timestamp)
        if key in self._done:
            return  # a retransmitted end packet, or a late update
        digit = DIGITS[code]
        pending = self._pending
        if pending is not None and (pending.ssrc, pending.timestamp) != key:
            gap = ts_diff(packet.timestamp, pending.timestamp)
            if pending.ssrc == packet.ssrc and gap < 0:
                return  # a late packet of an event older than the one in progress
            if (
                pending.ssrc == packet.ssrc
                and pending.digit == digit
                and pending.duration >= _SEGMENT_FULL
                and abs(gap - pending.duration) <= _SEGMENT_SLACK
            ):  # the next segment of a long event
                self._done.append((pending.ssrc, pending.timestamp))
                pending.earlier += gap
                pending.timestamp = packet.timestamp
                pending.duration = 0
            else:
                self._finish()
                pending = None
        if pending is None:
            pending = self._pending = _Pending(key[0], key[1], digit, duration, now, key[1])
        else:
            pending.last_seen = now
            pending.duration = max(pending.duration, duration)
        if flags & 0x80:
            self._finish()

    def poll(self, now: float) -> DtmfDigit | None:
        """Report an event whose end never came, once ``end_timeout`` has passed; else None."""
        pending = self._pending
        if pending is not None and now - pending.last_seen >= self._end_timeout:
            self._finish()
        return self._ready.popleft() if self._ready else None

    def next_timeout(self) -> float | None:
        """When ``poll`` should next be called: a time in the past means now; None means never."""
        if self._ready:
            return float("-inf")
        if self._pending is None:
            return None
        return self._pending.last_seen + self._end_timeout

    def _finish(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._done.append((pending.ssrc, pending.timestamp))
        duration_ms = (pending.earlier + pending.duration) * 1000 // self._clock_rate
        self._ready.append(DtmfDigit(pending.digit, duration_ms, pending.start))


@dataclass(frozen=True, slots=True)
class DtmfFrame:
    """One RTP packet of an event, sent on one media tick.

    Send ``payload`` with the telephone-event payload type, the ``marker`` bit and the event's start
    timestamp (the same for every frame of the event), and advance the stream's clock by
    ``samples`` (one tick) whether or not audio would have been sent.
    """

    payload: bytes
    marker: bool
    end: bool
    duration: int
    samples: int


class DtmfSender:
    """Lays out the RFC 4733 packets of one key press.

    With an ``RtpSender`` the caller, on each 20 ms tick of the event, sends the next frame instead
    of audio::

        start = rtp.next_timestamp
        for frame in dtmf.packets_for("5"):  # one per tick
            datagram = rtp.build(frame.payload, frame.samples, frame.marker,
                                 payload_type=dtmf.payload_type, timestamp=start)
    """

    __slots__ = ("_clock_rate", "_payload_type")

    def __init__(self, payload_type: int = DEFAULT_PAYLOAD_TYPE, clock_rate: int = 8000) -> None:
        if not 96 <= payload_type <= 127:
            raise ValueError(f"telephone-event payload type {payload_type} is not dynamic (96-127)")
        self._payload_type = payload_type
        self._clock_rate = clock_rate

    @property
    def payload_type(self) -> int:
        return self._payload_type

    @property
    def clock_rate(self) -> int:
        return self._clock_rate

    def packets_for(
        self, digit: str, duration_ms: int = 160, volume: int = 10, ptime_ms: int = 20
    ) -> list[DtmfFrame]:
        """The frames of one key press, one per ``ptime_ms`` tick.

        The first has the marker bit; each update carries the duration so far; the last update has
        the E bit and is sent ``END_RETRANSMISSIONS`` times in all, on the following ticks.
        """
        code = event_code(digit)
        if not 0 <= volume <= 0x3F:
            raise ValueError(f"volume {volume} is not 0-63 (-dBm0)")
        if ptime_ms <= 0 or duration_ms < ptime_ms:
            raise ValueError(f"duration {duration_ms} ms is shorter than one packet ({ptime_ms})")
        tick = ptime_ms * self._clock_rate // 1000
        total = duration_ms * self._clock_rate // 1000
        if total > 0xFFFF:
            raise ValueError(f"{duration_ms} ms does not fit one event's 16-bit duration")
        updates = -(-total // tick)
        frames = []
        for index in range(1, updates + END_RETRANSMISSIONS):
            elapsed = min(index * tick, total)
            end = elapsed == total
            flags = (0x80 if end else 0) | volume
            frames.append(
                DtmfFrame(_EVENT.pack(code, flags, elapsed), index == 1, end, elapsed, tick)
            )
        return frames
