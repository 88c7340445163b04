"""``AriLeg``: one Asterisk channel in the worker's Stasis application, as a ``worker.legs.Leg``.

Media stays in Asterisk: the channel and an ExternalMedia channel (``media.py``) share a mixing
bridge, and the ExternalMedia channel's RTP is the leg's audio. The bridge and the ExternalMedia
channel get ids derived from the channel's (``<id>-bridge``, ``<id>-media``), so their events can
be routed before the REST answer that creates them arrives, and a resync after a reconnect can
tell them apart from anything else.

The flow, one REST call at a time where Asterisk needs an order, at once where it does not:
``start`` creates the bridge and the ExternalMedia channel concurrently (for an inbound call as
soon as it enters Stasis; for an originate while it rings); ``answer`` answers (concurrently with
that), then adds the channel and the ExternalMedia channel to the bridge in one call and reports
``LegAnswered``. ``ring(early_media=True)`` is ``progress`` plus the same join. A ``dial`` leg
placed for a native bridge (``with_media=False``) has neither: ``connect`` adds it to the
caller's bridge, and its audio never passes through the worker.

Asterisk's events for the leg's channels arrive at ``on_event`` from the Stasis application, in
order; signalling requests return at once and their outcome arrives as ``LegEvent``s, as the
``Leg`` contract says. A failed REST call ends the call (cause ``ari-error``), and every way out
deletes what was created: the channel (when the worker hangs up), the ExternalMedia channel, the
bridge. A 404 there means it is gone already, which is what was wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Coroutine, Mapping
from dataclasses import replace
from typing import Any, Protocol

from worker.ari.causes import hangup_reason, unanswered_end
from worker.ari.client import AriClient, AriError, AriNotFoundError
from worker.ari.media import ExternalMedia
from worker.ari.models import (
    AriEvent,
    AriProtocolError,
    BridgeDestroyed,
    ChannelDestroyed,
    ChannelDtmfReceived,
    ChannelHangupRequest,
    Dial,
    StasisEnd,
    StasisStart,
)
from worker.ari.route import BRIDGE_SUFFIX, MEDIA_SUFFIX, bridge_name
from worker.config import AriSettings
from worker.legs import (
    Address,
    Direction,
    Leg,
    LegAnswered,
    LegDtmf,
    LegEarlyMedia,
    LegEnd,
    LegEnded,
    LegEvent,
    LegInfo,
    LegObserver,
    LegRinging,
    MediaQuality,
)
from worker.log import CallLogger


class AriLegHost(Protocol):
    """What a leg asks of its Stasis application (``stasis.StasisApp``)."""

    @property
    def client(self) -> AriClient: ...

    @property
    def settings(self) -> AriSettings: ...

    def media_host(self) -> str: ...

    def open_media(self) -> Awaitable[ExternalMedia]: ...

    def close_media(self, media: ExternalMedia) -> None: ...

    def release(self, leg: AriLeg) -> None:
        """The leg is over and cleaned up: forget its channels and bridge."""


class Phase(enum.Enum):
    NEW = "new"
    RINGING = "ringing"
    EARLY_MEDIA = "early-media"
    ANSWERED = "answered"
    ENDED = "ended"


class AriLeg:
    """See the module docstring."""

    def __init__(
        self,
        host: AriLegHost,
        *,
        channel_id: str,
        direction: Direction,
        from_user: str,
        to_user: str,
        caller_name: str = "",
        protocol_id: str = "",
        with_media: bool = True,
        log: CallLogger,
    ) -> None:
        self._host = host
        self.channel_id = channel_id
        self.bridge_id = channel_id + BRIDGE_SUFFIX
        self.media_id = channel_id + MEDIA_SUFFIX
        self.with_media = with_media
        self.phase = Phase.NEW
        self._log = log
        self._observer: LegObserver | None = None
        self._pending: list[LegEvent] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prepare: asyncio.Task[None] | None = None
        self._join: asyncio.Task[None] | None = None
        self._answering = False
        self._flowing = False  # the channel and its ExternalMedia channel are in the bridge
        self._bridge_created = False
        self._media_created = False
        self._hangup_cause: int | None = None
        self._tech_cause: int | None = None
        self.media: ExternalMedia | None = None
        self.placed = False
        """Asterisk has the channel (it entered the application, or the originate returned)."""
        self.end: LegEnd | None = None
        self.teardown: asyncio.Task[None] | None = None
        """Set when the leg ends: deleting what it created in Asterisk."""
        self._info = LegInfo(
            call_id=protocol_id or channel_id,
            direction=direction,
            from_user=from_user,
            to_user=to_user,
            caller_name=caller_name,
            local_address=("", 0),
            remote_address=("", 0),
            codec=host.settings.media_format if with_media else None,
            headers=(("X-Asterisk-Channel", channel_id),),
        )

    def start(self) -> None:
        """Create the bridge and the ExternalMedia channel (concurrently), unless the leg has
        no media of its own."""
        if self.with_media and self._prepare is None:
            self._prepare = self._spawn(self._create_media())

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    # -- Leg -------------------------------------------------------------------------------------
    @property
    def info(self) -> LegInfo:
        return self._info

    @property
    def log(self) -> CallLogger:
        return self._log

    def attach(self, observer: LegObserver) -> None:
        self._observer = observer
        if self.media is not None:
            self.media.observer = observer
        pending, self._pending = self._pending, []
        for event in pending:
            observer.on_leg_event(event)

    def ring(self, early_media: bool = False) -> None:
        if self._info.direction != "inbound" or self.phase not in (Phase.NEW, Phase.RINGING):
            return
        if early_media:
            self._spawn(self._early_media())
        elif self.phase is Phase.NEW:
            self.phase = Phase.RINGING
            self._spawn(self._ring())

    def answer(self) -> None:
        if self._info.direction != "inbound" or self._answering or self.ended:
            return
        if self.phase is Phase.ANSWERED:
            return
        self._answering = True
        self._spawn(self._answer())

    def hangup(self, cause: str, status: int = 480, reason: str | None = None) -> None:
        if self.ended:
            return
        answered = self.phase is Phase.ANSWERED
        self._finish(LegEnd(cause, None if answered else status, None if answered else reason))
        self._start_teardown(hangup_reason(status, answered))

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        if self.ended or self.phase is not Phase.ANSWERED:
            return False
        self._spawn(self._host.client.send_dtmf(self.channel_id, digit, duration_ms), fatal=False)
        return True

    def send_request(
        self,
        method: str,
        content_type: str | None = None,
        content: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """ARI carries no in-dialog SIP requests."""
        return False

    def pull_frame(self, now: float) -> bytes | None:
        media = self.media
        if media is None or not self._flowing:
            return None
        return media.pull_frame(now)

    def send_frame(self, pcm: bytes) -> None:
        media = self.media
        if media is None or not self._flowing:
            return
        media.send_frame(pcm)

    def frame_due(self) -> float | None:
        media = self.media
        return None if media is None or not self._flowing else media.frame_due()

    def quality(self) -> MediaQuality:
        return self.media.quality() if self.media is not None else MediaQuality()

    def connect(self, other: Leg) -> bool:
        """Join ``other`` (a leg of the same Stasis application) to this call's bridge inside
        Asterisk: its audio and the caller's meet there, not in the worker."""
        if not isinstance(other, AriLeg) or other._host is not self._host:
            return False
        if self.ended or not self.with_media:
            return False
        self._spawn(self._add_to_bridge(other.channel_id))
        return True

    # -- Asterisk's events for this leg's channels and bridge -------------------------------------
    def on_event(self, event: AriEvent) -> None:
        if self.ended:
            return
        if isinstance(event, ChannelDtmfReceived):
            if event.channel.id == self.channel_id:
                self._log.info("dtmf", extra={"digit": event.digit, "method": "ari"})
                self._emit(LegDtmf(event.digit, event.duration_ms, "ari"))
        elif isinstance(event, ChannelHangupRequest):
            if event.channel.id == self.channel_id and not event.soft:
                self._hangup_cause, self._tech_cause = event.cause, event.tech_cause
        elif isinstance(event, StasisStart):
            if event.channel.id == self.channel_id and self._info.direction == "outbound":
                self._spawn(self._outbound_answered())
        elif isinstance(event, Dial):
            alerting = event.dialstatus in ("RINGING", "PROGRESS")
            if event.peer.id == self.channel_id and alerting and self.phase is Phase.NEW:
                self.phase = Phase.RINGING
                self._emit(LegRinging())
        elif isinstance(event, StasisEnd | ChannelDestroyed):
            if event.channel.id == self.channel_id:
                if isinstance(event, ChannelDestroyed) and self._hangup_cause is None:
                    self._hangup_cause, self._tech_cause = event.cause, event.tech_cause
                self.gone()
            elif event.channel.id == self.media_id:
                self._log.error("the ExternalMedia channel went away", extra={"event": event.type})
                self.hangup("media-lost", 500)
        elif isinstance(event, BridgeDestroyed) and event.bridge.id == self.bridge_id:
            self._log.error("the call's bridge was destroyed")
            self.hangup("media-lost", 500)

    def gone(self) -> None:
        """The channel has left the application (hung up, or gone while the events socket was
        down): end the leg as Asterisk ended it, and clean up."""
        if self.ended:
            return
        if self.phase is Phase.ANSWERED:
            end = LegEnd("remote-bye")
        elif self._info.direction == "inbound":
            end = LegEnd("cancelled", 487)
        else:
            end = unanswered_end(self._hangup_cause, self._tech_cause)
        self._finish(end)
        self._start_teardown(None)

    # -- the REST flow -----------------------------------------------------------------------------
    async def _create_media(self) -> None:
        client, settings = self._host.client, self._host.settings
        media = await self._host.open_media()
        self.media = media
        media.observer = self._observer
        host = self._host.media_host()
        port = media.local[1]
        external = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._info = replace(self._info, local_address=(host, port))
        bridge, channel = await asyncio.gather(
            client.create_bridge(
                self.bridge_id, settings.bridge_type, bridge_name(self.channel_id)
            ),
            client.external_media(
                settings.app, external, settings.media_format, channel_id=self.media_id
            ),
            return_exceptions=True,
        )
        self._bridge_created = not isinstance(bridge, BaseException)
        self._media_created = not isinstance(channel, BaseException)
        for result in (bridge, channel):
            if isinstance(result, BaseException):
                raise result
        assert not isinstance(channel, BaseException)
        remote = _rtp_source(channel.channelvars)
        media.connect(remote)
        self._info = replace(self._info, remote_address=remote)

    async def _joined(self) -> None:
        """The channel and its ExternalMedia channel in the bridge (once, however many ask)."""
        if self._join is None:
            self._join = asyncio.get_running_loop().create_task(self._add_both())
            self._join.add_done_callback(_retrieve)  # its waiters may all have been cancelled
        await asyncio.shield(self._join)

    async def _add_both(self) -> None:
        assert self._prepare is not None
        await self._prepare
        await self._host.client.add_channels(self.bridge_id, [self.channel_id, self.media_id])
        self._flowing = True

    async def _ring(self) -> None:
        await self._host.client.ring(self.channel_id)
        if self.phase is Phase.RINGING:
            self._emit(LegRinging())

    async def _early_media(self) -> None:
        await self._host.client.progress(self.channel_id)
        await self._joined()
        if self.phase in (Phase.NEW, Phase.RINGING):
            self.phase = Phase.EARLY_MEDIA
            self._emit(LegEarlyMedia(self._host.settings.media_format, True))

    async def _answer(self) -> None:
        await self._host.client.answer(self.channel_id)
        await self._joined()
        self._answered()

    async def _outbound_answered(self) -> None:
        if self.with_media:
            await self._joined()
        self._answered()

    def _answered(self) -> None:
        if self.ended or self.phase is Phase.ANSWERED:
            return
        self.phase = Phase.ANSWERED
        codec = self._host.settings.media_format if self.with_media else "asterisk-bridge"
        self._log.info("call answered", extra={"channel": self.channel_id, "codec": codec})
        self._emit(LegAnswered(codec, True))

    async def _add_to_bridge(self, channel_id: str) -> None:
        await self._joined()
        await self._host.client.add_channels(self.bridge_id, [channel_id])

    # -- the end -----------------------------------------------------------------------------------
    def _finish(self, end: LegEnd) -> None:
        self.phase = Phase.ENDED
        self.end = end
        summary: dict[str, object] = {"cause": end.cause, "sip_status": end.sip_status}
        if self.media is not None:
            summary.update(self.media.summary())
        self._log.info("call ended", extra=summary)
        self._emit(LegEnded(end))

    def _start_teardown(self, reason: str | None) -> None:
        for task in self._tasks:
            if task is not self._prepare:
                task.cancel()
        loop = asyncio.get_running_loop()
        self.teardown = loop.create_task(self._delete_all(reason))

    async def _delete_all(self, reason: str | None) -> None:
        """Delete the channel (``reason`` given: the worker hangs up), the ExternalMedia channel
        and the bridge, once their creation has finished one way or the other."""
        client = self._host.client
        if self._prepare is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait([self._prepare])
        calls: list[Coroutine[Any, Any, None]] = []
        if reason is not None:
            calls.append(client.hangup(self.channel_id, reason))
        if self._media_created:
            calls.append(client.hangup(self.media_id, "normal"))
        if self._bridge_created:
            calls.append(client.destroy_bridge(self.bridge_id))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, AriNotFoundError):
                continue  # gone already
            if isinstance(result, Exception):
                self._log.warning("cleanup in Asterisk failed", extra={"error": str(result)})
        if self.media is not None:
            self._host.close_media(self.media)
        self._host.release(self)

    # -- internals ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], *, fatal: bool = True) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                return
            if fatal and isinstance(exc, AriError) and exc.status in (404, 422):
                # Perhaps the channel vanished between two requests (the caller hung up).
                asyncio.get_running_loop().create_task(self._check_gone(exc))
                return
            if isinstance(exc, AriError | AriProtocolError | OSError):
                self._log.error("ARI request failed", extra={"error": str(exc)})
            else:
                self._log.error("ARI leg task failed", exc_info=exc)
            if fatal:
                self.hangup("ari-error", 500)

        task.add_done_callback(done)
        return task

    async def _check_gone(self, exc: AriError) -> None:
        """A request failed with 404/422: end the leg as gone if its channel is, else as an
        error."""
        try:
            await self._host.client.channel(self.channel_id)
        except AriNotFoundError:
            self._log.info("channel gone", extra={"request": f"{exc.method} {exc.path}"})
            self.gone()
            return
        except AriError:
            pass
        self._log.error("ARI request failed", extra={"error": str(exc)})
        self.hangup("ari-error", 500)

    def _emit(self, event: LegEvent) -> None:
        observer = self._observer
        if observer is None:
            self._pending.append(event)
        else:
            observer.on_leg_event(event)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _rtp_source(channelvars: Mapping[str, str] | None) -> Address:
    """Where an ExternalMedia channel sends from, and takes RTP at: its channel variables, both
    strings (``UNICASTRTP_LOCAL_ADDRESS`` "127.0.0.1", ``UNICASTRTP_LOCAL_PORT`` "20904")."""
    variables = channelvars or {}
    address = variables.get("UNICASTRTP_LOCAL_ADDRESS")
    port = variables.get("UNICASTRTP_LOCAL_PORT", "")
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise AriProtocolError(f"ExternalMedia channel without a usable RTP address: {variables}")
    return (address, int(port))
