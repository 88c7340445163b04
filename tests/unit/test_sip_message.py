"""SIP message parsing and serialization: RFC 3261 §7, §18.3, §19, §20, §25 and RFC 4475 torture
messages, plus hypothesis fuzzing of ``parse`` and ``StreamFramer``."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import LocalError, RemoteError
from worker.sip.message import (
    CSeq,
    Headers,
    Message,
    MessageTooLarge,
    NameAddr,
    SipMessageError,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    StreamFramer,
    Via,
    canonical_name,
    error_response,
    generate_branch,
    generate_call_id,
    generate_tag,
    is_keepalive,
    make_cancel,
    make_response,
    parse,
)


def wire(*lines: str, body: str = "") -> bytes:
    """A message from header lines joined with CRLF, the blank line, then ``body``."""
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")


SDP_150 = (
    "v=0\r\n"
    "o=mhandley 29739 7272939 IN IP4 192.0.2.3\r\n"
    "s=-\r\n"
    "c=IN IP4 192.0.2.4\r\n"
    "t=0 0\r\n"
    "m=audio 49217 RTP/AVP 0 12\r\n"
    "m=video 3227 RTP/AVP 31\r\n"
    "a=rtpmap:31 LPC\r\n"
)

INVITE = wire(
    "INVITE sip:bob@biloxi.example.com SIP/2.0",
    "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds",
    "Max-Forwards: 70",
    "To: Bob <sip:bob@biloxi.example.com>",
    'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@pc33.atlanta.example.com",
    "CSeq: 314159 INVITE",
    "Contact: <sip:alice@pc33.atlanta.example.com>",
    "Content-Type: application/sdp",
    "Content-Length: 150",
    body=SDP_150,
)


def request(data: bytes) -> SipRequest:
    message = parse(data)
    assert isinstance(message, SipRequest)
    return message


def response(data: bytes) -> SipResponse:
    message = parse(data)
    assert isinstance(message, SipResponse)
    return message


def parse_error(data: bytes) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse(data)
    return info.value


# ---------------------------------------------------------------------------------------------
# RFC 4475 §3.1.1: valid messages


WSINV = wire(
    "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0",
    "TO :",
    " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
    'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>',
    "  ;",
    "  tag = 98asjd8",
    "MaX-fOrWaRdS: 0068",
    "Call-ID: wsinv.ndaksdj@192.0.2.1",
    "Content-Length   : 150",
    "cseq: 0009",
    "  INVITE",
    "Via  : SIP  /   2.0",
    " /UDP",
    "    192.0.2.2;branch=390skdjuw",
    "s :",
    "NewFangledHeader:   newfangled value",
    " continued newfangled value",
    "UnknownHeaderWithUnusualValue: ;;,,;;,;",
    "Content-Type: application/sdp",
    "Route:",
    " <sip:services.example.com;lr;unknownwith=value;unknown-no-value>",
    "v:  SIP  / 2.0  / TCP     spindle.example.com   ;",
    "  branch  =   z9hG4bK9ikj8  ,",
    " SIP  /    2.0   / UDP  192.168.255.111   ; branch=",
    " z9hG4bK30239",
    'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =',
    "      newvalue ;",
    "  secondparam ; q = 0.33",
    body=SDP_150,
)


class TestRfc4475Section3_1_1_1ShortTortuousInvite:
    def test_request_line_and_uri(self) -> None:
        msg = request(WSINV)
        assert msg.method == "INVITE"
        assert msg.uri.user == "vivekg"
        assert msg.uri.host == "chair-dnrc.example.com"
        assert msg.uri.has_param("unknownparam")

    def test_folded_and_spaced_headers(self) -> None:
        msg = request(WSINV)
        assert msg.to.uri == SipUri.parse("sip:vivekg@chair-dnrc.example.com")
        assert msg.to_tag == "1918181833n"
        assert msg.from_.display_name == 'J Rosenberg \\"'
        assert msg.from_tag == "98asjd8"
        assert msg.max_forwards == 68
        assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
        assert msg.cseq == CSeq(9, "INVITE")
        assert msg.headers.get("Subject") == ""
        assert msg.headers["newfangledheader"] == "newfangled value continued newfangled value"
        assert msg.headers["UnknownHeaderWithUnusualValue"] == ";;,,;;,;"

    def test_vias_split_and_in_order(self) -> None:
        vias = request(WSINV).vias
        assert [(v.transport, v.host, v.branch) for v in vias] == [
            ("UDP", "192.0.2.2", "390skdjuw"),
            ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
            ("UDP", "192.168.255.111", "z9hG4bK30239"),
        ]

    def test_compact_contact_with_quoted_display_and_params(self) -> None:
        contact = request(WSINV).contact
        assert contact is not None
        assert contact.display_name == 'Quoted string ""'
        assert contact.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))

    def test_route_keeps_unknown_uri_params(self) -> None:
        (route,) = request(WSINV).routes
        assert route.uri.has_param("lr")
        assert route.uri.param("unknownwith") == "value"
        assert route.uri.has_param("unknown-no-value")

    def test_body_by_content_length(self) -> None:
        msg = request(WSINV)
        assert msg.body == SDP_150.encode()
        assert msg.content_type == "application/sdp"

    def test_round_trip(self) -> None:
        msg = request(WSINV)
        again = request(msg.serialize())
        assert again == msg
        assert again.serialize() == msg.serialize()


INTMETH_METHOD = "!interesting-Method0123456789_*+`.%indeed'~"
INTMETH_USER = "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
INTMETH = wire(
    f"{INTMETH_METHOD} sip:{INTMETH_USER}:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    "@example.com SIP/2.0",
    "Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~",
    f'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:{INTMETH_USER}@example.com>',
    "From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>"
    ";fromParam''~+*_!.-%=\"работающий\";tag=_token~1'+`*%!-.",
    "Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
    f"CSeq: 139122385 {INTMETH_METHOD}",
    "Max-Forwards: 255",
    "extensionHeader-!.%*+_`'~:\ufeff大停電",
    "Content-Length: 0",
)


class TestRfc4475Section3_1_1_2WideRangeOfValidCharacters:
    def test_method_and_uri(self) -> None:
        msg = request(INTMETH)
        assert msg.method == INTMETH_METHOD
        assert msg.uri.user == INTMETH_USER
        assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
        assert msg.uri.host == "example.com"
        assert msg.cseq == CSeq(139122385, INTMETH_METHOD)

    def test_quoted_controls_and_token_display_name(self) -> None:
        msg = request(INTMETH)
        assert msg.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
        assert msg.from_.display_name == "token1~` token2'+_ token3*%!.-"
        assert msg.from_.param("fromParam''~+*_!.-%") == '"работающий"'
        assert msg.from_tag == "_token~1'+`*%!-."
        assert msg.via.branch == "z9hG4bK-.!%66*_+`'~"
        assert msg.headers["extensionHeader-!.%*+_`'~"] == "\ufeff大停電"

    def test_round_trip(self) -> None:
        msg = request(INTMETH)
        assert request(msg.serialize()) == msg


class TestRfc4475Section3_1_1_3ValidPercentEscaping:
    DATA = wire(
        "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0",
        "To: sip:%75se%72@example.com",
        "From: <sip:I%20have%20spaces@example.net>;tag=938",
        "Max-Forwards: 87",
        "i: esc01.239409asdfakjkn23onasd0-3234",
        "CSeq: 234234 INVITE",
        "Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw",
        "C: application/sdp",
        "Contact:",
        "  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>",
        "Content-Length: 150",
        body=SDP_150,
    )

    def test_escapes_are_kept_verbatim(self) -> None:
        msg = request(self.DATA)
        assert msg.uri.user == "sips%3Auser%40example.com"
        assert msg.uri.host == "example.net"
        assert msg.to.uri.user == "%75se%72"
        assert msg.from_.uri.user == "I%20have%20spaces"
        contact = msg.contact
        assert contact is not None
        assert contact.uri.params == (("%6C%72", None), ("n%61me", "v%61lue%25%34%31"))
        assert msg.call_id == "esc01.239409asdfakjkn23onasd0-3234"
        assert msg.content_type == "application/sdp"
        assert str(msg.uri) == "sip:sips%3Auser%40example.com@example.net"


class TestRfc4475Section3_1_1_4EscapedNullsInUris:
    DATA = wire(
        "REGISTER sip:example.com SIP/2.0",
        "To: sip:null-%00-null@example.com",
        "From: sip:null-%00-null@example.com;tag=839923423",
        "Max-Forwards: 70",
        "Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd",
        "CSeq: 14398234 REGISTER",
        "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw",
        "Contact: <sip:%00@host5.example.com>",
        "Contact: <sip:%00%00@host5.example.com>",
        "L:0",
    )

    def test_parses(self) -> None:
        msg = request(self.DATA)
        assert [c.uri.user for c in msg.contacts] == ["%00", "%00%00"]
        assert msg.to.uri.user == "null-%00-null"
        assert msg.body == b""


class TestRfc4475Section3_1_1_5PercentThatIsNotAnEscape:
    DATA = wire(
        "RE%47IST%45R sip:registrar.example.com SIP/2.0",
        'To: "%Z%45" <sip:resource@example.com>',
        'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23',
        "Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf",
        "Via: SIP/2.0/TCP host.example.com;rport;branch=z9hG4bK209323",
        "C%6Fntact: <sip:alias1@host1.example.com>",
        "Contact: <sip:alias2@host2.example.com>",
        "Contact: <sip:alias3@host3.example.com>",
        "Max-Forwards: 70",
        "Content-Length: 0",
        "CSeq: 29344 RE%47IST%45R",
    )

    def test_method_is_not_unescaped(self) -> None:
        msg = request(self.DATA)
        assert msg.method == "RE%47IST%45R"
        assert msg.to.display_name == "%Z%45"
        assert [c.uri.host for c in msg.contacts] == ["host2.example.com", "host3.example.com"]
        assert msg.headers["C%6Fntact"] == "<sip:alias1@host1.example.com>"
        assert msg.via.rport_requested
        assert msg.via.rport is None


class TestRfc4475Section3_1_1_6NoLwsBetweenDisplayNameAndLessThan:
    DATA = wire(
        "OPTIONS sip:user@example.com SIP/2.0",
        "To: sip:user@example.com",
        "From: caller<sip:caller@example.com>;tag=323",
        "Max-Forwards: 70",
        "Call-ID: lwsdisp.1234abcd@funky.example.com",
        "CSeq: 60 OPTIONS",
        "Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw",
        "l: 0",
    )

    def test_parses(self) -> None:
        msg = request(self.DATA)
        assert msg.from_.display_name == "caller"
        assert msg.from_.uri.user == "caller"
        assert msg.from_tag == "323"


class TestRfc4475Section3_1_1_7LongValuesInHeaderFields:
    def test_long_values(self) -> None:
        long_tag = "k" * 2000
        vias = [f"Via: SIP/2.0/TCP sip{i}.example.com;branch=z9hG4bK{i:04d}" for i in range(40)]
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            f'To: "I have a user name of {"extreme" * 40} proportion" <sip:user@example.com>',
            f"From: sip:caller@example.net;tag={long_tag}",
            "Call-ID: longreq.one" + "really" * 100 + "longcallid",
            "CSeq: 3882340 INVITE",
            *vias,
            "Max-Forwards: 70",
            "x-extremely-long-header: " + "value" * 500,
            "Content-Length: 0",
        )
        msg = request(data)
        assert msg.from_tag == long_tag
        assert len(msg.vias) == 40
        assert msg.vias[-1].host == "sip39.example.com"
        assert request(msg.serialize()) == msg


class TestRfc4475Section3_1_1_8ExtraTrailingOctetsInUdpDatagram:
    def test_octets_past_content_length_are_ignored(self) -> None:
        register = wire(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:j.user@example.com;tag=43251j3j324",
            "Max-Forwards: 8",
            "I: dblreq.0ha0isndaksdj99sdfafnl3lk233412",
            "Contact: sip:j.user@host.example.com",
            "CSeq: 8 REGISTER",
            "Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492",
            "Content-Length: 0",
        )
        msg = request(register + b"\r\n" + INVITE)
        assert msg.method == "REGISTER"
        assert msg.body == b""
        contact = msg.contact
        assert contact is not None
        assert contact.uri.host == "host.example.com"


class TestRfc4475Section3_1_1_9SemicolonSeparatedParametersInUriUserPart:
    DATA = wire(
        "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0",
        "To: sip:j_user@example.com",
        "From: sip:caller@example.org;tag=33242",
        "Max-Forwards: 3",
        "Call-ID: semiuri.0ha0isndaksdj",
        "CSeq: 8 OPTIONS",
        "Accept: application/sdp, application/pkcs7-mime,",
        "        multipart/mixed, multipart/signed,",
        "        message/sip, message/sipfrag",
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw",
        "l: 0",
    )

    def test_user_part_keeps_its_semicolons(self) -> None:
        msg = request(self.DATA)
        assert msg.uri.user == "user;par=u%40example.net"
        assert msg.uri.host == "example.com"
        assert msg.uri.params == ()
        assert msg.headers.get_all("Accept") == [
            "application/sdp",
            "application/pkcs7-mime",
            "multipart/mixed",
            "multipart/signed",
            "message/sip",
            "message/sipfrag",
        ]


class TestRfc4475Section3_1_1_10VariedAndUnknownTransportTypes:
    def test_transports(self) -> None:
        data = wire(
            "OPTIONS sip:user@example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: <sip:caller@example.com>;tag=323",
            "Max-Forwards: 70",
            "Call-ID:  transports.kijh4akdnaqjkwendsasfdj",
            "Accept: application/sdp",
            "CSeq: 60 OPTIONS",
            "Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw",
            "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf",
            "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj",
            "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en",
            "Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee",
            "l: 0",
        )
        transports = [v.transport for v in request(data).vias]
        assert transports == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


UNREASON_PHRASE = "= 2**3 * 5**2 но сто девяносто девять - простое"


class TestRfc4475Section3_1_1_12UnusualReasonPhrase:
    def test_utf8_reason_phrase(self) -> None:
        body = SDP_150.replace("192.0.2.3", "192.0.2.198").replace("192.0.2.4", "192.0.2.198")
        data = wire(
            f"SIP/2.0 200 {UNREASON_PHRASE}",
            "Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923",
            "Call-ID: unreason.1234ksdfak3j2erwedfsASdf",
            "CSeq: 35 INVITE",
            "From: sip:user@example.com;tag=11141343",
            "To: sip:user@example.edu;tag=2229",
            "Content-Length: 154",
            "Content-Type: application/sdp",
            "Contact: <sip:user@host198.example.com>",
            body=body,
        )
        msg = response(data)
        assert msg.status == 200
        assert msg.reason == UNREASON_PHRASE
        assert len(msg.body) == 154
        assert response(msg.serialize()) == msg


class TestRfc4475Section3_1_1_13EmptyReasonPhrase:
    def test_empty_reason(self) -> None:
        data = wire(
            "SIP/2.0 100 ",
            "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
            "Call-ID: noreason.asndj203insdf99223ndf",
            "CSeq: 35 INVITE",
            "From: <sip:user@example.com>;tag=39ansfi3",
            "To: <sip:user@example.edu>;tag=902jndnke3",
            "Content-Length: 0",
            "Contact: <sip:user@host105.example.com>",
        )
        msg = response(data)
        assert (msg.status, msg.reason) == (100, "")


# ---------------------------------------------------------------------------------------------
# RFC 4475 §3.1.2: invalid messages


class TestRfc4475Section3_1_2InvalidMessages:
    def test_badinv01_extraneous_separators(self) -> None:
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;;tag=134161461246",
            "Max-Forwards: 7",
            "Call-ID: badinv01.0ha0isndaksdjasdf3234nas",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.15;;,;,,",
            'Contact: "Joe" <sip:joe@example.org>;;;;',
            "Content-Length: 150",
            "Content-Type: application/sdp",
            body=SDP_150,
        )
        error = parse_error(data)
        assert error.status_code == 400

    def test_clerr_content_length_larger_than_message(self) -> None:
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            "Max-Forwards: 80",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=93942939o2",
            "Contact: <sip:caller@hungry.example.net>",
            "Call-ID: clerr.0ha0isndaksdjweiafasdk3",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523",
            "Content-Type: application/sdp",
            "Content-Length: 9999",
            body=SDP_150,
        )
        error = parse_error(data)
        assert "Content-Length" in error.reason
        answer = error_response(error)
        assert answer is not None
        assert answer.status == 400

    def test_ncl_negative_content_length(self) -> None:
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            "Max-Forwards: 254",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=32394234",
            "Call-ID: ncl.0ha0isndaksdj2193423r542w35",
            "CSeq: 0 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw",
            "Contact: <sip:caller@example53.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: -999",
            body=SDP_150,
        )
        assert "Content-Length" in parse_error(data).reason

    def test_scalar02_overlarge_request_scalars(self) -> None:
        data = wire(
            "REGISTER sip:example.com SIP/2.0",
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3",
            "To: <sip:user@example.com>",
            "From: <sip:user@example.com>;tag=239232jh3",
            "CSeq: 36893488147419103232 REGISTER",
            "Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32",
            "Max-Forwards: 300",
            "Expires: " + "1" + "0" * 80,
            "Contact: <sip:user@host129.example.com>",
            "  ;expires=280297596632815",
            "Content-Length: 0",
        )
        error = parse_error(data)
        assert "CSeq" in error.reason
        assert error.method == "REGISTER"
        answer = error_response(error)
        assert answer is not None
        assert answer.headers["CSeq"] == "36893488147419103232 REGISTER"

    def test_max_forwards_over_255_alone(self) -> None:
        data = INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 300")
        assert "Max-Forwards" in parse_error(data).reason

    def test_scalarlg_overlarge_response_scalars(self) -> None:
        data = wire(
            "SIP/2.0 503 Service Unavailable",
            "Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129",
            "To: <sip:user@example.com>",
            "From: <sip:other@example.net>;tag=2easdjfejw",
            "CSeq: 9292394834772304023312 OPTIONS",
            "Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r",
            "Retry-After: 949302838503028349304023988",
            'Warning: 1812 overture "In Progress"',
            "Content-Length: 0",
        )
        error = parse_error(data)
        assert error_response(error) is None  # never answer a response

    def test_quotbal_unterminated_quoted_display_name(self) -> None:
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            'To: "Mr. J. User <sip:j.user@example.com>',
            "From: sip:caller@example.net;tag=93334",
            "Max-Forwards: 10",
            "Call-ID: quotbal.aksdj",
            "Contact: <sip:caller@host59.example.net>",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234",
            "Content-Type: application/sdp",
            "Content-Length: 150",
            body=SDP_150,
        )
        error = parse_error(data)
        answer = error_response(error, to_tag="xyz")
        assert answer is not None
        assert answer.status == 400
        assert answer.reason == error.reason
        assert answer.headers["Via"] == "SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234"
        assert answer.headers["To"].endswith(";tag=xyz")
        assert answer.headers["Call-ID"] == "quotbal.aksdj"

    def test_ltgtruri_angle_brackets_around_request_uri(self) -> None:
        data = wire(
            "INVITE <sip:user@example.com> SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:caller@example.net;tag=39291",
            "Max-Forwards: 23",
            "Call-ID: ltgtruri.1@192.0.2.5",
            "CSeq: 1 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.5",
            "Contact: <sip:caller@host5.example.net>",
            "Content-Type: application/sdp",
            "Content-Length: 150",
            body=SDP_150,
        )
        error = parse_error(data)
        assert "Request-URI" in error.reason
        assert error.method == "INVITE"
        assert error_response(error) is not None

    @pytest.mark.parametrize(
        ("start_line", "case"),
        [
            ("INVITE sip:user@example.com; lr SIP/2.0", "lwsruri"),
            ("INVITE  sip:user@example.com  SIP/2.0", "lwsstart"),
            ("INVITE sip:user@example.com SIP/2.0  ", "trws"),
            ("INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0", "escruri"),
        ],
    )
    def test_malformed_request_lines(self, start_line: str, case: str) -> None:
        data = INVITE.replace(b"INVITE sip:bob@biloxi.example.com SIP/2.0", start_line.encode())
        assert parse_error(data).status_code == 400, case

    def test_regbadct_addr_spec_with_header_needs_angle_brackets(self) -> None:
        data = wire(
            "REGISTER sip:example.com SIP/2.0",
            "To: sip:user@example.com",
            "From: sip:user@example.com;tag=998332",
            "Max-Forwards: 70",
            "Call-ID: regbadct.k345asrl3fdbv@10.0.0.1",
            "CSeq: 1 REGISTER",
            "Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw",
            "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "l: 0",
        )
        msg = request(data)  # Contact is only checked when the user agent reads it
        with pytest.raises(SipParseError):
            _ = msg.contacts

    def test_badaspec_spaces_inside_angle_brackets(self) -> None:
        data = wire(
            "OPTIONS sip:user@example.org SIP/2.0",
            "Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234",
            "Max-Forwards: 70",
            'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423',
            'To: "Watson, Thomas" < sip:t.watson@example.org >',
            "Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3",
            "Accept: application/sdp",
            "CSeq: 3923239 OPTIONS",
            "l: 0",
        )
        parse_error(data)

    def test_baddn_non_token_characters_in_display_name(self) -> None:
        data = wire(
            "OPTIONS sip:t.watson@example.org SIP/2.0",
            "Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw",
            "Max-Forwards:      70",
            "From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            "To:      Watson, Thomas <sip:t.watson@example.org>",
            "Call-ID: baddn.31415@c.example.com",
            "Accept: application/sdp",
            "CSeq:    3923239 OPTIONS",
            "l: 0",
        )
        assert "display name" in parse_error(data).reason

    def test_badvers_unknown_protocol_version_is_505(self) -> None:
        data = wire(
            "OPTIONS sip:t.watson@example.org SIP/7.0",
            "Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw",
            "Max-Forwards:     70",
            "From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe",
            "To:      T. Watson <sip:t.watson@example.org>",
            "Call-ID: badvers.31417@c.example.com",
            "CSeq:    1 OPTIONS",
            "l: 0",
        )
        error = parse_error(data)
        assert error.status_code == 505
        answer = error_response(error)
        assert answer is not None
        assert answer.status == 505

    def test_mismatch01_cseq_method_differs_from_request_line(self) -> None:
        data = wire(
            "OPTIONS sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=34525",
            "Max-Forwards: 6",
            "Call-ID: mismatch01.dj0234sxdfl3",
            "CSeq: 8 INVITE",
            "Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw",
            "l: 0",
        )
        error = parse_error(data)
        assert "CSeq" in error.reason
        answer = error_response(error)
        assert answer is not None
        assert answer.headers["CSeq"] == "8 INVITE"

    def test_mismatch02_unknown_method_with_cseq_mismatch(self) -> None:
        data = wire(
            "NEWMETHOD sip:user@example.com SIP/2.0",
            "To: sip:j.user@example.com",
            "From: sip:caller@example.net;tag=34525",
            "Max-Forwards: 6",
            "Call-ID: mismatch02.dj0234sxdfl3",
            "CSeq: 8 INVITE",
            "Contact: <sip:caller@host.example.net>",
            "Via: SIP/2.0/UDP host.example.net;branch=z9hG4bKkdjuw",
            "Content-Type: application/sdp",
            "l: 150",
            body=SDP_150,
        )
        assert parse_error(data).method == "NEWMETHOD"

    def test_bigcode_overlarge_response_code(self) -> None:
        data = wire(
            "SIP/2.0 4294967301 better not break the receiver",
            "Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe",
            "Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i",
            "CSeq: 353494 INVITE",
            "From: <sip:user@example.com>;tag=39ansfi3",
            "To: <sip:user@example.edu>;tag=902jndnke3",
            "Content-Length: 0",
            "Contact: <sip:user@host105.example.com>",
        )
        assert "status code" in parse_error(data).reason


class TestRfc4475Section3_3ApplicationLayerSemantics:
    def test_insuf_missing_required_headers(self) -> None:
        data = wire(
            "INVITE sip:user@example.com SIP/2.0",
            "CSeq: 193942 INVITE",
            "Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf",
            "Content-Type: application/sdp",
            "l: 150",
            body=SDP_150,
        )
        error = parse_error(data)
        assert error.reason.startswith("Missing")
        assert error_response(error) is None  # no From/To/Call-ID: cannot be routed

    @pytest.mark.parametrize(
        "uri", ["nobodyKnowsThisScheme:totallyopaque-content", "soap.beep://192.0.2.103:3002"]
    )
    def test_unknown_request_uri_scheme_is_416(self, uri: str) -> None:
        data = INVITE.replace(b"sip:bob@biloxi.example.com SIP", f"{uri} SIP".encode())
        assert parse_error(data).status_code == 416

    def test_unksm2_unknown_schemes_in_header_fields_are_accepted(self) -> None:
        data = wire(
            "REGISTER sip:example.com SIP/2.0",
            "To: isbn:2983792873",
            "From: <http://www.example.com>;tag=3234233",
            "Call-ID: unksm2.daksdj@hyphenated-host.example.com",
            "CSeq: 234902 REGISTER",
            "Max-Forwards: 70",
            "Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw",
            "Contact: <name:John_Smith>",
            "l: 0",
        )
        msg = request(data)
        assert msg.to.uri.scheme == "isbn"
        assert msg.to.uri.opaque == "2983792873"
        assert str(msg.from_.uri) == "http://www.example.com"
        contact = msg.contact
        assert contact is not None
        assert str(contact.uri) == "name:John_Smith"


# ---------------------------------------------------------------------------------------------
# RFC 3261 §7: message structure, headers, bodies


class TestRfc3261Section7_3HeaderFields:
    @pytest.mark.parametrize(
        ("short", "canonical"),
        [
            ("i", "Call-ID"),
            ("m", "Contact"),
            ("f", "From"),
            ("t", "To"),
            ("v", "Via"),
            ("l", "Content-Length"),
            ("c", "Content-Type"),
            ("k", "Supported"),
            ("s", "Subject"),
            ("e", "Content-Encoding"),
            ("o", "Event"),
            ("u", "Allow-Events"),
            ("r", "Refer-To"),
            ("b", "Referred-By"),
            ("x", "Session-Expires"),
        ],
    )
    def test_compact_forms_expand(self, short: str, canonical: str) -> None:
        assert canonical_name(short) == canonical
        assert canonical_name(short.upper()) == canonical
        headers = Headers([(short, "value")])
        assert headers.items() == [(canonical, "value")]
        assert headers.get(canonical.upper()) == "value"

    def test_names_are_case_insensitive(self) -> None:
        headers = Headers([("call-id", "abc"), ("X-Custom", "1"), ("x-custom", "2")])
        assert headers.items()[0] == ("Call-ID", "abc")
        assert headers["CALL-ID"] == "abc"
        assert headers.get_all("X-CUSTOM") == ["1", "2"]
        assert "x-Custom" in headers
        assert "Missing" not in headers
        with pytest.raises(KeyError):
            _ = headers["Missing"]

    def test_contact_split_respects_quotes_and_angle_brackets(self) -> None:
        data = INVITE.replace(
            b"Contact: <sip:alice@pc33.atlanta.example.com>",
            b'Contact: "Doe, John" <sip:j@a.example.com;x=1,2>;q=0.5, '
            b"sip:k@b.example.com;expires=60, <sip:l@c.example.com?Subject=a,b>",
        )
        contacts = request(data).contacts
        assert [c.display_name for c in contacts] == ["Doe, John", None, None]
        assert contacts[0].uri.param("x") == "1,2"
        assert contacts[0].param("q") == "0.5"
        assert contacts[1].param("expires") == "60"
        assert contacts[2].uri.headers == (("Subject", "a,b"),)

    def test_multi_value_headers_split(self) -> None:
        data = INVITE.replace(
            b"Max-Forwards: 70",
            b"Max-Forwards: 70\r\nAllow: INVITE, ACK,BYE\r\nSupported: timer, 100rel\r\n"
            b"Require: replaces\r\nRecord-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
        )
        msg = request(data)
        assert msg.headers.get_all("Allow") == ["INVITE", "ACK", "BYE"]
        assert msg.headers.get_all("Supported") == ["timer", "100rel"]
        assert msg.headers.get_all("Require") == ["replaces"]
        assert [r.uri.host for r in msg.record_routes] == ["p1.example.com", "p2.example.com"]

    @pytest.mark.parametrize(
        "name", ["WWW-Authenticate", "Authorization", "Proxy-Authenticate", "Proxy-Authorization"]
    )
    def test_auth_headers_are_never_split(self, name: str) -> None:
        value = 'Digest realm="a, b", nonce="n", qop="auth,auth-int", algorithm=MD5'
        data = INVITE.replace(b"Max-Forwards: 70", f"Max-Forwards: 70\r\n{name}: {value}".encode())
        assert request(data).headers.get_all(name) == [value]

    def test_folding_with_tabs(self) -> None:
        data = INVITE.replace(b"Max-Forwards: 70", b"Subject: one\r\n\ttwo\r\n   three")
        assert request(data).headers["Subject"] == "one two three"

    def test_bare_lf_line_endings_are_tolerated(self) -> None:
        body = SDP_150.replace("\r\n", "\n").encode()
        data = INVITE.replace(b"\r\n", b"\n").replace(b"Length: 150", b"Length: %d" % len(body))
        msg = request(data)
        assert msg.cseq == CSeq(314159, "INVITE")
        assert msg.body == body

    def test_stray_cr_line_inside_the_header_block_is_rejected(self) -> None:
        data = INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\n\r\r\n")
        assert parse_error(data).reason.startswith("Malformed header line")

    def test_leading_crlf_before_start_line_is_ignored(self) -> None:
        assert request(b"\r\n\r\n" + INVITE).method == "INVITE"

    def test_header_editing(self) -> None:
        headers = Headers([("Via", "a"), ("Via", "b"), ("To", "t")])
        headers.prepend("v", "top")
        assert headers.get_all("Via") == ["top", "a", "b"]
        headers.replace_first("Via", "TOP")
        headers.remove_first("via")
        assert headers.get_all("Via") == ["a", "b"]
        headers.set("Via", "only")
        assert headers.items() == [("Via", "only"), ("To", "t")]
        headers.set("Subject", "new")
        headers.replace_first("Event", "dialog")
        headers.remove("to")
        assert headers.items() == [("Via", "only"), ("Subject", "new"), ("Event", "dialog")]
        copy = headers.copy()
        copy.add("X-A", "1")
        assert len(copy) == len(headers) + 1
        assert headers != copy
        assert list(headers) == headers.items()
        assert "Headers(" in repr(headers)

    def test_absent_names_and_foreign_comparison(self) -> None:
        headers = Headers([("To", "t")])
        headers.remove_first("Via")
        headers.remove("Via")
        assert headers.items() == [("To", "t")]
        assert headers != [("To", "t")]
        assert 5 not in headers

    def test_header_injection_is_refused(self) -> None:
        headers = Headers()
        with pytest.raises(LocalError):
            headers.add("Subject", "a\r\nVia: evil")
        with pytest.raises(LocalError):
            headers.add("Bad Name", "x")

    def test_malformed_header_lines(self) -> None:
        assert "Malformed header" in parse_error(INVITE.replace(b"Max-Forwards: 70", b"j")).reason
        assert (
            "Continuation"
            in parse_error(
                INVITE.replace(
                    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n",
                    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n folded\r\n",
                )
            ).reason
        )

    @pytest.mark.parametrize(
        ("old", "new", "reason"),
        [
            (b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com", b"Call-ID: a b", "Call-ID"),
            (b"INVITE sip:bob", b"INV@TE sip:bob", "method"),
            (b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n", b"", "Call-ID"),
        ],
    )
    def test_other_request_faults(self, old: bytes, new: bytes, reason: str) -> None:
        assert reason in parse_error(INVITE.replace(old, new)).reason

    def test_response_with_other_version(self) -> None:
        data = wire(
            "SIP/3.0 200 OK",
            "Via: SIP/2.0/UDP a.example.com;branch=z9hG4bK1",
            "From: <sip:a@a.example.com>;tag=1",
            "To: <sip:b@b.example.com>;tag=2",
            "Call-ID: v3",
            "CSeq: 1 OPTIONS",
        )
        assert "version" in parse_error(data).reason

    def test_duplicate_from_is_rejected(self) -> None:
        data = INVITE.replace(b"Max-Forwards: 70", b"From: <sip:x@y.example.com>;tag=2")
        parse_error(data)


class TestRfc3261Section18_3Framing:
    def test_udp_body_truncated_to_content_length(self) -> None:
        msg = request(INVITE + b"garbage after the body")
        assert msg.body == SDP_150.encode()

    def test_udp_without_content_length_takes_the_rest(self) -> None:
        data = INVITE.replace(b"Content-Length: 150\r\n", b"")
        assert request(data).body == SDP_150.encode()

    def test_body_shorter_than_content_length_is_an_error(self) -> None:
        error = parse_error(INVITE[:-10])
        assert error.reason == "Body shorter than Content-Length"

    def test_conflicting_content_lengths(self) -> None:
        data = INVITE.replace(b"Content-Length: 150", b"Content-Length: 150\r\nl: 10")
        assert "Conflicting" in parse_error(data).reason

    def test_missing_blank_line_means_no_body(self) -> None:
        data = INVITE.split(b"\r\n\r\n")[0].replace(b"Content-Length: 150", b"l: 0")
        assert request(data).body == b""

    def test_too_large(self) -> None:
        with pytest.raises(MessageTooLarge) as info:
            parse(INVITE, max_size=450)  # header block 396 octets, message 550
        error = info.value
        assert error.status_code == 513
        answer = error_response(error)
        assert answer is not None
        assert answer.status == 513
        assert answer.headers["CSeq"] == "314159 INVITE"

    def test_too_large_header_block_keeps_the_lines_that_fit(self) -> None:
        with pytest.raises(MessageTooLarge) as info:
            parse(INVITE, max_size=130)
        assert info.value.headers.get("Via") is not None
        assert error_response(info.value) is None  # From, To... were past the limit
        with pytest.raises(MessageTooLarge) as info:
            parse(INVITE, max_size=300)
        answer = error_response(info.value)
        assert answer is not None
        assert answer.status == 513

    def test_serialize_always_writes_correct_content_length(self) -> None:
        msg = request(INVITE)
        msg.body = b"v=0\r\n"
        msg.headers.add("Content-Length", "999")
        data = msg.serialize()
        assert data.count(b"Content-Length") == 1
        assert b"Content-Length: 5\r\n" in data
        bare = SipRequest("OPTIONS", SipUri.parse("sip:a.example.com"), Headers())
        assert bare.serialize() == b"OPTIONS sip:a.example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n"

    def test_keepalive(self) -> None:
        assert is_keepalive(b"\r\n\r\n")
        assert is_keepalive(b"\r\n")
        assert not is_keepalive(b"")
        assert not is_keepalive(INVITE)


class TestRfc3261Section19_1SipUri:
    @pytest.mark.parametrize(
        "text",
        [
            "sip:alice@atlanta.com",
            "sip:alice:secretword@atlanta.com;transport=tcp",
            "sips:alice@atlanta.com?subject=project%20x&priority=urgent",
            "sip:+1-212-555-1212:1234@gateway.com;user=phone",
            "sips:1212@gateway.com",
            "sip:alice@192.0.2.4",
            "sip:atlanta.com;method=REGISTER?to=alice%40atlanta.com",
            "sip:alice;day=tuesday@atlanta.com",
            "sip:[2001:db8::10]:5070;transport=udp",
            "sip:user@[::1]",
            "tel:+1-201-555-0123;phone-context=example.com",
            "urn:service:sos",
        ],
    )
    def test_round_trip(self, text: str) -> None:
        assert str(SipUri.parse(text)) == text

    def test_fields(self) -> None:
        uri = SipUri.parse("SIPS:alice:pw@[2001:db8::10]:5071;Transport=TLS;lr?h=v")
        assert uri.scheme == "sips"
        assert (uri.user, uri.password) == ("alice", "pw")
        assert (uri.host, uri.address, uri.port) == ("[2001:db8::10]", "2001:db8::10", 5071)
        assert uri.param("transport") == "TLS"
        assert uri.has_param("LR")
        assert uri.param("lr") is None
        assert uri.headers == (("h", "v"),)
        assert uri.is_sip
        assert str(uri.with_param("maddr", "x").without_param("lr").without_headers()) == (
            "sips:alice:pw@[2001:db8::10]:5071;Transport=TLS;maddr=x"
        )
        tel = SipUri.parse("tel:+15551234")
        assert (tel.scheme, tel.user, tel.host, tel.is_sip) == ("tel", "+15551234", "", False)

    @pytest.mark.parametrize(
        "text",
        [
            "sip:",
            "sip:@host",
            "<sip:a@b>",
            "sip:a@b c",
            "sip:a@[::1",
            "sip:a@[zz::1]",
            "sip:a@[::1]x",
            "sip:a@host:99999",
            "sip:a@host:port",
            "sip:a@-bad-",
            "sip:a@host;;lr",
            "sip:a@host?&x",
            "tel:",
            "tel:;phone-context=x",
            ":nothing",
        ],
    )
    def test_invalid(self, text: str) -> None:
        with pytest.raises(SipParseError):
            SipUri.parse(text)


class TestRfc3261Section20NameAddrViaCSeq:
    def test_name_addr_forms(self) -> None:
        full = NameAddr.parse('"A \\"B\\"" <sip:a@b.example.com;transport=tcp>;tag=x;foo')
        assert full.display_name == 'A "B"'
        assert full.uri.param("transport") == "tcp"
        assert full.tag == "x"
        assert full.has_param("foo")
        assert str(full) == '"A \\"B\\"" <sip:a@b.example.com;transport=tcp>;tag=x;foo'
        bare = NameAddr.parse("sip:a@b.example.com;tag=y")
        assert (bare.uri.params, bare.tag) == ((), "y")
        assert str(bare.with_tag("z")) == "<sip:a@b.example.com>;tag=z"
        assert str(full.without_params()) == '"A \\"B\\"" <sip:a@b.example.com;transport=tcp>'
        assert NameAddr.parse("Bob <sip:bob@x.example.com>").display_name == "Bob"

    @pytest.mark.parametrize(
        "text",
        [
            '"unterminated <sip:a@b>',
            '"no uri"',
            "<sip:a@b",
            "",
            "sip:a@b;=x",
            "sip:a@b;tag=",
            'sip:a@b;x="open',
            'sip:a@b;x="closed"tail',
            "sip:a@b junk",
            "<sip:a@b> junk",
        ],
    )
    def test_name_addr_invalid(self, text: str) -> None:
        with pytest.raises(SipParseError):
            NameAddr.parse(text)

    def test_via_fields(self) -> None:
        via = Via.parse("SIP/2.0/UDP [2001:db8::1]:5062;branch=z9hG4bKx;rport=5999;received=::2")
        assert (via.transport, via.host, via.port) == ("UDP", "[2001:db8::1]", 5062)
        assert via.branch == "z9hG4bKx"
        assert via.has_rfc3261_branch
        assert via.rport_requested
        assert via.rport == 5999
        assert via.received == "::2"
        assert via.sent_by == "[2001:db8::1]:5062"
        assert str(Via.parse(str(via))) == str(via)

    def test_via_rport_flag_and_defaults(self) -> None:
        via = Via.parse("SIP/2.0/tls host.example.com;rport;branch=abc")
        assert via.transport == "TLS"
        assert via.rport_requested
        assert via.rport is None
        assert not via.has_rfc3261_branch
        assert via.sent_by == "host.example.com:5061"
        assert via.maddr is None

    def test_via_new(self) -> None:
        via = Via.new("udp", "::1", 5060)
        assert str(via).startswith("SIP/2.0/UDP [::1]:5060;branch=z9hG4bK")
        assert via.rport_requested
        fixed = Via.new("TCP", "10.0.0.1", None, branch="z9hG4bKfixed", rport=False)
        assert str(fixed) == "SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKfixed"
        assert generate_branch() != generate_branch()

    @pytest.mark.parametrize(
        "text",
        [
            "SIP/2.0/UDP",
            "SIP/3.0/UDP host",
            "HTTP/2.0/UDP host",
            "SIP/2.0/UDP host;;branch=x",
            "SIP/2.0/UDP host:0x10",
            "SIP/2.0/UDP host junk",
        ],
    )
    def test_via_invalid(self, text: str) -> None:
        with pytest.raises(SipParseError):
            Via.parse(text)

    @pytest.mark.parametrize(
        "text", ["1", "x INVITE", "1 INVITE extra", "2147483648 INVITE", "1 INV@TE"]
    )
    def test_cseq_invalid(self, text: str) -> None:
        with pytest.raises(SipParseError):
            CSeq.parse(text)

    def test_cseq(self) -> None:
        assert CSeq.parse("  2147483647   BYE ") == CSeq(2147483647, "BYE")
        assert str(CSeq(1, "ACK")) == "1 ACK"


class TestRfc3261Section20TypedAccessors:
    def test_accessors(self) -> None:
        msg = request(INVITE)
        assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
        assert msg.from_tag == "1928301774"
        assert msg.to_tag is None
        assert msg.via.sent_by == "pc33.atlanta.example.com:5060"
        assert msg.max_forwards == 70
        assert msg.content_type == "application/sdp"
        assert msg.expires is None
        assert not msg.is_star_contact
        assert msg.routes == []

    def test_expires(self) -> None:
        msg = request(INVITE.replace(b"Max-Forwards: 70", b"Expires: 3600"))
        assert msg.expires == 3600

    def test_missing_and_bad_values(self) -> None:
        msg = SipRequest("OPTIONS", SipUri.parse("sip:a.example.com"))
        assert msg.max_forwards is None
        assert msg.content_type is None
        assert msg.contact is None
        with pytest.raises(SipParseError):
            _ = msg.call_id
        msg.headers.add("Expires", "soon")
        msg.headers.add("Max-Forwards", "-1")
        with pytest.raises(SipParseError):
            _ = msg.expires
        with pytest.raises(SipParseError):
            _ = msg.max_forwards

    def test_star_contact(self) -> None:
        data = INVITE.replace(b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: *")
        msg = request(data)
        assert msg.is_star_contact
        assert msg.contacts == []

    def test_response_helpers(self) -> None:
        ok = make_response(request(INVITE), 200, to_tag="abc")
        assert ok.is_success
        assert not ok.is_provisional
        assert make_response(request(INVITE), 180).is_provisional


class TestRfc3261Section8_2_6ResponseConstruction:
    def test_make_response_copies_headers_and_adds_tag(self) -> None:
        invite = request(
            INVITE.replace(
                b"Max-Forwards: 70",
                b"Max-Forwards: 70\r\nRecord-Route: <sip:p1.example.com;lr>\r\n"
                b"Via: SIP/2.0/UDP second.example.com;branch=z9hG4bK2",
            )
        )
        ringing = make_response(invite, 180, to_tag="t1")
        assert ringing.reason == "Ringing"
        assert ringing.headers.get_all("Via") == invite.headers.get_all("Via")
        assert ringing.to_tag == "t1"
        assert ringing.headers.get_all("Record-Route") == ["<sip:p1.example.com;lr>"]
        trying = make_response(invite, 100, to_tag="t1")
        assert trying.to_tag is None
        assert "Record-Route" not in trying.headers
        busy = make_response(invite, 486, to_tag="t1", headers=[("Retry-After", "30")])
        assert "Record-Route" not in busy.headers
        assert busy.headers["Retry-After"] == "30"
        odd = make_response(invite, 299, body=b"x", content_type="text/plain")
        assert (odd.reason, odd.content_type) == ("Unknown", "text/plain")
        tagged = make_response(parse_response_request(), 200, to_tag="other")
        assert tagged.to_tag == "already"

    def test_cancel(self) -> None:
        invite = request(INVITE.replace(b"Max-Forwards: 70", b"Route: <sip:p.example.com;lr>"))
        cancel = make_cancel(invite)
        assert cancel.method == "CANCEL"
        assert cancel.uri == invite.uri
        assert cancel.via == invite.via
        assert cancel.cseq == CSeq(314159, "CANCEL")
        assert cancel.headers["Route"] == "<sip:p.example.com;lr>"
        assert request(cancel.serialize()).serialize() == cancel.serialize()


def parse_response_request() -> SipRequest:
    return request(
        INVITE.replace(b"To: Bob <sip:bob@biloxi.example.com>", b"t: <sip:b@x>;tag=already")
    )


class TestErrorResponses:
    def test_ack_is_never_answered(self) -> None:
        data = INVITE.replace(b"INVITE sip:", b"ACK sip:").replace(b"314159 INVITE", b"1 ACK")
        error = parse_error(data.replace(b"Content-Length: 150", b"Content-Length: 999"))
        assert error_response(error) is None

    def test_garbage_start_line(self) -> None:
        error = parse_error(b"\x00\x01\x02 hello\r\n\r\n")
        assert error.method is None
        assert error_response(error) is None

    def test_existing_to_tag_is_kept(self) -> None:
        data = INVITE.replace(
            b"To: Bob <sip:bob@biloxi.example.com>", b"To: Bob <sip:bob@biloxi.example.com>;tag=x"
        )
        answer = error_response(parse_error(data.replace(b"CSeq: 314159", b"CSeq: x")))
        assert answer is not None
        assert answer.to_tag == "x"

    def test_generated_identifiers(self) -> None:
        assert generate_call_id("host.example.com").endswith("@host.example.com")
        assert "@" not in generate_call_id()
        assert generate_call_id() != generate_call_id()
        assert generate_tag() != generate_tag()

    def test_broken_to_still_gets_a_tag(self) -> None:
        error = parse_error(INVITE.replace(b"To: Bob <sip:bob@biloxi.example.com>", b'To: "x'))
        answer = error_response(error)
        assert answer is not None
        assert ";tag=" in answer.headers["To"]

    def test_errors_are_remote_errors(self) -> None:
        assert issubclass(SipParseError, RemoteError)
        assert issubclass(MessageTooLarge, SipMessageError)
        assert not issubclass(MessageTooLarge, SipParseError)


# ---------------------------------------------------------------------------------------------
# StreamFramer (RFC 3261 §18.3 over TCP)

OPTIONS = wire(
    "OPTIONS sip:bob@biloxi.example.com SIP/2.0",
    "Via: SIP/2.0/TCP pc33.atlanta.example.com;branch=z9hG4bKopt",
    "Max-Forwards: 70",
    "To: <sip:bob@biloxi.example.com>",
    "From: <sip:alice@atlanta.example.com>;tag=1",
    "Call-ID: opt1",
    "CSeq: 1 OPTIONS",
    "Content-Length: 0",
)


def messages_only(items: list[Message | SipMessageError]) -> list[Message]:
    out: list[Message] = []
    for item in items:
        assert not isinstance(item, SipMessageError)
        out.append(item)
    return out


class TestRfc3261Section18_3StreamFramer:
    def test_byte_by_byte(self) -> None:
        framer = StreamFramer()
        got: list[Message | SipMessageError] = []
        for i in range(len(INVITE)):
            got += framer.feed(INVITE[i : i + 1])
        assert messages_only(got) == [parse(INVITE)]
        assert framer.buffered == 0

    def test_several_messages_and_keepalives_in_one_chunk(self) -> None:
        framer = StreamFramer()
        got = framer.feed(b"\r\n\r\n" + INVITE + b"\r\n" + OPTIONS + INVITE[:40])
        assert [m.cseq.method for m in messages_only(got)] == ["INVITE", "OPTIONS"]
        assert framer.buffered == 40
        assert messages_only(framer.feed(INVITE[40:])) == [parse(INVITE)]

    def test_missing_content_length_means_empty_body(self) -> None:
        framer = StreamFramer()
        data = OPTIONS.replace(b"Content-Length: 0\r\n", b"")
        (msg,) = messages_only(framer.feed(data + OPTIONS))[:1]
        assert msg.body == b""

    def test_unparseable_message_is_returned_and_stream_continues(self) -> None:
        framer = StreamFramer()
        bad = OPTIONS.replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS")
        got = framer.feed(bad + OPTIONS)
        assert isinstance(got[0], SipParseError)
        assert isinstance(got[1], SipRequest)

    def test_oversized_header_block(self) -> None:
        framer = StreamFramer(max_header_size=64)
        with pytest.raises(MessageTooLarge):
            framer.feed(b"OPTIONS sip:a SIP/2.0\r\n" + b"X: " + b"y" * 100)
        with pytest.raises(LocalError):
            framer.feed(OPTIONS)

    def test_oversized_header_block_with_terminator(self) -> None:
        framer = StreamFramer(max_header_size=64)
        with pytest.raises(MessageTooLarge):
            framer.feed(INVITE)

    def test_oversized_body(self) -> None:
        framer = StreamFramer(max_body_size=100)
        with pytest.raises(MessageTooLarge) as info:
            framer.feed(INVITE)
        answer = error_response(info.value)
        assert answer is not None
        assert answer.status == 513

    def test_bad_content_length_loses_framing(self) -> None:
        framer = StreamFramer()
        with pytest.raises(SipParseError):
            framer.feed(OPTIONS.replace(b"Content-Length: 0", b"Content-Length: zero"))
        with pytest.raises(LocalError):
            framer.feed(b"")

    @given(cuts=st.lists(st.integers(min_value=0, max_value=2 * len(INVITE) + 8), max_size=12))
    def test_any_chunking_gives_the_same_messages(self, cuts: list[int]) -> None:
        stream = INVITE + b"\r\n\r\n" + INVITE
        framer = StreamFramer()
        got: list[Message | SipMessageError] = []
        last = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            got += framer.feed(stream[last:cut])
            last = max(last, cut)
        assert messages_only(got) == [parse(INVITE), parse(INVITE)]

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.binary(max_size=600))
    def test_fuzz_only_sip_errors(self, data: bytes) -> None:
        framer = StreamFramer(max_header_size=256, max_body_size=256)
        try:
            for item in framer.feed(data):
                assert isinstance(item, SipRequest | SipResponse | SipMessageError)
        except SipMessageError:
            pass


# ---------------------------------------------------------------------------------------------
# Fuzzing parse() and round trips

_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=12,
)
_HOST = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z][a-z0-9]{0,8}){0,3}", fullmatch=True)


def _parse_or_sip_error(data: bytes) -> None:
    try:
        msg = parse(data)
    except SipMessageError:
        return
    # Serializing is stable through a parse (Content-Length is added when it was missing).
    wire_form = msg.serialize()
    assert parse(wire_form).serialize() == wire_form


class TestParserFuzzing:
    @given(st.binary(max_size=1500))
    def test_random_bytes(self, data: bytes) -> None:
        _parse_or_sip_error(data)

    @given(st.data())
    def test_mutated_invites(self, data: st.DataObject) -> None:
        raw = bytearray(WSINV)
        for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
            pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
            action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
            byte = data.draw(st.sampled_from(b' \t\r\n:;,<>"\\@=/0aZ\x00\xff'))
            if action == "flip":
                raw[pos] = byte
            elif action == "insert":
                raw.insert(pos, byte)
            else:
                del raw[pos]
        _parse_or_sip_error(bytes(raw))

    @given(
        lines=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "Via",
                        "v",
                        "To",
                        "From",
                        "f",
                        "Contact",
                        "m",
                        "CSeq",
                        "Call-ID",
                        "l",
                        "Route",
                        "X-Y",
                        "Max-Forwards",
                    ]
                ),
                st.text(alphabet=' \t;,<>"\\:@=/sipz9hG4bK0123.', max_size=40),
            ),
            max_size=12,
        )
    )
    def test_structured_garbage(self, lines: list[tuple[str, str]]) -> None:
        head = ["INVITE sip:a@b.example.com SIP/2.0"] + [f"{n}: {v}" for n, v in lines]
        _parse_or_sip_error(wire(*head))

    @given(
        method=_TOKEN,
        user=_TOKEN,
        host=_HOST,
        tag=_TOKEN,
        branch=_TOKEN,
        number=st.integers(min_value=0, max_value=2**31 - 1),
        display=st.one_of(
            st.none(), st.text(max_size=20).filter(lambda s: "\r" not in s and "\n" not in s)
        ),
        body=st.binary(max_size=64),
    )
    def test_built_requests_round_trip(
        self,
        method: str,
        user: str,
        host: str,
        tag: str,
        branch: str,
        number: int,
        display: str | None,
        body: bytes,
    ) -> None:
        uri = SipUri(user=user, host=host)
        headers = Headers()
        headers.add("Via", str(Via.new("UDP", host, 5060, branch="z9hG4bK" + branch)))
        headers.add("From", str(NameAddr(uri, display, (("tag", tag),))))
        headers.add("To", str(NameAddr(uri)))
        headers.add("Call-ID", f"{tag}@{host}")
        headers.add("CSeq", f"{number} {method}")
        headers.add("Content-Length", str(len(body)))
        msg = SipRequest(method, uri, headers, body)
        again = request(msg.serialize())
        assert again == msg
        assert again.from_.display_name == display
        assert again.from_tag == tag
        assert again.cseq == CSeq(number, method)
