"""RTCP (RFC 3550 §6) for one RTP session, sans-I/O: compound packets (SR, RR, SDES CNAME,
BYE) built and parsed, receiver statistics kept per RFC 3550 A.1/A.3, the report interval of
§6.3 (5 s minimum, randomized), and what the far end reports about our stream (loss, jitter,
round-trip time from LSR/DLSR, §6.4.1).

``RtcpSession`` takes every RTP packet we receive (``on_rtp``) and send (``on_sent``), every
RTCP datagram that arrives (``receive``), and ``now``; ``report(now, rtp_timestamp)`` builds the
next compound packet once ``due(now)`` (``rtp_timestamp``: our stream's clock now). Times on
the wire are NTP timestamps derived from ``now`` plus a fixed ``ntp_offset`` (the adapter's
wall clock minus its monotonic clock, taken once), so round-trip times use one clock. Nothing
here reads a clock or touches a socket.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

RTCP_VERSION = 2
SR, RR, SDES, BYE = 200, 201, 202, 203
MIN_INTERVAL_S = 5.0
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01
_HEADER = struct.Struct("!BBH")
_SR_INFO = struct.Struct("!IIIII")  # ssrc, ntp msw, ntp lsw, rtp ts, packets, octets (+ssrc first)
_BLOCK = struct.Struct("!IIIIII")  # ssrc, lost (fraction|cumulative), ext seq, jitter, lsr, dlsr
_SEQ_MOD = 1 << 16
_MAX_DROPOUT = 3000
_MAX_MISORDER = 100


class RtcpParseError(ValueError):
    """A datagram is not a valid RTCP compound packet."""


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """One reception report (RFC 3550 §6.4.1) about the stream ``ssrc``."""

    ssrc: int
    fraction_lost: int  # 0-255, the fraction of packets lost since the last report * 256
    cumulative_lost: int  # signed 24 bits
    highest_sequence: int  # extended
    jitter: int  # RTP timestamp units
    last_sr: int  # middle 32 bits of the NTP time of the last SR received, 0 if none
    delay_since_last_sr: int  # in 1/65536 s


@dataclass(frozen=True, slots=True)
class SenderInfo:
    ntp: int  # 64-bit NTP timestamp
    rtp_timestamp: int
    packets: int
    octets: int


@dataclass(frozen=True, slots=True)
class RtcpPacket:
    """One packet of a compound: SR (``sender`` set), RR, SDES (``cname``) or BYE."""

    packet_type: int
    ssrc: int
    sender: SenderInfo | None = None
    blocks: tuple[ReportBlock, ...] = ()
    cname: str | None = None


def is_rtcp(data: bytes) -> bool:
    """Whether a datagram on a multiplexed port is RTCP (RFC 5761 §4: types 192-223)."""
    return len(data) >= 2 and data[0] >> 6 == RTCP_VERSION and 192 <= data[1] <= 223


def parse_compound(data: bytes) -> list[RtcpPacket]:
    """The packets of a compound RTCP datagram; unknown types are skipped. Raises
    ``RtcpParseError`` when the lengths do not add up."""
    out: list[RtcpPacket] = []
    offset = 0
    size = len(data)
    if size < 4:
        raise RtcpParseError("shorter than an RTCP header")
    while offset < size:
        if size - offset < 4:
            raise RtcpParseError("trailing bytes after the last packet")
        first, packet_type, length = _HEADER.unpack_from(data, offset)
        if first >> 6 != RTCP_VERSION:
            raise RtcpParseError(f"version {first >> 6}")
        end = offset + 4 * (length + 1)
        if end > size:
            raise RtcpParseError("packet past the end of the datagram")
        count = first & 0x1F
        body = data[offset + 4 : end]
        if first & 0x20 and body:  # padding: the last octet counts it
            pad = body[-1]
            if pad == 0 or pad > len(body):
                raise RtcpParseError("bad padding")
            body = body[:-pad]
        out.extend(_parse_one(packet_type, count, body))
        offset = end
    return out


def _parse_one(packet_type: int, count: int, body: bytes) -> list[RtcpPacket]:
    if packet_type in (SR, RR):
        head = 24 if packet_type == SR else 4
        if len(body) < head + count * 24:
            raise RtcpParseError("report shorter than its blocks")
        ssrc = int.from_bytes(body[:4], "big")
        sender = None
        if packet_type == SR:
            msw, lsw, rtp_ts, packets, octets = _SR_INFO.unpack_from(body, 4)
            sender = SenderInfo((msw << 32) | lsw, rtp_ts, packets, octets)
        blocks = []
        for i in range(count):
            src, lost, ext, jitter, lsr, dlsr = _BLOCK.unpack_from(body, head + 24 * i)
            cumulative = lost & 0xFFFFFF
            if cumulative & 0x800000:
                cumulative -= 1 << 24
            blocks.append(ReportBlock(src, lost >> 24, cumulative, ext, jitter, lsr, dlsr))
        return [RtcpPacket(packet_type, ssrc, sender, tuple(blocks))]
    if packet_type == SDES and count >= 1 and len(body) >= 4:
        ssrc = int.from_bytes(body[:4], "big")
        cname: str | None = None
        i = 4
        while i + 2 <= len(body) and body[i] != 0:
            item, length = body[i], body[i + 1]
            if item == 1:
                cname = body[i + 2 : i + 2 + length].decode("utf-8", "replace")
            i += 2 + length
        return [RtcpPacket(SDES, ssrc, cname=cname)]
    if packet_type == BYE and count >= 1 and len(body) >= 4:
        return [RtcpPacket(BYE, int.from_bytes(body[:4], "big"))]
    return []


def _header(packet_type: int, count: int, body_len: int) -> bytes:
    return _HEADER.pack(0x80 | count, packet_type, (body_len + 4) // 4 - 1)


def _block_bytes(block: ReportBlock) -> bytes:
    lost = ((block.fraction_lost & 0xFF) << 24) | (block.cumulative_lost & 0xFFFFFF)
    return _BLOCK.pack(
        block.ssrc,
        lost,
        block.highest_sequence & 0xFFFFFFFF,
        block.jitter & 0xFFFFFFFF,
        block.last_sr & 0xFFFFFFFF,
        block.delay_since_last_sr & 0xFFFFFFFF,
    )


def build_report(
    ssrc: int, sender: SenderInfo | None, blocks: tuple[ReportBlock, ...], cname: str
) -> bytes:
    """A compound packet: SR (with ``sender``) or RR, then SDES CNAME (RFC 3550 §6.1)."""
    reports = b"".join(_block_bytes(b) for b in blocks[:31])
    if sender is not None:
        body = ssrc.to_bytes(4, "big") + _SR_INFO.pack(
            sender.ntp >> 32,
            sender.ntp & 0xFFFFFFFF,
            sender.rtp_timestamp & 0xFFFFFFFF,
            sender.packets & 0xFFFFFFFF,
            sender.octets & 0xFFFFFFFF,
        )
        first = _header(SR, len(blocks[:31]), len(body) + len(reports)) + body + reports
    else:
        body = ssrc.to_bytes(4, "big")
        first = _header(RR, len(blocks[:31]), len(body) + len(reports)) + body + reports
    name = cname.encode()[:255]
    chunk = ssrc.to_bytes(4, "big") + bytes([1, len(name)]) + name + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)
    return first + _header(SDES, 1, len(chunk)) + chunk


def build_bye(ssrc: int) -> bytes:
    return _header(BYE, 1, 4) + ssrc.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class PeerReport:
    """What the far end last said about our stream."""

    fraction_lost: float
    cumulative_lost: int
    jitter_ms: float
    round_trip_ms: float | None


class RtcpSession:
    """RTCP for one leg. See the module docstring."""

    def __init__(
        self,
        ssrc: int,
        cname: str,
        *,
        clock_rate: int = 8000,
        ntp_offset: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.ssrc = ssrc
        self.cname = cname
        self.clock_rate = clock_rate
        self.ntp_offset = ntp_offset
        self._rng = rng or random.Random()
        # What we sent.
        self.packets_sent = 0
        self.octets_sent = 0
        # What we received (RFC 3550 A.1).
        self.remote_ssrc: int | None = None
        self._base_seq = 0
        self._max_seq = 0
        self._cycles = 0
        self._bad_seq = _SEQ_MOD + 1
        self.received = 0
        self._expected_prior = 0
        self._received_prior = 0
        self._jitter = 0.0  # timestamp units (A.8)
        self._transit: float | None = None
        self._last_sr: int = 0  # middle 32 bits of the last SR's NTP time
        self._last_sr_at: float | None = None
        # What the peer said, and what we did.
        self.peer: PeerReport | None = None
        self.reports_in = 0
        self.reports_out = 0
        self.invalid = 0
        self._next_at: float | None = None

    # -- RTP in and out ------------------------------------------------------------------------
    def on_rtp(self, ssrc: int, sequence: int, timestamp: int, now: float) -> None:
        """A packet of the peer's stream arrived (any payload type)."""
        if ssrc != self.remote_ssrc:
            self.remote_ssrc = ssrc
            self._reset(sequence)
        elif not self._update_seq(sequence):
            return
        self.received += 1
        arrival = now * self.clock_rate
        transit = arrival - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < self.clock_rate * 10:  # a timestamp jump is not jitter
                self._jitter += (d - self._jitter) / 16.0
        self._transit = transit

    def on_sent(self, payload_octets: int) -> None:
        """We sent one RTP packet with ``payload_octets`` of payload."""
        self.packets_sent += 1
        self.octets_sent += payload_octets

    def _reset(self, sequence: int) -> None:
        self._base_seq = sequence
        self._max_seq = sequence
        self._cycles = 0
        self._bad_seq = _SEQ_MOD + 1
        self.received = 0
        self._expected_prior = 0
        self._received_prior = 0
        self._transit = None
        self._jitter = 0.0

    def _update_seq(self, sequence: int) -> bool:
        delta = (sequence - self._max_seq) & 0xFFFF
        if delta < _MAX_DROPOUT:
            if sequence < self._max_seq:
                self._cycles += _SEQ_MOD
            self._max_seq = sequence
        elif delta <= _SEQ_MOD - _MAX_MISORDER:
            if sequence == self._bad_seq:  # two in a row: the source restarted
                self._reset(sequence)
            else:
                self._bad_seq = (sequence + 1) & 0xFFFF
                return False
        return True

    # -- RTCP in ---------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> None:
        """An RTCP datagram from the peer; bad ones are counted, never raised."""
        try:
            packets = parse_compound(data)
        except RtcpParseError:
            self.invalid += 1
            return
        self.reports_in += 1
        for packet in packets:
            if packet.sender is not None:
                self._last_sr = (packet.sender.ntp >> 16) & 0xFFFFFFFF
                self._last_sr_at = now
            for block in packet.blocks:
                if block.ssrc == self.ssrc:
                    self.peer = self._peer_report(block, now)

    def _peer_report(self, block: ReportBlock, now: float) -> PeerReport:
        rtt: float | None = None
        if block.last_sr:
            arrival = (self._ntp(now) >> 16) & 0xFFFFFFFF
            delay = (arrival - block.last_sr - block.delay_since_last_sr) & 0xFFFFFFFF
            if delay < 0x80000000:
                rtt = round(delay / 65536 * 1000, 2)
        return PeerReport(
            fraction_lost=block.fraction_lost / 256,
            cumulative_lost=block.cumulative_lost,
            jitter_ms=round(block.jitter / self.clock_rate * 1000, 2),
            round_trip_ms=rtt,
        )

    # -- RTCP out ------------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        if self._next_at is None:  # RFC 3550 §6.3: the first report after half an interval
            self._next_at = now + self._interval(MIN_INTERVAL_S / 2)
        return now >= self._next_at

    def report(self, now: float, rtp_timestamp: int) -> bytes:
        """The next compound packet: SR once we have sent RTP (``rtp_timestamp`` is our
        stream's clock at ``now``), else RR."""
        self._next_at = now + self._interval(MIN_INTERVAL_S)
        sender = None
        if self.packets_sent:
            sender = SenderInfo(
                ntp=self._ntp(now),
                rtp_timestamp=rtp_timestamp & 0xFFFFFFFF,
                packets=self.packets_sent,
                octets=self.octets_sent,
            )
        blocks = () if self.remote_ssrc is None else (self._block(now),)
        self.reports_out += 1
        return build_report(self.ssrc, sender, blocks, self.cname)

    def bye(self) -> bytes:
        return build_report(self.ssrc, None, (), self.cname) + build_bye(self.ssrc)

    def _block(self, now: float) -> ReportBlock:
        assert self.remote_ssrc is not None
        extended = self._cycles + self._max_seq
        expected = extended - self._base_seq + 1
        lost = max(-(1 << 23), min((1 << 23) - 1, expected - self.received))
        expected_interval = expected - self._expected_prior
        received_interval = self.received - self._received_prior
        self._expected_prior = expected
        self._received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        dlsr = 0
        if self._last_sr_at is not None:
            dlsr = int((now - self._last_sr_at) * 65536)
        return ReportBlock(
            self.remote_ssrc, fraction, lost, extended, int(self._jitter), self._last_sr, dlsr
        )

    def _interval(self, base: float) -> float:
        return base * self._rng.uniform(0.5, 1.5)

    def _ntp(self, now: float) -> int:
        seconds = now + self.ntp_offset + NTP_EPOCH_OFFSET
        whole = int(seconds)
        return (whole << 32) | int((seconds - whole) * (1 << 32))

    @property
    def jitter_ms(self) -> float:
        return round(self._jitter / self.clock_rate * 1000, 2)

    @property
    def lost(self) -> int:
        """Packets of the peer's stream that never arrived (RFC 3550 A.3)."""
        if self.remote_ssrc is None:
            return 0
        return max(0, self._cycles + self._max_seq - self._base_seq + 1 - self.received)
