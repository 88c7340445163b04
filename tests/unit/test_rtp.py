"""RTP packets (RFC 3550): header fields, parse/serialize round trips, wrap arithmetic, rejects."""

# Test classes carry RFC section numbers (Section5_3_1), which N801 would reject.

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.rtp import (
    RtpCounters,
    RtpPacket,
    RtpParseError,
    RtpSender,
    parse_or_count,
    seq_diff,
    seq_newer,
    ts_diff,
)
from tests.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    PcapError,
    UdpDatagram,
    read_pcap,
)

# Version 2, marker, PT 0, seq 0x1234, ts 0xDEADBEEF, SSRC 0x01020304, 4 octets of payload.
MINIMAL = bytes.fromhex("8080 1234 deadbeef 01020304 aabbccdd")


def header(first: int = 0x80, second: int = 0, seq: int = 1, ts: int = 2, ssrc: int = 3) -> bytes:
    return struct.pack("!BBHII", first, second, seq, ts, ssrc)


def assert_same_packet_on_the_wire(packet: RtpPacket, data: bytes) -> None:
    """Serializing gives the datagram back, but for the padding octets (written as zeros)."""
    wire = packet.serialize()
    unpadded = len(data) - packet.padding
    assert len(wire) == len(data)
    assert wire[:unpadded] == data[:unpadded]
    assert wire[-1:] == data[-1:]


packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=200),
    marker=st.booleans(),
    csrcs=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    extension=st.none()
    | st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4])),
    padding=st.integers(0, 255),
)


class TestRfc3550Section5_1FixedHeader:
    def test_fields(self) -> None:
        packet = RtpPacket.parse(MINIMAL)
        assert packet == RtpPacket(
            payload_type=0,
            sequence=0x1234,
            timestamp=0xDEADBEEF,
            ssrc=0x01020304,
            payload=b"\xaa\xbb\xcc\xdd",
            marker=True,
        )

    def test_serialize_is_the_wire_form(self) -> None:
        assert RtpPacket.parse(MINIMAL).serialize() == MINIMAL

    def test_header_only_packet_has_empty_payload(self) -> None:
        packet = RtpPacket.parse(header(second=8))
        assert packet.payload == b""
        assert packet.payload_type == 8
        assert not packet.marker

    def test_marker_and_payload_type_share_an_octet(self) -> None:
        packet = RtpPacket(101, 1, 2, 3, b"", marker=True)
        assert packet.serialize()[1] == 0x80 | 101
        assert RtpPacket.parse(packet.serialize()).marker

    @pytest.mark.parametrize("version", [0, 1, 3])
    def test_version_other_than_2_is_rejected(self, version: int) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=version << 6) + b"x")
        assert caught.value.reason == RtpParseError.BAD_VERSION

    @pytest.mark.parametrize("size", range(12))
    def test_shorter_than_the_fixed_header_is_rejected(self, size: int) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(MINIMAL[:size])
        assert caught.value.reason == RtpParseError.TOO_SHORT

    def test_parse_error_is_a_value_error(self) -> None:
        assert issubclass(RtpParseError, ValueError)

    @pytest.mark.parametrize(
        "packet",
        [
            RtpPacket(128, 0, 0, 0, b""),
            RtpPacket(0, 0x10000, 0, 0, b""),
            RtpPacket(0, 0, 1 << 32, 0, b""),
            RtpPacket(0, 0, 0, -1, b""),
            RtpPacket(0, 0, 0, 0, b"", csrcs=tuple(range(16))),
            RtpPacket(0, 0, 0, 0, b"", extension=(0x10000, b"")),
            RtpPacket(0, 0, 0, 0, b"", extension=(1, b"abc")),
            RtpPacket(0, 0, 0, 0, b"", padding=256),
        ],
    )
    def test_serialize_rejects_out_of_range_fields(self, packet: RtpPacket) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 - the message varies by field
            packet.serialize()


class TestRfc3550Section5_1Csrc:
    def test_csrc_list(self) -> None:
        data = header(first=0x82) + struct.pack("!II", 7, 0xFFFFFFFF) + b"pay"
        packet = RtpPacket.parse(data)
        assert packet.csrcs == (7, 0xFFFFFFFF)
        assert packet.payload == b"pay"
        assert packet.serialize() == data

    def test_csrc_count_past_end_is_rejected(self) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0x83) + bytes(8))
        assert caught.value.reason == RtpParseError.CSRC_PAST_END

    def test_fifteen_csrcs(self) -> None:
        packet = RtpPacket(0, 1, 2, 3, b"x", csrcs=tuple(range(15)))
        assert RtpPacket.parse(packet.serialize()) == packet


class TestRfc3550Section5_3_1HeaderExtension:
    def test_extension(self) -> None:
        data = header(first=0x90) + struct.pack("!HH", 0xBEDE, 1) + b"\x10\xff\x00\x00" + b"pay"
        packet = RtpPacket.parse(data)
        assert packet.extension == (0xBEDE, b"\x10\xff\x00\x00")
        assert packet.payload == b"pay"
        assert packet.serialize() == data

    def test_empty_extension(self) -> None:
        data = header(first=0x90) + struct.pack("!HH", 1, 0)
        assert RtpPacket.parse(data).extension == (1, b"")

    def test_extension_with_csrcs(self) -> None:
        data = header(first=0x91) + struct.pack("!I", 9) + struct.pack("!HH", 2, 1) + bytes(4)
        packet = RtpPacket.parse(data + b"p")
        assert (packet.csrcs, packet.extension, packet.payload) == ((9,), (2, bytes(4)), b"p")

    def test_missing_extension_header_is_rejected(self) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0x90) + b"\x00\x01")
        assert caught.value.reason == RtpParseError.EXTENSION_PAST_END

    def test_extension_length_past_end_is_rejected(self) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0x90) + struct.pack("!HH", 1, 2) + bytes(7))
        assert caught.value.reason == RtpParseError.EXTENSION_PAST_END


class TestRfc3550Section5_1Padding:
    def test_padding_octets_are_not_kept(self) -> None:
        packet = RtpPacket.parse(header(first=0xA0) + b"pay" + b"\xee\xee\x03")
        assert packet.payload == b"pay"
        assert packet.serialize() == header(first=0xA0) + b"pay" + b"\x00\x00\x03"

    def test_padding_is_removed(self) -> None:
        data = header(first=0xA0) + b"payload" + b"\x00\x00\x03"
        packet = RtpPacket.parse(data)
        assert (packet.payload, packet.padding) == (b"payload", 3)
        assert packet.serialize() == data

    def test_padding_can_be_the_whole_rest(self) -> None:
        packet = RtpPacket.parse(header(first=0xA0) + b"\x00\x00\x00\x04")
        assert (packet.payload, packet.padding) == (b"", 4)

    def test_zero_padding_count_is_rejected(self) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0xA0) + b"pay\x00")
        assert caught.value.reason == RtpParseError.PADDING_ZERO

    def test_padding_past_end_is_rejected(self) -> None:
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0xA0) + b"pay\x05")
        assert caught.value.reason == RtpParseError.PADDING_PAST_END

    def test_padding_cannot_eat_the_extension(self) -> None:
        data = header(first=0xB0) + struct.pack("!HH", 1, 1) + b"\x00\x00\x00\x06"
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(data)
        assert caught.value.reason == RtpParseError.PADDING_PAST_END

    def test_padding_flag_on_header_only_packet_reads_the_last_header_octet(self) -> None:
        # The last octet of the SSRC is then the padding count, which runs past the payload.
        with pytest.raises(RtpParseError) as caught:
            RtpPacket.parse(header(first=0xA0, ssrc=1))
        assert caught.value.reason == RtpParseError.PADDING_PAST_END


class TestRfc3550RoundTrip:
    @given(packets)
    def test_serialize_then_parse_gives_the_packet_back(self, packet: RtpPacket) -> None:
        assert RtpPacket.parse(packet.serialize()) == packet

    @given(st.binary(max_size=300))
    def test_parse_raises_only_rtp_parse_error(self, data: bytes) -> None:
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError:
            return
        assert_same_packet_on_the_wire(packet, data)

    @given(st.binary(min_size=12, max_size=300))
    def test_version_2_garbage_raises_only_rtp_parse_error(self, data: bytes) -> None:
        data = bytes((0x80 | data[0] & 0x3F,)) + data[1:]
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError:
            return
        assert_same_packet_on_the_wire(packet, data)

    def test_sipp_capture_round_trips_byte_for_byte(self, sipp_share: Path) -> None:
        datagrams = read_pcap(sipp_share / "g711a.pcap").datagrams
        for name in ("dtmf_2833_1.pcap", "dtmf_2833_pound.pcap"):
            datagrams += read_pcap(sipp_share / name).datagrams
        assert len(datagrams) > 250
        for datagram in datagrams:
            assert RtpPacket.parse(datagram.payload).serialize() == datagram.payload


class TestRfc3550AppendixA_1SequenceArithmetic:
    @pytest.mark.parametrize(
        ("a", "b", "expected"),
        [
            (5, 3, 2),
            (3, 5, -2),
            (0, 0xFFFF, 1),
            (0xFFFF, 0, -1),
            (10, 0xFFF0, 26),
            (0x7FFF, 0, 0x7FFF),
            (0x8000, 0, -0x8000),
            (0, 0x8000, -0x8000),
        ],
    )
    def test_seq_diff(self, a: int, b: int, expected: int) -> None:
        assert seq_diff(a, b) == expected

    def test_seq_newer_across_the_wrap(self) -> None:
        assert seq_newer(0, 0xFFFF)
        assert not seq_newer(0xFFFF, 0)
        assert not seq_newer(7, 7)

    @pytest.mark.parametrize(
        ("a", "b", "expected"),
        [(160, 0, 160), (0, 160, -160), (80, 0xFFFFFFB0, 160), (0xFFFFFFB0, 80, -160)],
    )
    def test_ts_diff(self, a: int, b: int, expected: int) -> None:
        assert ts_diff(a, b) == expected

    @given(st.integers(0, 0xFFFF), st.integers(-0x8000, 0x7FFF))
    def test_seq_diff_inverts_modular_addition(self, base: int, step: int) -> None:
        assert seq_diff((base + step) & 0xFFFF, base) == step

    @given(st.integers(0, 0xFFFFFFFF), st.integers(-0x80000000, 0x7FFFFFFF))
    def test_ts_diff_inverts_modular_addition(self, base: int, step: int) -> None:
        assert ts_diff((base + step) & 0xFFFFFFFF, base) == step


class TestRtpSender:
    def test_sequence_and_timestamp_advance_and_wrap(self) -> None:
        sender = RtpSender(0, ssrc=0xCAFE, sequence=0xFFFE, timestamp=0xFFFFFF00)
        parsed = [RtpPacket.parse(sender.build(bytes(160), 160)) for _ in range(4)]
        assert [p.sequence for p in parsed] == [0xFFFE, 0xFFFF, 0, 1]
        assert [p.timestamp for p in parsed] == [0xFFFFFF00, 0xFFFFFFA0, 0x40, 0xE0]
        assert {p.ssrc for p in parsed} == {0xCAFE}
        assert (sender.next_sequence, sender.next_timestamp) == (2, 0x180)

    def test_build_carries_marker_and_payload(self) -> None:
        sender = RtpSender(8, ssrc=1, sequence=0, timestamp=0)
        packet = RtpPacket.parse(sender.build(b"\xd5" * 240, 240, marker=True))
        assert (packet.payload_type, packet.marker, packet.payload) == (8, True, b"\xd5" * 240)

    def test_skip_advances_time_without_a_packet(self) -> None:
        sender = RtpSender(0, ssrc=1, sequence=10, timestamp=1000)
        sender.build(bytes(160), 160)
        sender.skip(480)
        packet = RtpPacket.parse(sender.build(bytes(160), 160))
        assert (packet.sequence, packet.timestamp) == (11, 1640)

    def test_overrides_for_one_packet(self) -> None:
        sender = RtpSender(0, ssrc=1, sequence=0, timestamp=5000)
        packet = RtpPacket.parse(sender.build(b"ev", 160, payload_type=101, timestamp=4840))
        assert (packet.payload_type, packet.timestamp) == (101, 4840)
        assert sender.next_timestamp == 5160
        assert RtpPacket.parse(sender.build(b"", 0)).payload_type == 0

    def test_random_start_when_not_given(self) -> None:
        starts = {(s.next_sequence, s.next_timestamp) for s in (RtpSender(0, 1) for _ in range(8))}
        assert len(starts) > 1
        assert all(0 <= seq <= 0xFFFF and 0 <= ts <= 0xFFFFFFFF for seq, ts in starts)

    def test_properties(self) -> None:
        sender = RtpSender(8, ssrc=77, clock_rate=8000)
        assert (sender.payload_type, sender.ssrc, sender.clock_rate) == (8, 77, 8000)

    @pytest.mark.parametrize(("payload_type", "ssrc"), [(128, 1), (-1, 1), (0, 1 << 32)])
    def test_bad_construction_is_a_value_error(self, payload_type: int, ssrc: int) -> None:
        with pytest.raises(ValueError, match="not"):
            RtpSender(payload_type, ssrc)

    def test_bad_payload_type_override_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="payload type"):
            RtpSender(0, 1).build(b"", 0, payload_type=200)


class TestParseOrCount:
    def test_counts_good_packets(self) -> None:
        counters = RtpCounters()
        packet = parse_or_count(MINIMAL, counters)
        assert packet is not None
        assert (counters.datagrams, counters.received, counters.payload_octets) == (1, 1, 4)

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"", RtpParseError.TOO_SHORT),
            (MINIMAL[:11], RtpParseError.TOO_SHORT),
            (b"\x40" + MINIMAL[1:], RtpParseError.BAD_VERSION),
            (header(first=0x8F), RtpParseError.CSRC_PAST_END),
            (header(first=0x90) + b"\x00\x00\x00\x09", RtpParseError.EXTENSION_PAST_END),
            (header(first=0xA0) + b"\x00", RtpParseError.PADDING_ZERO),
            (header(first=0xA0) + b"\xff", RtpParseError.PADDING_PAST_END),
        ],
    )
    def test_truncated_and_garbage_are_counted_not_raised(self, data: bytes, reason: str) -> None:
        counters = RtpCounters()
        assert parse_or_count(data, counters) is None
        assert (counters.malformed, counters.received, counters.last_error) == (1, 0, reason)

    def test_unknown_payload_type_is_counted(self) -> None:
        counters = RtpCounters()
        assert parse_or_count(header(second=18) + b"g729", counters, {0, 8, 101}) is None
        assert parse_or_count(header(second=8) + b"alaw", counters, {0, 8, 101}) is not None
        assert (counters.unknown_payload_type, counters.received) == (1, 1)

    def test_multiplexed_rtcp_is_counted_apart(self) -> None:
        receiver_report = bytes.fromhex("81c90007") + bytes(28)
        counters = RtpCounters()
        assert parse_or_count(receiver_report, counters) is None
        assert (counters.rtcp, counters.malformed, counters.received) == (1, 0, 0)

    def test_sipp_capture_is_all_received(self, sipp_share: Path) -> None:
        counters = RtpCounters()
        for datagram in read_pcap(sipp_share / "g711a.pcap").datagrams:
            assert parse_or_count(datagram.payload, counters, {8}) is not None
        assert counters == RtpCounters(
            datagrams=236, received=236, payload_octets=236 * 240, malformed=0
        )

    @given(st.binary(max_size=300), st.none() | st.frozensets(st.integers(0, 127)))
    def test_never_raises(self, data: bytes, payload_types: frozenset[int] | None) -> None:
        counters = RtpCounters()
        packet = parse_or_count(data, counters, payload_types)
        total = counters.received + counters.malformed
        assert total + counters.unknown_payload_type + counters.rtcp == counters.datagrams == 1
        assert (packet is not None) == (counters.received == 1)


def pcap_file(link_type: int, frames: list[bytes], magic: int = 0xA1B2C3D4) -> bytes:
    out = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, link_type)]
    for n, frame in enumerate(frames):
        out.append(struct.pack("<IIII", 1000 + n, 250000, len(frame), len(frame)) + frame)
    return b"".join(out)


def ipv4_udp(payload: bytes, src_port: int = 4000, dst_port: int = 5000) -> bytes:
    udp = struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, b"\x7f\0\0\1", b"\n\0\0\2"
    )
    return ip + udp


class TestPcapFixtureReader:
    """The reader behind the golden fixtures: the link types it claims, and SIPp's files."""

    def test_sipp_files_are_ethernet(self, sipp_share: Path) -> None:
        names = sorted(p.name for p in sipp_share.glob("*.pcap"))
        assert len(names) == 13
        for name in names:
            capture = read_pcap(sipp_share / name)
            assert capture.link_type == LINKTYPE_ETHERNET
            assert capture.datagrams
            assert all(d.dst[1] in (2006, 10000) for d in capture.datagrams)

    def test_ethernet_with_vlan_tag(self, tmp_path: Path) -> None:
        ethernet = bytes(12) + b"\x81\x00\x00\x05" + b"\x08\x00" + ipv4_udp(MINIMAL)
        path = tmp_path / "vlan.pcap"
        path.write_bytes(pcap_file(LINKTYPE_ETHERNET, [ethernet]))
        (datagram,) = read_pcap(path).datagrams
        assert datagram == UdpDatagram(1000.25, ("127.0.0.1", 4000), ("10.0.0.2", 5000), MINIMAL)

    def test_linux_cooked_capture(self, tmp_path: Path) -> None:
        sll = bytes(14) + b"\x08\x00" + ipv4_udp(MINIMAL)
        arp = bytes(14) + b"\x08\x06" + bytes(28)
        path = tmp_path / "sll.pcap"
        path.write_bytes(pcap_file(LINKTYPE_LINUX_SLL, [arp, sll], magic=0xA1B23C4D))
        (datagram,) = read_pcap(path).datagrams
        assert datagram.payload == MINIMAL
        assert datagram.timestamp == pytest.approx(1001.00025)  # nanosecond pcap

    def test_fragments_and_tcp_are_skipped(self, tmp_path: Path) -> None:
        fragment = bytearray(bytes(14) + b"\x08\x00" + ipv4_udp(MINIMAL))
        fragment[16 + 6] = 0x20  # more fragments
        tcp = bytearray(bytes(14) + b"\x08\x00" + ipv4_udp(MINIMAL))
        tcp[16 + 9] = 6
        path = tmp_path / "skip.pcap"
        path.write_bytes(pcap_file(LINKTYPE_LINUX_SLL, [bytes(fragment), bytes(tcp)]))
        assert read_pcap(path).datagrams == []

    def test_not_a_pcap(self, tmp_path: Path) -> None:
        path = tmp_path / "x.pcapng"
        path.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
        with pytest.raises(PcapError, match="pcapng"):
            read_pcap(path)

    def test_cut_short(self, tmp_path: Path) -> None:
        path = tmp_path / "short.pcap"
        path.write_bytes(pcap_file(LINKTYPE_LINUX_SLL, [bytes(16) + ipv4_udp(b"x")])[:-3])
        with pytest.raises(PcapError, match="cut short"):
            read_pcap(path)
