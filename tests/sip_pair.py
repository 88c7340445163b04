"""Two SIP user agent cores wired together in memory (like h11's ``ConnectionPair``), with one
virtual clock: what one sends is parsed and received by the other, nothing touches a socket.

``pair.a`` is at 127.0.0.1:5060 and ``pair.b`` at 127.0.0.2:5070; each has the other as a trunk
(``"b"`` on a, ``"a"`` on b) and accepts the other's INVITEs (loopback is trusted by default).
``flush()`` delivers until both are quiet; ``advance(seconds)`` moves the clock, firing both
cores' timers in order. ``hold`` keeps one side's outgoing messages for a test to inspect, drop
or answer by hand (``take`` and ``inject``), to play a peer that misbehaves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.config import Settings, load_settings
from worker.sip.core import (
    CallEnded,
    CallProgress,
    IncomingCall,
    MediaNegotiated,
    UaCall,
    UaEvent,
    UserAgentCore,
)
from worker.sip.message import Message, SipMessageError, SipRequest, SipResponse, parse
from worker.sip.transaction import OutgoingMessage, Transport

Side = Literal["a", "b"]
A_ADDRESS = ("127.0.0.1", 5060)
B_ADDRESS = ("127.0.0.2", 5070)


def settings_for(
    tmp_path: Path,
    side: Side,
    *,
    sip: dict[str, Any] | None = None,
    trunk: dict[str, Any] | None = None,
) -> Settings:
    host, port = A_ADDRESS if side == "a" else B_ADDRESS
    other: Side = "b" if side == "a" else "a"
    other_host, other_port = B_ADDRESS if side == "a" else A_ADDRESS
    return load_settings(
        None,
        data_dir=tmp_path / side,
        sip={"host": host, "port": port, "t1_ms": 500, **(sip or {})},
        rtp={"host": host},
        trunks={other: {"host": other_host, "port": other_port, **(trunk or {})}},
        routes=[{"match": "*", "action": "echo"}],
    )


@dataclass
class Sent:
    """One message on the wire: who sent it and what it was."""

    sender: Side
    message: Message
    data: bytes
    transport: Transport


@dataclass
class UaPair:
    a: UserAgentCore
    b: UserAgentCore
    now: float = 1000.0
    wire: list[Sent] = field(default_factory=list)
    events: dict[Side, list[UaEvent]] = field(default_factory=lambda: {"a": [], "b": []})
    held: dict[Side, list[OutgoingMessage]] = field(default_factory=lambda: {"a": [], "b": []})
    holding: set[Side] = field(default_factory=set)
    unparseable: list[tuple[Side, bytes]] = field(default_factory=list)
    drop: Callable[[Sent], bool] | None = None
    auto_media: bool = True
    """Open media (port 4000 on a, 6000 on b) for every incoming call at once."""

    @classmethod
    def create(
        cls,
        tmp_path: Path,
        *,
        a_sip: dict[str, Any] | None = None,
        b_sip: dict[str, Any] | None = None,
        a_trunk: dict[str, Any] | None = None,
        b_trunk: dict[str, Any] | None = None,
    ) -> UaPair:
        a = UserAgentCore(settings_for(tmp_path, "a", sip=a_sip, trunk=a_trunk))
        b = UserAgentCore(settings_for(tmp_path, "b", sip=b_sip, trunk=b_trunk))
        return cls(a, b)

    def core(self, side: Side) -> UserAgentCore:
        return self.a if side == "a" else self.b

    # -- moving messages -------------------------------------------------------------------------
    def flush(self) -> list[Sent]:
        """Deliver until neither side has anything to send; what went over the wire."""
        delivered: list[Sent] = []
        for _ in range(200):
            moved = False
            for side in ("a", "b"):
                self._collect(side)
                for out in self.core(side).data_to_send():
                    moved = True
                    if side in self.holding:
                        self.held[side].append(out)
                        continue
                    sent = self._deliver(side, out)
                    if sent is not None:
                        delivered.append(sent)
            if not moved:
                self._collect("a")
                self._collect("b")
                return delivered
        raise AssertionError("the pair never went quiet")

    def _deliver(self, sender: Side, out: OutgoingMessage) -> Sent | None:
        try:
            message = parse(out.data)
        except SipMessageError:
            self.unparseable.append((sender, out.data))  # e.g. a 400 echoing a bad CSeq
            return None
        sent = Sent(sender, message, out.data, out.transport)
        self.wire.append(sent)
        if self.drop is not None and self.drop(sent):
            return None
        receiver: Side = "b" if sender == "a" else "a"
        expected = B_ADDRESS if receiver == "b" else A_ADDRESS
        assert out.destination == expected, (out.destination, message)
        source = A_ADDRESS if sender == "a" else B_ADDRESS
        self.core(receiver).receive(message, source, out.transport, self.now)
        return sent

    def take(self, side: Side) -> list[Message]:
        """What ``side`` sent while held (not delivered), parsed."""
        self.flush()
        out, self.held[side] = self.held[side], []
        return [parse(o.data) for o in out]

    def inject(self, message: Message, to: Side) -> None:
        """Deliver a hand-made message to ``to`` as if the other side had sent it."""
        source = A_ADDRESS if to == "b" else B_ADDRESS
        self.core(to).receive(parse(message.serialize()), source, Transport.UDP, self.now)
        self.flush()

    def _collect(self, side: Side) -> None:
        core = self.core(side)
        for event in core.events():
            self.events[side].append(event)
            if isinstance(event, IncomingCall) and self.auto_media:
                core.media_opened(event.call, 4000 if side == "a" else 6000, self.now)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing both sides' timers in order, delivering after each."""
        end = self.now + seconds
        self.flush()
        while True:
            due = [t for t in (self.a.next_timeout(), self.b.next_timeout()) if t is not None]
            if not due or min(due) > end:
                break
            self.now = max(self.now, min(due))
            self.a.handle_timeout(self.now)
            self.b.handle_timeout(self.now)
            self.flush()
        self.now = end
        self.flush()

    # -- reading what happened -------------------------------------------------------------------
    def sent(self, sender: Side, what: str | int) -> list[Message]:
        """Messages ``sender`` put on the wire: requests by method, responses by status."""
        out: list[Message] = []
        for item in self.wire:
            m = item.message
            if item.sender != sender:
                continue
            if (isinstance(what, str) and isinstance(m, SipRequest) and m.method == what) or (
                isinstance(what, int) and isinstance(m, SipResponse) and m.status == what
            ):
                out.append(m)
        return out

    def wire_responses(self, sender: Side) -> list[SipResponse]:
        """Every response ``sender`` put on the wire, in order."""
        return [
            s.message
            for s in self.wire
            if s.sender == sender and isinstance(s.message, SipResponse)
        ]

    def incoming(self, side: Side) -> UaCall:
        calls = [e.call for e in self.events[side] if isinstance(e, IncomingCall)]
        assert calls, f"no incoming call on {side}"
        return calls[-1]

    def ended(self, side: Side, call: UaCall) -> CallEnded | None:
        for event in self.events[side]:
            if isinstance(event, CallEnded) and event.call is call:
                return event
        return None

    def progress(self, side: Side, call: UaCall) -> list[str]:
        return [
            str(e.phase)
            for e in self.events[side]
            if isinstance(e, CallProgress) and e.call is call
        ]

    def negotiated(self, side: Side, call: UaCall) -> list[MediaNegotiated]:
        return [e for e in self.events[side] if isinstance(e, MediaNegotiated) and e.call is call]

    def call_a_to_b(self, number: str = "100") -> tuple[UaCall, UaCall]:
        """a calls b; b rings and answers; both calls (a's, b's)."""
        out = self.a.place_call("b", number, 4000, self.now)
        self.flush()
        inbound = self.incoming("b")
        self.b.ring(inbound, self.now)
        self.flush()
        self.b.answer(inbound, self.now)
        self.flush()
        return out, inbound
