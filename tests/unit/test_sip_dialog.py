"""SIP dialogs (RFC 3261 §12, §13.2.2.4): creation on both sides, route sets, CSeq rules,
target refresh, and requests built inside the dialog."""

from __future__ import annotations

import pytest

from worker.errors import LocalError
from worker.sip.dialog import Dialog, DialogId, DialogState, OutOfOrderRequestError
from worker.sip.message import (
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
    make_response,
    parse,
)


def wire(*lines: str, body: str = "") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


INVITE = wire(
    "INVITE sip:bob@biloxi.example.com SIP/2.0",
    "Via: SIP/2.0/UDP proxy2.example.com;branch=z9hG4bKp2",
    "Via: SIP/2.0/UDP proxy1.example.com;branch=z9hG4bKp1",
    "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKuac",
    "Max-Forwards: 68",
    "Record-Route: <sip:proxy2.example.com;lr>",
    "Record-Route: <sip:proxy1.example.com;lr>",
    "To: Bob <sip:bob@biloxi.example.com>",
    'From: "Alice" <sip:alice@atlanta.example.com>;tag=alice-tag',
    "Call-ID: dialog-call-1",
    "CSeq: 101 INVITE",
    "Contact: <sip:alice@pc33.atlanta.example.com>",
    "Content-Length: 0",
)

UAS_CONTACT = SipUri.parse("sip:bob@192.0.2.4:5060")
UAC_VIA = Via.new("UDP", "pc33.atlanta.example.com", 5060, branch="z9hG4bKnext")
UAS_VIA = Via.new("UDP", "192.0.2.4", 5060, branch="z9hG4bKuasnext")


def state(dialog: Dialog) -> DialogState:
    """Read the state afresh (keeps mypy from narrowing it across method calls)."""
    return dialog.state


def request(data: bytes) -> SipRequest:
    message = parse(data)
    assert isinstance(message, SipRequest)
    return message


def response(data: bytes) -> SipResponse:
    message = parse(data)
    assert isinstance(message, SipResponse)
    return message


def uas_answer(status: int = 200) -> tuple[SipRequest, SipResponse]:
    invite = request(INVITE)
    answer = make_response(
        invite, status, to_tag="bob-tag", headers=[("Contact", f"<{UAS_CONTACT}>")]
    )
    return invite, answer


def uac_side(status: int = 200) -> tuple[SipRequest, SipResponse, Dialog]:
    """The UAC's view: its INVITE and the 1xx/2xx that came back through both proxies."""
    invite, answer = uas_answer(status)
    received = response(answer.serialize())
    return invite, received, Dialog.from_uac(invite, received)


def in_dialog(method: str, cseq: int, *, contact: str | None = None) -> SipRequest:
    lines = [
        f"{method} sip:bob@192.0.2.4:5060 SIP/2.0",
        "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKin" + str(cseq),
        "Max-Forwards: 70",
        "To: Bob <sip:bob@biloxi.example.com>;tag=bob-tag",
        'From: "Alice" <sip:alice@atlanta.example.com>;tag=alice-tag',
        "Call-ID: dialog-call-1",
        f"CSeq: {cseq} {method}",
    ]
    if contact is not None:
        lines.append(f"Contact: {contact}")
    return request(wire(*lines, "Content-Length: 0"))


class TestRfc3261Section12_1_1UasDialogCreation:
    def test_state_from_invite_and_2xx(self) -> None:
        invite, answer = uas_answer()
        dialog = Dialog.from_uas(invite, answer, UAS_CONTACT)
        assert dialog.id == DialogId("dialog-call-1", "bob-tag", "alice-tag")
        assert dialog.state is DialogState.CONFIRMED
        assert not dialog.is_uac
        assert dialog.remote_target == SipUri.parse("sip:alice@pc33.atlanta.example.com")
        assert [r.uri.host for r in dialog.route_set] == [
            "proxy2.example.com",
            "proxy1.example.com",
        ]
        assert dialog.remote_seq == 101
        assert dialog.local_seq is None
        assert dialog.local_uri == NameAddr(SipUri.parse("sip:bob@biloxi.example.com"), "Bob")
        assert dialog.remote_uri.display_name == "Alice"
        assert dialog.remote_uri.tag is None
        assert not dialog.secure
        assert DialogId.of_request(in_dialog("BYE", 102)) == DialogId(
            "dialog-call-1", "bob-tag", "alice-tag"
        )
        assert DialogId.of_request(invite) is None

    def test_early_dialog_from_180_then_confirm(self) -> None:
        invite, ringing = uas_answer(180)
        dialog = Dialog.from_uas(invite, ringing, NameAddr(UAS_CONTACT))
        assert state(dialog) is DialogState.EARLY
        dialog.confirm()
        assert state(dialog) is DialogState.CONFIRMED
        dialog.terminate()
        dialog.confirm()
        assert state(dialog) is DialogState.TERMINATED

    def test_sips_request_uri_makes_a_secure_dialog(self) -> None:
        invite = request(INVITE.replace(b"INVITE sip:bob", b"INVITE sips:bob"))
        answer = make_response(invite, 200, to_tag="t")
        assert Dialog.from_uas(invite, answer, UAS_CONTACT).secure

    def test_needs_tag_and_contact(self) -> None:
        invite = request(INVITE)
        with pytest.raises(LocalError):
            Dialog.from_uas(invite, make_response(invite, 200), UAS_CONTACT)
        with pytest.raises(LocalError):
            Dialog.from_uas(invite, make_response(invite, 100, to_tag="t"), UAS_CONTACT)
        no_contact = request(
            INVITE.replace(b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n", b"")
        )
        with pytest.raises(SipParseError):
            Dialog.from_uas(no_contact, make_response(no_contact, 200, to_tag="t"), UAS_CONTACT)


class TestRfc3261Section12_1_2UacDialogCreation:
    def test_route_set_is_reversed_record_route(self) -> None:
        _, answer, dialog = uac_side()
        assert dialog.is_uac
        assert dialog.id == DialogId("dialog-call-1", "alice-tag", "bob-tag")
        assert DialogId.of_response(answer) == dialog.id
        assert [r.uri.host for r in dialog.route_set] == [
            "proxy1.example.com",
            "proxy2.example.com",
        ]
        assert dialog.remote_target == UAS_CONTACT
        assert dialog.local_seq == 101
        assert dialog.remote_seq is None
        assert dialog.invite_cseq == 101
        assert dialog.local_contact == NameAddr(SipUri.parse("sip:alice@pc33.atlanta.example.com"))

    def test_early_dialog_confirmed_by_2xx_recomputes_route_set(self) -> None:
        invite, _, dialog = uac_side(180)
        assert state(dialog) is DialogState.EARLY
        ok = make_response(
            invite,
            200,
            to_tag="bob-tag",
            headers=[("Contact", "<sip:bob@192.0.2.99>")],
        )
        ok.headers.remove("Record-Route")
        ok.headers.add("Record-Route", "<sip:only.example.com;lr>")
        dialog.receive_response(response(ok.serialize()))
        assert state(dialog) is DialogState.CONFIRMED
        assert [r.uri.host for r in dialog.route_set] == ["only.example.com"]
        assert dialog.remote_target == SipUri.parse("sip:bob@192.0.2.99")

    def test_provisional_without_contact_targets_the_request_uri(self) -> None:
        invite = request(INVITE)
        ringing = make_response(invite, 180, to_tag="bob-tag")
        dialog = Dialog.from_uac(invite, ringing)
        assert dialog.remote_target == invite.uri
        dialog.receive_response(
            make_response(invite, 183, to_tag="bob-tag", headers=[("Contact", "<sip:b@h2>")])
        )
        assert dialog.remote_target == SipUri.parse("sip:b@h2")

    def test_early_dialog_ends_on_error(self) -> None:
        invite, _, dialog = uac_side(180)
        dialog.receive_response(make_response(invite, 486, to_tag="bob-tag"))
        assert dialog.state is DialogState.TERMINATED

    def test_subscribe_dialog_has_no_invite_to_ack(self) -> None:
        subscribe = request(
            INVITE.replace(b"INVITE sip:", b"SUBSCRIBE sip:").replace(
                b"101 INVITE", b"101 SUBSCRIBE"
            )
        )
        accepted = make_response(subscribe, 202, to_tag="n", headers=[("Contact", "<sip:n@h>")])
        dialog = Dialog.from_uac(subscribe, accepted)
        assert dialog.invite_cseq is None
        assert dialog.local_seq == 101

    def test_needs_tags_and_our_contact(self) -> None:
        invite = request(INVITE)
        with pytest.raises(LocalError):
            Dialog.from_uac(invite, make_response(invite, 200))
        no_contact = request(
            INVITE.replace(b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n", b"")
        )
        with pytest.raises(LocalError):
            Dialog.from_uac(no_contact, make_response(no_contact, 200, to_tag="t"))


class TestRfc3261Section12_2_1_1RequestConstruction:
    def test_bye_with_loose_routing(self) -> None:
        _, _, dialog = uac_side()
        bye = dialog.create_request("bye", UAC_VIA)
        assert bye.method == "BYE"
        assert bye.uri == UAS_CONTACT
        assert bye.headers.get_all("Route") == [
            "<sip:proxy1.example.com;lr>",
            "<sip:proxy2.example.com;lr>",
        ]
        assert bye.headers.get_all("Via") == [str(UAC_VIA)]
        assert bye.cseq.number == 102
        assert bye.from_tag == "alice-tag"
        assert bye.from_.display_name == "Alice"
        assert bye.to_tag == "bob-tag"
        assert bye.call_id == "dialog-call-1"
        assert bye.max_forwards == 70
        assert "Contact" not in bye.headers
        assert dialog.next_hop() == SipUri.parse("sip:proxy1.example.com;lr")
        again = request(bye.serialize())
        assert again.serialize() == bye.serialize()

    def test_cseq_increments_and_reinvite_carries_contact_and_body(self) -> None:
        _, _, dialog = uac_side()
        info = dialog.create_request(
            "INFO", UAC_VIA, body=b"Signal=5\r\n", content_type="application/dtmf-relay"
        )
        reinvite = dialog.create_request(
            "INVITE",
            UAC_VIA,
            body=b"v=0\r\n",
            content_type="application/sdp",
            headers=[("Supported", "timer")],
        )
        update = dialog.create_request("UPDATE", UAC_VIA)
        options = dialog.create_request("OPTIONS", UAC_VIA)
        assert [r.cseq.number for r in (info, reinvite, update, options)] == [102, 103, 104, 105]
        assert info.content_type == "application/dtmf-relay"
        assert reinvite.headers["Contact"] == "<sip:alice@pc33.atlanta.example.com>"
        assert reinvite.content_type == "application/sdp"
        assert reinvite.headers["Supported"] == "timer"
        assert "Contact" in update.headers
        assert "Contact" not in options.headers
        assert dialog.invite_cseq == 103

    def test_strict_routing(self) -> None:
        invite = request(
            INVITE.replace(b"<sip:proxy1.example.com;lr>", b"<sip:proxy1.example.com;method=X>")
        )
        ok = make_response(invite, 200, to_tag="bob-tag", headers=[("Contact", f"<{UAS_CONTACT}>")])
        dialog = Dialog.from_uac(invite, response(ok.serialize()))
        bye = dialog.create_request("BYE", UAC_VIA)
        assert bye.uri == SipUri.parse("sip:proxy1.example.com")
        assert bye.headers.get_all("Route") == [
            "<sip:proxy2.example.com;lr>",
            f"<{UAS_CONTACT}>",
        ]

    def test_no_route_set_means_no_route_header(self) -> None:
        invite = request(INVITE.replace(b"Record-Route", b"X-Old-Record-Route"))
        ok = make_response(invite, 200, to_tag="b", headers=[("Contact", f"<{UAS_CONTACT}>")])
        dialog = Dialog.from_uac(invite, ok)
        bye = dialog.create_request("BYE", UAC_VIA)
        assert "Route" not in bye.headers
        assert bye.uri == UAS_CONTACT
        assert dialog.next_hop() == UAS_CONTACT

    def test_uas_side_requests(self) -> None:
        invite, answer = uas_answer()
        dialog = Dialog.from_uas(invite, answer, UAS_CONTACT)
        bye = dialog.create_request("BYE", UAS_VIA)
        assert bye.cseq.number == 1
        assert bye.uri == SipUri.parse("sip:alice@pc33.atlanta.example.com")
        assert bye.headers.get_all("Route") == [
            "<sip:proxy2.example.com;lr>",
            "<sip:proxy1.example.com;lr>",
        ]
        assert bye.from_tag == "bob-tag"
        assert bye.to_tag == "alice-tag"
        # The UAC finds its dialog from the BYE it receives.
        _, _, uac_dialog = uac_side()
        received = request(bye.serialize())
        assert DialogId.of_request(received) == uac_dialog.id
        uac_dialog.receive_request(received)
        assert uac_dialog.state is DialogState.TERMINATED

    def test_rfc2543_peer_without_from_tag(self) -> None:
        invite = request(INVITE.replace(b";tag=alice-tag", b""))
        dialog = Dialog.from_uas(invite, make_response(invite, 200, to_tag="b"), UAS_CONTACT)
        assert dialog.remote_tag == ""
        bye = dialog.create_request("BYE", UAS_VIA)
        assert bye.to_tag is None

    def test_refused_requests(self) -> None:
        _, _, dialog = uac_side()
        for method in ("ACK", "CANCEL"):
            with pytest.raises(LocalError):
                dialog.create_request(method, UAC_VIA)
        dialog.terminate()
        with pytest.raises(LocalError):
            dialog.create_request("BYE", UAC_VIA)


class TestRfc3261Section13_2_2_4AckFor2xx:
    def test_ack_uses_the_invite_cseq(self) -> None:
        _, _, dialog = uac_side()
        ack = dialog.create_ack(UAC_VIA)
        assert (ack.method, ack.cseq.number, ack.cseq.method) == ("ACK", 101, "ACK")
        assert ack.uri == UAS_CONTACT
        assert ack.headers.get_all("Route") == [
            "<sip:proxy1.example.com;lr>",
            "<sip:proxy2.example.com;lr>",
        ]
        assert ack.to_tag == "bob-tag"
        assert "Contact" not in ack.headers
        assert dialog.local_seq == 101

    def test_ack_for_a_reinvite_and_late_offer_body(self) -> None:
        _, _, dialog = uac_side()
        dialog.create_request("INVITE", UAC_VIA)
        ack = dialog.create_ack(UAC_VIA, body=b"v=0\r\n", content_type="application/sdp")
        assert ack.cseq.number == 102
        assert ack.body == b"v=0\r\n"
        assert ack.content_type == "application/sdp"
        explicit = dialog.create_ack(UAC_VIA, cseq=101, headers=[("Authorization", "Digest x=1")])
        assert explicit.cseq.number == 101
        assert explicit.headers["Authorization"] == "Digest x=1"

    def test_no_invite_to_acknowledge(self) -> None:
        invite, answer = uas_answer()
        dialog = Dialog.from_uas(invite, answer, UAS_CONTACT)
        with pytest.raises(LocalError):
            dialog.create_ack(UAS_VIA)


class TestRfc3261Section12_2_2IncomingRequests:
    def dialog(self) -> Dialog:
        invite, answer = uas_answer()
        return Dialog.from_uas(invite, answer, UAS_CONTACT)

    def test_lower_cseq_is_rejected_with_500(self) -> None:
        dialog = self.dialog()
        with pytest.raises(OutOfOrderRequestError) as info:
            dialog.receive_request(in_dialog("INFO", 100))
        assert info.value.status_code == 500
        assert dialog.remote_seq == 101

    def test_equal_and_higher_cseq_accepted(self) -> None:
        dialog = self.dialog()
        dialog.receive_request(in_dialog("INFO", 101))
        dialog.receive_request(in_dialog("INFO", 150))
        assert dialog.remote_seq == 150
        with pytest.raises(OutOfOrderRequestError):
            dialog.receive_request(in_dialog("INFO", 149))

    def test_ack_and_cancel_skip_the_check(self) -> None:
        dialog = self.dialog()
        dialog.receive_request(in_dialog("INFO", 200))
        dialog.receive_request(in_dialog("ACK", 101))
        dialog.receive_request(in_dialog("CANCEL", 101))
        assert dialog.remote_seq == 200

    def test_empty_remote_cseq_takes_the_first_value(self) -> None:
        _, _, dialog = uac_side()
        assert dialog.remote_seq is None
        dialog.receive_request(in_dialog("BYE", 7))
        assert dialog.remote_seq == 7

    @pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
    def test_target_refresh(self, method: str) -> None:
        dialog = self.dialog()
        dialog.receive_request(in_dialog(method, 102, contact="<sip:alice@198.51.100.9:5070>"))
        assert dialog.remote_target == SipUri.parse("sip:alice@198.51.100.9:5070")
        dialog.receive_request(in_dialog(method, 103))
        assert dialog.remote_target == SipUri.parse("sip:alice@198.51.100.9:5070")

    def test_info_does_not_refresh_target(self) -> None:
        dialog = self.dialog()
        dialog.receive_request(in_dialog("INFO", 102, contact="<sip:elsewhere@198.51.100.9>"))
        assert dialog.remote_target == SipUri.parse("sip:alice@pc33.atlanta.example.com")

    def test_bye_terminates(self) -> None:
        dialog = self.dialog()
        dialog.receive_request(in_dialog("BYE", 102))
        assert dialog.state is DialogState.TERMINATED


class TestRfc3261Section12_2_1_2ResponsesInDialog:
    def test_2xx_to_reinvite_refreshes_target(self) -> None:
        _, _, dialog = uac_side()
        reinvite = dialog.create_request("INVITE", UAC_VIA)
        ringing = make_response(reinvite, 180, headers=[("Contact", "<sip:ignored@h>")])
        dialog.receive_response(ringing)
        assert dialog.remote_target == UAS_CONTACT  # 1xx does not refresh a confirmed dialog
        ok = make_response(reinvite, 200, headers=[("Contact", "<sip:bob@203.0.113.8>")])
        dialog.receive_response(ok)
        assert dialog.remote_target == SipUri.parse("sip:bob@203.0.113.8")
        assert dialog.state is DialogState.CONFIRMED

    def test_2xx_without_contact_keeps_the_target(self) -> None:
        _, _, dialog = uac_side()
        update = dialog.create_request("UPDATE", UAC_VIA)
        dialog.receive_response(make_response(update, 200))
        assert dialog.remote_target == UAS_CONTACT

    def test_error_to_reinvite_keeps_the_dialog(self) -> None:
        _, _, dialog = uac_side()
        reinvite = dialog.create_request("INVITE", UAC_VIA)
        dialog.receive_response(make_response(reinvite, 488))
        assert dialog.state is DialogState.CONFIRMED

    @pytest.mark.parametrize("status", [408, 481])
    def test_408_and_481_terminate(self, status: int) -> None:
        _, _, dialog = uac_side()
        info = dialog.create_request("INFO", UAC_VIA)
        dialog.receive_response(make_response(info, status))
        assert dialog.state is DialogState.TERMINATED

    def test_of_response_without_tags(self) -> None:
        invite = request(INVITE)
        assert DialogId.of_response(make_response(invite, 100)) is None
