"""The seam between a call session and the telephony side of a call: the ``Leg`` protocol every
ingress implements (``worker.sip.leg.SipLeg``, ``worker.ari.leg.AriLeg``), the frozen ``LegInfo``
a session reads about its call, and the events a leg reports. ``worker.session`` imports this
module and never ``worker.sip`` or ``worker.ari``.

Signalling: ``ring``, ``answer``, ``hangup``, ``send_dtmf`` and ``send_request`` return at once;
what comes of them, and everything the far end does, arrives as ``LegEvent``s at the leg's one
observer (``attach``), in the order it happened. A leg never changes a session's state: the
session feeds the events to its status table.

Media: 8 kHz, 16-bit little-endian mono PCM in 20 ms frames (``FRAME_BYTES``). On each media tick
the session calls ``pull_frame(now)`` once (the caller's next frame, or None when the far end
sends nothing) and ``send_frame(pcm)`` once (what the far end hears). Before the leg has media
(no SDP answer yet) both are cheap no-ops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from worker.errors import RemoteError
from worker.log import CallLogger

Address = tuple[str, int]
Direction = Literal["inbound", "outbound"]
DtmfMethod = Literal["rfc4733", "sip-info", "inband", "ari"]

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2


@dataclass(frozen=True, slots=True)
class LegInfo:
    """What a session may know about its leg. ``headers`` is the initial request's header
    fields as an ordered multi-map (each field line once, with its value as received);
    ``raw`` is that request exactly as it came off the wire (inbound) or as sent (outbound)."""

    call_id: str
    direction: Direction
    from_user: str
    to_user: str
    caller_name: str
    local_address: Address
    remote_address: Address
    codec: str | None = None
    request_uri: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes = b""
    body: bytes = b""
    content_type: str | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class LegEnd:
    """Why a leg ended. ``cause`` is a short token (``remote-bye``, ``local-hangup``,
    ``cancelled``, ``rtp-timeout``, ``ack-timeout``, ``rejected``, ``timeout``, ``busy``,
    ``no-answer``, ``dialog-gone`` ...). ``sip_status`` is the final status of a call that never
    connected, when one was sent or received; None when none came (RFC 3261 §9.1)."""

    cause: str
    sip_status: int | None = None
    sip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class MediaQuality:
    """A leg's media figures: what it received and sent, what its jitter buffer saw, and what
    the far end reported about our stream in RTCP receiver reports (None without any)."""

    packets_in: int = 0
    packets_out: int = 0
    lost: int = 0
    late: int = 0
    concealed_ms: float = 0.0
    jitter_ms: float = 0.0
    peer_fraction_lost: float | None = None
    peer_cumulative_lost: int | None = None
    peer_jitter_ms: float | None = None
    round_trip_ms: float | None = None
    rtcp_in: int = 0
    rtcp_out: int = 0


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LegRinging:
    """The far end is alerting (180 sent or received)."""


@dataclass(frozen=True, slots=True)
class LegEarlyMedia:
    """Media flows before the answer (183 with SDP); ``telephone_event``: RFC 4733 negotiated."""

    codec: str
    telephone_event: bool


@dataclass(frozen=True, slots=True)
class LegAnswered:
    codec: str
    telephone_event: bool


@dataclass(frozen=True, slots=True)
class LegMediaChanged:
    """A re-negotiation (re-INVITE, UPDATE) changed the codec or put the call on/off hold."""

    codec: str
    on_hold: bool


@dataclass(frozen=True, slots=True)
class LegDtmf:
    digit: str
    duration_ms: int
    method: DtmfMethod


@dataclass(frozen=True, slots=True)
class LegEnded:
    end: LegEnd


LegEvent = LegRinging | LegEarlyMedia | LegAnswered | LegMediaChanged | LegDtmf | LegEnded


class LegObserver(Protocol):
    def on_leg_event(self, event: LegEvent) -> None:
        """One event, synchronously, in order. Must not raise; must not block."""

    def on_caller_audio(self, now: float) -> None:
        """A packet of the caller's audio was filed (in the jitter buffer) at ``now``: a frame
        missing at its tick may be taken now (``pull_frame``), not a tick later. Called for
        every packet, on the 20 ms path: must be cheap, must not raise."""


class CallFailedError(RemoteError):
    """A call ended without being answered (busy, no answer, declined, unreachable)."""

    def __init__(self, end: LegEnd) -> None:
        super().__init__(f"call not answered: {end.cause} ({end.sip_status} {end.sip_reason})")
        self.end = end


class Leg(Protocol):
    """One call leg, whatever carries it. See the module docstring."""

    @property
    def info(self) -> LegInfo: ...

    @property
    def log(self) -> CallLogger: ...

    def attach(self, observer: LegObserver) -> None:
        """Send this leg's events to ``observer`` from now on (one observer per leg)."""

    def ring(self, early_media: bool = False) -> None:
        """Alert the caller (180), or with ``early_media`` open the media path unanswered (183
        with SDP). Inbound and unanswered only; otherwise nothing happens."""

    def answer(self) -> None:
        """Answer an inbound call (200 with SDP); ``LegAnswered`` follows."""

    def hangup(self, cause: str, status: int = 480, reason: str | None = None) -> None:
        """End the call whatever its state: BYE when connected, the final ``status`` (and
        ``reason``) for an unanswered inbound call, CANCEL for an unanswered outbound one.
        ``LegEnded`` follows (at once: the wire's cleanup goes on without the session)."""

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        """Send one key press (RFC 4733 in the media, else out of band); False if impossible."""

    def send_request(
        self,
        method: str,
        content_type: str | None = None,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Send an in-dialog request (INFO, NOTIFY, MESSAGE, OPTIONS); False without a dialog."""

    def pull_frame(self, now: float) -> bytes | None:
        """The caller's 20 ms of PCM due at ``now``, or None."""

    def send_frame(self, pcm: bytes) -> None:
        """What the far end hears for this tick (one frame of PCM)."""

    def frame_due(self) -> float | None:
        """When (loop time) ``pull_frame`` can next return the caller's audio: the jitter
        buffer's next packet falls due. None when not known (no media yet). The session ticks
        right after it (``MediaPacer.align``)."""

    def quality(self) -> MediaQuality:
        """The media figures so far."""

    def connect(self, other: Leg) -> bool:
        """Join ``other``'s audio to this leg's where both are carried (an Asterisk bridge), so
        it never passes through the worker; False when the carrier cannot (SIP legs), and the
        session then carries the frames between them itself."""


class LegWatch:
    """A ``LegObserver`` that turns a leg's events into futures, for code that waits on a leg
    it does not run a session for (the far leg of ``dial``, tests): ``media`` (early media or
    the answer), ``answered`` (fails with ``CallFailedError`` if the leg ends first) and
    ``ended``. ``forward`` also gets every event."""

    def __init__(self, forward: LegObserver | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.media: asyncio.Future[None] = loop.create_future()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[LegEnd] = loop.create_future()
        self.events: list[LegEvent] = []
        self.forward = forward

    def on_caller_audio(self, now: float) -> None:
        """A watched leg's audio is taken by whoever carries it, at its ticks."""

    def on_leg_event(self, event: LegEvent) -> None:
        self.events.append(event)
        if isinstance(event, LegEarlyMedia | LegAnswered) and not self.media.done():
            self.media.set_result(None)
        if isinstance(event, LegAnswered) and not self.answered.done():
            self.answered.set_result(None)
        elif isinstance(event, LegEnded):
            if not self.answered.done():
                self.answered.set_exception(CallFailedError(event.end))
                self.answered.exception()  # retrieved: waiting on it is optional
            if not self.media.done():
                self.media.cancel()
            if not self.ended.done():
                self.ended.set_result(event.end)
        if self.forward is not None:
            self.forward.on_leg_event(event)
