"""SIP transactions (RFC 3261 §17, with RFC 6026's Accepted state) and the layer that owns them.

``TransactionLayer`` is sans-I/O: feed it parsed messages with ``receive(msg, source, transport,
now)``, hand it what the TU sends (``send_request``, ``send_response``, ``send_ack``), then take
``events_received()`` and ``data_to_send()``; drive time with ``next_timeout()`` and
``handle_timeout(now)``. It never reads a clock and never touches a socket.

The rules, in one place:

- Client INVITE (§17.1.1): Calling -> Proceeding (1xx) -> Completed (300-699: the layer builds and
  sends the ACK, §17.1.1.3) or Accepted (2xx, RFC 6026). Timer A retransmits (T1, doubling;
  unreliable transports only) until B = 64*T1 (-> ``TransactionTimeout``). D = max(32 s, 64*T1)
  over UDP, 0 otherwise, absorbs final retransmissions by re-sending the ACK. M = 64*T1 keeps
  Accepted alive so 2xx retransmissions reach the TU (or are re-ACKed by the layer once the TU sent
  its ACK with ``send_ack``). After we send a CANCEL, a final response must come within 64*T1 or the
  INVITE is given up (``TransactionTimeout`` with timer "CANCEL", §9.1).
- Client non-INVITE (§17.1.2): Trying -> Proceeding -> Completed. Timer E retransmits (T1 doubling,
  capped at T2; T2 in Proceeding; unreliable only) until F = 64*T1. K = T4 over UDP, 0 otherwise.
- Server INVITE (§17.2.1): Proceeding (100 Trying sent at once) -> Completed (300-699: G
  retransmits the final, T1 doubling capped at T2, unreliable only; H = 64*T1 waits for the ACK) ->
  Confirmed (ACK absorbed; I = T4 over UDP, 0 otherwise). A 2xx moves it to Accepted (RFC 6026):
  the layer also does the TU's duty of §13.3.1.4 and re-sends the 2xx (T1 doubling, capped at T2,
  whatever the transport) until the ACK comes (passed up once) or L = 64*T1 (-> ``AckTimeout``,
  the TU should send BYE). A retransmitted INVITE gets the last provisional or final again.
- Server non-INVITE (§17.2.2): Trying (retransmissions absorbed) -> Proceeding -> Completed
  (retransmissions answered with the last response). J = 64*T1 over UDP, 0 otherwise.
- Responses go back to the request's real source address and port, whatever its Via says
  (``response_destination``: RFC 3581 symmetric routing for every request, never ``maddr``).
- Matching (§17.1.3, §17.2.3): responses by top Via branch + CSeq method; requests by branch +
  sent-by + method, ACK matching its INVITE; RFC 2543 requests (no ``z9hG4bK``) by Call-ID, From
  tag, CSeq number, top Via and method. An ACK for a 2xx is matched by Call-ID, CSeq and To tag.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Final

from worker.errors import LocalError
from worker.sip.message import (
    MAGIC_COOKIE,
    Message,
    SipMessage,
    SipRequest,
    SipResponse,
    Via,
    make_response,
    request_on_invite_branch,
    strip_brackets,
)

Address = tuple[str, int]

TIMER_D_MINIMUM: Final = 32.0


class Transport(StrEnum):
    """How a message travels; only UDP is unreliable."""

    UDP = "UDP"
    TCP = "TCP"
    TLS = "TLS"

    @property
    def reliable(self) -> bool:
        return self is not Transport.UDP


class TransactionState(StrEnum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 Table 4 base values, in seconds."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64*T1: timers B, F, H, J (unreliable), L and M."""
        return 64 * self.t1

    @property
    def d(self) -> float:
        """Timer D over UDP: at least 32 s, and never shorter than the server's timer H."""
        return max(TIMER_D_MINIMUM, self.timeout)


class TransactionError(LocalError):
    """The TU asked for something the transaction layer cannot do (no such transaction...)."""


# --------------------------------------------------------------------------------------------
# What comes out: datagrams and events


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """Bytes to put on the wire. Over TCP/TLS ``destination`` names the peer's connection."""

    data: bytes
    destination: Address
    transport: Transport
    transaction_id: str | None = field(default=None, compare=False)
    """The client or server transaction that sends it; report a failed send to
    ``TransactionLayer.transport_error`` with it (§17.1.4, §17.2.4)."""


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    """Base of everything the layer reports to the TU."""


@dataclass(frozen=True, slots=True)
class RequestReceived(TransactionEvent):
    """A new request for the TU. ``transaction_id`` is None for an ACK (no server transaction)."""

    request: SipRequest
    source: Address
    transport: Transport
    transaction_id: str | None


@dataclass(frozen=True, slots=True)
class ResponseReceived(TransactionEvent):
    """A response on one of our client transactions (retransmitted 2xx included, until ACKed)."""

    response: SipResponse
    request: SipRequest
    transaction_id: str


@dataclass(frozen=True, slots=True)
class UnmatchedResponse(TransactionEvent):
    """A response that matches no client transaction (e.g. a 2xx after timer M): the TU may
    re-send the ACK for it or drop it (§18.1.2)."""

    response: SipResponse
    source: Address
    transport: Transport


@dataclass(frozen=True, slots=True)
class TransactionTimeout(TransactionEvent):
    """Timer B or F (no final response: treat as 408) or H (no ACK for our final) fired."""

    transaction_id: str
    request: SipRequest
    timer: str


@dataclass(frozen=True, slots=True)
class TransportFailure(TransactionEvent):
    """The transport could not deliver for this transaction (§17.1.4, §17.2.4): treat as 503."""

    transaction_id: str
    request: SipRequest
    reason: str


@dataclass(frozen=True, slots=True)
class AckTimeout(TransactionEvent):
    """Our 2xx to an INVITE was never ACKed within 64*T1 (§13.3.1.4): send BYE."""

    transaction_id: str
    request: SipRequest
    response: SipResponse


# --------------------------------------------------------------------------------------------
# Transactions


class _Transaction:
    initial_state: ClassVar[TransactionState]

    __slots__ = (
        "destination",
        "id",
        "interval",
        "layer",
        "request",
        "state",
        "timers",
        "transport",
    )

    def __init__(
        self,
        layer: TransactionLayer,
        tid: str,
        request: SipRequest,
        destination: Address,
        transport: Transport,
    ) -> None:
        self.id = tid
        self.layer = layer
        self.request = request
        self.destination = destination
        self.transport = transport
        self.state = self.initial_state
        self.timers: dict[str, float] = {}
        self.interval = layer.timers.t1

    @property
    def unreliable(self) -> bool:
        return self.transport is Transport.UDP

    def _send(self, data: bytes) -> None:
        self.layer._outgoing.append(
            OutgoingMessage(data, self.destination, self.transport, self.id)
        )

    def _arm(self, name: str, at: float) -> None:
        self.timers[name] = at
        self.layer._schedule(at, self, name)

    def _cancel(self, *names: str) -> None:
        for name in names:
            self.timers.pop(name, None)

    def _linger(self, name: str, duration: float, now: float) -> None:
        """Arm a wait-in-Completed timer, or terminate now when its duration is 0."""
        if duration <= 0:
            self.terminate()
        else:
            self._arm(name, now + duration)

    def terminate(self) -> None:
        self.state = TransactionState.TERMINATED
        self.timers.clear()
        self.layer._forget(self)

    def fire(self, name: str, now: float) -> None:
        raise NotImplementedError

    def transport_failed(self, reason: str) -> None:
        self.layer._events.append(TransportFailure(self.id, self.request, reason))
        self.terminate()


class _ClientTransaction(_Transaction):
    __slots__ = ("data",)

    def __init__(
        self,
        layer: TransactionLayer,
        tid: str,
        request: SipRequest,
        destination: Address,
        transport: Transport,
    ) -> None:
        super().__init__(layer, tid, request, destination, transport)
        self.data = request.serialize()

    def start(self, now: float) -> None:
        raise NotImplementedError

    def on_response(self, response: SipResponse, now: float) -> None:
        raise NotImplementedError

    def _report(self, response: SipResponse) -> None:
        self.layer._events.append(ResponseReceived(response, self.request, self.id))


class InviteClientTransaction(_ClientTransaction):
    """RFC 3261 §17.1.1 with RFC 6026's Accepted state."""

    initial_state = TransactionState.CALLING
    __slots__ = ("ack", "acks_2xx")

    def __init__(
        self,
        layer: TransactionLayer,
        tid: str,
        request: SipRequest,
        destination: Address,
        transport: Transport,
    ) -> None:
        super().__init__(layer, tid, request, destination, transport)
        self.ack: bytes | None = None
        self.acks_2xx: dict[str | None, bytes] = {}

    def start(self, now: float) -> None:
        self._send(self.data)
        if self.unreliable:
            self._arm("A", now + self.interval)
        self._arm("B", now + self.layer.timers.timeout)

    def fire(self, name: str, now: float) -> None:
        if name == "A" and self.state is TransactionState.CALLING:
            self._send(self.data)
            self.interval *= 2
            self._arm("A", now + self.interval)
        elif name == "B" and self.state is TransactionState.CALLING:
            self.layer._events.append(TransactionTimeout(self.id, self.request, "B"))
            self.terminate()
        elif name == "CANCEL" and self.state in (
            TransactionState.CALLING,
            TransactionState.PROCEEDING,
        ):
            # RFC 3261 §9.1: no final response 64*T1 after our CANCEL; give the INVITE up.
            self.layer._events.append(TransactionTimeout(self.id, self.request, "CANCEL"))
            self.terminate()
        elif name in ("D", "M"):
            self.terminate()

    def on_response(self, response: SipResponse, now: float) -> None:
        state = self.state
        status = response.status
        if state in (TransactionState.CALLING, TransactionState.PROCEEDING):
            if status < 200:
                self.state = TransactionState.PROCEEDING
                self._cancel("A", "B")
                self._report(response)
            elif status < 300:
                self.state = TransactionState.ACCEPTED
                self._cancel("A", "B")
                self._arm("M", now + self.layer.timers.timeout)
                self._report(response)
            else:
                self.state = TransactionState.COMPLETED
                self._cancel("A", "B")
                self.ack = build_non_2xx_ack(self.request, response).serialize()
                self._send(self.ack)
                self._report(response)
                self._linger("D", self.layer.timers.d if self.unreliable else 0.0, now)
        elif state is TransactionState.COMPLETED:
            if status >= 300 and self.ack is not None:
                self._send(self.ack)
        elif state is TransactionState.ACCEPTED and 200 <= status < 300:
            ack = self.acks_2xx.get(response.to_tag)
            if ack is not None:
                self._send(ack)
            else:
                self._report(response)

    def remember_ack(self, to_tag: str | None, data: bytes) -> None:
        self.acks_2xx[to_tag] = data

    def cancel_sent(self, now: float) -> None:
        if self.state in (TransactionState.CALLING, TransactionState.PROCEEDING):
            self._arm("CANCEL", now + self.layer.timers.timeout)


class NonInviteClientTransaction(_ClientTransaction):
    """RFC 3261 §17.1.2."""

    initial_state = TransactionState.TRYING
    __slots__ = ()

    def start(self, now: float) -> None:
        self._send(self.data)
        if self.unreliable:
            self._arm("E", now + self.interval)
        self._arm("F", now + self.layer.timers.timeout)

    def fire(self, name: str, now: float) -> None:
        state = self.state
        if name == "E" and state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            self._send(self.data)
            t2 = self.layer.timers.t2
            if state is TransactionState.TRYING:
                self.interval = min(self.interval * 2, t2)
            else:
                self.interval = t2
            self._arm("E", now + self.interval)
        elif name == "F" and state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            self.layer._events.append(TransactionTimeout(self.id, self.request, "F"))
            self.terminate()
        elif name == "K":
            self.terminate()

    def on_response(self, response: SipResponse, now: float) -> None:
        if self.state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            return  # Completed: retransmitted finals are absorbed.
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            self._report(response)
            return
        self.state = TransactionState.COMPLETED
        self._cancel("E", "F")
        self._report(response)
        self._linger("K", self.layer.timers.t4 if self.unreliable else 0.0, now)


class _ServerTransaction(_Transaction):
    __slots__ = ("last_response", "response_data")

    def __init__(
        self,
        layer: TransactionLayer,
        tid: str,
        request: SipRequest,
        destination: Address,
        transport: Transport,
    ) -> None:
        super().__init__(layer, tid, request, destination, transport)
        self.last_response: SipResponse | None = None
        self.response_data: bytes | None = None

    def _respond(self, response: SipResponse) -> None:
        self.last_response = response
        self.response_data = response.serialize()
        self._send(self.response_data)

    def _resend(self) -> None:
        if self.response_data is not None:
            self._send(self.response_data)

    def on_request(self, request: SipRequest, now: float) -> None:
        raise NotImplementedError

    def send_response(self, response: SipResponse, now: float) -> None:
        raise NotImplementedError


class InviteServerTransaction(_ServerTransaction):
    """RFC 3261 §17.2.1 with RFC 6026's Accepted state and the §13.3.1.4 2xx retransmission."""

    initial_state = TransactionState.PROCEEDING
    __slots__ = ("ack_key", "acked", "answer_interval")

    def __init__(
        self,
        layer: TransactionLayer,
        tid: str,
        request: SipRequest,
        destination: Address,
        transport: Transport,
    ) -> None:
        super().__init__(layer, tid, request, destination, transport)
        self.ack_key: tuple[str, int, str | None] | None = None
        self.acked = False
        self.answer_interval = layer.timers.t1

    def start(self, send_trying: bool) -> None:
        if send_trying:
            self._respond(make_response(self.request, 100))

    def on_request(self, request: SipRequest, now: float) -> None:
        """A retransmitted INVITE (the layer routes ACKs to ``on_ack``)."""
        if self.state in (TransactionState.PROCEEDING, TransactionState.COMPLETED):
            self._resend()
        # Accepted, Confirmed: absorbed.

    def on_ack(self, ack: SipRequest, source: Address, transport: Transport, now: float) -> None:
        if self.state is TransactionState.COMPLETED:
            self.state = TransactionState.CONFIRMED
            self._cancel("G", "H")
            self._linger("I", self.layer.timers.t4 if self.unreliable else 0.0, now)
        elif self.state is TransactionState.ACCEPTED and not self.acked:
            self.acked = True
            self._cancel("R")
            self.layer._events.append(RequestReceived(ack, source, transport, None))

    def send_response(self, response: SipResponse, now: float) -> None:
        status = response.status
        state = self.state
        if state is TransactionState.PROCEEDING:
            if status < 200:
                self._respond(response)
            elif status < 300:
                self.state = TransactionState.ACCEPTED
                self._respond(response)
                self.ack_key = (response.call_id, response.cseq.number, response.to_tag)
                self.layer._accepted[self.ack_key] = self
                self._arm("R", now + self.answer_interval)
                self._arm("L", now + self.layer.timers.timeout)
            else:
                self.state = TransactionState.COMPLETED
                self._respond(response)
                if self.unreliable:
                    self._arm("G", now + self.interval)
                self._arm("H", now + self.layer.timers.timeout)
        elif state is TransactionState.ACCEPTED and 200 <= status < 300:
            self._send(response.serialize())  # RFC 6026 §8.5: the TU may retransmit its 2xx.
        else:
            raise TransactionError(f"cannot send {status} in INVITE server state {state}")

    def fire(self, name: str, now: float) -> None:
        state = self.state
        timers = self.layer.timers
        if name == "G" and state is TransactionState.COMPLETED:
            self._resend()
            self.interval = min(self.interval * 2, timers.t2)
            self._arm("G", now + self.interval)
        elif name == "H" and state is TransactionState.COMPLETED:
            self.layer._events.append(TransactionTimeout(self.id, self.request, "H"))
            self.terminate()
        elif name == "I":
            self.terminate()
        elif name == "R" and state is TransactionState.ACCEPTED and not self.acked:
            self._resend()
            self.answer_interval = min(self.answer_interval * 2, timers.t2)
            self._arm("R", now + self.answer_interval)
        elif name == "L":
            if not self.acked and self.last_response is not None:
                event = AckTimeout(self.id, self.request, self.last_response)
                self.layer._events.append(event)
            self.terminate()

    def terminate(self) -> None:
        if self.ack_key is not None and self.layer._accepted.get(self.ack_key) is self:
            del self.layer._accepted[self.ack_key]
        super().terminate()


class NonInviteServerTransaction(_ServerTransaction):
    """RFC 3261 §17.2.2."""

    initial_state = TransactionState.TRYING
    __slots__ = ()

    def on_request(self, request: SipRequest, now: float) -> None:
        if self.state is not TransactionState.TRYING:
            self._resend()

    def send_response(self, response: SipResponse, now: float) -> None:
        state = self.state
        if state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            raise TransactionError(f"cannot send {response.status} in server state {state}")
        self._respond(response)
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            return
        self.state = TransactionState.COMPLETED
        self._linger("J", self.layer.timers.timeout if self.unreliable else 0.0, now)

    def fire(self, name: str, now: float) -> None:
        if name == "J":
            self.terminate()


# --------------------------------------------------------------------------------------------
# Helpers


def build_non_2xx_ack(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK the INVITE client transaction sends for a 300-699 (RFC 3261 §17.1.1.3).

    Same Request-URI, Call-ID, From, Route and top Via (so the same branch) as the INVITE; To from
    the response (with its tag); CSeq number of the INVITE with method ACK.
    """
    return request_on_invite_branch(invite, "ACK", response.headers["To"])


def response_destination(via: Via, source: Address, transport: Transport) -> Address:
    """Where a response goes: back to the address and port the request really came from, over
    any transport (RFC 3581 §4's symmetric response routing, applied to every request).

    On purpose stricter than RFC 3261 §18.2.2: a Via's ``maddr``, a ``received`` the peer wrote
    itself and the sent-by address are never used, so one unauthenticated datagram can never
    make the worker send to an address of the sender's choosing (reflection, amplification).
    """
    return source


def _client_key(branch: str, method: str) -> str:
    return f"c|{branch}|{method}"


def _server_key(method: str, via: Via, message: SipMessage) -> str:
    """The server transaction id for a request (or for the response the TU sends on it)."""
    if method == "ACK":
        method = "INVITE"
    branch = via.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        return f"s|{branch}|{via.sent_by}|{method}"
    # RFC 2543 peers: no usable branch (§17.2.3, simplified: the To tag is left out so that the
    # ACK, which carries the tag of our response, still finds its INVITE).
    return (
        f"s2543|{message.call_id}|{message.from_tag}|{message.cseq.number}|"
        f"{via.sent_by}|{branch}|{method}"
    )


# --------------------------------------------------------------------------------------------
# The layer


class TransactionLayer:
    """Owns every client and server transaction and their timers (one per SIP transport pair)."""

    def __init__(
        self,
        *,
        timers: Timers | None = None,
        send_trying: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.timers = timers or Timers()
        self.send_trying = send_trying
        self._transactions: dict[str, _Transaction] = {}
        self._accepted: dict[tuple[str, int, str | None], InviteServerTransaction] = {}
        self._heap: list[tuple[float, int, _Transaction, str]] = []
        self._counter = itertools.count()
        self._events: list[TransactionEvent] = []
        self._outgoing: list[OutgoingMessage] = []
        self._log = logger or logging.getLogger("worker.sip.transaction")
        self._debug = self._log.isEnabledFor(logging.DEBUG)

    # -- bookkeeping used by the transactions

    def _schedule(self, at: float, txn: _Transaction, name: str) -> None:
        heapq.heappush(self._heap, (at, next(self._counter), txn, name))

    def _forget(self, txn: _Transaction) -> None:
        if self._transactions.get(txn.id) is txn:
            del self._transactions[txn.id]
            if self._debug:
                self._log.debug("= %s terminated", txn.id)

    # -- outputs

    def events_received(self) -> list[TransactionEvent]:
        """Everything that happened since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[OutgoingMessage]:
        """Everything to put on the wire since the last call, in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_timeout(self) -> float | None:
        """When ``handle_timeout`` must next be called, or None with no timer running."""
        heap = self._heap
        while heap:
            at, _, txn, name = heap[0]
            if txn.timers.get(name) == at:
                return at
            heapq.heappop(heap)
        return None

    def handle_timeout(self, now: float) -> None:
        """Fire every timer due at or before ``now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, txn, name = heapq.heappop(heap)
            if txn.timers.get(name) != at:
                continue
            del txn.timers[name]
            if self._debug:
                self._log.debug("= %s timer %s", txn.id, name)
            txn.fire(name, now)

    # -- introspection

    def __len__(self) -> int:
        return len(self._transactions)

    def state_of(self, transaction_id: str) -> TransactionState | None:
        """The state of a live transaction; None once it has terminated."""
        txn = self._transactions.get(transaction_id)
        return None if txn is None else txn.state

    def find_cancelled_invite(self, cancel: SipRequest) -> SipRequest | None:
        """The INVITE a received CANCEL targets (RFC 3261 §9.2), None when there is none.

        None: answer 481 to the CANCEL. Otherwise answer 200 to the CANCEL and, if no final
        response was sent yet (``invite_answered`` is False), 487 to the INVITE.
        """
        txn = self._transactions.get(_server_key("INVITE", cancel.via, cancel))
        return txn.request if isinstance(txn, InviteServerTransaction) else None

    def invite_answered(self, invite: SipRequest) -> bool:
        """Whether a final response went out on this INVITE's server transaction."""
        txn = self._transactions.get(_server_key("INVITE", invite.via, invite))
        return not isinstance(txn, InviteServerTransaction) or (
            txn.state is not TransactionState.PROCEEDING
        )

    # -- inputs from the TU

    def send_request(
        self, request: SipRequest, destination: Address, transport: Transport, now: float
    ) -> str:
        """Start a client transaction; returns its id. The request's top Via must carry an RFC
        3261 branch. ACK is not sent this way (use ``send_ack``)."""
        if request.method == "ACK":
            raise TransactionError("ACK has no client transaction: use send_ack()")
        branch = request.via.branch
        if branch is None or not branch.startswith(MAGIC_COOKIE):
            raise TransactionError("the top Via of a request we send needs a z9hG4bK branch")
        tid = _client_key(branch, request.method)
        if tid in self._transactions:
            raise TransactionError(f"transaction {tid} already exists")
        txn: _ClientTransaction
        if request.method == "INVITE":
            txn = InviteClientTransaction(self, tid, request, destination, transport)
        else:
            txn = NonInviteClientTransaction(self, tid, request, destination, transport)
        self._transactions[tid] = txn
        if self._debug:
            self._log.debug("> %s %s to %s", request.method, tid, destination)
        txn.start(now)
        if request.method == "CANCEL":
            invite = self._transactions.get(_client_key(branch, "INVITE"))
            if isinstance(invite, InviteClientTransaction):
                invite.cancel_sent(now)
        return tid

    def send_response(self, response: SipResponse, now: float) -> None:
        """Send a response through the server transaction its top Via and CSeq name."""
        key = _server_key(response.cseq.method, response.via, response)
        txn = self._transactions.get(key)
        if not isinstance(txn, _ServerTransaction):
            raise TransactionError(f"no server transaction for {response.status} ({key})")
        if self._debug:
            self._log.debug("> %d %s", response.status, key)
        txn.send_response(response, now)

    def send_ack(
        self,
        ack: SipRequest,
        destination: Address,
        transport: Transport,
        now: float,
        transaction_id: str | None = None,
    ) -> None:
        """Send the TU's ACK for a 2xx (a transaction of its own, §17.1.1.3 last paragraph).

        With ``transaction_id`` of the INVITE, retransmissions of that 2xx are answered with the
        same ACK by the layer instead of being reported again.
        """
        data = ack.serialize()
        self._outgoing.append(OutgoingMessage(data, destination, transport))
        if transaction_id is not None:
            txn = self._transactions.get(transaction_id)
            if isinstance(txn, InviteClientTransaction):
                txn.remember_ack(ack.to_tag, data)

    def send_stateless(self, message: Message, destination: Address, transport: Transport) -> None:
        """Send outside any transaction (a 400 for an unparseable request, a 481, a stray ACK)."""
        self._outgoing.append(OutgoingMessage(message.serialize(), destination, transport))

    def discard(self, transaction_id: str) -> None:
        """Forget a server transaction the TU answered statelessly (``send_stateless``) or chose
        to drop: it keeps no state and sends nothing more (a retransmitted request is new)."""
        txn = self._transactions.get(transaction_id)
        if isinstance(txn, _ServerTransaction):
            txn.terminate()

    def transport_error(self, transaction_id: str, reason: str = "transport error") -> None:
        """The transport reports that it could not send for this transaction."""
        txn = self._transactions.get(transaction_id)
        if txn is not None:
            txn.transport_failed(reason)

    # -- inputs from the network

    def receive(self, message: Message, source: Address, transport: Transport, now: float) -> None:
        """Route one parsed message from the network to its transaction, or up to the TU."""
        if isinstance(message, SipResponse):
            self._receive_response(message, source, transport, now)
        else:
            self._receive_request(message, source, transport, now)

    def _receive_response(
        self, response: SipResponse, source: Address, transport: Transport, now: float
    ) -> None:
        branch = response.via.branch
        txn = None
        if branch is not None:
            txn = self._transactions.get(_client_key(branch, response.cseq.method))
        if isinstance(txn, _ClientTransaction):
            if self._debug:
                self._log.debug("< %d %s", response.status, txn.id)
            txn.on_response(response, now)
        else:
            self._events.append(UnmatchedResponse(response, source, transport))

    def _receive_request(
        self, request: SipRequest, source: Address, transport: Transport, now: float
    ) -> None:
        via = _stamp_via(request, source)
        key = _server_key(request.method, via, request)
        txn = self._transactions.get(key)
        if request.method == "ACK":
            if isinstance(txn, InviteServerTransaction):
                txn.on_ack(request, source, transport, now)
                return
            accepted = self._accepted.get((request.call_id, request.cseq.number, request.to_tag))
            if accepted is not None:
                accepted.on_ack(request, source, transport, now)
                return
            self._events.append(RequestReceived(request, source, transport, None))
            return
        if isinstance(txn, _ServerTransaction):
            if self._debug:
                self._log.debug("< %s retransmission %s", request.method, key)
            txn.on_request(request, now)
            return
        destination = response_destination(via, source, transport)
        if request.method == "INVITE":
            server: _ServerTransaction = InviteServerTransaction(
                self, key, request, destination, transport
            )
        else:
            server = NonInviteServerTransaction(self, key, request, destination, transport)
        self._transactions[key] = server
        if self._debug:
            self._log.debug("< %s new %s from %s", request.method, key, source)
        self._events.append(RequestReceived(request, source, transport, key))
        if isinstance(server, InviteServerTransaction):
            server.start(self.send_trying)


def _stamp_via(request: SipRequest, source: Address) -> Via:
    """Add ``received`` and fill ``rport`` on the top Via (RFC 3261 §18.2.1, RFC 3581 §4)."""
    via = request.via
    host = source[0]
    stamped = via
    if via.rport_requested:
        stamped = stamped.with_param("received", host).with_param("rport", str(source[1]))
    elif strip_brackets(via.host) != host or via.received is not None:
        stamped = stamped.with_param("received", host)  # a peer's own received is replaced
    if stamped is not via:
        request.headers.replace_first("Via", str(stamped))
    return stamped
