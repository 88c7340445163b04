"""SDP (RFC 4566) parsing and the offer/answer model (RFC 3264) for one audio stream: codec
choice, telephone-event, ptime, direction and hold, o= versioning."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from worker.errors import LocalError
from worker.sip.sdp import (
    Connection,
    Direction,
    LocalSdp,
    MediaDescription,
    NegotiatedMedia,
    NoCommonCodecError,
    Origin,
    RtpMap,
    SdpParseError,
    SessionDescription,
    make_offer,
    negotiate,
    process_answer,
)


def sdp(*lines: str) -> SessionDescription:
    return SessionDescription.parse(("\r\n".join(lines) + "\r\n").encode())


# The body of SIPp's built-in uac_pcap scenario (``sipp -sd uac_pcap``), addresses filled in.
SIPP_UAC_PCAP = sdp(
    "v=0",
    "o=user1 53655765 2353687637 IN IP4 10.0.0.5",
    "s=-",
    "c=IN IP4 10.0.0.5",
    "t=0 0",
    "m=audio 6000 RTP/AVP 8 101",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-11,16",
)

PCMU_WITH_EVENTS = sdp(
    "v=0",
    "o=- 1 1 IN IP4 198.51.100.10",
    "s=call",
    "c=IN IP4 198.51.100.10",
    "t=0 0",
    "m=audio 20000 RTP/AVP 0 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-16",
    "a=ptime:20",
    "a=sendrecv",
)


def answer_to(
    offer: SessionDescription,
    *,
    supported: Sequence[str] = ("PCMU", "PCMA"),
    direction: Direction = Direction.SENDRECV,
    telephone_event: bool = True,
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Our answer from 192.0.2.50:30000."""
    return negotiate(
        offer,
        supported,
        address="192.0.2.50",
        port=30000,
        direction=direction,
        telephone_event=telephone_event,
    )


class TestRfc4566Section5Parsing:
    def test_sipp_uac_pcap_body(self) -> None:
        (audio,) = SIPP_UAC_PCAP.media
        assert SIPP_UAC_PCAP.origin == Origin("user1", "53655765", 2353687637, "10.0.0.5")
        assert SIPP_UAC_PCAP.connection == Connection("10.0.0.5")
        assert (audio.media, audio.port, audio.proto, audio.formats) == (
            "audio",
            6000,
            "RTP/AVP",
            ["8", "101"],
        )
        assert audio.rtpmaps() == {
            8: RtpMap(8, "PCMA", 8000),
            101: RtpMap(101, "telephone-event", 8000),
        }
        assert audio.fmtp(101) == "0-11,16"
        assert audio.fmtp(8) is None
        assert audio.ptime is None
        assert SIPP_UAC_PCAP.media_direction(audio) is Direction.SENDRECV

    def test_round_trip_keeps_every_line_in_rfc_order(self) -> None:
        text = (
            "v=0\r\n"
            "o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5\r\n"
            "s=SDP Seminar\r\n"
            "i=A Seminar on the session description protocol\r\n"
            "u=http://www.example.com/seminars/sdp.pdf\r\n"
            "e=j.doe@example.com (Jane Doe)\r\n"
            "c=IN IP4 224.2.17.12/127\r\n"
            "b=AS:128\r\n"
            "t=2873397496 2873404696\r\n"
            "r=7d 1h 0 25h\r\n"
            "a=recvonly\r\n"
            "m=audio 49170 RTP/AVP 0\r\n"
            "i=voice\r\n"
            "c=IN IP4 192.0.2.7\r\n"
            "b=TIAS:64000\r\n"
            "a=rtcp:53020 IN IP4 192.0.2.7\r\n"
            "a=maxptime:40\r\n"
            "a=x-unknown\r\n"
            "m=video 51372/2 RTP/AVP 99\r\n"
            "a=rtpmap:99 h263-1998/90000\r\n"
        )
        parsed = SessionDescription.parse(text)
        assert parsed.serialize().decode() == text
        assert parsed.direction is Direction.RECVONLY
        audio, video = parsed.media
        assert audio.connection == Connection("192.0.2.7")
        assert parsed.media_connection(video) == Connection("224.2.17.12/127")
        assert parsed.media_connection(video) is not None
        assert Connection("224.2.17.12/127").host == "224.2.17.12"
        assert audio.attribute("rtcp") == "53020 IN IP4 192.0.2.7"
        assert audio.has_attribute("x-unknown")
        assert audio.maxptime == 40
        assert audio.rtpmaps()[0] == RtpMap(0, "PCMU", 8000)
        assert parsed.media_direction(audio) is Direction.RECVONLY
        assert video.port_count == 2
        assert SessionDescription.parse(parsed.serialize()) == parsed

    def test_minimal_description_serializes_without_connection(self) -> None:
        minimal = SessionDescription(origin=Origin("-", "1", 1, "192.0.2.1"))
        assert minimal.serialize() == b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n"
        assert minimal.direction is Direction.SENDRECV

    def test_lf_endings_blank_lines_and_odd_values(self) -> None:
        parsed = SessionDescription.parse(
            "v=0\n\no=- 1 2 IN IP6 ::1\nc=IN IP6 ::1\nm=audio 1 RTP/AVP 0 8\n"
            "a=ptime:abc\na=rtpmap:bad\na=rtpmap:97 opus/48000/2\n"
        )
        assert parsed.session_name == "-"
        assert parsed.timing == [("t", "0 0")]
        audio = parsed.media[0]
        assert audio.ptime is None
        assert audio.rtpmaps() == {
            0: RtpMap(0, "PCMU", 8000),
            8: RtpMap(8, "PCMA", 8000),
        }
        assert str(RtpMap(97, "opus", 48000, 2)) == "97 opus/48000/2"

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "o=- 1 1 IN IP4 1.2.3.4\r\n",
            "v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n",
            "v=0\r\n",
            "v=0\r\no=- 1 1 IN IP4\r\n",
            "v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nt=now\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nhello\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nM=audio 1 RTP/AVP 0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 1 RTP/AVP\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 1/x RTP/AVP 0\r\n",
        ],
    )
    def test_malformed(self, text: str) -> None:
        with pytest.raises(SdpParseError) as info:
            SessionDescription.parse(text)
        assert info.value.status_code == 400


class TestRfc3264Section5Offer:
    def test_default_offer(self) -> None:
        offer = make_offer("192.0.2.50", 30000)
        text = offer.serialize().decode()
        assert "c=IN IP4 192.0.2.50\r\n" in text
        assert "m=audio 30000 RTP/AVP 0 8 101\r\n" in text
        assert "a=rtpmap:0 PCMU/8000\r\n" in text
        assert "a=rtpmap:8 PCMA/8000\r\n" in text
        assert "a=rtpmap:101 telephone-event/8000\r\n" in text
        assert "a=fmtp:101 0-16\r\n" in text
        assert "a=ptime:20\r\n" in text
        assert text.endswith("a=sendrecv\r\n")
        assert SessionDescription.parse(offer.serialize()) == offer

    def test_options(self) -> None:
        offer = make_offer(
            "2001:db8::5",
            4000,
            codecs=["pcma"],
            telephone_event_pt=None,
            ptime=30,
            direction=Direction.SENDONLY,
        )
        (audio,) = offer.media
        assert audio.formats == ["8"]
        assert audio.ptime == 30
        assert audio.direction() is Direction.SENDONLY
        assert offer.connection == Connection("2001:db8::5", "IN", "IP6")
        assert offer.origin.addr_type == "IP6"

    def test_unknown_codec_is_our_mistake(self) -> None:
        with pytest.raises(LocalError):
            make_offer("192.0.2.50", 4000, codecs=["opus"])


class TestRfc3264Section6Answer:
    def test_pcma_only_offer_from_sipp(self) -> None:
        answer, media = answer_to(SIPP_UAC_PCAP)
        assert media == NegotiatedMedia(
            remote_address="10.0.0.5",
            remote_port=6000,
            codec="PCMA",
            payload_type=8,
            clock_rate=8000,
            telephone_event_pt=101,
            ptime=20,
            direction=Direction.SENDRECV,
            remote_hold=False,
            rtcp_port=6001,  # RFC 3550 §11: RTP port + 1 when the offer has no a=rtcp
        )
        (audio,) = answer.media
        assert audio.port == 30000
        assert audio.formats == ["8", "101"]
        assert audio.fmtp(101) == "0-11,16"
        assert answer.connection == Connection("192.0.2.50")
        assert answer.media_direction(audio) is Direction.SENDRECV

    def test_pcmu_with_telephone_event(self) -> None:
        answer, media = answer_to(PCMU_WITH_EVENTS)
        assert (media.codec, media.payload_type, media.telephone_event_pt) == ("PCMU", 0, 101)
        assert answer.media[0].formats == ["0", "101"]

    def test_offerers_order_wins(self) -> None:
        offer = sdp("v=0", "o=- 1 1 IN IP4 1.2.3.4", "c=IN IP4 1.2.3.4", "m=audio 5 RTP/AVP 8 0")
        _, media = answer_to(offer, supported=["PCMU", "PCMA"])
        assert media.codec == "PCMA"

    def test_static_payload_types_without_rtpmap(self) -> None:
        offer = sdp("v=0", "o=- 1 1 IN IP4 1.2.3.4", "c=IN IP4 1.2.3.4", "m=audio 5 RTP/AVP 0")
        answer, media = answer_to(offer)
        assert (media.codec, media.payload_type, media.telephone_event_pt) == ("PCMU", 0, None)
        assert answer.media[0].formats == ["0"]

    def test_unmapped_dynamic_and_non_numeric_formats_are_skipped(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=application 9 UDP/BFCP *",
            "m=audio 5 RTP/AVP 96 x 8",
        )
        assert offer.media[0].rtpmaps() == {}
        answer, media = answer_to(offer)
        assert (media.codec, media.payload_type) == ("PCMA", 8)
        assert [m.port for m in answer.media] == [0, 30000]

    def test_codec_names_are_case_insensitive(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=audio 5 RTP/AVP 96 97",
            "a=rtpmap:96 pcmu/8000",
            "a=rtpmap:97 Telephone-Event/8000",
        )
        _, media = answer_to(offer, supported=["PcMu"])
        assert (media.codec, media.payload_type, media.telephone_event_pt) == ("PCMU", 96, 97)

    def test_no_common_codec_is_488(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=audio 5 RTP/AVP 18 101",
            "a=rtpmap:18 G729/8000",
            "a=rtpmap:101 telephone-event/8000",
        )
        with pytest.raises(NoCommonCodecError) as info:
            answer_to(offer)
        assert info.value.status_code == 488

    @pytest.mark.parametrize(
        "m_line", ["m=audio 5 RTP/SAVP 0", "m=audio 0 RTP/AVP 0", "m=video 5 RTP/AVP 0"]
    )
    def test_unusable_streams_are_no_common_codec(self, m_line: str) -> None:
        offer = sdp("v=0", "o=- 1 1 IN IP4 1.2.3.4", "c=IN IP4 1.2.3.4", m_line)
        with pytest.raises(NoCommonCodecError):
            answer_to(offer)

    def test_codec_not_in_supported_list(self) -> None:
        with pytest.raises(NoCommonCodecError):
            answer_to(SIPP_UAC_PCAP, supported=["PCMU"])

    def test_telephone_event_needs_the_codec_clock_rate(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=audio 5 RTP/AVP 0 100 101",
            "a=rtpmap:100 telephone-event/16000",
            "a=rtpmap:101 telephone-event/8000",
        )
        _, media = answer_to(offer)
        assert media.telephone_event_pt is None  # the first one listed is at 16 kHz
        _, without = answer_to(SIPP_UAC_PCAP, telephone_event=False)
        assert without.telephone_event_pt is None

    def test_other_streams_rejected_and_m_lines_kept_in_order(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=video 7000 RTP/AVP 31",
            "m=audio 0 RTP/AVP 0",
            "m=audio 8000 RTP/AVP 8",
            "c=IN IP4 5.6.7.8",
            "m=audio 9000 RTP/AVP 0",
        )
        answer, media = answer_to(offer)
        assert [(m.media, m.port) for m in answer.media] == [
            ("video", 0),
            ("audio", 0),
            ("audio", 30000),
            ("audio", 0),
        ]
        assert answer.media[0].formats == ["31"]
        assert (media.remote_address, media.remote_port, media.codec) == ("5.6.7.8", 8000, "PCMA")

    def test_ptime_from_the_offer(self) -> None:
        offer = sdp(
            "v=0",
            "o=- 1 1 IN IP4 1.2.3.4",
            "c=IN IP4 1.2.3.4",
            "m=audio 5 RTP/AVP 0",
            "a=ptime:30",
        )
        answer, media = answer_to(offer)
        assert media.ptime == 30
        assert answer.media[0].ptime == 20  # what we want to receive

    def test_offer_without_connection(self) -> None:
        offer = sdp("v=0", "o=- 1 1 IN IP4 1.2.3.4", "m=audio 5 RTP/AVP 0")
        with pytest.raises(SdpParseError):
            answer_to(offer)


class TestRfc3264Section8_4PuttingAStreamOnHold:
    def offer(self, *extra: str, address: str = "1.2.3.4") -> SessionDescription:
        return sdp(
            "v=0", "o=- 1 2 IN IP4 1.2.3.4", f"c=IN IP4 {address}", "m=audio 5 RTP/AVP 0", *extra
        )

    @pytest.mark.parametrize(
        ("offered", "ours", "hold"),
        [
            ("a=sendonly", Direction.RECVONLY, True),
            ("a=recvonly", Direction.SENDONLY, False),
            ("a=inactive", Direction.INACTIVE, True),
            ("a=sendrecv", Direction.SENDRECV, False),
        ],
    )
    def test_direction_is_mirrored(self, offered: str, ours: Direction, hold: bool) -> None:
        answer, media = answer_to(self.offer(offered))
        assert media.direction is ours
        assert media.remote_hold is hold
        assert answer.media[0].direction() is ours

    def test_rfc2543_hold_with_zero_address(self) -> None:
        answer, media = answer_to(self.offer(address="0.0.0.0"))
        assert media.remote_hold
        assert media.direction is Direction.RECVONLY
        assert media.remote_address == "0.0.0.0"
        assert answer.connection == Connection("192.0.2.50")
        _, both = answer_to(self.offer("a=sendonly", address="0.0.0.0"))
        assert both.direction is Direction.RECVONLY

    def test_session_level_direction(self) -> None:
        offer = sdp(
            "v=0", "o=- 1 1 IN IP4 1.2.3.4", "c=IN IP4 1.2.3.4", "a=inactive", "m=audio 5 RTP/AVP 0"
        )
        _, media = answer_to(offer)
        assert media.direction is Direction.INACTIVE

    def test_our_own_direction_is_respected(self) -> None:
        _, media = answer_to(self.offer(), direction=Direction.SENDONLY)
        assert media.direction is Direction.SENDONLY
        _, media = answer_to(self.offer("a=sendonly"), direction=Direction.SENDONLY)
        assert media.direction is Direction.INACTIVE

    def test_direction_algebra(self) -> None:
        assert Direction.SENDONLY.reversed() is Direction.RECVONLY
        assert Direction.INACTIVE.reversed() is Direction.INACTIVE
        assert (Direction.SENDRECV & Direction.RECVONLY) is Direction.RECVONLY
        assert Direction.of(sends=True, receives=False) is Direction.SENDONLY


class TestRfc3264Section7ProcessAnswer:
    def test_offer_answer_between_two_ends(self) -> None:
        ours = make_offer("192.0.2.50", 30000)
        theirs, their_view = negotiate(
            SessionDescription.parse(ours.serialize()),
            ["PCMA", "PCMU"],
            address="198.51.100.7",
            port=40000,
        )
        media = process_answer(ours, SessionDescription.parse(theirs.serialize()))
        assert (media.remote_address, media.remote_port) == ("198.51.100.7", 40000)
        assert (media.codec, media.payload_type, media.telephone_event_pt) == ("PCMU", 0, 101)
        assert media.direction is Direction.SENDRECV
        assert (their_view.remote_address, their_view.remote_port) == ("192.0.2.50", 30000)

    def test_answer_picks_one_of_our_codecs(self) -> None:
        ours = make_offer("192.0.2.50", 30000, telephone_event_pt=None)
        answer = sdp(
            "v=0",
            "o=- 9 9 IN IP4 5.6.7.8",
            "c=IN IP4 5.6.7.8",
            "m=audio 7078 RTP/AVP 8 101",
            "a=rtpmap:101 telephone-event/8000",
            "a=ptime:40",
            "a=recvonly",
        )
        media = process_answer(ours, answer)
        assert (media.codec, media.payload_type) == ("PCMA", 8)
        assert media.telephone_event_pt is None  # we did not offer it
        assert media.ptime == 40
        assert media.direction is Direction.SENDONLY
        assert not media.remote_hold

    def test_hold_answers(self) -> None:
        ours = make_offer("192.0.2.50", 30000, direction=Direction.SENDONLY)
        answer = sdp("v=0", "o=- 9 9 IN IP4 5.6.7.8", "c=IN IP4 0.0.0.0", "m=audio 7078 RTP/AVP 0")
        media = process_answer(ours, answer)
        assert media.direction is Direction.INACTIVE
        assert media.remote_hold

    def test_rejected_stream_or_foreign_codec(self) -> None:
        ours = make_offer("192.0.2.50", 30000)
        rejected = sdp("v=0", "o=- 9 9 IN IP4 5.6.7.8", "c=IN IP4 5.6.7.8", "m=audio 0 RTP/AVP 0")
        with pytest.raises(NoCommonCodecError):
            process_answer(ours, rejected)
        foreign = sdp(
            "v=0",
            "o=- 9 9 IN IP4 5.6.7.8",
            "c=IN IP4 5.6.7.8",
            "m=audio 7078 RTP/AVP 18",
            "a=rtpmap:18 G729/8000",
        )
        with pytest.raises(NoCommonCodecError):
            process_answer(ours, foreign)

    def test_answer_shape_errors(self) -> None:
        ours = make_offer("192.0.2.50", 30000)
        two = sdp(
            "v=0",
            "o=- 9 9 IN IP4 5.6.7.8",
            "c=IN IP4 5.6.7.8",
            "m=audio 7078 RTP/AVP 0",
            "m=video 0 RTP/AVP 31",
        )
        with pytest.raises(SdpParseError):
            process_answer(ours, two)
        no_c = sdp("v=0", "o=- 9 9 IN IP4 5.6.7.8", "m=audio 7078 RTP/AVP 0")
        with pytest.raises(SdpParseError):
            process_answer(ours, no_c)

    def test_our_offer_without_audio_is_our_bug(self) -> None:
        video_only = SessionDescription(
            origin=Origin("-", "1", 1, "192.0.2.50"),
            connection=Connection("192.0.2.50"),
            media=[MediaDescription("video", 5000, "RTP/AVP", ["31"])],
        )
        with pytest.raises(LocalError):
            process_answer(video_only, video_only)


class TestRfc3264Section8ModifyingTheSession:
    def test_version_goes_up_only_when_our_sdp_changes(self) -> None:
        local = LocalSdp("192.0.2.50", session_id="4242")
        first = local.offer(30000)
        assert (first.origin.session_id, first.origin.version) == ("4242", 1)
        same = local.offer(30000)
        assert same.origin.version == 1
        hold = local.offer(30000, direction=Direction.SENDONLY)
        assert hold.origin.version == 2
        assert hold.media[0].direction() is Direction.SENDONLY
        resume = local.offer(30000)
        assert resume.origin.version == 3
        assert first.origin.version == 1  # earlier descriptions keep their own o= line
        assert resume.origin.session_id == "4242"
        assert resume.origin.address == "192.0.2.50"

    def test_answers_share_the_origin(self) -> None:
        local = LocalSdp("192.0.2.50", session_id="7", first_version=10)
        answer, media = local.answer(PCMU_WITH_EVENTS, 30000)
        assert (answer.origin.session_id, answer.origin.version) == ("7", 10)
        assert media.codec == "PCMU"
        held, held_media = local.answer(
            sdp(
                "v=0",
                "o=- 1 2 IN IP4 198.51.100.10",
                "c=IN IP4 198.51.100.10",
                "m=audio 20000 RTP/AVP 0",
                "a=sendonly",
            ),
            30000,
        )
        assert held.origin.version == 11
        assert held_media.remote_hold
        assert held_media.direction is Direction.RECVONLY

    def test_late_offer_flow(self) -> None:
        """INVITE without SDP: we offer in our 200 OK, the peer answers in its ACK."""
        local = LocalSdp("192.0.2.50")
        our_offer = local.offer(30000, codecs=["PCMA", "PCMU"])
        peer = LocalSdp("10.0.0.5")
        their_answer, _ = peer.answer(SessionDescription.parse(our_offer.serialize()), 6000)
        media = process_answer(our_offer, SessionDescription.parse(their_answer.serialize()))
        assert (media.codec, media.remote_address, media.remote_port) == ("PCMA", "10.0.0.5", 6000)
