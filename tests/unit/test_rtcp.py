"""media.rtcp: RTCP packets and one session's reports (RFC 3550 §6), without sockets."""

from __future__ import annotations

import random

import pytest

from media.rtcp import (
    BYE,
    MIN_INTERVAL_S,
    RR,
    SDES,
    SR,
    ReportBlock,
    RtcpParseError,
    RtcpSession,
    SenderInfo,
    build_report,
    is_rtcp,
    parse_compound,
)
from worker.sip.sdp import SessionDescription, negotiate


class TestRfc3550Section6_4Packets:
    def test_sender_report_with_a_block_and_sdes_round_trip(self) -> None:
        block = ReportBlock(0xBEEF, 64, -3, 70000, 88, 0x12345678, 65536)
        sender = SenderInfo((3900000000 << 32) | 0x80000000, 1234, 50, 8000)
        data = build_report(0xCAFE, sender, (block,), "worker@test")
        assert len(data) % 4 == 0
        assert is_rtcp(data)
        sr, sdes = parse_compound(data)
        assert (sr.packet_type, sr.ssrc, sr.sender, sr.blocks) == (SR, 0xCAFE, sender, (block,))
        assert (sdes.packet_type, sdes.ssrc, sdes.cname) == (SDES, 0xCAFE, "worker@test")

    def test_receiver_report_without_blocks(self) -> None:
        rr, sdes = parse_compound(build_report(7, None, (), "x"))
        assert (rr.packet_type, rr.ssrc, rr.sender, rr.blocks) == (RR, 7, None, ())
        assert sdes.cname == "x"

    def test_bye(self) -> None:
        session = RtcpSession(9, "c")
        types = [p.packet_type for p in parse_compound(session.bye())]
        assert types == [RR, SDES, BYE]

    @pytest.mark.parametrize(
        "data",
        [
            b"\x80\xc8",  # shorter than a header
            b"\x40\xc8\x00\x00",  # version 1
            b"\x80\xc9\x00\x05\x00\x00\x00\x01",  # length past the end
            b"\x81\xc9\x00\x01\x00\x00\x00\x01",  # one block announced, none there
            b"\x80\xc9\x00\x01\x00\x00\x00\x01\x00",  # trailing byte
            b"\xa0\xc9\x00\x01\x00\x00\x00\x00",  # padding count 0
        ],
    )
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(RtcpParseError):
            parse_compound(data)
        session = RtcpSession(1, "c")
        session.receive(data, 0.0)
        assert session.invalid == 1

    def test_rtp_is_not_rtcp(self) -> None:
        assert not is_rtcp(b"\x80\x00\x00\x01")
        assert not is_rtcp(b"\x80")


class TestRfc3550AppendixA3Statistics:
    def test_loss_fraction_and_wrap(self) -> None:
        session = RtcpSession(1, "me")
        sequences = [65530 + i for i in range(6)] + list(range(0, 20))
        kept = [s for i, s in enumerate(sequences) if i % 4 != 3]  # lose every fourth
        for i, seq in enumerate(kept):
            session.on_rtp(0xAB, seq, i * 160, i * 0.02)
        assert session.lost == len(sequences) - len(kept)
        (rr, _) = parse_compound(session.report(1.0, 0))
        (block,) = rr.blocks
        assert block.ssrc == 0xAB
        assert block.highest_sequence == (1 << 16) + 19  # one wrap
        assert block.cumulative_lost == len(sequences) - len(kept)
        assert block.fraction_lost == (6 << 8) // 26
        (rr2, _) = parse_compound(session.report(2.0, 0))
        assert rr2.blocks[0].fraction_lost == 0  # nothing new since the last report

    def test_steady_stream_has_no_jitter_and_a_new_ssrc_restarts(self) -> None:
        session = RtcpSession(1, "me")
        for i in range(50):
            session.on_rtp(5, 100 + i, i * 160, 10.0 + i * 0.02)
        assert session.jitter_ms < 0.01
        session.on_rtp(6, 9, 0, 12.0)
        assert (session.remote_ssrc, session.received, session.lost) == (6, 1, 0)


class TestRfc3550Section6_4_1RoundTrip:
    def test_rtt_from_lsr_and_dlsr(self) -> None:
        """We send an SR at t=100; the peer echoes its time 0.25 s later; it arrives at 100.4:
        the round trip is 0.15 s (0.4 - 0.25)."""
        ours = RtcpSession(0x1111, "ours", ntp_offset=1.7e9)
        ours.on_sent(160)
        (sr, _) = parse_compound(ours.report(100.0, 8000))
        assert sr.sender is not None
        lsr = (sr.sender.ntp >> 16) & 0xFFFFFFFF
        block = ReportBlock(0x1111, 51, 12, 4000, 160, lsr, int(0.25 * 65536))
        ours.receive(build_report(0x2222, None, (block,), "peer"), 100.4)
        assert ours.peer is not None
        assert ours.peer.round_trip_ms == pytest.approx(150, abs=0.1)
        assert ours.peer.fraction_lost == pytest.approx(51 / 256)
        assert ours.peer.cumulative_lost == 12
        assert ours.peer.jitter_ms == 20.0  # 160 samples at 8 kHz
        assert ours.reports_in == 1

    def test_peer_sr_is_echoed_in_our_block(self) -> None:
        ours = RtcpSession(1, "ours")
        ours.on_rtp(2, 10, 0, 50.0)
        peer_ntp = (3900000000 << 32) | 0x40000000
        ours.receive(build_report(2, SenderInfo(peer_ntp, 0, 1, 160), (), "peer"), 50.0)
        (rr, _) = parse_compound(ours.report(50.5, 0))
        (block,) = rr.blocks
        assert block.last_sr == (peer_ntp >> 16) & 0xFFFFFFFF
        assert block.delay_since_last_sr == int(0.5 * 65536)


class TestRfc3550Section6_3Interval:
    def test_first_report_after_half_an_interval_then_every_five_seconds(self) -> None:
        session = RtcpSession(1, "me", rng=random.Random(4))
        assert not session.due(0.0)
        first = next(t / 100 for t in range(1, 1000) if session.due(t / 100))
        assert MIN_INTERVAL_S / 4 <= first <= MIN_INTERVAL_S * 3 / 4
        session.report(first, 0)
        second = next(first + t / 100 for t in range(1, 2000) if session.due(first + t / 100))
        assert MIN_INTERVAL_S / 2 <= second - first <= MIN_INTERVAL_S * 1.5


class TestRfc5761Section5_1_1RtcpMuxAndRfc3605:
    OFFER = (
        "v=0\r\no=- 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n"
        "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n{extra}"
    )

    def test_mux_offered_is_accepted(self) -> None:
        offer = SessionDescription.parse(self.OFFER.format(extra="a=rtcp-mux\r\n"))
        answer, media = negotiate(offer, address="10.0.0.1", port=30000)
        assert media.rtcp_mux
        assert media.rtcp_port == 6000
        assert answer.media[0].has_attribute("rtcp-mux")

    def test_rtcp_attribute_names_the_port(self) -> None:
        offer = SessionDescription.parse(self.OFFER.format(extra="a=rtcp:7007 IN IP4 10.0.0.5\r\n"))
        answer, media = negotiate(offer, address="10.0.0.1", port=30000)
        assert (media.rtcp_mux, media.rtcp_port) == (False, 7007)
        assert not answer.media[0].has_attribute("rtcp-mux")
