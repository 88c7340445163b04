"""RFC 4733 telephone-events: payload format, one report per key press, the sender's packets."""

# Test classes carry RFC section numbers (Section2_5_2), which N801 would reject.

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.dtmf import (
    DIGITS,
    END_RETRANSMISSIONS,
    DtmfDigit,
    DtmfReceiver,
    DtmfSender,
    TelephoneEvent,
    event_code,
)
from media.rtp import RtpPacket, RtpSender
from tests.pcap import read_pcap

SIPP_DTMF = {str(n): f"dtmf_2833_{n}.pcap" for n in range(10)} | {
    "*": "dtmf_2833_star.pcap",
    "#": "dtmf_2833_pound.pcap",
}


def event_packet(
    digit: str, duration: int, *, end: bool = False, ts: int = 8000, seq: int = 1, ssrc: int = 7
) -> RtpPacket:
    payload = TelephoneEvent(event_code(digit), end, 10, duration).serialize()
    return RtpPacket(101, seq, ts, ssrc, payload, marker=duration == 0)


def feed_all(receiver: DtmfReceiver, packets: list[RtpPacket], now: float = 0.0) -> list[DtmfDigit]:
    digits = []
    for index, packet in enumerate(packets):
        digit = receiver.feed(packet, now + index * 0.02)
        if digit is not None:
            digits.append(digit)
    return digits


def key_press(digit: str, ts: int, updates: int = 5, tick: int = 160) -> list[RtpPacket]:
    """Start, updates and three end packets, as a well-behaved sender sends them."""
    packets = [event_packet(digit, n * tick, ts=ts, seq=ts + n) for n in range(updates)]
    end = updates * tick
    packets += [event_packet(digit, end, end=True, ts=ts, seq=ts + updates + n) for n in range(3)]
    return packets


class TestRfc4733Section2_3PayloadFormat:
    def test_parse(self) -> None:
        assert TelephoneEvent.parse(bytes.fromhex("0b8a0320")) == TelephoneEvent(11, True, 10, 800)

    def test_serialize(self) -> None:
        assert TelephoneEvent(5, False, 63, 0xFFFF).serialize() == bytes.fromhex("053fffff")

    def test_reserved_bit_is_ignored(self) -> None:
        assert TelephoneEvent.parse(bytes.fromhex("01ca00a0")) == TelephoneEvent(1, True, 10, 160)

    def test_octets_after_the_first_event_are_ignored(self) -> None:
        assert TelephoneEvent.parse(bytes.fromhex("02050140ffff")).event == 2

    @pytest.mark.parametrize("size", [0, 1, 2, 3])
    def test_short_payload_is_rejected(self, size: int) -> None:
        with pytest.raises(ValueError, match="need 4"):
            TelephoneEvent.parse(bytes(size))

    @pytest.mark.parametrize(
        "event",
        [
            TelephoneEvent(256, False, 0, 0),
            TelephoneEvent(1, False, 64, 0),
            TelephoneEvent(1, False, 0, 0x10000),
        ],
    )
    def test_serialize_rejects_out_of_range_fields(self, event: TelephoneEvent) -> None:
        with pytest.raises(ValueError, match=r"range|16-bit"):
            event.serialize()

    @given(st.integers(0, 255), st.booleans(), st.integers(0, 63), st.integers(0, 0xFFFF))
    def test_round_trip(self, code: int, end: bool, volume: int, duration: int) -> None:
        event = TelephoneEvent(code, end, volume, duration)
        assert TelephoneEvent.parse(event.serialize()) == event

    @given(st.binary(max_size=12))
    def test_parse_raises_only_value_error(self, data: bytes) -> None:
        try:
            event = TelephoneEvent.parse(data)
        except ValueError:
            assert len(data) < 4
        else:
            assert event.serialize()[0] == data[0]


class TestRfc4733Section3_2DtmfEvents:
    def test_event_codes(self) -> None:
        assert [event_code(d) for d in "0123456789*#ABCD"] == list(range(16))
        assert event_code("d") == 15
        assert TelephoneEvent(11, False, 0, 0).digit == "#"
        assert TelephoneEvent(16, False, 0, 0).digit is None  # flash

    @pytest.mark.parametrize("digit", ["", "E", "12", " ", "é"])
    def test_invalid_digit_is_a_value_error(self, digit: str) -> None:
        with pytest.raises(ValueError, match="not a DTMF digit"):
            event_code(digit)


class TestRfc4733Section2_5EndOfEventOnSippCaptures:
    @pytest.mark.parametrize(("digit", "name"), sorted(SIPP_DTMF.items()))
    def test_each_capture_gives_exactly_its_digit(
        self, sipp_share: Path, digit: str, name: str
    ) -> None:
        datagrams = read_pcap(sipp_share / name).datagrams
        assert len(datagrams) == 10  # start, 6 updates, end sent 3 times
        receiver = DtmfReceiver()
        reported = []
        for datagram in datagrams:
            packet = RtpPacket.parse(datagram.payload)
            assert packet.payload_type == 101
            result = receiver.feed(packet, datagram.timestamp)
            if result is not None:
                reported.append(result)
        reported_later = receiver.poll(datagrams[-1].timestamp + 10.0)
        assert reported_later is None
        assert len(reported) == 1
        assert reported[0].digit == digit
        assert reported[0].duration_ms == 280  # 2240 samples at 8 kHz
        assert reported[0].timestamp == RtpPacket.parse(datagrams[0].payload).timestamp
        assert receiver.malformed == receiver.other_events == 0


class TestRfc4733Section2_5_2ReceiverProcedures:
    def test_retransmitted_end_packets_report_once(self) -> None:
        receiver = DtmfReceiver()
        digits = feed_all(receiver, key_press("7", ts=1000))
        assert digits == [DtmfDigit("7", 100, 1000)]
        assert receiver.next_timeout() is None

    def test_report_comes_with_the_first_end_packet(self) -> None:
        receiver = DtmfReceiver()
        packets = key_press("3", ts=1000, updates=4)
        results = [receiver.feed(p, 0.0) for p in packets]
        assert results[:4] == [None] * 4
        assert results[4] == DtmfDigit("3", 80, 1000)
        assert results[5:] == [None, None]

    def test_lost_start_only_end_packets(self) -> None:
        receiver = DtmfReceiver()
        packets = [event_packet("9", 1600, end=True, ts=500, seq=n) for n in range(3)]
        assert feed_all(receiver, packets) == [DtmfDigit("9", 200, 500)]

    def test_lost_start_and_first_updates(self) -> None:
        receiver = DtmfReceiver()
        packets = key_press("A", ts=500, updates=6)[3:]
        assert feed_all(receiver, packets) == [DtmfDigit("A", 120, 500)]

    def test_lost_end_reported_by_poll_after_the_timeout(self) -> None:
        receiver = DtmfReceiver(end_timeout=0.3)
        packets = key_press("5", ts=2000, updates=6)[:6]
        assert feed_all(receiver, packets, now=10.0) == []
        last_seen = 10.0 + 5 * 0.02
        assert receiver.next_timeout() == pytest.approx(last_seen + 0.3)
        assert receiver.poll(last_seen + 0.29) is None
        assert receiver.poll(last_seen + 0.3) == DtmfDigit("5", 100, 2000)
        assert receiver.poll(last_seen + 5.0) is None
        assert receiver.next_timeout() is None

    def test_late_end_after_the_timeout_is_not_reported_again(self) -> None:
        receiver = DtmfReceiver(end_timeout=0.3)
        press = key_press("5", ts=2000, updates=6)
        feed_all(receiver, press[:6])
        assert receiver.poll(5.0) is not None
        assert feed_all(receiver, press[6:], now=5.1) == []

    def test_lost_end_reported_when_the_next_event_starts(self) -> None:
        receiver = DtmfReceiver()
        first = key_press("1", ts=1000, updates=5)[:5]
        second = key_press("2", ts=3000, updates=5)
        reported = feed_all(receiver, first + second)
        assert reported == [DtmfDigit("1", 80, 1000), DtmfDigit("2", 100, 3000)]

    def test_two_events_in_a_row_where_the_second_has_only_end_packets(self) -> None:
        receiver = DtmfReceiver()
        assert receiver.feed(event_packet("1", 480, ts=1000), 0.0) is None
        end_only = event_packet("2", 800, end=True, ts=3000)
        assert receiver.feed(end_only, 0.02) == DtmfDigit("1", 60, 1000)
        assert receiver.next_timeout() == float("-inf")  # another digit is ready
        assert receiver.poll(0.02) == DtmfDigit("2", 100, 3000)
        assert receiver.poll(0.02) is None

    def test_late_packets_of_an_older_event_are_ignored(self) -> None:
        receiver = DtmfReceiver()
        assert receiver.feed(event_packet("4", 160, ts=5000), 0.0) is None
        assert receiver.feed(event_packet("8", 800, end=True, ts=3000), 0.01) is None
        assert feed_all(receiver, [event_packet("4", 320, end=True, ts=5000)]) == [
            DtmfDigit("4", 40, 5000)
        ]

    def test_same_digit_twice_is_two_presses(self) -> None:
        receiver = DtmfReceiver()
        digits = feed_all(receiver, key_press("0", ts=100) + key_press("0", ts=2100))
        assert [d.digit for d in digits] == ["0", "0"]

    def test_timestamp_wrap_between_events(self) -> None:
        receiver = DtmfReceiver()
        digits = feed_all(receiver, key_press("6", ts=0xFFFFFF00) + key_press("6", ts=0x500))
        assert [d.timestamp for d in digits] == [0xFFFFFF00, 0x500]

    def test_events_of_two_sources_are_kept_apart(self) -> None:
        receiver = DtmfReceiver()
        a = event_packet("1", 800, end=True, ts=100, ssrc=1)
        b = event_packet("2", 800, end=True, ts=100, ssrc=2)
        assert feed_all(receiver, [a, b, a, b]) == [
            DtmfDigit("1", 100, 100),
            DtmfDigit("2", 100, 100),
        ]

    def test_long_event_segments_are_joined(self) -> None:
        # RFC 4733 §2.5.1.3: past 0xFFFF samples the event goes on with a new timestamp.
        receiver = DtmfReceiver()
        first = [event_packet("#", d, ts=10000) for d in (0, 32000, 0xFFF0)]
        second = [event_packet("#", d, ts=10000 + 0xFFF0) for d in (160, 8000)]
        end = [event_packet("#", 8000, end=True, ts=10000 + 0xFFF0)] * 3
        assert feed_all(receiver, first + second + end) == [
            DtmfDigit("#", (0xFFF0 + 8000) // 8, 10000)
        ]

    def test_malformed_and_non_dtmf_events_are_counted(self) -> None:
        receiver = DtmfReceiver()
        assert receiver.feed(RtpPacket(101, 1, 2, 3, b"\x01\x02"), 0.0) is None
        flash = TelephoneEvent(16, True, 10, 800).serialize()
        assert receiver.feed(RtpPacket(101, 2, 2, 3, flash), 0.0) is None
        assert (receiver.malformed, receiver.other_events) == (1, 1)
        assert receiver.next_timeout() is None

    def test_wideband_clock_rate(self) -> None:
        receiver = DtmfReceiver(clock_rate=16000)
        assert feed_all(receiver, [event_packet("1", 3200, end=True)]) == [
            DtmfDigit("1", 200, 8000)
        ]

    @given(
        st.lists(
            st.builds(
                RtpPacket,
                payload_type=st.just(101),
                sequence=st.integers(0, 0xFFFF),
                timestamp=st.sampled_from([0, 160, 320, 0xFFFFFFF0]) | st.integers(0, 0xFFFFFFFF),
                ssrc=st.sampled_from([1, 2]),
                payload=st.binary(max_size=8),
                marker=st.booleans(),
            ),
            max_size=40,
        ),
        st.lists(st.floats(0, 1), min_size=40, max_size=40),
    )
    def test_feed_and_poll_never_raise(self, packets: list[RtpPacket], gaps: list[float]) -> None:
        receiver = DtmfReceiver()
        now = 0.0
        reported = 0
        for packet, gap in zip(packets, gaps, strict=False):
            now += gap
            reported += receiver.feed(packet, now) is not None
            reported += receiver.poll(now) is not None
        while receiver.poll(now + 10.0) is not None:
            reported += 1
        assert receiver.next_timeout() is None
        assert reported <= len(packets)


class TestRfc4733Section2_5_1SenderProcedures:
    def test_frames_of_a_160_ms_press(self) -> None:
        frames = DtmfSender().packets_for("5", duration_ms=160)
        events = [TelephoneEvent.parse(f.payload) for f in frames]
        assert len(frames) == 8 + 2  # 8 updates, then the end twice more
        assert [f.marker for f in frames] == [True] + [False] * 9
        assert [e.duration for e in events] == [160, 320, 480, 640, 800, 960, 1120] + [1280] * 3
        assert [e.end for e in events] == [False] * 7 + [True] * END_RETRANSMISSIONS
        assert {(e.event, e.volume) for e in events} == {(5, 10)}
        assert {f.samples for f in frames} == {160}
        assert [f.end for f in frames] == [e.end for e in events]
        assert [f.duration for f in frames] == [e.duration for e in events]

    def test_duration_not_a_multiple_of_ptime(self) -> None:
        frames = DtmfSender().packets_for("1", duration_ms=250, ptime_ms=20)
        durations = [TelephoneEvent.parse(f.payload).duration for f in frames]
        assert durations[-4:] == [1920, 2000, 2000, 2000]

    def test_30_ms_packets(self) -> None:
        frames = DtmfSender().packets_for("1", duration_ms=90, ptime_ms=30)
        assert [f.samples for f in frames] == [240] * 5
        assert [f.duration for f in frames] == [240, 480, 720, 720, 720]

    @pytest.mark.parametrize(
        ("digit", "kwargs"),
        [
            ("X", {}),
            ("", {}),
            ("1", {"volume": 64}),
            ("1", {"duration_ms": 10}),
            ("1", {"ptime_ms": 0}),
            ("1", {"duration_ms": 9000}),
        ],
    )
    def test_invalid_requests_are_value_errors(self, digit: str, kwargs: dict[str, int]) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 - one per bad argument
            DtmfSender().packets_for(digit, **kwargs)

    def test_payload_type_must_be_dynamic(self) -> None:
        with pytest.raises(ValueError, match="dynamic"):
            DtmfSender(payload_type=8)

    @pytest.mark.parametrize("digit", DIGITS)
    def test_sender_to_receiver_gives_the_digit_back(self, digit: str) -> None:
        rtp = RtpSender(0, ssrc=0x1234, sequence=0xFFFA, timestamp=0xFFFFFE00)
        dtmf = DtmfSender(payload_type=101)
        receiver = DtmfReceiver()
        datagrams = [rtp.build(bytes(160), 160)]  # audio before
        start = rtp.next_timestamp
        for frame in dtmf.packets_for(digit, duration_ms=200):
            datagrams.append(
                rtp.build(
                    frame.payload,
                    frame.samples,
                    frame.marker,
                    payload_type=dtmf.payload_type,
                    timestamp=start,
                )
            )
        datagrams.append(rtp.build(bytes(160), 160))  # audio after
        packets = [RtpPacket.parse(d) for d in datagrams]
        events = [p for p in packets if p.payload_type == 101]
        assert {p.timestamp for p in events} == {start}
        assert [p.sequence for p in packets] == [(0xFFFA + n) & 0xFFFF for n in range(len(packets))]
        # The audio after the event continues the clock past the event and its retransmissions.
        assert packets[-1].timestamp == (start + 160 * len(events)) & 0xFFFFFFFF
        assert feed_all(receiver, events) == [DtmfDigit(digit, 200, start)]

    def test_receiver_copes_with_losing_every_end_packet(self) -> None:
        frames = DtmfSender().packets_for("C", duration_ms=100)
        packets = [
            RtpPacket(101, n, 777, 1, f.payload, f.marker)
            for n, f in enumerate(frames)
            if not f.end
        ]
        receiver = DtmfReceiver()
        assert feed_all(receiver, packets) == []
        assert receiver.poll(60.0) == DtmfDigit("C", 80, 777)
