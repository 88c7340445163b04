"""The SIP user agent's rules (``worker.sip.core``), two cores wired together in memory
(``tests.sip_pair.UaPair``) with a virtual clock: no sockets, no sleeps. Test classes are named
after the RFC section each rule comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sip_pair import A_ADDRESS, B_ADDRESS, Side, UaPair
from worker.sip.auth import DigestChallenge
from worker.sip.core import (
    CallEnd,
    CallEnded,
    CallPhase,
    DtmfReceived,
    IncomingCall,
    RegistrationChanged,
    ResolveHost,
    UaCall,
    refresh_delay,
)
from worker.sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    make_response,
    parse,
)
from worker.sip.sdp import NegotiatedMedia, SessionDescription, make_offer
from worker.sip.transaction import Transport

SDP = "application/sdp"


def invite_to(
    pair: UaPair, side: Side, body: bytes | None = None, headers: dict[str, str] | None = None
) -> SipRequest:
    """A fresh INVITE to ``side`` from the other side's address (hand-made, for admission)."""
    host, port = B_ADDRESS if side == "b" else A_ADDRESS
    src_host, src_port = A_ADDRESS if side == "b" else B_ADDRESS
    headers = dict(headers or {})
    request = SipRequest("INVITE", SipUri(user="100", host=host, port=port))
    h = request.headers
    h.add("Via", f"SIP/2.0/UDP {src_host}:{src_port};branch=z9hG4bK{len(pair.wire)}x{id(h)}")
    h.add("Max-Forwards", headers.pop("max_forwards", "70"))
    h.add("From", f"<sip:alice@{src_host}>;tag=t{id(h)}")
    h.add("To", f"<sip:100@{host}>")
    h.add("Call-ID", f"c{id(h)}@{src_host}")
    h.add("CSeq", "1 INVITE")
    if headers.pop("contact", "yes") == "yes":
        h.add("Contact", f"<sip:alice@{src_host}:{src_port}>")
    for name, value in headers.items():
        h.add(name.replace("_", "-"), value)
    if body is None:
        body = make_offer(src_host, 7000).serialize()
    if body:
        h.add("Content-Type", headers.get("content_type", SDP))
    request.body = body
    return request


def end_of(call: UaCall) -> CallEnd | None:
    """Read afresh (mypy would keep an attribute narrowed across the calls in between)."""
    return call.end


def media_of(call: UaCall) -> NegotiatedMedia | None:
    return call.media


def statuses(pair: UaPair, sender: Side) -> list[int]:
    return [r.status for r in pair.wire_responses(sender)]


# -- a call between two user agents ------------------------------------------------------------


class TestRfc3261Section13_2InviteAnswered:
    async def test_invite_ring_answer_ack(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        assert out.phase is CallPhase.ANSWERED
        assert inbound.phase is CallPhase.ANSWERED
        assert pair.progress("a", out) == ["ringing", "answered"]
        assert pair.progress("b", inbound) == ["ringing", "answered"]
        assert len(pair.sent("a", "ACK")) == 1
        assert out.media is not None
        assert out.media.remote_port == 6000
        assert inbound.media is not None
        assert inbound.media.remote_port == 4000
        assert inbound.dialog is not None
        assert out.dialog is not None
        assert inbound.dialog.remote_tag == out.local_tag

    async def test_every_response_carries_one_to_tag(self, tmp_path: Path) -> None:
        """§8.2.6.2 / rule 2: 180 and 200 of one INVITE carry the same To tag."""
        pair = UaPair.create(tmp_path)
        _, inbound = pair.call_a_to_b()
        tags = {r.to_tag for r in pair.wire_responses("b") if r.status > 100}
        assert tags == {inbound.local_tag}


class TestRfc3261Section15Bye:
    async def test_caller_hangs_up(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.flush()
        end_a = pair.ended("a", out)
        assert end_a is not None
        assert end_a.end.cause == "local-hangup"
        end_b = pair.ended("b", inbound)
        assert end_b is not None
        assert end_b.end.cause == "remote-bye"
        assert 200 in [r.status for r in pair.wire_responses("b") if r.cseq.method == "BYE"]
        assert pair.a.calls == {}
        assert pair.b.calls == {}

    async def test_hangup_is_idempotent(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, _ = pair.call_a_to_b()
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.a.hangup(out, "again", now=pair.now)
        pair.flush()
        assert len({bye.cseq.number for bye in pair.sent("a", "BYE")}) == 1
        assert out.end is not None
        assert out.end.cause == "local-hangup"


class TestRfc3261Section9_1CancelWaitsForAProvisionalResponse:
    """Defect 3: a CANCEL goes out only after a provisional response; the call ends at once for
    the TU with no status, since none came."""

    async def test_no_response_at_all_means_no_cancel(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.drop = lambda sent: sent.sender == "a"  # b never hears a
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.flush()
        end = pair.ended("a", out)
        assert end is not None
        assert end.end.sip_status is None
        pair.advance(40.0)  # timer B
        assert pair.sent("a", "CANCEL") == []
        assert len(pair.sent("a", "INVITE")) > 1  # retransmitted until timer B, nothing else

    async def test_cancel_waits_then_goes_after_the_first_provisional(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.holding.add("b")  # b's answers are late
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.flush()
        assert pair.sent("a", "CANCEL") == []
        held = pair.take("b")  # 100 Trying
        assert [m.status for m in held if isinstance(m, SipResponse)] == [100]
        pair.holding.clear()
        pair.inject(held[0], to="a")
        assert len(pair.sent("a", "CANCEL")) == 1
        assert 487 in statuses(pair, "b")
        assert pair.b.calls == {}

    async def test_a_2xx_crossing_the_cancel_is_acked_and_byed(self, tmp_path: Path) -> None:
        """§15: a 2xx for a call we gave up is ACKed, then a BYE ends it."""
        pair = UaPair.create(tmp_path)
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        inbound = pair.incoming("b")
        pair.b.ring(inbound, pair.now)
        pair.flush()
        pair.holding.add("a")
        pair.a.hangup(out, "local-hangup", now=pair.now)
        cancel = pair.take("a")
        assert [m.method for m in cancel if isinstance(m, SipRequest)] == ["CANCEL"]
        pair.holding.clear()
        pair.b.answer(inbound, pair.now)  # the 200 crosses the CANCEL
        pair.flush()
        assert len(pair.sent("a", "ACK")) == 1
        assert len({bye.cseq.number for bye in pair.sent("a", "BYE")}) == 1
        end_b = pair.ended("b", inbound)
        assert end_b is not None
        assert end_b.end.cause == "remote-bye"


class TestRfc3261Section9_2CancelToTag:
    """Defect 4: the 200 to a CANCEL carries the To tag of the INVITE's 180 and 487."""

    async def test_cancel_while_ringing(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        inbound = pair.incoming("b")
        pair.b.ring(inbound, pair.now)
        pair.flush()
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.flush()
        by_status = {r.status: r.to_tag for r in pair.wire_responses("b") if r.status > 100}
        assert set(by_status) == {180, 200, 487}
        assert len(set(by_status.values())) == 1
        end_b = pair.ended("b", inbound)
        assert end_b is not None
        assert end_b.end.sip_status == 487

    async def test_cancel_while_the_media_port_opens(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.auto_media = False
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        inbound = pair.incoming("b")
        pair.a.hangup(out, "local-hangup", now=pair.now)
        pair.flush()
        tags = {r.to_tag for r in pair.wire_responses("b") if r.status > 100}
        assert len(tags) == 1
        assert pair.b.media_opened(inbound, 6000, pair.now) is False  # the adapter closes it


class TestRfc3261Section13_3_1RingTimeout:
    async def test_unanswered_call_is_cancelled_at_the_ring_timeout(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out = pair.a.place_call("b", "100", 4000, pair.now, ring_timeout_s=5.0)
        pair.flush()
        inbound = pair.incoming("b")
        pair.b.ring(inbound, pair.now)
        pair.advance(4.9)
        assert end_of(out) is None
        pair.advance(0.2)
        assert out.end is not None
        assert out.end.cause == "no-answer"
        assert len(pair.sent("a", "CANCEL")) == 1


class TestRfc3261Section13_3_1_4AckTimeout:
    async def test_no_ack_ends_the_call_with_a_bye(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.drop = lambda sent: (
            isinstance(sent.message, SipRequest) and sent.message.method == "ACK"
        )
        out, inbound = pair.call_a_to_b()
        pair.advance(31.0)
        assert end_of(inbound) is None
        pair.advance(2.0)  # 64*T1 = 32 s
        assert inbound.end is not None
        assert inbound.end.cause == "ack-timeout"
        assert len(pair.sent("b", "BYE")) == 1
        assert out.end is not None
        assert out.end.cause == "remote-bye"


class TestRfc3311Section5_2UpdateCarriesAnOffer:
    """Defect 1: an UPDATE with an SDP offer gets a 200 with the SDP answer and a Contact, and
    the new media is used; an UPDATE without SDP gets a 200 with a Contact."""

    async def test_update_with_offer(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        assert inbound.dialog is not None
        offer = make_offer("127.0.0.1", 4100, codecs=("PCMA",))
        update = inbound.dialog.create_request(
            "UPDATE", pair.b.via(Transport.UDP), body=offer.serialize(), content_type=SDP
        )
        before = len(pair.negotiated("a", out))
        pair.inject(update, to="a")
        (ok,) = [r for r in pair.wire_responses("a") if r.cseq.method == "UPDATE"]
        assert ok.status == 200
        assert ok.content_type == SDP
        answer = SessionDescription.parse(ok.body)
        assert answer.media[0].port == 4000
        assert "PCMA" in str(answer)
        assert ok.contact is not None
        news = pair.negotiated("a", out)[before:]
        assert [(n.media.codec, n.media.remote_port) for n in news] == [("PCMA", 4100)]

    async def test_update_without_offer(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        _out, inbound = pair.call_a_to_b()
        assert inbound.dialog is not None
        update = inbound.dialog.create_request("UPDATE", pair.b.via(Transport.UDP))
        pair.inject(update, to="a")
        (ok,) = [r for r in pair.wire_responses("a") if r.cseq.method == "UPDATE"]
        assert ok.status == 200
        assert ok.body == b""
        assert ok.contact is not None

    async def test_update_with_unusable_offer_gets_488(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        _, inbound = pair.call_a_to_b()
        assert inbound.dialog is not None
        offer = make_offer("127.0.0.1", 4100, codecs=("G729",))
        update = inbound.dialog.create_request(
            "UPDATE", pair.b.via(Transport.UDP), body=offer.serialize(), content_type=SDP
        )
        pair.inject(update, to="a")
        assert [r.status for r in pair.wire_responses("a") if r.cseq.method == "UPDATE"] == [488]


class TestRfc3264Section8_4ReInviteHold:
    async def test_hold_and_resume(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        assert inbound.dialog is not None
        for direction, held in (("sendonly", True), ("sendrecv", False)):
            offer = str(make_offer("127.0.0.2", 6000)).replace("sendrecv", direction)
            reinvite = inbound.dialog.create_request(
                "INVITE", pair.b.via(Transport.UDP), body=offer.encode(), content_type=SDP
            )
            pair.inject(reinvite, to="a")
            assert out.on_hold is held
        answers = [
            r for r in pair.wire_responses("a") if r.cseq.method == "INVITE" and r.status > 100
        ]
        assert [r.status for r in answers] == [200, 200]
        assert "a=recvonly" in answers[0].body.decode()

    async def test_reinvite_without_sdp_gets_our_offer_and_the_ack_answers(
        self, tmp_path: Path
    ) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        assert inbound.dialog is not None
        assert out.dialog is not None
        reinvite = inbound.dialog.create_request("INVITE", pair.b.via(Transport.UDP))
        pair.inject(reinvite, to="a")
        (ok,) = [
            r for r in pair.wire_responses("a") if r.cseq.method == "INVITE" and r.status == 200
        ]
        assert ok.content_type == SDP
        before = len(pair.negotiated("a", out))
        ack = inbound.dialog.create_ack(
            pair.b.via(Transport.UDP),
            body=make_offer("127.0.0.2", 6002).serialize(),
            content_type=SDP,
        )
        pair.inject(ack, to="a")
        news = pair.negotiated("a", out)[before:]
        assert [n.media.remote_port for n in news] == [6002]


class TestRfc3261Section12_2_1_2DialogGone:
    """A 481 or a 408 (or no answer) to an in-dialog request ends the call."""

    async def test_481_to_an_info_ends_the_call(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, _inbound = pair.call_a_to_b()
        pair.b.calls.clear()  # b lost the dialog (restarted)
        assert pair.a.send_info_dtmf(out, "5", 100, pair.now)
        pair.flush()
        assert out.end is not None
        assert out.end.cause == "dialog-gone"
        assert out.end.sip_status == 481
        assert pair.sent("a", "BYE") == []  # the peer has no dialog to end

    async def test_unanswered_info_ends_the_call_with_a_bye(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, _ = pair.call_a_to_b()
        pair.drop = lambda sent: sent.sender == "a" and isinstance(sent.message, SipRequest)
        assert pair.a.send_in_dialog(out, "OPTIONS", pair.now)
        pair.advance(40.0)
        assert out.end is not None
        assert out.end.cause == "dialog-timeout"
        assert len({bye.cseq.number for bye in pair.sent("a", "BYE")}) == 1

    async def test_no_dialog_no_request(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out = pair.a.place_call("b", "100", 4000, pair.now)
        assert pair.a.send_in_dialog(out, "INFO", pair.now) is False


class TestRfc3261Section17_1_4TransportError:
    async def test_a_failed_send_ends_the_call_at_once(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.holding.add("a")
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.take("a")
        assert out.invite_tid is not None
        pair.a.transport_failed(out.invite_tid, "connection refused", pair.now)
        assert out.end is not None
        assert out.end.cause == "transport-error"
        assert out.end.sip_status == 503


class TestRfc2976InfoDtmf:
    async def test_dtmf_relay(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        assert pair.a.send_info_dtmf(out, "#", 250, pair.now)
        pair.flush()
        (digit,) = [e for e in pair.events["b"] if isinstance(e, DtmfReceived)]
        assert (digit.digit, digit.duration_ms, digit.call) == ("#", 250, inbound)

    @pytest.mark.parametrize(
        ("content_type", "body", "status"),
        [
            ("application/dtmf", "7", 200),
            ("application/dtmf-relay", "Signal=x\r\n", 400),
            ("text/plain", "hi", 415),
            (None, "", 200),
        ],
    )
    async def test_other_info_bodies(
        self, tmp_path: Path, content_type: str | None, body: str, status: int
    ) -> None:
        pair = UaPair.create(tmp_path)
        out, _inbound = pair.call_a_to_b()
        assert pair.a.send_in_dialog(out, "INFO", pair.now, body.encode(), content_type)
        pair.flush()
        assert [r.status for r in pair.wire_responses("b") if r.cseq.method == "INFO"] == [status]


class TestRfc3261Section22_2DigestRetries:
    """Defect 8: a challenge is answered once; a 401/407 to the credentials just sent fails the
    call at once unless the nonce was stale."""

    def challenged(self, tmp_path: Path, password: str = "pw") -> UaPair:
        return UaPair.create(
            tmp_path,
            b_sip={"trusted_sources": [], "users": {"alice": "pw"}},
            a_trunk={"username": "alice", "password": password},
        )

    async def test_401_answered_once(self, tmp_path: Path) -> None:
        pair = self.challenged(tmp_path)
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        invites = pair.sent("a", "INVITE")
        assert len(invites) == 2
        assert invites[1].headers.get("Authorization") is not None
        inbound = pair.incoming("b")
        pair.b.answer(inbound, pair.now)
        pair.flush()
        assert out.phase is CallPhase.ANSWERED

    async def test_wrong_password_gets_403(self, tmp_path: Path) -> None:
        pair = self.challenged(tmp_path, password="wrong")
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        assert out.end is not None
        assert out.end.sip_status == 403
        assert len(pair.sent("a", "INVITE")) == 2

    def scripted(self, tmp_path: Path) -> tuple[UaPair, SipRequest]:
        pair = UaPair.create(tmp_path, a_trunk={"username": "alice", "password": "pw"})
        pair.holding.add("a")
        pair.a.place_call("b", "100", 4000, pair.now)
        (invite,) = pair.take("a")
        assert isinstance(invite, SipRequest)
        return pair, invite

    def challenge(self, invite: SipRequest, nonce: str, stale: bool = False) -> SipResponse:
        value = str(DigestChallenge("b.test", nonce, qop=("auth",), stale=stale))
        response = make_response(invite, 401, to_tag="x", headers=[("WWW-Authenticate", value)])
        return response

    async def test_second_401_to_fresh_credentials_fails_at_once(self, tmp_path: Path) -> None:
        pair, invite = self.scripted(tmp_path)
        pair.inject(self.challenge(invite, "n1"), to="a")
        (retry,) = [m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "INVITE"]
        assert retry.headers.get("Authorization") is not None
        pair.inject(self.challenge(retry, "n2"), to="a")
        again = [m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "INVITE"]
        assert again == []
        (end,) = [e for e in pair.events["a"] if isinstance(e, CallEnded)]
        assert (end.end.cause, end.end.sip_status) == ("auth-failed", 401)

    async def test_stale_nonce_is_retried_once(self, tmp_path: Path) -> None:
        pair, invite = self.scripted(tmp_path)
        pair.inject(self.challenge(invite, "n1"), to="a")
        (retry,) = [m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "INVITE"]
        pair.inject(self.challenge(retry, "n2", stale=True), to="a")
        (third,) = [m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "INVITE"]
        assert "n2" in (third.headers.get("Authorization") or "")
        pair.inject(self.challenge(third, "n3", stale=True), to="a")
        assert [
            m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "INVITE"
        ] == []


class TestRfc3261Section10_2_4RegistrationRefresh:
    """REGISTER refresh as deadlines: challenged once, granted 4 s, refreshed before expiry;
    a refusal is retried with back-off."""

    def registering(self, tmp_path: Path) -> UaPair:
        pair = UaPair.create(
            tmp_path,
            a_trunk={
                "username": "alice",
                "password": "pw",
                "registration": True,
                "registration_expires_s": 60,
            },
        )
        pair.holding.add("a")
        pair.a.start_registration("b", pair.now)
        return pair

    def registers(self, pair: UaPair) -> list[SipRequest]:
        return [m for m in pair.take("a") if isinstance(m, SipRequest) and m.method == "REGISTER"]

    async def test_challenge_grant_and_refresh(self, tmp_path: Path) -> None:
        pair = self.registering(tmp_path)
        pair.advance(0)
        (first,) = self.registers(pair)
        assert first.headers.get("Expires") == "60"
        value = str(DigestChallenge("b.test", "n1", qop=("auth",)))
        pair.inject(
            make_response(first, 401, to_tag="r", headers=[("WWW-Authenticate", value)]), to="a"
        )
        (second,) = self.registers(pair)
        assert second.headers.get("Authorization") is not None
        assert second.call_id == first.call_id
        assert second.cseq.number == first.cseq.number + 1
        pair.inject(make_response(second, 200, to_tag="r", headers=[("Expires", "4")]), to="a")
        reg = pair.a.registrations["b"]
        assert reg.registered
        assert reg.expires == 4
        assert reg.last_status == 200
        assert any(isinstance(e, RegistrationChanged) for e in pair.events["a"])
        pair.advance(refresh_delay(4) - 0.01)
        assert self.registers(pair) == []
        pair.advance(0.02)
        (refresh,) = self.registers(pair)
        assert refresh.call_id == first.call_id
        pair.inject(make_response(refresh, 200, to_tag="r", headers=[("Expires", "4")]), to="a")
        assert reg.refreshes == 1

    async def test_refusal_backs_off(self, tmp_path: Path) -> None:
        pair = self.registering(tmp_path)
        pair.advance(0)
        (first,) = self.registers(pair)
        pair.inject(make_response(first, 403, to_tag="r"), to="a")
        reg = pair.a.registrations["b"]
        assert not reg.registered
        assert reg.failures == 1
        assert reg.last_status == 403
        pair.advance(9.9)
        assert self.registers(pair) == []
        pair.advance(0.2)
        assert len(self.registers(pair)) == 1

    async def test_credentials_refused_twice_stop_the_round(self, tmp_path: Path) -> None:
        pair = self.registering(tmp_path)
        pair.advance(0)
        (first,) = self.registers(pair)
        value = str(DigestChallenge("b.test", "n1", qop=("auth",)))
        pair.inject(
            make_response(first, 401, to_tag="r", headers=[("WWW-Authenticate", value)]), to="a"
        )
        (second,) = self.registers(pair)
        pair.inject(
            make_response(second, 401, to_tag="r", headers=[("WWW-Authenticate", value)]), to="a"
        )
        assert self.registers(pair) == []
        assert pair.a.registrations["b"].last_status == 401


class TestRfc3263NameResolution:
    """Rule 7: the core asks the adapter to resolve a host and waits for the answer."""

    async def test_trunk_by_name(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.a.settings.trunks["named"] = pair.a.settings.trunks["b"].model_copy(
            update={"host": "peer.test"}
        )
        out = pair.a.place_call("named", "100", 4000, pair.now)
        pair.flush()
        assert [e.host for e in pair.events["a"] if isinstance(e, ResolveHost)] == ["peer.test"]
        assert pair.sent("a", "INVITE") == []
        pair.a.host_resolved("peer.test", B_ADDRESS[0], pair.now)
        pair.flush()
        assert len(pair.sent("a", "INVITE")) == 1
        assert out.remote == B_ADDRESS

    async def test_unresolvable_trunk_fails_the_call(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.a.settings.trunks["named"] = pair.a.settings.trunks["b"].model_copy(
            update={"host": "nowhere.test"}
        )
        out = pair.a.place_call("named", "100", 4000, pair.now)
        pair.a.host_resolved("nowhere.test", None, pair.now)
        assert out.end is not None
        assert out.end.cause == "unresolvable"
        assert pair.a.counters.unresolved == 1


# -- admission of new requests -------------------------------------------------------------------


class TestRfc3261Section8_2Admission:
    """Every refusal of a new INVITE is answered at once, with no call created."""

    @pytest.mark.parametrize(
        ("b_sip", "change", "status"),
        [
            ({"trusted_sources": []}, {}, 403),
            ({"trusted_sources": [], "users": {"u": "p"}}, {}, 401),
            ({}, {"Require": "100rel"}, 420),
            ({}, {"contact": "no"}, 400),
            ({}, {"max_forwards": "0"}, 483),
            ({"max_calls": 1}, {"second": "yes"}, 503),
        ],
    )
    async def test_refusals(
        self, tmp_path: Path, b_sip: dict[str, object], change: dict[str, str], status: int
    ) -> None:
        pair = UaPair.create(tmp_path, b_sip=b_sip)
        if change.pop("second", None):
            pair.inject(invite_to(pair, "b"), to="b")
        pair.inject(invite_to(pair, "b", headers=change), to="b")
        assert statuses(pair, "b")[-1] == status

    async def test_no_common_codec_gets_488(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        body = make_offer("127.0.0.1", 7000, codecs=("G729",)).serialize()
        pair.inject(invite_to(pair, "b", body=body), to="b")
        assert statuses(pair, "b")[-1] == 488
        assert pair.b.counters.no_common_codec == 1

    async def test_bad_sdp_gets_400(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.inject(invite_to(pair, "b", body=b"v=0\r\nm=audio"), to="b")
        assert statuses(pair, "b")[-1] == 400

    async def test_no_route_gets_404(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        pair.b.settings.routes[0] = pair.b.settings.routes[0].model_copy(update={"match": "200"})
        pair.inject(invite_to(pair, "b"), to="b")
        assert statuses(pair, "b")[-1] == 404

    async def test_rate_limit_gets_503_retry_after(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path, b_sip={"rate_limit_per_second": 0.5, "rate_limit_burst": 1})
        pair.inject(invite_to(pair, "b"), to="b")
        pair.inject(invite_to(pair, "b"), to="b")
        refused = [r for r in pair.wire_responses("b") if r.status == 503]
        assert refused
        assert refused[0].headers.get("Retry-After") == "2"

    @pytest.mark.parametrize(
        ("method", "status"), [("OPTIONS", 200), ("BYE", 481), ("SUBSCRIBE", 405)]
    )
    async def test_other_methods(self, tmp_path: Path, method: str, status: int) -> None:
        pair = UaPair.create(tmp_path)
        request = invite_to(pair, "b", body=b"")
        request.method = method
        request.headers.set("CSeq", f"1 {method}")
        pair.inject(request, to="b")
        assert statuses(pair, "b")[-1] == status

    async def test_late_offer_answered_in_the_ack(self, tmp_path: Path) -> None:
        """RFC 3264 §5 / RFC 3261 §13.2.1: an INVITE without SDP gets our offer in the 200."""
        pair = UaPair.create(tmp_path)
        pair.inject(invite_to(pair, "b", body=b""), to="b")
        inbound = pair.incoming("b")
        pair.b.answer(inbound, pair.now)
        pair.flush()
        (ok,) = [r for r in pair.wire_responses("b") if r.status == 200]
        assert ok.content_type == SDP
        assert media_of(inbound) is None
        assert inbound.dialog is not None
        ack = SipRequest("ACK", SipUri(user="worker", host=B_ADDRESS[0], port=B_ADDRESS[1]))
        for name in ("Via", "From", "Call-ID"):
            ack.headers.add(name, ok.headers[name])
        ack.headers.add("To", ok.headers["To"])
        ack.headers.add("Max-Forwards", "70")
        ack.headers.add("CSeq", "1 ACK")
        ack.headers.add("Content-Type", SDP)
        ack.body = make_offer(A_ADDRESS[0], 7000).serialize()
        ack.headers.set("Via", f"SIP/2.0/UDP {A_ADDRESS[0]}:{A_ADDRESS[1]};branch=z9hG4bKack1")
        pair.inject(ack, to="b")
        assert inbound.media is not None
        assert inbound.media.remote_port == 7000

    async def test_out_of_order_cseq_gets_500(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        _, _inbound = pair.call_a_to_b()
        out = pair.a.calls[next(iter(pair.a.calls))]
        assert out.dialog is not None
        request = out.dialog.create_request("OPTIONS", pair.a.via(Transport.UDP))
        request.headers.set("CSeq", "0 OPTIONS")
        pair.inject(request, to="b")
        assert [r.status for r in pair.wire_responses("b") if r.cseq.method == "OPTIONS"] == [500]

    async def test_parse_errors(self, tmp_path: Path) -> None:
        """RFC 3261 §21.4.1: a request that cannot be parsed gets 400 if a response can be
        routed; anything else is dropped and counted."""
        pair = UaPair.create(tmp_path)
        bad = invite_to(pair, "b").serialize().replace(b"CSeq: 1 INVITE", b"CSeq: x INVITE")
        with pytest.raises(SipParseError) as caught:
            parse(bad)
        pair.b.parse_error(caught.value, A_ADDRESS, Transport.UDP, pair.now)
        pair.flush()
        ((sender, data),) = pair.unparseable
        assert sender == "b"
        assert data.startswith(b"SIP/2.0 400 ")
        with pytest.raises(SipParseError) as caught:
            parse(b"SIP/2.0 200 OK\r\n\r\n")
        pair.b.parse_error(caught.value, A_ADDRESS, Transport.UDP, pair.now)
        assert pair.b.counters.malformed_dropped == 1


class TestShutdown:
    async def test_close_ends_every_call(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        out, inbound = pair.call_a_to_b()
        pair.a.place_call("b", "101", 4002, pair.now)
        pair.flush()
        ringing = pair.incoming("b")
        pair.b.close(pair.now)
        pair.flush()
        assert inbound.end is not None
        assert inbound.end.cause == "shutdown"
        assert ringing.end is not None
        assert ringing.end.sip_status == 503
        assert out.end is not None
        assert out.end.cause == "remote-bye"
        assert [e for e in pair.events["b"] if isinstance(e, IncomingCall)]


class TestEveryFinalFailureIsLogged:
    """Defect 10: every final non-2xx the core sends or receives leaves a log line with its
    status and reason (488 and 420 used to leave none)."""

    async def test_sent_and_received(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level("INFO", logger="worker.sip.ua")
        pair = UaPair.create(tmp_path)
        pair.inject(invite_to(pair, "b", headers={"Require": "100rel"}), to="b")
        body = make_offer("127.0.0.1", 7000, codecs=("G729",)).serialize()
        pair.inject(invite_to(pair, "b", body=body), to="b")
        out = pair.a.place_call("b", "100", 4000, pair.now)
        pair.flush()
        pair.b.hangup(pair.incoming("b"), "busy", 486, "Busy Here", now=pair.now)
        pair.flush()
        assert out.end is not None

        def logged(message: str) -> list[tuple[object, object]]:
            return [
                (vars(r)["status"], vars(r)["reason"])
                for r in caplog.records
                if r.getMessage() == message
            ]

        sent = logged("final response sent")
        received = logged("final response received")
        assert sent == [(420, "Bad Extension"), (488, "No common codec"), (486, "Busy Here")]
        assert received == [(486, "Busy Here")]


# -- hostile peers (issue 11) --------------------------------------------------------------------


class TestHostilePeersInMemory:
    """Each numbered finding of issue 11 that lives in the user agent's rules."""

    async def test_2_responses_go_only_to_the_real_source(self, tmp_path: Path) -> None:
        """maddr and a peer's own received are never used: the pair asserts every message goes
        to the other side's real address, so a reflected response would fail here."""
        pair = UaPair.create(tmp_path, b_sip={"trusted_sources": []})
        invite = invite_to(pair, "b")
        via = invite.headers["Via"]
        invite.headers.set("Via", via + ";maddr=192.0.2.99;received=198.51.100.9")
        pair.inject(invite, to="b")
        assert statuses(pair, "b") == [403]

    @pytest.mark.parametrize(
        "contact", ["<sip:@@@>", "<sip:alice@host:99999>", '"unterminated <sip:a@b>']
    )
    async def test_5_malformed_contact_gets_400_not_silence(
        self, tmp_path: Path, contact: str
    ) -> None:
        pair = UaPair.create(tmp_path)
        invite = invite_to(pair, "b", headers={"contact": "no"})
        invite.headers.add("Contact", contact)
        pair.inject(invite, to="b")
        assert statuses(pair, "b") == [400]
        assert pair.b.calls == {}

    @pytest.mark.parametrize("address", ["::1", "999.1.1.1", "bad\x00host", "media.example.com"])
    async def test_3_unusable_media_address_gets_488(self, tmp_path: Path, address: str) -> None:
        pair = UaPair.create(tmp_path)
        body = (
            make_offer("127.0.0.1", 7000)
            .serialize()
            .replace(b"IN IP4 127.0.0.1", f"IN IP4 {address}".encode())
        )
        pair.inject(invite_to(pair, "b", body=body), to="b")
        assert statuses(pair, "b") == [488]

    async def test_4_hangup_to_an_unresolvable_contact_never_raises(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        invite = invite_to(pair, "b", headers={"contact": "no"})
        host = "x" * 70 + ".test"
        invite.headers.add("Contact", f"<sip:alice@{host}>")
        pair.inject(invite, to="b")
        call = pair.incoming("b")
        pair.b.answer(call, pair.now)
        pair.flush()
        pair.b.hangup(call, "local-hangup", now=pair.now)  # must not raise
        pair.flush()
        assert [e.host for e in pair.events["b"] if isinstance(e, ResolveHost)] == [host]
        assert end_of(call) is not None
        pair.b.host_resolved(host, None, pair.now)
        pair.flush()
        assert pair.sent("b", "BYE") == []

    async def test_8_refusals_are_stateless_one_packet_each(self, tmp_path: Path) -> None:
        """No 100 Trying before admission, one response per request, nothing retransmitted,
        no transaction kept."""
        pair = UaPair.create(tmp_path, b_sip={"trusted_sources": []})
        for _ in range(3):
            pair.inject(invite_to(pair, "b"), to="b")
        pair.advance(40.0)
        assert statuses(pair, "b") == [403, 403, 403]
        assert len(pair.b.layer) == 0

    async def test_8_a_flood_is_refused_then_dropped(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path, b_sip={"rate_limit_per_second": 1, "rate_limit_burst": 2})
        pair.b.settings.routes[0] = pair.b.settings.routes[0].model_copy(update={"match": "nope"})
        for _ in range(10):
            pair.inject(invite_to(pair, "b"), to="b")
        assert statuses(pair, "b") == [404, 404, 503, 503]
        assert pair.b.counters.flood_dropped == 6
        assert len(pair.b.layer) == 0

    async def test_8_unacknowledged_answers_stop_holding_capacity(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path, b_sip={"max_calls": 1})
        pair.drop = lambda sent: (
            isinstance(sent.message, SipRequest) and sent.message.method == "ACK"
        )
        pair.call_a_to_b()
        pair.inject(invite_to(pair, "b"), to="b")
        assert statuses(pair, "b")[-1] == 503
        pair.advance(2.1)  # 4*T1 later the unacknowledged call no longer counts
        pair.inject(invite_to(pair, "b"), to="b")
        assert statuses(pair, "b")[-1] == 100
