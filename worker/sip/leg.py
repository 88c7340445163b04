"""``SipLeg``: one SIP call as a ``worker.legs.Leg``. It joins the core's call state
(``core.UaCall``, read only), the call's RTP endpoint and its sans-I/O media stream.

Signalling requests go to the user agent through ``LegControl`` (which ``ua.UserAgent``
implements; this module never imports it). The user agent hands the core's events for this
call to ``apply_media``, ``progress``, ``dtmf_info`` and ``finish``; the leg turns them into
``LegEvent``s for its observer. RTP packets arrive at ``rtp_received`` from the endpoint; the
session's media tick calls ``pull_frame`` and ``send_frame``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from media.dtmf import DtmfDigit
from media.g711 import codec_for_name
from media.rtcp import RtcpSession
from media.rtp import RtpPacket
from media.stream import FRAME_SAMPLES, RtpStream
from worker.config import RtpSettings
from worker.legs import (
    Address,
    CallFailedError,
    DtmfMethod,
    Leg,
    LegAnswered,
    LegDtmf,
    LegEarlyMedia,
    LegEnd,
    LegEnded,
    LegEvent,
    LegInfo,
    LegMediaChanged,
    LegObserver,
    LegRinging,
    MediaQuality,
)
from worker.log import CallLogger
from worker.rtp import RtpEndpoint
from worker.sip.core import CallEnd, CallPhase, UaCall
from worker.sip.sdp import NegotiatedMedia
from worker.sip.transaction import Transport

UNSENDABLE_ERRORS = 25
"""Failed RTP sends in a row (about half a second of ticks) that end a call."""


class LegControl(Protocol):
    """What a leg asks of its user agent (``ua.UserAgent``)."""

    @property
    def local_address(self) -> Address: ...

    def ring_call(self, call: UaCall, early_media: bool) -> None: ...

    def answer_call(self, call: UaCall) -> None: ...

    def hangup_call(self, call: UaCall, cause: str, status: int, reason: str | None) -> None: ...

    def send_in_dialog(
        self,
        call: UaCall,
        method: str,
        body: bytes,
        content_type: str | None,
        headers: list[tuple[str, str]],
    ) -> bool: ...

    def send_info_dtmf(self, call: UaCall, digit: str, duration_ms: int) -> bool: ...


@dataclass(slots=True)
class LegStats:
    dtmf_received: list[str] = field(default_factory=list)


class SipLeg:
    """See the module docstring. ``answered`` and ``ended`` are futures for code that waits on
    a SIP leg directly (the user agent's own tests); a session uses its observer events."""

    def __init__(
        self,
        control: LegControl,
        call: UaCall,
        endpoint: RtpEndpoint,
        rtp: RtpSettings,
        now: float,
        *,
        ntp_offset: float = 0.0,
    ) -> None:
        self._control = control
        self._ntp_offset = ntp_offset
        self.call = call
        self.endpoint = endpoint
        self._rtp = rtp
        self.stream: RtpStream | None = None
        self.rtcp: RtcpSession | None = None
        self.stats = LegStats()
        self._observer: LegObserver | None = None
        self._pending: list[LegEvent] = []  # events before an observer attached
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[LegEnd] = loop.create_future()
        self.end: LegEnd | None = None
        self.created_at = now
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.resumed_at: float | None = None  # when the last hold ended
        self._held = False
        self._errors_seen = 0
        self._sent_seen = 0
        invite = call.invite
        self._info = LegInfo(
            call_id=call.call_id,
            direction=call.direction,
            from_user=call.from_user,
            to_user=call.to_user,
            caller_name=call.caller_name,
            local_address=control.local_address,
            remote_address=call.remote,
            request_uri=str(invite.uri),
            headers=tuple(invite.headers.items()) if not invite.raw else _raw_headers(invite.raw),
            raw=invite.raw or invite.serialize(),
            body=invite.body,
            content_type=invite.content_type,
        )

    # -- Leg -------------------------------------------------------------------------------------
    @property
    def info(self) -> LegInfo:
        return self._info

    @property
    def log(self) -> CallLogger:
        return self.call.log

    def attach(self, observer: LegObserver) -> None:
        self._observer = observer
        pending, self._pending = self._pending, []
        for event in pending:
            observer.on_leg_event(event)

    def ring(self, early_media: bool = False) -> None:
        self._control.ring_call(self.call, early_media)

    def answer(self) -> None:
        self._control.answer_call(self.call)

    def hangup(
        self, cause: str = "local-hangup", status: int = 480, reason: str | None = None
    ) -> None:
        self._control.hangup_call(self.call, cause, status, reason)

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        """RFC 4733 when telephone-event was negotiated, else SIP INFO."""
        if self.stream is not None and self.stream.queue_dtmf(digit, duration_ms):
            return True
        return self._control.send_info_dtmf(self.call, digit, duration_ms)

    def send_request(
        self,
        method: str,
        content_type: str | None = None,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        return self._control.send_in_dialog(
            self.call,
            method.upper(),
            (content or "").encode(),
            content_type if content else None,
            list((headers or {}).items()),
        )

    def pull_frame(self, now: float) -> bytes | None:
        stream = self.stream
        if stream is None:
            return None
        frame = stream.pull_frame(now)
        late = stream.poll_dtmf(now)
        if late is not None:
            self._dtmf(late, "rfc4733")
        return frame

    def frame_due(self) -> float | None:
        stream = self.stream
        return None if stream is None else stream.next_due()

    def send_frame(self, pcm: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        if self.call.on_hold or self.endpoint.remote is None:
            stream.sender.skip(FRAME_SAMPLES)
            return
        packet = stream.send_frame(pcm)
        self.endpoint.send(packet)
        if self.rtcp is not None:
            self.rtcp.on_sent(len(packet) - 12)

    def quality(self) -> MediaQuality:
        endpoint = self.endpoint
        counters = endpoint.endpoint_counters
        if self.stream is None:
            return MediaQuality(packets_in=endpoint.counters.received)
        jitter = self.stream.jitter_stats
        peer = self.rtcp.peer if self.rtcp is not None else None
        return MediaQuality(
            packets_in=endpoint.counters.received,
            packets_out=counters.sent,
            lost=jitter.lost,
            late=jitter.late,
            concealed_ms=round(jitter.concealed_ms, 1),
            jitter_ms=round(jitter.jitter_ms, 2),
            peer_fraction_lost=peer.fraction_lost if peer is not None else None,
            peer_cumulative_lost=peer.cumulative_lost if peer is not None else None,
            peer_jitter_ms=peer.jitter_ms if peer is not None else None,
            round_trip_ms=peer.round_trip_ms if peer is not None else None,
            rtcp_in=counters.rtcp_in,
            rtcp_out=counters.rtcp_out,
        )

    def connect(self, other: Leg) -> bool:
        """SIP legs are bridged by the session, frame by frame."""
        return False

    # -- what the user agent calls ----------------------------------------------------------------
    def apply_media(self, media: NegotiatedMedia, now: float) -> None:
        """Use a (re)negotiated media description (the core has made it ``call.media``):
        codec, remote address, hold."""
        codec = codec_for_name(media.codec)
        assert codec is not None, media.codec  # negotiate() only picks codecs we support
        if not media.remote_hold:
            self.endpoint.set_remote((media.remote_address, media.remote_port))
        held_before, self._held = self._held, self.call.on_hold
        self._info = replace(self._info, codec=media.codec)
        stream = self.stream
        if stream is None:
            self.stream = RtpStream(
                codec,
                media.telephone_event_pt,
                jitter_min_ms=self._rtp.jitter_min_ms,
                jitter_max_ms=self._rtp.jitter_max_ms,
                jitter_early=self._rtp.jitter_early,
            )
            self.rtcp = RtcpSession(
                self.stream.sender.ssrc,
                f"aispinner-{secrets.token_hex(6)}",
                ntp_offset=self._ntp_offset,
            )
            return
        changed = codec is not stream.codec or held_before != self._held
        stream.set_codec(codec, media.telephone_event_pt)
        if held_before and not self._held:
            # No RTP was due during the hold: the inactivity timer starts again from here.
            self.resumed_at = now
        if changed and self.call.phase in (CallPhase.EARLY_MEDIA, CallPhase.ANSWERED):
            self._emit(LegMediaChanged(media.codec, self._held))

    def progress(self, phase: CallPhase, now: float) -> None:
        media = self.call.media
        if phase is CallPhase.RINGING:
            self._emit(LegRinging())
        elif phase is CallPhase.EARLY_MEDIA and media is not None:
            self._emit(LegEarlyMedia(media.codec, media.telephone_event_pt is not None))
        elif phase is CallPhase.ANSWERED and media is not None:
            self.answered_at = now
            if not self.answered.done():
                self.answered.set_result(None)
            self._emit(LegAnswered(media.codec, media.telephone_event_pt is not None))

    def dtmf_info(self, digit: str, duration_ms: int) -> None:
        self._dtmf(DtmfDigit(digit, duration_ms, 0), "sip-info")

    def rtp_received(self, packet: RtpPacket, now: float) -> None:
        stream = self.stream
        if stream is None:
            return
        rtcp = self.rtcp
        if rtcp is not None:
            rtcp.on_rtp(packet.ssrc, packet.sequence, packet.timestamp, now)
        digit = stream.receive(packet, now)
        if digit is not None:
            self._dtmf(digit, "rfc4733")
        elif self._observer is not None:
            self._observer.on_caller_audio(now)

    def rtcp_received(self, data: bytes, now: float) -> None:
        if self.rtcp is not None:
            self.rtcp.receive(data, now)

    def rtcp_tick(self, now: float) -> None:
        """Send an RTCP report when one is due (the user agent asks about once a second)."""
        rtcp, stream, media = self.rtcp, self.stream, self.call.media
        if rtcp is None or stream is None or media is None or self.end is not None:
            return
        if rtcp.due(now):
            report = rtcp.report(now, stream.sender.next_timestamp)
            self.endpoint.send_rtcp(report, media.rtcp_port, media.rtcp_mux)

    def media_unsendable(self) -> bool:
        """Whether, since the last time this was asked (about a second ago), every RTP send
        failed: an address the socket refuses makes a call whose media can never flow."""
        counters = self.endpoint.endpoint_counters
        errors, sent = counters.send_errors, counters.sent
        failing = errors - self._errors_seen >= UNSENDABLE_ERRORS and sent == self._sent_seen
        self._errors_seen, self._sent_seen = errors, sent
        return failing

    def inactive_for(self, now: float) -> float:
        """Seconds since the peer last sent RTP (or since the answer, or the end of a hold);
        0 while on hold or before the call has media."""
        if self.stream is None or self.call.on_hold or self.call.ended:
            return 0.0
        last = self.endpoint.last_received
        for since in (self.answered_at, self.call.answered_at, self.resumed_at):
            if since is not None and (last is None or since > last):
                last = since
        return 0.0 if last is None else now - last

    def finish(self, end: CallEnd, now: float) -> None:
        """The call ended: report it once; the user agent releases the media."""
        if self.end is not None:
            return
        leg_end = LegEnd(end.cause, end.sip_status, end.sip_reason)
        media = self.call.media
        if self.rtcp is not None and media is not None:  # RFC 3550 §6.6: say goodbye
            self.endpoint.send_rtcp(self.rtcp.bye(), media.rtcp_port, media.rtcp_mux)
        self.end = leg_end
        self.ended_at = now
        if not self.answered.done():
            self.answered.set_exception(CallFailedError(leg_end))
            self.answered.exception()  # retrieved: waiting on it is optional
        self.ended.set_result(leg_end)
        self.log.info("call ended", extra=self.summary())
        self._emit(LegEnded(leg_end))

    def summary(self) -> dict[str, object]:
        """The call's outcome and RTP figures, as logged when it ends (flat, JSON-friendly)."""
        end = self.end
        media = self.call.media
        out: dict[str, object] = {
            "direction": self.call.direction,
            "cause": end.cause if end else None,
            "sip_status": end.sip_status if end else None,
            "codec": media.codec if media else None,
            "rtp_in": self.endpoint.counters.received,
            "rtp_out": self.endpoint.endpoint_counters.sent,
            "rtp_malformed": self.endpoint.counters.malformed,
            "rtp_foreign": self.endpoint.endpoint_counters.foreign_source,
            "rtcp_in": self.endpoint.endpoint_counters.rtcp_in,
            "rtcp_out": self.endpoint.endpoint_counters.rtcp_out,
            "dtmf": "".join(self.stats.dtmf_received),
        }
        answered = self.answered_at
        if answered is not None and self.ended_at is not None:
            out["seconds"] = round(self.ended_at - answered, 3)
        if self.stream is not None:
            jitter = self.stream.jitter_stats
            out.update(
                rtp_played=jitter.received,
                rtp_lost=jitter.lost,
                rtp_late=jitter.late,
                rtp_overflow=jitter.overflow_dropped,
                rtp_previous_codec=self.stream.counters.previous_codec,
                concealed_ms=round(jitter.concealed_ms, 1),
                jitter_ms=round(jitter.jitter_ms, 2),
            )
        peer = self.rtcp.peer if self.rtcp is not None else None
        if peer is not None:
            out.update(
                peer_fraction_lost=peer.fraction_lost,
                peer_cumulative_lost=peer.cumulative_lost,
                peer_jitter_ms=peer.jitter_ms,
                round_trip_ms=peer.round_trip_ms,
            )
        return out

    # -- SIP-level views for the user agent's tests ------------------------------------------------
    @property
    def phase(self) -> CallPhase:
        return self.call.phase

    @property
    def media(self) -> NegotiatedMedia | None:
        return self.call.media

    @property
    def to_user(self) -> str:
        return self.call.to_user

    @property
    def is_ended(self) -> bool:
        return self.end is not None

    @property
    def transport(self) -> Transport:
        return self.call.transport

    @property
    def on_hold(self) -> bool:
        return self.call.on_hold

    # -- internals ---------------------------------------------------------------------------------
    def _dtmf(self, digit: DtmfDigit, method: DtmfMethod) -> None:
        self.stats.dtmf_received.append(digit.digit)
        self.log.info("dtmf", extra={"digit": digit.digit, "method": method})
        self._emit(LegDtmf(digit.digit, digit.duration_ms, method))

    def _emit(self, event: LegEvent) -> None:
        observer = self._observer
        if observer is None:
            self._pending.append(event)
        else:
            observer.on_leg_event(event)


def _raw_headers(raw: bytes) -> tuple[tuple[str, str], ...]:
    """Header fields of a message as they were on the wire: one entry per field line (folded
    lines joined), names as written, values untouched (a comma list stays one value)."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = head.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")[1:]
    out: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if colon:
            out.append((name.strip(), value.strip()))
    return tuple(out)
