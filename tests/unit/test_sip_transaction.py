"""SIP transactions (RFC 3261 §17, RFC 6026, §13.3.1.4): timers on a virtual clock, matching,
the non-2xx ACK, and an in-memory UAC/UAS pair with scripted loss. No sockets."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest

from worker.sip.message import (
    Headers,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    make_cancel,
    make_response,
    parse,
)
from worker.sip.transaction import (
    AckTimeout,
    Address,
    OutgoingMessage,
    RequestReceived,
    ResponseReceived,
    Timers,
    TransactionError,
    TransactionEvent,
    TransactionLayer,
    TransactionState,
    TransactionTimeout,
    Transport,
    TransportFailure,
    UnmatchedResponse,
    build_non_2xx_ack,
    response_destination,
)

UAC: Address = ("192.0.2.1", 5060)
UAS: Address = ("192.0.2.2", 5060)
UDP = Transport.UDP
TCP = Transport.TCP


def make_request(
    method: str = "INVITE",
    *,
    branch: str = "z9hG4bKaaa",
    cseq: int = 1,
    transport: Transport = UDP,
    to_tag: str | None = None,
    call_id: str = "call-1",
    routes: Iterable[str] = (),
    via_host: str = "192.0.2.1",
) -> SipRequest:
    headers = Headers()
    headers.add("Via", f"SIP/2.0/{transport} {via_host}:5060;branch={branch};rport")
    for route in routes:
        headers.add("Route", route)
    headers.add("Max-Forwards", "70")
    headers.add("From", "<sip:alice@example.com>;tag=from1")
    headers.add("To", "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else ""))
    headers.add("Call-ID", call_id)
    headers.add("CSeq", f"{cseq} {method}")
    headers.add("Contact", "<sip:alice@192.0.2.1:5060>")
    return SipRequest(method, SipUri.parse("sip:bob@192.0.2.2"), headers)


def over_wire(message: SipRequest | SipResponse) -> SipRequest | SipResponse:
    """What the peer gets: the message serialized and parsed again."""
    return parse(message.serialize())


def wire_request(message: SipRequest) -> SipRequest:
    out = over_wire(message)
    assert isinstance(out, SipRequest)
    return out


def wire_response(message: SipResponse) -> SipResponse:
    out = over_wire(message)
    assert isinstance(out, SipResponse)
    return out


def drive(layer: TransactionLayer, until: float) -> list[tuple[float, OutgoingMessage]]:
    """Fire timers in order up to ``until``; return what was sent, stamped with the time."""
    sent: list[tuple[float, OutgoingMessage]] = []
    while (at := layer.next_timeout()) is not None and at <= until:
        layer.handle_timeout(at)
        sent += [(at, out) for out in layer.data_to_send()]
    return sent


def sent_messages(layer: TransactionLayer) -> list[SipRequest | SipResponse]:
    return [parse(out.data) for out in layer.data_to_send()]


def times(sent: list[tuple[float, OutgoingMessage]]) -> list[float]:
    return [at for at, _ in sent]


def only(events: list[TransactionEvent]) -> TransactionEvent:
    assert len(events) == 1, events
    return events[0]


def server_with_invite(
    transport: Transport = UDP, *, send_trying: bool = True
) -> tuple[TransactionLayer, SipRequest, str]:
    layer = TransactionLayer(send_trying=send_trying)
    invite = wire_request(make_request(transport=transport))
    layer.receive(invite, UAC, transport, 0.0)
    event = only(layer.events_received())
    assert isinstance(event, RequestReceived)
    assert event.transaction_id is not None
    return layer, event.request, event.transaction_id


# ---------------------------------------------------------------------------------------------
# Client INVITE


class TestRfc3261Section17_1_1_2InviteClientTimers:
    def test_timer_a_doubles_until_timer_b_over_udp(self) -> None:
        layer = TransactionLayer()
        tid = layer.send_request(make_request(), UAS, UDP, 0.0)
        first = layer.data_to_send()
        assert [out.destination for out in first] == [UAS]
        assert layer.state_of(tid) is TransactionState.CALLING
        resent = drive(layer, 40.0)
        assert times(resent) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
        intervals = [b - a for a, b in zip([0.0, *times(resent)], times(resent), strict=False)]
        assert intervals == [0.5, 1, 2, 4, 8, 16]
        assert all(out.data == first[0].data for _, out in resent)
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert (event.timer, event.transaction_id) == ("B", tid)
        assert layer.state_of(tid) is None
        assert len(layer) == 0
        assert layer.next_timeout() is None

    def test_timer_b_fires_at_64_t1(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request(), UAS, UDP, 100.0)
        layer.data_to_send()
        drive(layer, 131.9)
        assert layer.events_received() == []
        drive(layer, 132.0)
        assert isinstance(only(layer.events_received()), TransactionTimeout)

    def test_no_retransmission_over_tcp(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request(transport=TCP), UAS, TCP, 0.0)
        assert len(layer.data_to_send()) == 1
        assert layer.next_timeout() == 32.0
        assert drive(layer, 40.0) == []
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert event.timer == "B"

    def test_configurable_t1(self) -> None:
        layer = TransactionLayer(timers=Timers(t1=0.1, t2=1.0, t4=1.0))
        layer.send_request(make_request(), UAS, UDP, 0.0)
        layer.data_to_send()
        resent = drive(layer, 10.0)
        assert times(resent) == pytest.approx([0.1, 0.3, 0.7, 1.5, 3.1, 6.3])
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)

    def test_provisional_stops_retransmissions_and_timer_b(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        drive(layer, 0.5)
        layer.receive(wire_response(make_response(request, 100)), UAS, UDP, 0.7)
        layer.receive(wire_response(make_response(request, 180, to_tag="t")), UAS, UDP, 0.8)
        assert layer.state_of(tid) is TransactionState.PROCEEDING
        events = layer.events_received()
        assert [e.response.status for e in events if isinstance(e, ResponseReceived)] == [100, 180]
        assert drive(layer, 100.0) == []
        assert layer.events_received() == []
        assert layer.state_of(tid) is TransactionState.PROCEEDING


class TestRfc3261Section17_1_1_3AckForNon2xx:
    def test_ack_built_with_same_branch_and_to_tag(self) -> None:
        layer = TransactionLayer()
        request = make_request(routes=["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"])
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        busy = wire_response(make_response(request, 486, to_tag="busy-tag"))
        layer.receive(busy, UAS, UDP, 1.0)
        (ack,) = sent_messages(layer)
        assert isinstance(ack, SipRequest)
        assert ack.method == "ACK"
        assert ack.uri == request.uri
        assert ack.headers.get_all("Via") == [request.headers["Via"]]
        assert ack.via.branch == "z9hG4bKaaa"
        assert ack.to_tag == "busy-tag"
        assert ack.from_ == request.from_
        assert ack.call_id == request.call_id
        assert (ack.cseq.number, ack.cseq.method) == (1, "ACK")
        assert ack.headers.get_all("Route") == request.headers.get_all("Route")
        assert ack.body == b""
        event = only(layer.events_received())
        assert isinstance(event, ResponseReceived)
        assert event.response.status == 486
        assert event.transaction_id == tid
        assert layer.state_of(tid) is TransactionState.COMPLETED

    def test_final_retransmission_is_acked_again_not_reported(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        busy = make_response(request, 486, to_tag="b")
        layer.receive(wire_response(busy), UAS, UDP, 1.0)
        first_ack = layer.data_to_send()
        layer.events_received()
        layer.receive(wire_response(busy), UAS, UDP, 2.0)
        assert layer.data_to_send() == first_ack
        assert layer.events_received() == []
        layer.receive(wire_response(make_response(request, 180, to_tag="b")), UAS, UDP, 2.5)
        assert layer.data_to_send() == []

    def test_timer_d_is_32s_over_udp(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 503, to_tag="x")), UAS, UDP, 2.0)
        assert layer.next_timeout() == 34.0
        drive(layer, 33.9)
        assert layer.state_of(tid) is TransactionState.COMPLETED
        drive(layer, 34.0)
        assert layer.state_of(tid) is None

    def test_timer_d_covers_a_long_timer_h(self) -> None:
        layer = TransactionLayer(timers=Timers(t1=1.0))
        request = make_request()
        layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 503, to_tag="x")), UAS, UDP, 2.0)
        assert layer.next_timeout() == 66.0  # 64*T1 > 32 s
        assert Timers(t1=1.0).d == 64.0
        assert Timers().d == 32.0

    def test_timer_d_is_zero_over_tcp(self) -> None:
        layer = TransactionLayer()
        request = make_request(transport=TCP)
        tid = layer.send_request(request, UAS, TCP, 0.0)
        layer.receive(wire_response(make_response(request, 404, to_tag="x")), UAS, TCP, 2.0)
        assert layer.state_of(tid) is None
        assert [m.method for m in sent_messages(layer) if isinstance(m, SipRequest)] == [
            "INVITE",
            "ACK",
        ]


class TestRfc6026Section8_4InviteClientAccepted:
    def test_2xx_retransmissions_reach_the_tu_until_it_acks(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        ok = make_response(request, 200, to_tag="ok-tag")
        layer.receive(wire_response(ok), UAS, UDP, 1.0)
        assert layer.state_of(tid) is TransactionState.ACCEPTED
        assert isinstance(only(layer.events_received()), ResponseReceived)
        assert layer.data_to_send() == []  # the ACK for a 2xx is the TU's
        layer.receive(wire_response(ok), UAS, UDP, 1.5)
        assert isinstance(only(layer.events_received()), ResponseReceived)
        ack = make_request("ACK", branch="z9hG4bKack", to_tag="ok-tag")
        layer.send_ack(ack, UAS, UDP, 1.6, transaction_id=tid)
        (sent_ack,) = layer.data_to_send()
        layer.receive(wire_response(ok), UAS, UDP, 2.5)
        assert layer.events_received() == []
        assert layer.data_to_send() == [sent_ack]
        assert layer.next_timeout() == 33.0  # timer M = 64*T1 after the 2xx
        drive(layer, 33.0)
        assert layer.state_of(tid) is None
        layer.receive(wire_response(ok), UAS, UDP, 40.0)
        stray = only(layer.events_received())
        assert isinstance(stray, UnmatchedResponse)
        assert stray.source == UAS

    def test_forked_2xx_with_another_tag_is_reported(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 200, to_tag="one")), UAS, UDP, 1.0)
        layer.send_ack(make_request("ACK", branch="z9hG4bKa1", to_tag="one"), UAS, UDP, 1.0, tid)
        layer.events_received()
        layer.receive(wire_response(make_response(request, 200, to_tag="two")), UAS, UDP, 1.2)
        event = only(layer.events_received())
        assert isinstance(event, ResponseReceived)
        assert event.response.to_tag == "two"

    def test_error_after_2xx_is_ignored(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 200, to_tag="t")), UAS, UDP, 1.0)
        layer.events_received()
        layer.data_to_send()
        layer.receive(wire_response(make_response(request, 500, to_tag="t")), UAS, UDP, 1.1)
        assert layer.events_received() == []
        assert layer.data_to_send() == []


# ---------------------------------------------------------------------------------------------
# Client non-INVITE


class TestRfc3261Section17_1_2_2NonInviteClientTimers:
    def test_timer_e_doubles_to_t2_until_timer_f(self) -> None:
        layer = TransactionLayer()
        tid = layer.send_request(make_request("OPTIONS"), UAS, UDP, 0.0)
        layer.data_to_send()
        resent = drive(layer, 40.0)
        assert times(resent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert (event.timer, event.transaction_id) == ("F", tid)
        assert event.request.method == "OPTIONS"

    def test_proceeding_retransmits_every_t2(self) -> None:
        layer = TransactionLayer()
        request = make_request("BYE")
        layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        drive(layer, 0.5)
        layer.receive(wire_response(make_response(request, 100)), UAS, UDP, 0.6)
        assert isinstance(only(layer.events_received()), ResponseReceived)
        resent = drive(layer, 40.0)
        assert times(resent) == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert event.timer == "F"

    def test_no_retransmission_over_tcp(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request("OPTIONS", transport=TCP), UAS, TCP, 0.0)
        layer.data_to_send()
        assert drive(layer, 40.0) == []
        assert isinstance(only(layer.events_received()), TransactionTimeout)

    def test_timer_k_is_t4_over_udp_and_absorbs_retransmissions(self) -> None:
        layer = TransactionLayer()
        request = make_request("BYE")
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.data_to_send()
        ok = wire_response(make_response(request, 200, to_tag="t"))
        layer.receive(ok, UAS, UDP, 1.0)
        assert isinstance(only(layer.events_received()), ResponseReceived)
        assert layer.state_of(tid) is TransactionState.COMPLETED
        assert layer.next_timeout() == 6.0
        layer.receive(ok, UAS, UDP, 2.0)
        assert layer.events_received() == []
        assert drive(layer, 5.9) == []
        assert layer.state_of(tid) is TransactionState.COMPLETED
        drive(layer, 6.0)
        assert layer.state_of(tid) is None

    def test_timer_k_is_zero_over_tcp(self) -> None:
        layer = TransactionLayer()
        request = make_request("BYE", transport=TCP)
        tid = layer.send_request(request, UAS, TCP, 0.0)
        layer.receive(wire_response(make_response(request, 200, to_tag="t")), UAS, TCP, 1.0)
        assert layer.state_of(tid) is None

    def test_custom_t4(self) -> None:
        layer = TransactionLayer(timers=Timers(t4=2.5))
        request = make_request("INFO")
        layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 200, to_tag="t")), UAS, UDP, 1.0)
        assert layer.next_timeout() == 3.5


# ---------------------------------------------------------------------------------------------
# Server INVITE


class TestRfc3261Section17_2_1InviteServer:
    def test_100_trying_sent_at_once(self) -> None:
        layer, invite, tid = server_with_invite()
        (trying,) = sent_messages(layer)
        assert isinstance(trying, SipResponse)
        assert trying.status == 100
        assert trying.to_tag is None
        assert layer.state_of(tid) is TransactionState.PROCEEDING
        assert layer.find_cancelled_invite(wire_request(make_cancel(invite))) is invite
        assert not layer.invite_answered(invite)

    def test_no_automatic_trying_when_disabled(self) -> None:
        layer, _, _ = server_with_invite(send_trying=False)
        assert layer.data_to_send() == []

    def test_retransmitted_invite_gets_last_provisional(self) -> None:
        layer, invite, _ = server_with_invite()
        layer.data_to_send()
        layer.send_response(make_response(invite, 180, to_tag="uas"), 0.1)
        (ringing,) = layer.data_to_send()
        layer.receive(wire_request(make_request()), UAC, UDP, 0.5)
        assert layer.events_received() == []
        assert layer.data_to_send() == [ringing]

    def test_timer_g_retransmits_final_until_timer_h(self) -> None:
        layer, invite, tid = server_with_invite()
        layer.data_to_send()
        layer.send_response(make_response(invite, 486, to_tag="uas"), 0.0)
        (busy,) = layer.data_to_send()
        assert busy.destination == UAC
        resent = drive(layer, 40.0)
        assert times(resent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        assert all(out.data == busy.data for _, out in resent)
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert (event.timer, event.transaction_id) == ("H", tid)
        assert layer.state_of(tid) is None

    def test_no_timer_g_over_tcp(self) -> None:
        layer, invite, _ = server_with_invite(TCP)
        layer.data_to_send()
        layer.send_response(make_response(invite, 486, to_tag="uas"), 0.0)
        layer.data_to_send()
        assert drive(layer, 40.0) == []
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert event.timer == "H"

    def test_ack_absorbed_and_timer_i_is_t4_over_udp(self) -> None:
        layer, invite, tid = server_with_invite()
        layer.data_to_send()
        busy = make_response(invite, 486, to_tag="uas")
        layer.send_response(busy, 0.0)
        layer.data_to_send()
        layer.receive(wire_request(make_request()), UAC, UDP, 0.2)
        assert layer.data_to_send()[0].data == busy.serialize()
        ack = wire_request(build_non_2xx_ack(make_request(), busy))
        layer.receive(ack, UAC, UDP, 1.0)
        assert layer.state_of(tid) is TransactionState.CONFIRMED
        assert layer.events_received() == []
        assert drive(layer, 5.9) == []  # timer G stopped
        layer.receive(ack, UAC, UDP, 2.0)
        layer.receive(wire_request(make_request()), UAC, UDP, 2.1)
        assert layer.events_received() == []
        assert layer.data_to_send() == []
        drive(layer, 6.0)
        assert layer.state_of(tid) is None

    def test_timer_i_is_zero_over_tcp(self) -> None:
        layer, invite, tid = server_with_invite(TCP)
        busy = make_response(invite, 603, to_tag="uas")
        layer.send_response(busy, 0.0)
        layer.receive(wire_request(build_non_2xx_ack(invite, busy)), UAC, TCP, 0.1)
        assert layer.state_of(tid) is None

    def test_cannot_answer_twice(self) -> None:
        layer, invite, _ = server_with_invite()
        layer.send_response(make_response(invite, 486, to_tag="uas"), 0.0)
        with pytest.raises(TransactionError):
            layer.send_response(make_response(invite, 200, to_tag="uas"), 0.1)


class TestRfc3261Section13_3_1_4AnswerRetransmission:
    def test_2xx_retransmitted_until_ack(self) -> None:
        layer, invite, tid = server_with_invite()
        layer.data_to_send()
        ok = make_response(invite, 200, to_tag="uas")
        layer.send_response(ok, 0.0)
        layer.data_to_send()
        assert layer.state_of(tid) is TransactionState.ACCEPTED
        resent = drive(layer, 10.0)
        assert times(resent) == [0.5, 1.5, 3.5, 7.5]
        layer.receive(wire_request(make_request()), UAC, UDP, 10.5)  # INVITE again: absorbed
        assert layer.data_to_send() == []
        ack = make_request("ACK", branch="z9hG4bKnew", to_tag="uas")
        layer.receive(wire_request(ack), UAC, UDP, 10.6)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert event.request.method == "ACK"
        assert event.transaction_id is None
        assert drive(layer, 31.9) == []
        layer.receive(wire_request(ack), UAC, UDP, 12.0)
        assert layer.events_received() == []  # a repeated ACK is absorbed
        drive(layer, 32.0)
        assert layer.state_of(tid) is None
        assert layer.events_received() == []

    def test_no_ack_means_ack_timeout(self) -> None:
        layer, invite, tid = server_with_invite()
        ok = make_response(invite, 200, to_tag="uas")
        layer.send_response(ok, 0.0)
        layer.data_to_send()
        resent = drive(layer, 40.0)
        assert times(resent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        event = only(layer.events_received())
        assert isinstance(event, AckTimeout)
        assert event.transaction_id == tid
        assert event.response.status == 200
        assert event.request.method == "INVITE"

    def test_2xx_is_retransmitted_over_tcp_too(self) -> None:
        layer, invite, _ = server_with_invite(TCP)
        layer.send_response(make_response(invite, 200, to_tag="uas"), 0.0)
        layer.data_to_send()
        assert times(drive(layer, 4.0)) == [0.5, 1.5, 3.5]

    def test_tu_may_resend_its_2xx(self) -> None:
        layer, invite, _ = server_with_invite()
        ok = make_response(invite, 200, to_tag="uas")
        layer.send_response(ok, 0.0)
        layer.data_to_send()
        layer.send_response(ok, 0.1)
        assert len(layer.data_to_send()) == 1

    def test_ack_after_the_transaction_is_gone_goes_to_the_tu(self) -> None:
        layer = TransactionLayer()
        ack = make_request("ACK", branch="z9hG4bKlate", to_tag="uas")
        layer.receive(wire_request(ack), UAC, UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert event.transaction_id is None


# ---------------------------------------------------------------------------------------------
# Server non-INVITE


class TestRfc3261Section17_2_2NonInviteServer:
    def test_retransmission_absorbed_while_trying(self) -> None:
        layer = TransactionLayer()
        layer.receive(wire_request(make_request("BYE")), UAC, UDP, 0.0)
        assert isinstance(only(layer.events_received()), RequestReceived)
        assert layer.data_to_send() == []  # no 100 Trying for non-INVITE
        layer.receive(wire_request(make_request("BYE")), UAC, UDP, 0.5)
        assert layer.events_received() == []
        assert layer.data_to_send() == []

    def test_retransmission_gets_last_response(self) -> None:
        layer = TransactionLayer()
        bye = wire_request(make_request("BYE"))
        layer.receive(bye, UAC, UDP, 0.0)
        layer.events_received()
        layer.send_response(make_response(bye, 100), 0.1)
        (trying,) = layer.data_to_send()
        layer.receive(wire_request(make_request("BYE")), UAC, UDP, 0.5)
        assert layer.data_to_send() == [trying]
        layer.send_response(make_response(bye, 200, to_tag="t"), 0.6)
        (ok,) = layer.data_to_send()
        layer.receive(wire_request(make_request("BYE")), UAC, UDP, 1.0)
        assert layer.data_to_send() == [ok]
        assert layer.events_received() == []
        with pytest.raises(TransactionError):
            layer.send_response(make_response(bye, 500, to_tag="t"), 1.1)

    def test_timer_j_is_64_t1_over_udp(self) -> None:
        layer = TransactionLayer()
        options = wire_request(make_request("OPTIONS"))
        layer.receive(options, UAC, UDP, 0.0)
        tid = only(layer.events_received())
        assert isinstance(tid, RequestReceived)
        assert tid.transaction_id is not None
        layer.send_response(make_response(options, 200, to_tag="t"), 1.0)
        assert layer.next_timeout() == 33.0
        drive(layer, 32.9)
        assert layer.state_of(tid.transaction_id) is TransactionState.COMPLETED
        drive(layer, 33.0)
        assert layer.state_of(tid.transaction_id) is None

    def test_timer_j_is_zero_over_tcp(self) -> None:
        layer = TransactionLayer()
        options = wire_request(make_request("OPTIONS", transport=TCP))
        layer.receive(options, UAC, TCP, 0.0)
        layer.send_response(make_response(options, 200, to_tag="t"), 1.0)
        assert len(layer) == 0


# ---------------------------------------------------------------------------------------------
# Matching and Via handling


class TestRfc3261Section17_1_3ClientMatching:
    def test_unknown_branch_is_unmatched(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request(), UAS, UDP, 0.0)
        other = make_response(make_request(branch="z9hG4bKother"), 200, to_tag="t")
        layer.receive(wire_response(other), UAS, UDP, 0.1)
        assert isinstance(only(layer.events_received()), UnmatchedResponse)

    def test_cancel_and_invite_share_a_branch_but_not_a_transaction(self) -> None:
        layer = TransactionLayer()
        invite = make_request()
        invite_id = layer.send_request(invite, UAS, UDP, 0.0)
        cancel = make_cancel(invite)
        cancel_id = layer.send_request(cancel, UAS, UDP, 0.1)
        assert invite_id != cancel_id
        layer.receive(wire_response(make_response(cancel, 200, to_tag="t")), UAS, UDP, 0.2)
        layer.receive(wire_response(make_response(invite, 487, to_tag="t")), UAS, UDP, 0.3)
        received = layer.events_received()
        events = [e for e in received if isinstance(e, ResponseReceived)]
        assert len(events) == len(received)
        assert [(e.transaction_id, e.response.status) for e in events] == [
            (cancel_id, 200),
            (invite_id, 487),
        ]


class TestRfc3261Section9_1Cancel:
    def test_invite_given_up_64_t1_after_cancel_without_final(self) -> None:
        layer = TransactionLayer()
        invite = make_request()
        invite_id = layer.send_request(invite, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(invite, 180, to_tag="t")), UAS, UDP, 0.2)
        cancel = make_cancel(invite)
        cancel_id = layer.send_request(cancel, UAS, UDP, 10.0)
        layer.receive(wire_response(make_response(cancel, 200, to_tag="t")), UAS, UDP, 10.1)
        layer.events_received()
        drive(layer, 41.9)
        assert layer.state_of(invite_id) is TransactionState.PROCEEDING
        assert layer.state_of(cancel_id) is None  # timer K ended the CANCEL's own transaction
        drive(layer, 42.0)
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert (event.transaction_id, event.timer) == (invite_id, "CANCEL")
        assert layer.state_of(invite_id) is None

    def test_487_after_cancel_completes_normally(self) -> None:
        layer = TransactionLayer()
        invite = make_request()
        invite_id = layer.send_request(invite, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(invite, 180, to_tag="t")), UAS, UDP, 0.2)
        layer.send_request(make_cancel(invite), UAS, UDP, 1.0)
        layer.receive(wire_response(make_response(invite, 487, to_tag="t")), UAS, UDP, 1.2)
        assert layer.state_of(invite_id) is TransactionState.COMPLETED
        drive(layer, 100.0)
        timeouts = [e for e in layer.events_received() if isinstance(e, TransactionTimeout)]
        assert [e.request.method for e in timeouts] == ["CANCEL"]  # nobody answered the CANCEL
        assert len(layer) == 0


class TestRfc3261Section17_2_3ServerMatching:
    def test_same_branch_other_sent_by_is_a_new_transaction(self) -> None:
        layer = TransactionLayer()
        layer.receive(wire_request(make_request("OPTIONS")), UAC, UDP, 0.0)
        other = make_request("OPTIONS", via_host="192.0.2.9")
        layer.receive(wire_request(other), ("192.0.2.9", 5060), UDP, 0.1)
        assert len(layer.events_received()) == 2
        assert len(layer) == 2

    def test_cancel_finds_its_invite(self) -> None:
        layer, invite, tid = server_with_invite()
        cancel = wire_request(make_cancel(invite))
        layer.receive(cancel, UAC, UDP, 0.5)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert event.request.method == "CANCEL"
        assert event.transaction_id != tid
        assert layer.find_cancelled_invite(cancel) is invite
        layer.send_response(make_response(cancel, 200, to_tag="t"), 0.6)
        layer.send_response(make_response(invite, 487, to_tag="t"), 0.6)
        assert layer.find_cancelled_invite(cancel) is invite  # a late CANCEL still gets 200
        assert layer.invite_answered(invite)
        unknown = wire_request(make_cancel(make_request(branch="z9hG4bKnone")))
        assert layer.find_cancelled_invite(unknown) is None  # 481
        assert layer.invite_answered(unknown)

    def test_rfc2543_requests_without_magic_cookie(self) -> None:
        layer = TransactionLayer()
        old = make_request(branch="oldbranch")
        layer.receive(wire_request(old), UAC, UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert event.transaction_id is not None
        assert event.transaction_id.startswith("s2543|")
        layer.receive(wire_request(old), UAC, UDP, 0.5)
        assert layer.events_received() == []
        busy = make_response(event.request, 486, to_tag="uas")
        layer.send_response(busy, 1.0)
        ack = build_non_2xx_ack(old, busy)
        layer.receive(wire_request(ack), UAC, UDP, 1.1)
        assert layer.events_received() == []
        assert layer.state_of(event.transaction_id) is TransactionState.CONFIRMED


class TestRfc3261Section18_2Via:
    def test_received_added_when_host_differs(self) -> None:
        layer = TransactionLayer()
        request = make_request("OPTIONS", via_host="pc.example.com")
        request.headers.replace_first("Via", "SIP/2.0/UDP pc.example.com:5070;branch=z9hG4bKv")
        layer.receive(wire_request(request), ("198.51.100.7", 5070), UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        via = event.request.via
        assert via.received == "198.51.100.7"
        assert not via.rport_requested
        layer.send_response(make_response(event.request, 200, to_tag="t"), 0.1)
        (out,) = layer.data_to_send()
        assert out.destination == ("198.51.100.7", 5070)

    def test_rport_filled_and_response_goes_to_source(self) -> None:
        layer = TransactionLayer()
        layer.receive(wire_request(make_request("OPTIONS")), ("203.0.113.5", 40000), UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        via = event.request.via
        assert (via.received, via.rport) == ("203.0.113.5", 40000)
        layer.send_response(make_response(event.request, 200, to_tag="t"), 0.1)
        (out,) = layer.data_to_send()
        assert out.destination == ("203.0.113.5", 40000)
        assert parse(out.data).via.rport == 40000

    def test_same_host_without_rport_is_left_alone(self) -> None:
        layer = TransactionLayer()
        request = make_request("OPTIONS")
        request.headers.replace_first("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKv")
        layer.receive(wire_request(request), UAC, UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert event.request.headers["Via"] == "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKv"

    @pytest.mark.parametrize(
        ("via", "transport"),
        [
            ("SIP/2.0/UDP a.example.com;branch=z9hG4bK1", UDP),
            ("SIP/2.0/UDP a.example.com:5080;branch=z9hG4bK1", UDP),
            ("SIP/2.0/UDP a.example.com:5080;received=10.0.0.1", UDP),
            ("SIP/2.0/UDP a.example.com;received=10.0.0.1;rport=6000", UDP),
            ("SIP/2.0/UDP a.example.com;maddr=239.1.1.1;received=10.0.0.1", UDP),
            ("SIP/2.0/UDP a.example.com;maddr=not-an-ip", UDP),
            ("SIP/2.0/UDP [2001:db8::1]:5062;branch=z9hG4bK1", UDP),
            ("SIP/2.0/TCP a.example.com;received=10.0.0.1", TCP),
        ],
    )
    def test_rfc3581_section4_responses_go_to_the_real_source(
        self, via: str, transport: Transport
    ) -> None:
        """Never ``maddr``, a peer's own ``received`` or the sent-by address (issue 11 #2)."""
        source = ("198.51.100.1", 40001)
        assert response_destination(Via.parse(via), source, transport) == source

    def test_a_peer_supplied_received_is_replaced(self) -> None:
        layer = TransactionLayer()
        request = make_request("OPTIONS")
        request.headers.replace_first(
            "Via", f"SIP/2.0/UDP {UAC[0]};received=203.0.113.9;branch=z9hG4bKv"
        )
        layer.receive(wire_request(request), UAC, UDP, 0.0)
        event = only(layer.events_received())
        assert isinstance(event, RequestReceived)
        assert f"received={UAC[0]}" in event.request.headers["Via"]


class TestRfc3261Section17_1_4TransportErrors:
    def test_transport_error_reported_and_transaction_gone(self) -> None:
        layer = TransactionLayer()
        tid = layer.send_request(make_request("OPTIONS"), UAS, TCP, 0.0)
        layer.transport_error(tid, "connection refused")
        event = only(layer.events_received())
        assert isinstance(event, TransportFailure)
        assert (event.transaction_id, event.reason) == (tid, "connection refused")
        assert layer.state_of(tid) is None
        layer.transport_error(tid)
        assert layer.events_received() == []
        assert layer.next_timeout() is None

    def test_server_side_transport_error(self) -> None:
        layer, _, tid = server_with_invite(TCP)
        layer.transport_error(tid, "reset")
        assert isinstance(only(layer.events_received()), TransportFailure)


class TestTransactionLayerTimersAndLogging:
    def test_cancelled_timers_are_skipped_without_next_timeout(self) -> None:
        layer = TransactionLayer()
        request = make_request()
        tid = layer.send_request(request, UAS, UDP, 0.0)
        layer.receive(wire_response(make_response(request, 180, to_tag="t")), UAS, UDP, 0.1)
        layer.data_to_send()
        layer.events_received()
        layer.handle_timeout(100.0)  # A and B were cancelled: their heap entries are stale
        assert layer.data_to_send() == []
        assert layer.events_received() == []
        assert layer.state_of(tid) is TransactionState.PROCEEDING
        assert layer.next_timeout() is None

    def test_late_handle_timeout_fires_in_order(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request("OPTIONS"), UAS, UDP, 0.0)
        layer.data_to_send()
        layer.handle_timeout(40.0)  # a stalled loop: one retransmission, then timer F
        assert len(layer.data_to_send()) == 1
        event = only(layer.events_received())
        assert isinstance(event, TransactionTimeout)
        assert event.timer == "F"

    def test_debug_logging(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG, logger="worker.sip.transaction")
        pair = Pair()
        invite = make_request()
        pair.uac.send_request(invite, UAS, UDP, 0.0)
        pair.flush(0.0)
        pair.uac.receive(wire_response(make_response(invite, 100)), UAS, UDP, 0.1)
        pair.uas.receive(wire_request(invite), UAC, UDP, 0.2)
        (incoming,) = pair.uas.events_received()
        assert isinstance(incoming, RequestReceived)
        pair.uas.send_response(make_response(incoming.request, 404, to_tag="t"), 0.3)
        pair.flush(0.3)
        pair.run(40.0)
        messages = [record.getMessage() for record in caplog.records]
        assert any(m.startswith("> INVITE c|z9hG4bKaaa|INVITE") for m in messages)
        assert any(m.startswith("< INVITE new s|z9hG4bKaaa|") for m in messages)
        assert any(m.startswith("< INVITE retransmission") for m in messages)
        assert any(m.startswith("> 404 ") for m in messages)
        assert any(m.startswith("< 404 c|") for m in messages)
        assert any(" timer D" in m for m in messages)
        assert any(m.endswith(" terminated") for m in messages)


class TestTransactionLayerMisuse:
    def test_ack_has_no_client_transaction(self) -> None:
        with pytest.raises(TransactionError):
            TransactionLayer().send_request(make_request("ACK"), UAS, UDP, 0.0)

    def test_branch_needs_magic_cookie(self) -> None:
        with pytest.raises(TransactionError):
            TransactionLayer().send_request(make_request(branch="old"), UAS, UDP, 0.0)

    def test_duplicate_transaction(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request(), UAS, UDP, 0.0)
        with pytest.raises(TransactionError):
            layer.send_request(make_request(), UAS, UDP, 0.0)

    def test_response_without_server_transaction(self) -> None:
        with pytest.raises(TransactionError):
            TransactionLayer().send_response(make_response(make_request(), 200), 0.0)

    def test_send_stateless_and_untracked_ack(self) -> None:
        layer = TransactionLayer()
        answer = make_response(make_request(), 481, to_tag="t")
        layer.send_stateless(answer, UAC, UDP)
        layer.send_ack(make_request("ACK", branch="z9hG4bKx"), UAS, UDP, 0.0, "c|none|INVITE")
        layer.send_ack(make_request("ACK", branch="z9hG4bKy"), UAS, TCP, 0.0)
        assert [(out.destination, out.transport) for out in layer.data_to_send()] == [
            (UAC, UDP),
            (UAS, UDP),
            (UAS, TCP),
        ]
        assert len(layer) == 0

    def test_response_without_branch_is_unmatched(self) -> None:
        layer = TransactionLayer()
        layer.send_request(make_request(), UAS, UDP, 0.0)
        stray = make_response(make_request(), 200, to_tag="t")
        stray.headers.replace_first("Via", "SIP/2.0/UDP 192.0.2.1:5060")
        layer.receive(wire_response(stray), UAS, UDP, 0.1)
        assert isinstance(only(layer.events_received()), UnmatchedResponse)

    def test_retransmitted_invite_before_any_response(self) -> None:
        layer, _, _ = server_with_invite(send_trying=False)
        layer.receive(wire_request(make_request()), UAC, UDP, 0.5)
        assert layer.data_to_send() == []
        assert layer.events_received() == []


# ---------------------------------------------------------------------------------------------
# A UAC and a UAS wired together in memory, with scripted loss


class Pair:
    """Two transaction layers that exchange bytes, dropping the datagrams listed in ``drop``."""

    def __init__(self, transport: Transport = UDP, drop: Iterable[int] = ()) -> None:
        self.uac = TransactionLayer()
        self.uas = TransactionLayer()
        self.transport = transport
        self.drop = set(drop)
        self.count = 0
        self.log: list[str] = []

    def flush(self, now: float) -> None:
        moving = True
        while moving:
            moving = False
            for layer, peer, source in ((self.uac, self.uas, UAC), (self.uas, self.uac, UAS)):
                for out in layer.data_to_send():
                    moving = True
                    self.count += 1
                    message = parse(out.data)
                    label = (
                        message.method if isinstance(message, SipRequest) else str(message.status)
                    )
                    if self.count in self.drop:
                        self.log.append(f"x {label}")
                        continue
                    self.log.append(label)
                    peer.receive(message, source, self.transport, now)

    def run(self, until: float) -> None:
        """Advance both clocks to ``until``, firing timers in global order."""
        while True:
            due = [t for t in (self.uac.next_timeout(), self.uas.next_timeout()) if t is not None]
            if not due or min(due) > until:
                return
            now = min(due)
            self.uac.handle_timeout(now)
            self.uas.handle_timeout(now)
            self.flush(now)


class TestRfc3261Section17InMemoryCallSetup:
    def test_lost_invite_and_lost_200_recover(self) -> None:
        pair = Pair(drop={1, 4})  # the first INVITE and the first 200 OK are lost
        invite = make_request()
        tid = pair.uac.send_request(invite, UAS, UDP, 0.0)
        pair.flush(0.0)
        pair.run(0.5)  # timer A: the INVITE goes again
        (incoming,) = pair.uas.events_received()
        assert isinstance(incoming, RequestReceived)
        ok = make_response(incoming.request, 200, to_tag="uas")
        pair.uas.send_response(ok, 0.6)
        pair.flush(0.6)
        pair.run(1.1)  # the UAS re-sends its 2xx
        uac_events = pair.uac.events_received()
        assert [e.response.status for e in uac_events if isinstance(e, ResponseReceived)] == [
            100,
            200,
        ]
        ack = make_request("ACK", branch="z9hG4bKack", to_tag="uas")
        pair.uac.send_ack(ack, UAS, UDP, 1.2, transaction_id=tid)
        pair.flush(1.2)
        (acked,) = pair.uas.events_received()
        assert isinstance(acked, RequestReceived)
        assert acked.request.method == "ACK"
        pair.run(60.0)
        assert pair.log == ["x INVITE", "INVITE", "100", "x 200", "200", "ACK"]
        assert len(pair.uac) == len(pair.uas) == 0
        assert pair.uac.events_received() == pair.uas.events_received() == []

    def test_rejected_call_over_tcp(self) -> None:
        pair = Pair(TCP)
        invite = make_request(transport=TCP)
        pair.uac.send_request(invite, UAS, TCP, 0.0)
        pair.flush(0.0)
        (incoming,) = pair.uas.events_received()
        assert isinstance(incoming, RequestReceived)
        pair.uas.send_response(make_response(incoming.request, 486, to_tag="uas"), 0.1)
        pair.flush(0.1)
        assert pair.log == ["INVITE", "100", "486", "ACK"]
        assert len(pair.uac) == len(pair.uas) == 0
