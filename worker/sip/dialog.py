"""SIP dialogs (RFC 3261 §12): identifiers, sequence numbers, route set and remote target.

A ``Dialog`` is plain state plus the rules for building requests inside it (§12.2.1.1, loose and
strict routing) and for checking requests received in it (§12.2.2). It sends nothing itself:
requests it builds go through the transaction layer, and the ACK for a 2xx through
``TransactionLayer.send_ack``. Unknown dialogs are the caller's business (answer 481).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from worker.errors import LocalError, RemoteError
from worker.sip.message import (
    Headers,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    SipUri,
    Via,
)

TARGET_REFRESH_METHODS: Final = frozenset({"INVITE", "UPDATE"})
CONTACT_METHODS: Final = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})
DIALOG_TERMINATING_STATUSES: Final = frozenset({408, 481})


class DialogState(StrEnum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class OutOfOrderRequestError(RemoteError):
    """An in-dialog request whose CSeq is lower than the last one seen: answer 500 (§12.2.2)."""

    status_code = 500


@dataclass(frozen=True, slots=True)
class DialogId:
    """Call-ID plus both tags, from our side (§12). Use as a dict key."""

    call_id: str
    local_tag: str
    remote_tag: str

    @classmethod
    def of_request(cls, request: SipRequest) -> DialogId | None:
        """The dialog an incoming request belongs to (local = To tag); None outside a dialog."""
        to_tag = request.to_tag
        if to_tag is None:
            return None
        return cls(request.call_id, to_tag, request.from_tag or "")

    @classmethod
    def of_response(cls, response: SipResponse) -> DialogId | None:
        """The dialog a response to our request belongs to (local = From tag)."""
        to_tag = response.to_tag
        from_tag = response.from_tag
        if to_tag is None or from_tag is None:
            return None
        return cls(response.call_id, from_tag, to_tag)


def _as_name_addr(contact: SipUri | NameAddr) -> NameAddr:
    return contact if isinstance(contact, NameAddr) else NameAddr(contact)


class Dialog:
    """One dialog's state (§12.1) and the in-dialog request rules (§12.2)."""

    __slots__ = (
        "call_id",
        "invite_cseq",
        "is_uac",
        "local_contact",
        "local_seq",
        "local_tag",
        "local_uri",
        "remote_seq",
        "remote_tag",
        "remote_target",
        "remote_uri",
        "route_set",
        "secure",
        "state",
    )

    def __init__(
        self,
        *,
        call_id: str,
        local_tag: str,
        remote_tag: str,
        local_uri: NameAddr,
        remote_uri: NameAddr,
        remote_target: SipUri,
        local_contact: NameAddr,
        route_set: Iterable[NameAddr] = (),
        local_seq: int | None = None,
        remote_seq: int | None = None,
        secure: bool = False,
        state: DialogState = DialogState.CONFIRMED,
        is_uac: bool = True,
    ) -> None:
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_uri = local_uri.without_params()
        self.remote_uri = remote_uri.without_params()
        self.remote_target = remote_target
        self.local_contact = local_contact
        self.route_set: tuple[NameAddr, ...] = tuple(route_set)
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.secure = secure
        self.state = state
        self.is_uac = is_uac
        # CSeq number of the last INVITE we sent in this dialog: the ACK for its 2xx reuses it.
        self.invite_cseq: int | None = None

    # -- creation

    @classmethod
    def from_uas(
        cls, request: SipRequest, response: SipResponse, local_contact: SipUri | NameAddr
    ) -> Dialog:
        """The dialog our 101-299 answer (with a To tag) to ``request`` creates (§12.1.1)."""
        local_tag = response.to_tag
        if local_tag is None or not 100 < response.status < 300:
            raise LocalError("a dialog needs a 101-299 response with a To tag")
        contact = request.contact
        if contact is None:
            raise SipParseError("Missing Contact header")
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=request.from_tag or "",
            local_uri=request.to,
            remote_uri=request.from_,
            remote_target=contact.uri,
            local_contact=_as_name_addr(local_contact),
            route_set=request.record_routes,
            local_seq=None,
            remote_seq=request.cseq.number,
            secure=request.uri.scheme == "sips",
            state=DialogState.EARLY if response.status < 200 else DialogState.CONFIRMED,
            is_uac=False,
        )

    @classmethod
    def from_uac(cls, request: SipRequest, response: SipResponse) -> Dialog:
        """The dialog a 101-299 response (with a To tag) to our ``request`` creates (§12.1.2)."""
        remote_tag = response.to_tag
        local_tag = request.from_tag
        if remote_tag is None or local_tag is None or not 100 < response.status < 300:
            raise LocalError("a dialog needs a 101-299 response with a To tag")
        contact = response.contact
        local_contact = request.contact
        if local_contact is None:
            raise LocalError("our dialog-creating request has no Contact")
        dialog = cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=remote_tag,
            local_uri=request.from_,
            remote_uri=request.to,
            remote_target=contact.uri if contact is not None else request.uri,
            local_contact=local_contact,
            route_set=reversed(response.record_routes),
            local_seq=request.cseq.number,
            remote_seq=None,
            secure=request.uri.scheme == "sips",
            state=DialogState.EARLY if response.status < 200 else DialogState.CONFIRMED,
            is_uac=True,
        )
        if request.method == "INVITE":
            dialog.invite_cseq = request.cseq.number
        return dialog

    @property
    def id(self) -> DialogId:
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    # -- sending

    def next_hop(self) -> SipUri:
        """The URI to resolve (RFC 3263) for a request in this dialog: first route, or target."""
        return self.route_set[0].uri if self.route_set else self.remote_target

    def _uri_and_routes(self) -> tuple[SipUri, list[NameAddr]]:
        if not self.route_set:
            return self.remote_target, []
        first = self.route_set[0]
        if first.uri.has_param("lr"):
            return self.remote_target, list(self.route_set)
        # Strict routing (§12.2.1.1): the first route becomes the Request-URI and the remote
        # target goes to the end of the Route header field.
        uri = first.uri.without_headers().without_param("method")
        return uri, [*self.route_set[1:], NameAddr(self.remote_target)]

    def _build(
        self,
        method: str,
        cseq: int,
        via: Via,
        body: bytes,
        content_type: str | None,
        headers: Iterable[tuple[str, str]],
    ) -> SipRequest:
        uri, routes = self._uri_and_routes()
        out = Headers()
        out.add("Via", str(via))
        for route in routes:
            out._add_trusted("Route", str(route))
        out._add_trusted("Max-Forwards", "70")
        out._add_trusted("From", str(self.local_uri.with_tag(self.local_tag)))
        remote = self.remote_uri.with_tag(self.remote_tag) if self.remote_tag else self.remote_uri
        out._add_trusted("To", str(remote))
        out._add_trusted("Call-ID", self.call_id)
        out._add_trusted("CSeq", f"{cseq} {method}")
        if method in CONTACT_METHODS:
            out.add("Contact", str(self.local_contact))
        for name, value in headers:
            out.add(name, value)
        if body and content_type is not None:
            out.set("Content-Type", content_type)
        return SipRequest(method, uri, out, body)

    def create_request(
        self,
        method: str,
        via: Via,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> SipRequest:
        """A new request in this dialog (BYE, re-INVITE, UPDATE, INFO, OPTIONS, ...), §12.2.1.1.

        The local CSeq is incremented. ``via`` is our top Via, with a fresh branch. ACK and
        CANCEL are refused: use ``create_ack`` and ``message.make_cancel``.
        """
        method = method.upper()
        if method in ("ACK", "CANCEL"):
            raise LocalError(f"{method} is not built with create_request()")
        if self.state is DialogState.TERMINATED:
            raise LocalError("the dialog is terminated")
        self.local_seq = (self.local_seq or 0) + 1
        if method == "INVITE":
            self.invite_cseq = self.local_seq
        return self._build(method, self.local_seq, via, body, content_type, headers)

    def create_ack(
        self,
        via: Via,
        *,
        cseq: int | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> SipRequest:
        """The ACK for a 2xx to our INVITE (§13.2.2.4): CSeq number of that INVITE (``cseq``,
        default the last INVITE we sent), method ACK; the local CSeq is not incremented. Put the
        SDP answer in ``body`` for a late offer; pass the INVITE's credentials in ``headers``."""
        number = cseq if cseq is not None else self.invite_cseq
        if number is None:
            raise LocalError("no INVITE to acknowledge in this dialog")
        return self._build("ACK", number, via, body, content_type, headers)

    # -- receiving

    def receive_request(self, request: SipRequest) -> None:
        """Check and apply a request received in this dialog (§12.2.2).

        Raises ``OutOfOrderRequestError`` (answer 500) when its CSeq is lower than the remote CSeq.
        Target-refresh requests (re-INVITE, UPDATE) with a Contact update the remote target;
        BYE terminates the dialog.
        """
        method = request.method
        if method not in ("ACK", "CANCEL"):
            number = request.cseq.number
            if self.remote_seq is not None and number < self.remote_seq:
                raise OutOfOrderRequestError(
                    f"CSeq {number} is lower than the dialog's remote CSeq {self.remote_seq}"
                )
            self.remote_seq = number
        if method in TARGET_REFRESH_METHODS:
            contact = request.contact
            if contact is not None:
                self.remote_target = contact.uri
        elif method == "BYE":
            self.state = DialogState.TERMINATED

    def receive_response(self, response: SipResponse) -> None:
        """Apply a response to a request we sent in this dialog (UAC side).

        A 2xx confirms an early dialog (the route set is recomputed from it, §13.2.2.4); a
        300-699 to the dialog-creating INVITE ends an early dialog; 2xx to a target refresh
        updates the remote target; 408 and 481 terminate the dialog (§12.2.1.2).
        """
        status = response.status
        method = response.cseq.method
        if status in DIALOG_TERMINATING_STATUSES:
            self.state = DialogState.TERMINATED
            return
        if self.state is DialogState.EARLY and method == "INVITE":
            if 200 <= status < 300:
                self.state = DialogState.CONFIRMED
                if self.is_uac:
                    self.route_set = tuple(reversed(response.record_routes))
            elif status >= 300:
                self.state = DialogState.TERMINATED
                return
        refreshes = 200 <= status < 300 or (100 < status < 200 and self.state is DialogState.EARLY)
        if refreshes and method in TARGET_REFRESH_METHODS:
            contact = response.contact
            if contact is not None:
                self.remote_target = contact.uri

    def confirm(self) -> None:
        """UAS side: our 2xx has been sent, so the early dialog is confirmed."""
        if self.state is DialogState.EARLY:
            self.state = DialogState.CONFIRMED

    def terminate(self) -> None:
        self.state = DialogState.TERMINATED
