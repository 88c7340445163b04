"""Adaptive jitter buffer for one incoming RTP stream: reorders, conceals loss, paces playout.

Sans-I/O: ``push(packet, now)`` files a packet by its arrival time; ``pop(now)`` returns what is
due.

Model. Everything is in RTP timestamp units (``clock_rate`` per second). A packet whose timestamp
is ``T`` is due when the playout point ``now * clock_rate - offset`` reaches ``T``. The offset is
the fast-path transit time (the lowest recent ``arrival - timestamp``) plus a target delay that
is four times the RFC 3550 interarrival jitter (appendix A.8), kept between ``min_ms`` and
``max_ms`` less 50 ms of headroom (one packet and one pop interval). The offset grows at once when
more delay is needed and shrinks by at most 10 % of elapsed time.

Early release. With ``early=True`` a packet that is next in order goes out at the first ``pop``
after it arrived, without waiting for its due time: the target delay then only says how long a
missing packet is waited for before it is concealed (and a reordered one still finds its place
while it is waited for). ``next_due`` then gives when the next packet is expected at the
earliest (the fast-path transit after its timestamp). Latency is what the network gave, not
the network's worst case; the output is as smooth as the arrivals.

Output. ``pop`` returns, in order, ``JitterFrame`` (a packet) and ``Gap`` (conceal that many
samples) items. Their ``timestamp`` is the position on the buffer's own output timeline:
unwrapped RTP units, strictly increasing, continuous across resynchronisations (a new SSRC, a
sequence jump, a timestamp jump), so a consumer can place audio on the call's media clock with it.

Durations. With ``samples_of`` (default ``len``: G.711, one byte per sample) a packet lasts as many
samples as its payload holds, which is exact even after a silence (DTX) where the timestamp delta
to the next packet is not the packet's length. With ``samples_of=None`` the duration is the
timestamp delta to the next sequence number, else the last known duration. Timestamp holes
between packets (mixed 20/30 ms packetisation around a loss, DTX, a resync) become ``Gap`` items.

Bounds. At most ``max_ms`` of audio waits in the buffer: beyond it the oldest packets are dropped
(``overflow_dropped``) and the playout point moves forward, so latency never grows. Concealment
stops after ``max_conceal_ms`` without a frame; the timeline keeps running silently and the next
frame's timestamp shows the jump. Bad input (wrong types, absurd sizes, NaN times) is counted
in ``invalid`` and never raises.

Resynchronisation. A packet from another SSRC, a sequence jump beyond RFC 3550's MAX_DROPOUT /
MAX_MISORDER, or a timestamp a second or more (at least ``2 * max_ms``) away from the playout
point is held as a probe; the stream is re-anchored when the next packet confirms it (as RFC 3550
A.1 does for sequence restarts), and a lone stray packet is discarded. When the buffer has run
dry and a packet of the same stream arrives behind the playout point (a network stall, or a
sender that froze its timestamps during silence), the stream slips: it is re-anchored on that
packet instead of every following packet being dropped as late.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from media.rtp import seq_diff, ts_diff

__all__ = [
    "Gap",
    "JitterBuffer",
    "JitterFrame",
    "JitterOutput",
    "JitterStats",
    "RtpLike",
]

_MAX_DROPOUT = 3000  # RFC 3550 A.1: a forward sequence jump larger than this is a restart
_MAX_MISORDER = 100  # RFC 3550 A.1: a backward jump larger than this is a restart
_PROBE_SPAN = 16  # how far in sequence the packet confirming a probe may be
_SEEN_BITS = 64  # received-history window behind the playout cursor (duplicate vs late)
_SEEN_MASK = (1 << _SEEN_BITS) - 1
_PREROLL_SPAN = 16  # before the first output, packets this far before the anchor are taken
_MAX_PACKETS = 1024  # hard bound on buffered packets, whatever their timestamps say
_JITTER_MULTIPLIER = 4.0  # target delay = this many times the RFC 3550 jitter
_BASE_CREEP = 1.0 / 512.0  # how fast the fast-path transit estimate rises towards later arrivals
_RELEASE_RATE = 0.1  # the delay shrinks by at most this fraction of elapsed time
_HYSTERESIS_S = 0.005  # extra delay smaller than this is not worth releasing
_HEADROOM_S = 0.05  # target stays this far below max_ms: one packet plus one pop interval
_MAX_PACKET_S = 0.2  # longest acceptable packet
_DEFAULT_PACKET_S = 0.02  # packet duration assumed before one has been seen
_MIN_CHUNK_S = 0.01  # concealment comes in pieces of the last packet's duration, at least this
_RESYNC_S = 1.0  # a timestamp this far ahead of the playout point is a jump
_TS_MASK = 0xFFFFFFFF


class RtpLike(Protocol):
    """What the buffer reads from a packet; ``media.rtp.RtpPacket`` has all of it."""

    @property
    def ssrc(self) -> int: ...

    @property
    def sequence(self) -> int: ...

    @property
    def timestamp(self) -> int: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def marker(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class JitterFrame:
    """A packet due now. ``timestamp`` is its output-timeline position, ``sequence`` its wire
    sequence number, ``samples`` its duration in clock units."""

    payload: bytes
    timestamp: int
    sequence: int
    samples: int
    marker: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """Conceal ``samples`` clock units starting at output-timeline position ``timestamp``."""

    samples: int
    timestamp: int


JitterOutput = JitterFrame | Gap


@dataclass(frozen=True, slots=True)
class JitterStats:
    """A snapshot of the buffer's counters.

    ``received`` counts well-formed packets pushed (duplicates and late ones included);
    ``lost`` counts sequence numbers skipped at playout because they had not arrived in time (a
    packet that turns up afterwards also counts in ``late``); ``late`` counts packets dropped
    because their place had already been played or concealed; ``reordered`` counts packets
    accepted after a higher sequence number; ``overflow_dropped`` counts packets dropped to keep
    the depth under ``max_ms``; ``invalid`` counts malformed packets and stray probes;
    ``resyncs`` counts re-anchorings. ``jitter_ms`` is the RFC 3550 interarrival jitter,
    ``depth_ms`` the audio waiting from the playout cursor to the end of the newest packet,
    ``target_ms`` the current target delay.
    """

    received: int
    lost: int
    late: int
    duplicated: int
    reordered: int
    overflow_dropped: int
    invalid: int
    resyncs: int
    concealed_ms: float
    jitter_ms: float
    depth_ms: float
    target_ms: float


# One buffered packet: (output-timeline timestamp, payload, wire sequence, samples or 0, marker).
_Slot = tuple[int, bytes, int, int, bool]
# A held probe: (wire sequence, wire timestamp, ssrc, payload, samples, marker, arrival units).
_Probe = tuple[int, int, int, bytes, int, bool, float]


class JitterBuffer:
    """Adaptive jitter buffer for one RTP stream; see the module docstring for the model."""

    __slots__ = (
        "_anchored",
        "_base",
        "_conceal_cap",
        "_concealed",
        "_duplicated",
        "_early",
        "_high_ext_seq",
        "_high_ext_ts",
        "_high_raw_seq",
        "_high_raw_ts",
        "_high_samples",
        "_hysteresis",
        "_invalid",
        "_j_arrival",
        "_j_has_prev",
        "_j_ts",
        "_jitter",
        "_last_out",
        "_last_pop",
        "_late",
        "_lost",
        "_max_packet",
        "_max_target",
        "_max_units",
        "_min_chunk",
        "_min_units",
        "_next_seq",
        "_next_ts",
        "_nominal",
        "_offset",
        "_overflow",
        "_packets",
        "_probe",
        "_rate",
        "_received",
        "_reordered",
        "_resync_units",
        "_resyncs",
        "_run",
        "_samples_of",
        "_seen",
        "_ssrc",
        "_started",
    )

    def __init__(
        self,
        clock_rate: int = 8000,
        *,
        min_ms: float = 40.0,
        max_ms: float = 200.0,
        max_conceal_ms: float = 300.0,
        samples_of: Callable[[bytes], int] | None = len,
        early: bool = False,
    ) -> None:
        """``min_ms``: lowest target delay. ``max_ms``: most audio ever buffered (the target stays
        50 ms below it, so keep ``min_ms <= max_ms - 50``). ``max_conceal_ms``: longest run of
        ``Gap`` output. ``samples_of``: samples in a payload, or None to use timestamp deltas.
        ``early``: release packets in order as soon as they are here (module docstring).
        Raises ``ValueError`` for impossible settings."""
        if clock_rate <= 0:
            raise ValueError(f"clock_rate must be positive, not {clock_rate}")
        if not 0.0 < min_ms < max_ms:
            raise ValueError(f"need 0 < min_ms < max_ms, got {min_ms} and {max_ms}")
        if max_conceal_ms < 0.0:
            raise ValueError(f"max_conceal_ms must not be negative, not {max_conceal_ms}")
        rate = float(clock_rate)
        self._rate = rate
        self._samples_of = samples_of
        self._early = early
        self._min_units = min_ms * rate / 1000.0
        self._max_units = max_ms * rate / 1000.0
        self._max_target = max(self._min_units, self._max_units - _HEADROOM_S * rate)
        self._max_packet = max(1, int(min(_MAX_PACKET_S * rate, self._max_units / 2.0)))
        self._conceal_cap = int(max_conceal_ms * rate / 1000.0)
        self._resync_units = max(_RESYNC_S * rate, 2.0 * self._max_units)
        self._hysteresis = _HYSTERESIS_S * rate
        self._nominal = max(1, min(self._max_packet, round(_DEFAULT_PACKET_S * rate)))
        self._min_chunk = max(1, min(self._max_packet, round(_MIN_CHUNK_S * rate)))
        self._packets: dict[int, _Slot] = {}
        self._anchored = False
        self._started = False
        self._probe: _Probe | None = None
        self._ssrc = 0
        # Playout cursor: next extended sequence number and output-timeline position.
        self._next_seq = 0
        self._next_ts = 0
        self._last_out = -1
        self._run = 0  # clock units concealed since the last frame
        self._seen = 0  # bit i: sequence next_seq - 1 - i was received
        # Highest accepted packet: the reference for unwrapping sequence numbers and timestamps.
        self._high_ext_seq = 0
        self._high_raw_seq = 0
        self._high_ext_ts = 0
        self._high_raw_ts = 0
        self._high_samples = 0
        # Timing: playout point = now * rate - offset; base = fast-path transit estimate.
        self._offset = 0.0
        self._base = 0.0
        self._last_pop = 0.0
        # RFC 3550 A.8 interarrival jitter, in clock units.
        self._jitter = 0.0
        self._j_has_prev = False
        self._j_arrival = 0.0
        self._j_ts = 0
        # Counters.
        self._received = 0
        self._lost = 0
        self._late = 0
        self._duplicated = 0
        self._reordered = 0
        self._overflow = 0
        self._invalid = 0
        self._resyncs = 0
        self._concealed = 0

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> JitterStats:
        """Counters and gauges as they stand now."""
        to_ms = 1000.0 / self._rate
        return JitterStats(
            received=self._received,
            lost=self._lost,
            late=self._late,
            duplicated=self._duplicated,
            reordered=self._reordered,
            overflow_dropped=self._overflow,
            invalid=self._invalid,
            resyncs=self._resyncs,
            concealed_ms=self._concealed * to_ms,
            jitter_ms=self._jitter * to_ms,
            depth_ms=self._depth() * to_ms,
            target_ms=self._target() * to_ms,
        )

    @property
    def depth_ms(self) -> float:
        """Audio waiting from the playout cursor to the end of the newest packet, in ms."""
        return self._depth() * 1000.0 / self._rate

    @property
    def target_ms(self) -> float:
        """The current target delay, in ms."""
        return self._target() * 1000.0 / self._rate

    def next_due(self) -> float | None:
        """When (on the clock ``push`` and ``pop`` are given) the audio at the playout cursor
        falls due: the earliest ``pop`` that returns it (with ``early``, when it is expected to
        arrive at the earliest). None before the first packet."""
        if not self._anchored:
            return None
        return (self._next_ts + (self._base if self._early else self._offset)) / self._rate

    @property
    def packet_samples(self) -> int:
        """How long the packets are: the newest one's samples (20 ms before any)."""
        return self._high_samples or self._nominal

    def push(self, packet: RtpLike, now: float) -> None:
        """File ``packet``, which arrived at ``now`` (seconds). Never raises on bad input."""
        try:
            seq = packet.sequence & 0xFFFF
            ts = packet.timestamp & _TS_MASK
            ssrc = packet.ssrc
            payload = packet.payload
            marker = bool(packet.marker)
            now_units = float(now) * self._rate
            samples_of = self._samples_of
            samples = samples_of(payload) if samples_of is not None else 0
        except (AttributeError, TypeError, ValueError, OverflowError):
            self._invalid += 1
            return
        if (
            not isinstance(payload, bytes)
            or not isinstance(samples, int)
            or now_units - now_units != 0.0  # NaN or infinite
            or samples < 0
            or samples > self._max_packet
            or (samples == 0 and samples_of is not None)
        ):
            self._invalid += 1
            return
        self._received += 1
        if not self._anchored:
            self._anchor_first(seq, ts, ssrc, now_units)
            self._accept(seq, ts, seq, ts, payload, samples, marker, now_units)
            return
        if ssrc == self._ssrc:
            d = seq_diff(seq, self._high_raw_seq)
            if -_MAX_MISORDER <= d <= _MAX_DROPOUT:
                ext_ts = self._high_ext_ts + ts_diff(ts, self._high_raw_ts)
                if abs(ext_ts - (now_units - self._offset)) <= self._resync_units:
                    if self._probe is not None:
                        self._probe = None
                        self._invalid += 1
                    self._accept(
                        self._high_ext_seq + d, ext_ts, seq, ts, payload, samples, marker, now_units
                    )
                    return
        self._discontinuity(seq, ts, ssrc, payload, samples, marker, now_units)

    def pop(self, now: float) -> list[JitterOutput]:
        """Return the frames and gaps due at ``now`` (seconds), oldest first."""
        out: list[JitterOutput] = []
        if not self._anchored:
            return out
        try:
            now_units = float(now) * self._rate
        except (TypeError, ValueError, OverflowError):
            return out
        if now_units - now_units != 0.0:
            return out
        # Adapt the playout offset: grow at once, shrink slowly (time compression <= 10 %).
        offset = self._offset
        desired = self._base + self._target()
        if desired > offset:
            offset = desired
        elif offset - desired > self._hysteresis:
            elapsed = now_units - self._last_pop
            if elapsed > 0.0:
                step = min(elapsed, 0.1 * self._rate) * _RELEASE_RATE
                offset -= min(offset - desired, step)
        self._offset = offset
        self._last_pop = now_units
        play_pos = now_units - offset

        packets = self._packets
        next_seq = self._next_seq
        next_ts = self._next_ts
        run = self._run
        cap = self._conceal_cap
        nominal = self._nominal
        seen = self._seen
        early = self._early
        while next_ts <= play_pos or (
            # Early: what has arrived in order goes now, before its due time.
            early and (ahead := packets.get(next_seq)) is not None and ahead[0] == next_ts
        ):
            slot = packets.get(next_seq)
            if slot is not None:
                ts = slot[0]
                if ts > next_ts:
                    # A hole in the timeline before a packet we hold: DTX, or the rest of a
                    # loss in a mixed-packetisation stream, or a resync.
                    hole = ts - next_ts
                    if run >= cap:
                        step = min(hole, int(play_pos - next_ts) + 1)
                    else:
                        step = min(hole, nominal)
                        emit = min(step, cap - run)
                        out.append(Gap(emit, next_ts))
                        self._concealed += emit
                    run += step
                    next_ts += step
                    continue
                del packets[next_seq]
                next_seq += 1
                seen = ((seen << 1) | 1) & _SEEN_MASK
                if ts < next_ts and (run > 0 or ts <= self._last_out):
                    # Its start has already been concealed, or it would go back in time.
                    self._late += 1
                    continue
                samples = slot[3]
                if samples == 0:
                    samples = self._delta_to(next_seq, ts, nominal)
                out.append(JitterFrame(slot[1], ts, slot[2], samples, slot[4]))
                end = ts + samples
                if end > next_ts:
                    next_ts = end
                self._last_out = ts
                run = 0
                nominal = samples if samples > self._min_chunk else self._min_chunk
                continue
            # The packet at the cursor is missing.
            if packets:
                p_seq = min(packets)
                hole = packets[p_seq][0] - next_ts
                if hole <= 0:
                    # The span up to the next packet we hold has been concealed already.
                    self._lost += p_seq - next_seq
                    seen = (seen << (p_seq - next_seq)) & _SEEN_MASK
                    next_seq = p_seq
                    continue
            else:
                p_seq = -1
                hole = 0
            if run >= cap:
                # Concealment is capped: run the timeline silently up to the playout point.
                step = int(play_pos - next_ts) + 1
                if p_seq >= 0 and hole < step:
                    step = hole
            else:
                step = nominal if p_seq < 0 or hole > nominal else hole
                emit = min(step, cap - run)
                out.append(Gap(emit, next_ts))
                self._concealed += emit
            run += step
            next_ts += step
            if p_seq >= 0 and step == hole:
                self._lost += p_seq - next_seq
                seen = (seen << (p_seq - next_seq)) & _SEEN_MASK
                next_seq = p_seq
        if out:
            self._started = True
        self._next_seq = next_seq
        self._next_ts = next_ts
        self._run = run
        self._nominal = nominal
        self._seen = seen
        return out

    # ------------------------------------------------------------------ internals

    def _target(self) -> float:
        target = self._jitter * _JITTER_MULTIPLIER
        if target < self._min_units:
            return self._min_units
        if target > self._max_target:
            return self._max_target
        return target

    def _depth(self) -> int:
        if not self._packets:
            return 0
        return max(0, self._high_ext_ts + self._high_samples - self._next_ts)

    def _delta_to(self, ext_seq: int, ts: int, nominal: int) -> int:
        """Duration of the packet before ``ext_seq`` from the timestamp of ``ext_seq``."""
        following = self._packets.get(ext_seq)
        if following is not None:
            delta = following[0] - ts
            if 0 < delta <= self._max_packet:
                return delta
        return nominal

    def _anchor_first(self, seq: int, ts: int, ssrc: int, now_units: float) -> None:
        self._anchored = True
        self._ssrc = ssrc
        self._offset = now_units - ts + self._min_units
        self._base = now_units - ts
        self._last_pop = now_units
        self._next_seq = seq
        self._next_ts = ts
        self._last_out = ts - 1
        self._high_ext_seq = seq - 1
        self._high_raw_seq = (seq - 1) & 0xFFFF
        self._high_ext_ts = ts
        self._high_raw_ts = ts

    def _accept(
        self,
        ext_seq: int,
        ext_ts: int,
        seq: int,
        ts: int,
        payload: bytes,
        samples: int,
        marker: bool,
        now_units: float,
    ) -> None:
        """File a packet of the current stream, given its extended sequence and timestamp."""
        # RFC 3550 A.8: J += (|D| - J) / 16 over consecutive arrivals of this stream.
        jitter_before = self._jitter
        if self._j_has_prev:
            d = (now_units - self._j_arrival) - ts_diff(ts, self._j_ts)
            if d < 0.0:
                d = -d
            self._jitter += (d - self._jitter) * 0.0625
        self._j_has_prev = True
        self._j_arrival = now_units
        self._j_ts = ts

        next_seq = self._next_seq
        packets = self._packets
        if ext_seq < next_seq:
            if (
                not self._started
                and next_seq - ext_seq <= _PREROLL_SPAN
                and ext_ts < self._next_ts
                and ext_ts >= now_units - self._offset
            ):
                # Nothing played yet and still in time: move the start back to this packet.
                self._next_seq = ext_seq
                self._next_ts = ext_ts
                self._last_out = ext_ts - 1
                self._seen = 0
            else:
                behind = next_seq - 1 - ext_seq
                if behind < _SEEN_BITS and (self._seen >> behind) & 1:
                    self._duplicated += 1
                else:
                    self._late += 1
                    if behind < _SEEN_BITS:
                        self._seen |= 1 << behind
                return
        elif ext_seq in packets:
            self._duplicated += 1
            return
        elif ext_ts < self._next_ts and not (
            ext_seq == next_seq and self._run == 0 and ext_ts > self._last_out
        ):
            # Its place has been played or concealed already.
            if packets:
                self._late += 1
                return
            # Nothing is waiting: the stream stalled or froze its clock. Slip the timeline and
            # play it rather than drop every packet from here on as late.
            self._jitter = jitter_before  # the jump is a discontinuity, not jitter
            ext_ts = self._slip_target(now_units)
            self._resyncs += 1
            self._base = now_units - ext_ts
        packets[ext_seq] = (ext_ts, payload, seq, samples, marker)
        if ext_seq > self._high_ext_seq:
            self._high_ext_seq = ext_seq
            self._high_raw_seq = seq
            self._high_ext_ts = ext_ts
            self._high_raw_ts = ts
            self._high_samples = samples or self._nominal
        else:
            self._reordered += 1
        transit = now_units - ext_ts
        base = self._base
        if transit < base:
            self._base = transit
        else:
            self._base = base + (transit - base) * _BASE_CREEP
        if (
            self._high_ext_ts + self._high_samples - self._next_ts > self._max_units
            or len(packets) > _MAX_PACKETS
        ):
            self._shed(now_units)

    def _slip_target(self, now_units: float) -> int:
        """Where a re-anchored packet goes: after everything held, one target delay from now."""
        end = self._next_ts
        if self._packets:
            end = max(end, self._high_ext_ts + self._high_samples)
        desired = math.ceil(now_units - self._offset + self._target())
        return max(end, desired)

    def _shed(self, now_units: float) -> None:
        """Drop the oldest audio until the depth bound holds, and bring the playout point along."""
        packets = self._packets
        next_seq = self._next_seq
        next_ts = self._next_ts
        seen = self._seen
        while packets:
            excess = self._high_ext_ts + self._high_samples - next_ts - self._max_units
            if excess <= 0 and len(packets) <= _MAX_PACKETS:
                break
            oldest = min(packets)
            slot = packets[oldest]
            if excess > 0 and slot[0] > next_ts:
                next_ts += min(slot[0] - next_ts, math.ceil(excess))
                continue
            del packets[oldest]
            self._overflow += 1
            self._lost += oldest - next_seq
            skipped = oldest + 1 - next_seq
            seen = ((seen << skipped) | 1) & _SEEN_MASK if skipped < _SEEN_BITS else 1
            next_seq = oldest + 1
            end = slot[0] + (slot[3] or self._nominal)
            if end > next_ts:
                next_ts = end
        self._next_seq = next_seq
        self._next_ts = next_ts
        self._seen = seen
        lead = next_ts - (now_units - self._offset)
        if lead > 0:
            # Never let latency grow: what is now at the cursor becomes due at once.
            self._offset -= lead
            self._base = min(self._base, self._offset - self._target())

    def _discontinuity(
        self,
        seq: int,
        ts: int,
        ssrc: int,
        payload: bytes,
        samples: int,
        marker: bool,
        now_units: float,
    ) -> None:
        """A packet that does not follow the current stream: hold it, or resync on it."""
        probe = self._probe
        if probe is not None and ssrc == probe[2]:
            ds = seq_diff(seq, probe[0])
            if ds == 0 and ts == probe[1]:
                self._duplicated += 1
                return
            if (
                ds != 0
                and -_PROBE_SPAN <= ds <= _PROBE_SPAN
                and abs(ts_diff(ts, probe[1]) - (now_units - probe[6])) <= self._resync_units
            ):
                self._probe = None
                self._resync(probe)
                ext_ts = self._high_ext_ts + ts_diff(ts, self._high_raw_ts)
                self._accept(
                    self._high_ext_seq + ds, ext_ts, seq, ts, payload, samples, marker, now_units
                )
                return
        if probe is not None:
            self._invalid += 1
        self._probe = (seq, ts, ssrc, payload, samples, marker, now_units)

    def _resync(self, probe: _Probe) -> None:
        """Re-anchor on a confirmed probe: new sequence and timestamp mapping, same timeline."""
        seq, ts, ssrc, payload, samples, marker, arrival = probe
        ext_ts = self._slip_target(arrival)
        ext_seq = max(self._next_seq, self._high_ext_seq + 1)
        self._resyncs += 1
        self._ssrc = ssrc
        self._j_has_prev = False
        self._base = arrival - ext_ts
        # Point the references just below the probe so _accept takes it as the new highest.
        self._high_ext_seq = ext_seq - 1
        self._high_raw_seq = (seq - 1) & 0xFFFF
        self._high_ext_ts = ext_ts
        self._high_raw_ts = ts
        self._accept(ext_seq, ext_ts, seq, ts, payload, samples, marker, arrival)
