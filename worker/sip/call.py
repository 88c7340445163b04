"""One SIP call leg as the rest of the worker sees it: its dialog, its negotiated media, its RTP
endpoint and stream, and the life cycle (ringing, answered, ended with a cause).

The user agent (``ua.py``) creates calls and feeds them SIP events; the call owns the media
once it is answered: on each 20 ms pacer tick it pulls the caller's frame from the jitter
buffer, hands it to ``on_audio``, asks ``audio_source`` for what the caller should hear, and
sends one RTP packet. Consumers (the echo route, a call session) only use the public methods
and callbacks, never SIP.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from media.dtmf import DtmfDigit
from media.g711 import codec_for_name
from media.rtp import RtpPacket
from media.stream import FRAME_BYTES, FRAME_SAMPLES, RtpStream
from worker.log import CallLogger, call_logger
from worker.rtp import RtpEndpoint
from worker.sip.auth import DigestClient
from worker.sip.dialog import Dialog
from worker.sip.message import SipRequest
from worker.sip.sdp import LocalSdp, NegotiatedMedia, SessionDescription
from worker.sip.transaction import Transport

if TYPE_CHECKING:
    from worker.sip.ua import UserAgent

Address = tuple[str, int]
SILENCE = bytes(FRAME_BYTES)


class CallState(enum.StrEnum):
    INCOMING = "incoming"  # INVITE received, not answered
    CALLING = "calling"  # INVITE sent, no answer yet
    RINGING = "ringing"  # 180 sent or received
    EARLY_MEDIA = "early-media"  # 183 with SDP
    ANSWERED = "answered"  # 2xx sent/received, dialog confirmed or awaiting ACK
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class CallEnd:
    """Why a call ended. ``cause`` is a short token (``remote-bye``, ``local-hangup``,
    ``cancelled``, ``rtp-timeout``, ``ack-timeout``, ``rejected``, ``timeout``, ``busy``, ...);
    ``sip_status`` is the final status for calls that never connected."""

    cause: str
    sip_status: int | None = None
    sip_reason: str | None = None


@dataclass(slots=True)
class CallStats:
    dtmf_received: list[str] = field(default_factory=list)


class SipCall:
    """One leg. Created by ``UserAgent``; see the module docstring."""

    def __init__(
        self,
        ua: UserAgent,
        *,
        call_id: str,
        direction: str,
        local_tag: str,
        remote: Address,
        transport: Transport,
        endpoint: RtpEndpoint,
        local_sdp: LocalSdp,
    ) -> None:
        self.ua = ua
        self.call_id = call_id
        self.direction = direction  # "inbound" | "outbound"
        self.local_tag = local_tag
        self.remote = remote
        self.transport = transport
        self.endpoint = endpoint
        self.local_sdp = local_sdp
        self.state = CallState.INCOMING if direction == "inbound" else CallState.CALLING
        self.dialog: Dialog | None = None
        self.invite: SipRequest | None = None
        self.media: NegotiatedMedia | None = None
        self.stream: RtpStream | None = None
        self.from_user = ""
        self.to_user = ""
        self.caller_name = ""
        self.end: CallEnd | None = None
        self.stats = CallStats()
        self.log: CallLogger = call_logger(call_id, "worker.sip.call")
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[CallEnd] = loop.create_future()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.created_at = loop.time()
        self.on_hold = False
        self.resumed_at: float | None = None  # when the last hold ended
        self._inactivity_timeout = ua.settings.rtp.inactivity_timeout_s
        self._timed_out = False
        # SIP bookkeeping the user agent keeps per call:
        self.offer: SessionDescription | None = None  # the SDP offer (theirs inbound, ours out)
        self.destination: Address = remote  # where in-dialog requests of an outbound call go
        self.invite_tid: str | None = None
        self.digest: DigestClient | None = None
        self.reoffer_pending = False
        # Consumers set these:
        self.on_audio: Callable[[bytes, float], None] | None = None
        self.on_dtmf: Callable[[str, int, str], None] | None = None
        self.on_state: Callable[[SipCall], None] | None = None
        self.audio_source: Callable[[float], bytes | None] | None = None
        self.on_tick_done: Callable[[bytes | None, bytes, float], None] | None = None

    # -- what consumers call -------------------------------------------------------------------
    async def ring(self, early_media: bool = False) -> None:
        """Send 180 Ringing (or 183 Session Progress with SDP when ``early_media``)."""
        self.ua.send_provisional(self, early_media)

    async def answer(self) -> None:
        """Send 200 OK with our SDP and start the media; returns once sent."""
        self.ua.answer_call(self)

    async def hangup(
        self, cause: str = "local-hangup", status: int = 480, reason: str | None = None
    ) -> None:
        """End the call whatever its state: BYE, CANCEL, or a final ``status`` if unanswered."""
        await self.ua.hangup_call(self, cause, status, reason)

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        """Send a DTMF digit as RFC 4733 (or SIP INFO when telephone-event was not negotiated)."""
        if self.stream is not None and self.stream.queue_dtmf(digit, duration_ms):
            return True
        return self.ua.send_info_dtmf(self, digit, duration_ms)

    def send_request(
        self,
        method: str,
        content_type: str | None = None,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Send an in-dialog INFO / NOTIFY / MESSAGE / OPTIONS; False when there is no dialog."""
        return self.ua.send_in_dialog(
            self,
            method.upper(),
            (content or "").encode(),
            content_type if content else None,
            list((headers or {}).items()),
        )

    @property
    def is_ended(self) -> bool:
        return self.state is CallState.ENDED

    # -- used by the user agent ---------------------------------------------------------------
    def set_state(self, state: CallState) -> None:
        if self.state is CallState.ENDED or state is self.state:
            return
        self.state = state
        if self.on_state is not None:
            self.on_state(self)

    def apply_media(self, media: NegotiatedMedia) -> None:
        """Use a (re)negotiated media description: codec, remote address, hold."""
        codec = codec_for_name(media.codec)
        assert codec is not None, media.codec  # negotiate() only picks codecs we support
        self.media = media
        was_on_hold = self.on_hold
        self.on_hold = media.remote_hold or not media.direction.sends
        if was_on_hold and not self.on_hold:
            # No RTP was due during the hold: the inactivity timer starts again from here.
            self.resumed_at = asyncio.get_running_loop().time()
        if not media.remote_hold:
            self.endpoint.set_remote((media.remote_address, media.remote_port))
        if self.stream is None or self.stream.codec is not codec:
            settings = self.ua.settings.rtp
            self.stream = RtpStream(
                codec,
                media.telephone_event_pt,
                jitter_min_ms=settings.jitter_min_ms,
                jitter_max_ms=settings.jitter_max_ms,
            )
        else:
            self.stream.telephone_event_pt = media.telephone_event_pt

    def rtp_received(self, packet: RtpPacket, now: float) -> None:
        stream = self.stream
        if stream is None:
            return
        digit = stream.receive(packet, now)
        if digit is not None:
            self._dtmf(digit, "rfc4733")

    def dtmf_received(self, digit: str, duration_ms: int, method: str) -> None:
        self._dtmf(DtmfDigit(digit, duration_ms, 0), method)

    def _dtmf(self, digit: DtmfDigit, method: str) -> None:
        self.stats.dtmf_received.append(digit.digit)
        self.log.info("dtmf", extra={"digit": digit.digit, "method": method})
        if self.on_dtmf is not None:
            self.on_dtmf(digit.digit, digit.duration_ms, method)

    def tick(self, now: float) -> None:
        """One 20 ms media tick (called by the process-wide pacer)."""
        stream = self.stream
        if stream is None or self.state is CallState.ENDED:
            return
        frame = stream.pull_frame(now)
        late = stream.poll_dtmf(now)
        if late is not None:
            self._dtmf(late, "rfc4733")
        if frame is not None and self.on_audio is not None:
            self.on_audio(frame, now)
        source = self.audio_source(now) if self.audio_source is not None else None
        out = source if source is not None else SILENCE
        if not self.on_hold and self.endpoint.remote is not None:
            self.endpoint.send(stream.send_frame(out))
        else:
            stream.sender.skip(FRAME_SAMPLES)
        if self.on_tick_done is not None:
            self.on_tick_done(frame, out, now)
        self._check_inactivity(now)

    def _check_inactivity(self, now: float) -> None:
        # Runs every tick: plain comparisons, nothing allocated.
        if self.on_hold or self._timed_out:
            return
        last = self.endpoint.last_received
        since = self.answered_at
        if since is not None and (last is None or since > last):
            last = since
        since = self.resumed_at
        if since is not None and (last is None or since > last):
            last = since
        if last is not None and now - last > self._inactivity_timeout:
            self._timed_out = True  # hang up once, not on every tick until the BYE is out
            self.log.warning("no RTP from the peer", extra={"seconds": round(now - last, 1)})
            self.ua.spawn(self.hangup("rtp-timeout"))

    def finish(self, end: CallEnd) -> None:
        """Mark the call ended (idempotent) and release its media."""
        if self.state is CallState.ENDED:
            return
        self.state = CallState.ENDED
        self.end = end
        self.ended_at = asyncio.get_running_loop().time()
        self.ua.release_media(self)
        if not self.answered.done():
            self.answered.set_exception(CallFailedError(end))
            self.answered.exception()
        self.ended.set_result(end)
        self.log.info("call ended", extra=self.summary())
        if self.on_state is not None:
            self.on_state(self)

    def summary(self) -> dict[str, object]:
        """The call's outcome and RTP figures, as logged when it ends (flat, JSON-friendly)."""
        rtp = self.endpoint.counters
        out: dict[str, object] = {
            "direction": self.direction,
            "cause": self.end.cause if self.end else None,
            "sip_status": self.end.sip_status if self.end else None,
            "codec": self.media.codec if self.media else None,
            "rtp_in": rtp.received,
            "rtp_out": self.endpoint.endpoint_counters.sent,
            "rtp_malformed": rtp.malformed,
            "rtp_foreign": self.endpoint.endpoint_counters.foreign_source,
            "dtmf": "".join(self.stats.dtmf_received),
        }
        if self.answered_at is not None and self.ended_at is not None:
            out["seconds"] = round(self.ended_at - self.answered_at, 3)
        if self.stream is not None:
            jitter = self.stream.jitter_stats
            out.update(
                rtp_played=jitter.received,
                rtp_lost=jitter.lost,
                rtp_late=jitter.late,
                rtp_overflow=jitter.overflow_dropped,
                concealed_ms=round(jitter.concealed_ms, 1),
                jitter_ms=round(jitter.jitter_ms, 2),
            )
        return out


class CallFailedError(Exception):
    """An outbound call (or an inbound one before answer) ended without being answered."""

    def __init__(self, end: CallEnd) -> None:
        super().__init__(f"call not answered: {end.cause} ({end.sip_status} {end.sip_reason})")
        self.end = end
