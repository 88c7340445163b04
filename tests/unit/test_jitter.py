"""Tests of media.jitter: ordering, loss, lateness, bounds, resynchronisation and RFC 3550 jitter.

Streams are scripted: each packet has a send time and an arrival time, and the buffer is popped
on a 20 ms tick, as the worker's pacer does. No sockets, no clock.
"""

from __future__ import annotations

import itertools
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.jitter import Gap, JitterBuffer, JitterFrame, JitterOutput

RATE = 8000
TICK = 0.02
NETWORK_DELAY = 0.03


@dataclass(frozen=True, slots=True)
class Pkt:
    sequence: int
    timestamp: int
    payload: bytes
    marker: bool = False
    ssrc: int = 0x1234


def stream(
    count: int,
    *,
    first_seq: int = 0,
    first_ts: int = 0,
    samples: int = 160,
    start: float = 0.0,
    ssrc: int = 0x1234,
) -> list[tuple[float, Pkt]]:
    """``count`` packets of ``samples`` each, sent in real time, arriving NETWORK_DELAY later."""
    out = []
    for i in range(count):
        send = start + i * samples / RATE
        payload = bytes([i % 256]) * samples
        pkt = Pkt((first_seq + i) & 0xFFFF, (first_ts + i * samples) & 0xFFFFFFFF, payload)
        out.append((send + NETWORK_DELAY, Pkt(pkt.sequence, pkt.timestamp, payload, ssrc=ssrc)))
    return out


def run(
    jb: JitterBuffer,
    arrivals: list[tuple[float, Pkt]],
    until: float,
    *,
    tick: float = TICK,
    phase: float = 0.001,
) -> list[tuple[float, JitterOutput]]:
    """Push packets at their arrival times and pop on every tick until ``until``."""
    events: list[tuple[float, int, Pkt | None]] = [(t, 0, p) for t, p in arrivals]
    ticks = int(until / tick) + 1
    events += [(k * tick + phase, 1, None) for k in range(ticks)]
    events.sort(key=lambda e: (e[0], e[1]))
    outputs: list[tuple[float, JitterOutput]] = []
    for t, kind, pkt in events:
        if kind == 0:
            assert pkt is not None
            jb.push(pkt, t)
        else:
            outputs += [(t, o) for o in jb.pop(t)]
    return outputs


def frames_of(outputs: list[tuple[float, JitterOutput]]) -> list[JitterFrame]:
    return [o for _, o in outputs if isinstance(o, JitterFrame)]


def gaps_of(outputs: list[tuple[float, JitterOutput]]) -> list[Gap]:
    return [o for _, o in outputs if isinstance(o, Gap)]


def played(outputs: list[tuple[float, JitterOutput]]) -> list[tuple[float, JitterOutput]]:
    """The outputs up to the last frame: what follows is concealment after the stream ended."""
    last = max(i for i, (_, o) in enumerate(outputs) if isinstance(o, JitterFrame))
    return outputs[: last + 1]


def assert_contiguous(outputs: list[tuple[float, JitterOutput]]) -> None:
    """Each output starts where the previous one ended on the output timeline."""
    items = [o for _, o in outputs]
    for before, after in itertools.pairwise(items):
        assert after.timestamp == before.timestamp + before.samples, (before, after)


class TestInOrderPlayout:
    def test_steady_stream_plays_every_packet_once_in_order(self) -> None:
        jb = JitterBuffer()
        outputs = run(jb, stream(50), until=1.07)  # the last packet is due at 1.05 s
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == list(range(50))
        assert [f.timestamp for f in frames] == [i * 160 for i in range(50)]
        assert all(f.samples == 160 for f in frames)
        assert gaps_of(outputs) == []
        stats = jb.stats
        assert (stats.received, stats.lost, stats.late, stats.duplicated) == (50, 0, 0, 0)

    def test_first_frame_waits_for_the_minimum_delay(self) -> None:
        jb = JitterBuffer(min_ms=40.0)
        jb.push(Pkt(7, 1000, bytes(160)), 10.0)
        assert jb.pop(10.0) == []
        assert jb.pop(10.039) == []
        (frame,) = jb.pop(10.040)
        assert frame == JitterFrame(bytes(160), 1000, 7, 160, False)

    def test_next_due_is_when_pop_returns_the_cursors_packet(self) -> None:
        jb = JitterBuffer(min_ms=40.0)
        assert jb.next_due() is None  # before the first packet
        jb.push(Pkt(7, 1000, bytes(160)), 10.0)
        jb.push(Pkt(8, 1160, bytes(160)), 10.02)
        due = jb.next_due()
        assert due is not None
        assert due == pytest.approx(10.040)
        assert jb.pop(due - 0.0001) == []
        assert len(jb.pop(due)) == 1
        assert jb.next_due() == pytest.approx(10.060)  # the next packet's turn

    def test_frame_carries_payload_marker_and_wire_sequence(self) -> None:
        jb = JitterBuffer()
        jb.push(Pkt(65535, 5, b"\x01" * 160, marker=True), 0.0)
        (frame,) = jb.pop(0.05)
        assert isinstance(frame, JitterFrame)
        assert (frame.payload, frame.sequence, frame.marker) == (b"\x01" * 160, 65535, True)

    def test_pop_before_any_packet_returns_nothing(self) -> None:
        assert JitterBuffer().pop(5.0) == []

    def test_accepts_media_rtp_packets(self) -> None:
        from media.rtp import RtpPacket

        jb = JitterBuffer()
        jb.push(RtpPacket(8, 1, 160, 99, bytes(160)), 0.0)
        jb.push(RtpPacket(8, 2, 320, 99, bytes(160)), 0.02)
        frames = [o for o in jb.pop(1.0) if isinstance(o, JitterFrame)]
        assert [f.sequence for f in frames] == [1, 2]


class TestReordering:
    def test_swapped_pairs_come_out_in_order(self) -> None:
        arrivals = stream(40)
        for i in range(0, 40, 2):  # the odd packet of each pair overtakes the even one
            (ta, a), (tb, b) = arrivals[i], arrivals[i + 1]
            arrivals[i], arrivals[i + 1] = (ta + 0.015, a), (tb - 0.015, b)
        jb = JitterBuffer()
        outputs = played(run(jb, arrivals, until=1.0))
        assert [f.sequence for f in frames_of(outputs)] == list(range(40))
        assert gaps_of(outputs) == []
        assert jb.stats.reordered == 20
        assert jb.stats.lost == 0

    def test_packet_before_the_first_one_is_still_played(self) -> None:
        arrivals = stream(10)
        arrivals[0], arrivals[1] = (arrivals[1][0] + 0.001, arrivals[0][1]), arrivals[1]
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.5)
        assert [f.sequence for f in frames_of(outputs)] == list(range(10))


class TestDuplicates:
    def test_duplicate_waiting_in_the_buffer_is_dropped_and_counted(self) -> None:
        arrivals = stream(10)
        arrivals.insert(4, (arrivals[3][0] + 0.001, arrivals[3][1]))
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.5)
        assert [f.sequence for f in frames_of(outputs)] == list(range(10))
        assert jb.stats.duplicated == 1
        assert jb.stats.late == 0

    def test_duplicate_of_a_played_packet_counts_as_duplicate_not_late(self) -> None:
        arrivals = stream(20)
        arrivals.append((0.35, arrivals[2][1]))  # long after packet 2 was played
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.6)
        assert [f.sequence for f in frames_of(outputs)] == list(range(20))
        assert (jb.stats.duplicated, jb.stats.late) == (1, 0)


class TestLatePackets:
    def test_packet_arriving_after_its_turn_is_dropped_and_concealed(self) -> None:
        arrivals = stream(10)
        arrivals[5] = (arrivals[5][0] + 0.2, arrivals[5][1])
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.6)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        assert Gap(160, 800) in gaps_of(outputs)
        assert_contiguous(outputs[: len(frames) + 1])
        assert (jb.stats.lost, jb.stats.late) == (1, 1)


class TestLossConcealment:
    def test_single_loss_becomes_one_gap_at_its_place(self) -> None:
        arrivals = [a for a in stream(20) if a[1].sequence != 7]
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.5)
        played = outputs[:20]
        assert [o for _, o in played if isinstance(o, Gap)] == [Gap(160, 7 * 160)]
        assert_contiguous(played)
        assert jb.stats.lost == 1
        assert jb.stats.concealed_ms == pytest.approx(20.0 + (len(gaps_of(outputs)) - 1) * 20.0)

    def test_burst_loss_is_concealed_in_packet_sized_gaps(self) -> None:
        arrivals = [a for a in stream(30) if not 10 <= a[1].sequence < 13]
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.55)
        played = outputs[:30]
        assert [o for _, o in played if isinstance(o, Gap)] == [
            Gap(160, 1600),
            Gap(160, 1760),
            Gap(160, 1920),
        ]
        assert_contiguous(played)
        assert jb.stats.lost == 3

    def test_concealment_stops_after_max_conceal_ms(self) -> None:
        jb = JitterBuffer(max_conceal_ms=100.0)
        outputs = run(jb, stream(5), until=2.0)
        gaps = gaps_of(outputs)
        assert sum(g.samples for g in gaps) == 800
        assert all(g.samples == 160 for g in gaps)

    def test_concealment_cap_can_end_inside_a_packet(self) -> None:
        jb = JitterBuffer(max_conceal_ms=50.0)
        outputs = run(jb, stream(5), until=2.0)
        assert [g.samples for g in gaps_of(outputs)] == [160, 160, 80]


class TestMixedPacketisation:
    def test_twenty_and_thirty_ms_packets_keep_a_continuous_timeline(self) -> None:
        arrivals: list[tuple[float, Pkt]] = []
        ts = 0
        for i in range(40):
            samples = 160 if (i // 5) % 2 == 0 else 240
            arrivals.append((ts / RATE + NETWORK_DELAY, Pkt(i, ts, bytes(samples))))
            ts += samples
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=ts / RATE + 0.1)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == list(range(40))
        assert [f.samples for f in frames] == [len(p.payload) for _, p in arrivals]
        assert_contiguous(outputs[:40])

    def test_lost_thirty_ms_packet_is_concealed_as_thirty_ms(self) -> None:
        arrivals: list[tuple[float, Pkt]] = []
        ts = 0
        for i in range(12):
            samples = 160 if i < 6 else 240
            arrivals.append((ts / RATE + NETWORK_DELAY, Pkt(i, ts, bytes(samples))))
            ts += samples
        lost_ts = arrivals[8][1].timestamp
        del arrivals[8]
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=ts / RATE + 0.06)
        assert Gap(240, lost_ts) in gaps_of(outputs)
        assert_contiguous(outputs[:12])

    def test_timestamp_deltas_give_durations_when_payload_length_is_not_used(self) -> None:
        arrivals: list[tuple[float, Pkt]] = []
        ts = 0
        for i in range(10):
            samples = 160 if i % 2 else 240
            arrivals.append((ts / RATE + NETWORK_DELAY, Pkt(i, ts, b"opaque")))
            ts += samples
        jb = JitterBuffer(samples_of=None, min_ms=60.0)
        frames = frames_of(run(jb, arrivals, until=ts / RATE + 0.1))
        assert [f.samples for f in frames[:9]] == [240, 160] * 4 + [240]

    def test_sipp_g711a_capture_plays_without_loss(self, sipp_share: Path) -> None:
        packets = read_pcap_rtp(sipp_share / "g711a.pcap")
        assert len(packets) == 236
        first = packets[0][0]
        arrivals = [(t - first, p) for t, p in packets]
        jb = JitterBuffer()
        outputs = played(run(jb, arrivals, until=arrivals[-1][0] + 0.1))
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == [p.sequence for _, p in packets]
        assert all(f.samples == 240 for f in frames)
        assert gaps_of(outputs) == []
        assert jb.stats.lost == 0
        assert jb.stats.jitter_ms < 5.0


def read_pcap_rtp(path: Path) -> list[tuple[float, Pkt]]:
    """RTP packets of a classic little-endian Ethernet pcap, with their capture times."""
    data = path.read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    offset = 24
    out = []
    while offset + 16 <= len(data):
        sec, usec, length, _ = struct.unpack_from("<IIII", data, offset)
        frame = data[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ip = frame[14:]
        udp = ip[(ip[0] & 0x0F) * 4 :]
        rtp = udp[8:]
        first, second, seq, ts, ssrc = struct.unpack_from("!BBHII", rtp)
        assert first >> 6 == 2
        out.append((sec + usec / 1e6, Pkt(seq, ts, rtp[12:], bool(second & 0x80), ssrc)))
    return out


class TestBoundedDepth:
    def test_burst_keeps_depth_under_max_and_drops_the_oldest(self) -> None:
        jb = JitterBuffer(max_ms=200.0)
        burst = [p for _, p in stream(100)]  # two seconds of audio arriving at once
        for pkt in burst:
            jb.push(pkt, 0.5)
            assert jb.depth_ms <= 200.0
        frames = frames_of(run(jb, [], until=1.0))
        assert jb.stats.overflow_dropped == 100 - len(frames)
        assert [f.sequence for f in frames] == list(range(100 - len(frames), 100))
        assert 200 / 20 - 1 <= len(frames) <= 200 / 20

    def test_latency_does_not_grow_when_nothing_pops(self) -> None:
        jb = JitterBuffer(max_ms=200.0)
        for t, pkt in stream(500):
            jb.push(pkt, t)
            assert jb.depth_ms <= 200.0
        assert jb.stats.overflow_dropped == 490
        # What is left is the newest audio, and all of it is due within max_ms.
        last_arrival = NETWORK_DELAY + 499 * 0.02
        outputs = jb.pop(last_arrival) + jb.pop(last_arrival + 0.2)
        frames = [o for o in outputs if isinstance(o, JitterFrame)]
        assert [f.sequence for f in frames] == list(range(490, 500))

    def test_sender_running_fast_is_bounded(self) -> None:
        jb = JitterBuffer(max_ms=120.0)
        arrivals = [(i * 0.015, p) for i, (_, p) in enumerate(stream(400))]  # 33 % fast
        delays = []
        for t, o in run(jb, arrivals, until=6.5):
            assert jb.depth_ms <= 120.0
            if isinstance(o, JitterFrame):
                delays.append(t - arrivals[o.sequence][0])
        assert max(delays) <= 0.12 + TICK
        assert jb.stats.overflow_dropped > 0


class TestSequenceWrap:
    def test_sequence_and_timestamp_wrap_without_loss(self) -> None:
        arrivals = stream(20, first_seq=65530, first_ts=2**32 - 800)
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=0.5)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == [*range(65530, 65536), *range(14)]
        assert [f.timestamp for f in frames] == [2**32 - 800 + 160 * i for i in range(20)]
        stats = jb.stats
        assert (stats.lost, stats.resyncs, stats.late, stats.invalid) == (0, 0, 0, 0)

    def test_reordering_across_the_wrap(self) -> None:
        arrivals = stream(10, first_seq=65532)
        (t3, p3), (t4, p4) = arrivals[3], arrivals[4]  # 65535 and 0 swap
        arrivals[3], arrivals[4] = (t3, p4), (t4, p3)
        jb = JitterBuffer()
        frames = frames_of(run(jb, arrivals, until=0.4))
        assert [f.sequence for f in frames] == [65532, 65533, 65534, 65535, *range(6)]
        assert jb.stats.reordered == 1


class TestRfc3550AppendixA1SequenceRestart:
    """Jumps beyond MAX_DROPOUT / MAX_MISORDER, new SSRCs and timestamp jumps resync cleanly."""

    def test_sequence_jump_of_30000_resyncs_without_a_hole(self) -> None:
        arrivals = stream(50) + stream(
            50, first_seq=30050, first_ts=123_456_789, start=1.0, ssrc=0x1234
        )
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=2.2)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == [*range(50), *range(30050, 30100)]
        assert_contiguous(outputs[:100])
        assert jb.stats.resyncs == 1
        assert jb.stats.lost == 0

    def test_new_ssrc_resyncs(self) -> None:
        arrivals = stream(50) + stream(50, first_seq=9000, first_ts=80_000, start=1.0, ssrc=7)
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=2.2)
        assert [f.sequence for f in frames_of(outputs)] == [*range(50), *range(9000, 9050)]
        assert_contiguous(outputs[:100])
        assert jb.stats.resyncs == 1

    def test_timestamp_jump_of_many_seconds_resyncs(self) -> None:
        arrivals = stream(50) + stream(50, first_seq=50, first_ts=8000 * 3600, start=1.0)
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=2.2)
        assert [f.sequence for f in frames_of(outputs)] == list(range(100))
        assert_contiguous(outputs[:100])
        assert jb.stats.resyncs == 1

    def test_timestamp_jump_backwards_resyncs_without_loss(self) -> None:
        back = (50 * 160 - 8000 * 3600) & 0xFFFFFFFF  # an hour back, sequence numbers continue
        arrivals = stream(50) + stream(50, first_seq=50, first_ts=back, start=1.0)
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=2.2)
        assert [f.sequence for f in frames_of(outputs)] == list(range(100))
        assert_contiguous(outputs[:100])
        assert (jb.stats.resyncs, jb.stats.late, jb.stats.lost) == (1, 0, 0)

    @pytest.mark.parametrize(
        "stray",
        [
            Pkt(30020, 999_999, bytes(160)),  # sequence far away
            Pkt(20, 3200, bytes(160), ssrc=0xBAD),  # another source
            Pkt(20, 3200 + 8000 * 60, bytes(160)),  # timestamp a minute ahead
        ],
    )
    def test_single_stray_packet_is_discarded(self, stray: Pkt) -> None:
        arrivals = stream(50)
        arrivals.insert(21, (arrivals[20][0] + 0.005, stray))
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=1.2)
        assert [f.sequence for f in frames_of(outputs)] == list(range(50))
        assert_contiguous(outputs[:50])
        assert (jb.stats.invalid, jb.stats.resyncs) == (1, 0)


class TestLongSilence:
    @pytest.mark.parametrize("timestamps_advance", [True, False])
    def test_minutes_without_packets_produce_bounded_output(self, timestamps_advance: bool) -> None:
        silence = 180.0
        resume_ts = (50 * 160 + int(silence * RATE)) if timestamps_advance else 50 * 160
        arrivals = stream(50) + stream(50, first_seq=50, first_ts=resume_ts, start=1.0 + silence)
        arrivals[50] = (arrivals[50][0], Pkt(50, resume_ts, arrivals[50][1].payload, marker=True))
        jb = JitterBuffer(max_conceal_ms=300.0)
        outputs = run(jb, arrivals, until=2.2 + silence)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == list(range(100))
        items = [o for _, o in outputs]
        between = items[items.index(frames[49]) + 1 : items.index(frames[50])]
        assert all(isinstance(o, Gap) for o in between)
        assert sum(o.samples for o in between) == 2400  # capped at 300 ms
        resumed_at = next(t for t, o in outputs if isinstance(o, JitterFrame) and o.sequence == 50)
        assert resumed_at - arrivals[50][0] <= 0.04 + TICK + 1e-9
        # The output timeline kept running through the silence.
        assert frames[50].timestamp - frames[49].timestamp == pytest.approx(
            silence * RATE, abs=0.1 * RATE
        )
        assert jb.stats.lost == 0


class TestRfc3550AppendixA8Jitter:
    def test_constant_transit_time_gives_zero_jitter(self) -> None:
        jb = JitterBuffer()
        for t, pkt in stream(100):
            jb.push(pkt, t)
        assert jb.stats.jitter_ms == pytest.approx(0.0, abs=1e-6)

    def test_estimate_follows_the_rfc_formula(self) -> None:
        rnd = random.Random(3550)
        jb = JitterBuffer()
        expected = 0.0
        previous: tuple[float, int] | None = None
        for i in range(300):
            ts = i * 160
            arrival = i * 0.02 + rnd.uniform(0.0, 0.05)
            jb.push(Pkt(i, ts, bytes(160)), arrival)
            if previous is not None:
                d = (arrival - previous[0]) * RATE - (ts - previous[1])
                expected += (abs(d) - expected) / 16
            previous = (arrival, ts)
        assert jb.stats.jitter_ms == pytest.approx(expected / RATE * 1000.0, rel=1e-9)

    def test_target_delay_adapts_to_jitter_within_bounds(self) -> None:
        calm = JitterBuffer(min_ms=40.0, max_ms=300.0)
        for t, pkt in stream(200):
            calm.push(pkt, t)
        assert calm.stats.target_ms == 40.0
        rnd = random.Random(7)
        rough = JitterBuffer(min_ms=40.0, max_ms=300.0)
        for t, pkt in stream(200):
            rough.push(pkt, t + rnd.uniform(0.0, 0.08))
        assert 40.0 < rough.stats.target_ms <= 300.0
        assert rough.stats.target_ms == pytest.approx(4 * rough.stats.jitter_ms)

    def test_jittery_network_loses_little_after_warm_up(self) -> None:
        rnd = random.Random(11)
        arrivals = [(t + rnd.uniform(0.0, 0.06), p) for t, p in stream(1000)]
        jb = JitterBuffer()
        outputs = run(jb, arrivals, until=20.5)
        played = {f.sequence for f in frames_of(outputs)}
        missing_after_warm_up = [s for s in range(100, 1000) if s not in played]
        assert len(missing_after_warm_up) <= 9  # under 1 %


class TestBadInput:
    @pytest.mark.parametrize(
        "packet",
        [
            None,
            object(),
            Pkt(1, 160, "text"),  # type: ignore[arg-type]
            Pkt("1", 160, bytes(160)),  # type: ignore[arg-type]
            Pkt(1, 160, b""),
            Pkt(1, 160, bytes(5000)),  # longer than any packet
        ],
    )
    def test_malformed_packet_is_counted_not_raised(self, packet: object) -> None:
        jb = JitterBuffer()
        jb.push(packet, 0.0)  # type: ignore[arg-type]
        assert jb.stats.invalid == 1
        assert jb.stats.received == 0
        assert jb.pop(1.0) == []

    @pytest.mark.parametrize("now", [float("nan"), float("inf"), "soon"])
    def test_bad_time_is_counted_not_raised(self, now: object) -> None:
        jb = JitterBuffer()
        jb.push(Pkt(1, 160, bytes(160)), now)  # type: ignore[arg-type]
        assert jb.stats.invalid == 1
        jb.push(Pkt(1, 160, bytes(160)), 0.0)
        assert jb.pop(now) == []  # type: ignore[arg-type]

    def test_bad_samples_of_is_counted_not_raised(self) -> None:
        def broken(payload: bytes) -> int:
            raise ValueError("codec says no")

        jb = JitterBuffer(samples_of=broken)
        jb.push(Pkt(1, 160, bytes(160)), 0.0)
        assert jb.stats.invalid == 1

    @pytest.mark.parametrize(
        "kwargs",
        [{"clock_rate": 0}, {"min_ms": 50.0, "max_ms": 40.0}, {"max_conceal_ms": -1.0}],
    )
    def test_bad_configuration_is_rejected(self, kwargs: dict[str, float]) -> None:
        with pytest.raises(ValueError, match=r"must|need"):
            JitterBuffer(**kwargs)  # type: ignore[arg-type]


class TestStats:
    def test_counters_of_a_scripted_session(self) -> None:
        arrivals = stream(30)
        del arrivals[10]  # lost
        arrivals[14] = (arrivals[14][0] + 0.3, arrivals[14][1])  # late (seq 15)
        arrivals.insert(5, (arrivals[4][0] + 0.001, arrivals[4][1]))  # duplicate of 4
        (ta, a), (tb, b) = arrivals[20], arrivals[21]
        arrivals[20], arrivals[21] = (ta, b), (tb, a)  # reordered
        jb = JitterBuffer()
        run(jb, arrivals, until=0.7)
        stats = jb.stats
        assert stats.received == 30
        assert (stats.lost, stats.late, stats.duplicated, stats.reordered) == (2, 1, 1, 1)
        assert stats.overflow_dropped == 0
        assert stats.depth_ms == 0.0
        assert stats.target_ms >= 40.0
        assert stats.jitter_ms > 0.0


push_op = st.tuples(
    st.just("push"),
    st.one_of(st.integers(-3, 6), st.integers(0, 65535)),  # sequence step, or absolute
    st.one_of(st.integers(-400, 800), st.integers(0, 2**32 - 1)),  # timestamp step, or absolute
    st.sampled_from([1, 1, 1, 2]),  # ssrc
    st.sampled_from([0, 1, 80, 160, 160, 240, 480, 3000]),  # payload length
    st.one_of(st.floats(0.0, 0.05), st.floats(0.0, 400.0)),  # time step
    st.booleans(),  # step (True) or absolute values (False)
)
pop_op = st.tuples(st.just("pop"), st.one_of(st.floats(0.0, 0.05), st.floats(0.0, 120.0)))


class TestEarlyRelease:
    """``early=True``: a packet next in order goes at the first pop after it arrived; the target
    delay only bounds the wait for a missing one."""

    def test_a_packet_in_order_goes_at_the_first_pop_after_it_arrived(self) -> None:
        jb = JitterBuffer(min_ms=40.0, early=True)
        jb.push(Pkt(7, 1000, bytes(160)), 10.0)
        (frame,) = jb.pop(10.0)
        assert frame == JitterFrame(bytes(160), 1000, 7, 160, False)
        jb.push(Pkt(8, 1160, bytes(160)), 10.021)
        assert jb.pop(10.021) == [JitterFrame(bytes(160), 1160, 8, 160, False)]
        assert jb.pop(10.05) == []  # the next one is not here, and not yet given up

    def test_next_due_is_when_the_next_packet_is_expected_at_the_earliest(self) -> None:
        jb = JitterBuffer(min_ms=40.0, early=True)
        jb.push(Pkt(7, 1000, bytes(160)), 10.0)
        jb.push(Pkt(8, 1160, bytes(160)), 10.025)  # 5 ms later than the first one's transit
        assert len(jb.pop(10.025)) == 2
        assert jb.next_due() == pytest.approx(10.040)  # ts 1320 at the first packet's transit

    def test_a_late_packet_is_waited_for_and_the_next_ones_keep_their_order(self) -> None:
        arrivals = stream(10)
        arrivals[5] = (arrivals[5][0] + 0.035, arrivals[5][1])  # 35 ms late, after 6 and 7
        jb = JitterBuffer(min_ms=40.0, early=True)
        outputs = run(jb, arrivals, until=0.4)
        frames = frames_of(outputs)
        assert [f.sequence for f in frames] == list(range(10))
        assert gaps_of(played(outputs)) == []
        assert (jb.stats.lost, jb.stats.late) == (0, 0)
        # 6 and 7 went no earlier than 5, and all three at the first tick after 5 came.
        released = {o.sequence: t for t, o in outputs if isinstance(o, JitterFrame)}
        assert released[5] == released[6] == released[7] >= arrivals[5][0]

    def test_a_missing_packet_is_concealed_after_the_target_delay_and_counted_late(
        self,
    ) -> None:
        arrivals = stream(10)
        arrivals[5] = (arrivals[5][0] + 0.2, arrivals[5][1])
        jb = JitterBuffer(min_ms=40.0, early=True)
        outputs = run(jb, arrivals, until=0.6)
        assert [f.sequence for f in frames_of(outputs)] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        (gap_time, gap) = next((t, o) for t, o in outputs if isinstance(o, Gap))
        assert gap == Gap(160, 800)
        # Given up 40 ms (the target delay) after packet 5 was expected, not before.
        assert gap_time >= stream(10)[5][0] + 0.040
        assert_contiguous(played(outputs))
        assert (jb.stats.lost, jb.stats.late) == (1, 1)

    def test_swapped_packets_come_out_in_order(self) -> None:
        arrivals = stream(12)
        (t3, p3), (t4, p4) = arrivals[3], arrivals[4]
        arrivals[3], arrivals[4] = (t3, p4), (t4, p3)
        jb = JitterBuffer(min_ms=40.0, early=True)
        # Popped as each packet arrives, as a session catching up on arrival does.
        outputs: list[tuple[float, JitterOutput]] = []
        for t, p in arrivals:
            jb.push(p, t)
            outputs += [(t, o) for o in jb.pop(t)]
        assert [f.sequence for f in frames_of(outputs)] == list(range(12))
        assert jb.stats.reordered == 1

    @settings(max_examples=100, deadline=None)
    @given(delays=st.lists(st.floats(0.0, 0.015), min_size=5, max_size=60))
    def test_with_jitter_below_the_target_every_frame_goes_at_its_arrival(
        self, delays: list[float]
    ) -> None:
        """Popped at each arrival: a frame whose predecessors are out goes at once, and nothing
        is concealed while the jitter stays under the target delay."""
        jb = JitterBuffer(min_ms=20.0, early=True)
        arrivals = sorted(
            (t + delay, p) for (t, p), delay in zip(stream(len(delays)), delays, strict=True)
        )
        released: dict[int, float] = {}
        for t, p in arrivals:
            jb.push(p, t)
            released.update((o.sequence, t) for o in jb.pop(t) if isinstance(o, JitterFrame))
        assert sorted(released) == list(range(len(delays)))
        arrived = {p.sequence: t for t, p in arrivals}
        for seq, t in released.items():
            assert t == max(arrived[s] for s in range(seq + 1))
        assert jb.stats.concealed_ms == 0.0


class TestFuzzedStreams:
    @settings(max_examples=300, deadline=None)
    @given(ops=st.lists(st.one_of(push_op, pop_op), max_size=300), early=st.booleans())
    def test_invariants_hold_for_any_stream(
        self, ops: list[tuple[object, ...]], early: bool
    ) -> None:
        jb = JitterBuffer(min_ms=40.0, max_ms=200.0, max_conceal_ms=300.0, early=early)
        now = 1000.0
        seq, ts = 100, 16000
        last_timestamp: int | None = None
        concealed_since_frame = 0
        for op in ops:
            if op[0] == "push":
                _, seq_arg, ts_arg, ssrc, size, dt, relative = op
                assert isinstance(seq_arg, int)
                assert isinstance(ts_arg, int)
                assert isinstance(ssrc, int)
                assert isinstance(size, int)
                assert isinstance(dt, float)
                seq = (seq + seq_arg) & 0xFFFF if relative else seq_arg
                ts = (ts + ts_arg) & 0xFFFFFFFF if relative else ts_arg
                now += dt
                jb.push(Pkt(seq, ts, bytes(size), ssrc=ssrc), now)
            else:
                dt = op[1]
                assert isinstance(dt, float)
                now += dt
                for out in jb.pop(now):
                    assert out.samples > 0
                    if last_timestamp is not None:
                        assert out.timestamp > last_timestamp
                    last_timestamp = out.timestamp
                    if isinstance(out, Gap):
                        concealed_since_frame += out.samples
                        assert concealed_since_frame <= 2400
                    else:
                        concealed_since_frame = 0
            assert 0.0 <= jb.depth_ms <= 200.0
            stats = jb.stats
            assert stats.lost >= 0
            assert 40.0 <= stats.target_ms <= 200.0
