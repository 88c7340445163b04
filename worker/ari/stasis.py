"""``StasisApp``: the worker's Stasis application in one Asterisk. It routes each event to the leg
whose channel or bridge it names, starts a call (an ``AriLeg`` handed to the same router as SIP
calls) when a channel enters the application with ``inbound``, and places calls through
Asterisk (originate).

Events. A worker in one process keeps the events WebSocket itself (``events.py``). Behind a
front (``processes`` > 1) every media process runs a ``StasisApp`` for the calls that fall on
it (``owns``: ``worker.front.shard`` of the call's key, ``route.py``): the front holds the one
events connection and hands each event to the process that owns it (``dispatch``), and tells
every process when the connection comes and goes (``set_connected``). The REST calls go from
each process straight to Asterisk; a call this process originates gets a channel id that falls
on it (``new_channel_id``).

After every connect the worker pushes the configured trunks (the front, or this application in
one process) and each application resyncs its own calls, since Asterisk replays nothing: legs
whose channel left the application during the gap end as Asterisk ended them, channels in the
application that the worker does not know are adopted (an inbound call still ringing) or hung up
(left over from an earlier worker process, or from a media process that died), and bridges it
does not know are destroyed; behind a front, each process does this for the channels and
bridges that fall on it. Calls keep their audio while the connection is down (their media never
depended on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from worker.ari.client import AriClient, AriError, AriNotFoundError, AriUnreachableError
from worker.ari.events import EventCounters, EventsConnection, read_event
from worker.ari.leg import AriLeg
from worker.ari.media import ExternalMedia
from worker.ari.models import ApplicationReplaced, Channel, StasisStart
from worker.ari.route import BRIDGE_SUFFIX, bridge_name, call_key, random_channel_id, subject
from worker.config import AriSettings, Settings
from worker.errors import RemoteError
from worker.legs import Leg
from worker.log import LogThrottle, call_logger
from worker.rtp import RtpPortPool

log = logging.getLogger("worker.ari")

IncomingHandler = Callable[[Leg], Awaitable[None]]
_DIALABLE = re.compile(r"[A-Za-z0-9+*#._-]{1,64}")


def _any_id(resource_id: str) -> bool:
    return True


@dataclass(slots=True)
class StasisCounters(EventCounters):
    connects: int = 0
    adopted: int = 0
    orphans_removed: int = 0
    refused: int = 0


class StasisApp:
    """See the module docstring. ``start`` checks the credentials and starts the events
    connection (in one process); ``close`` stops it and waits for the legs' cleanup.

    ``own_events``: keep the events connection here (False behind a front, which feeds
    ``dispatch`` and ``set_connected``). ``owns``: whether a channel or bridge id falls on this
    process (resync leaves the others to their owners); ``new_channel_id``: an id for a channel
    this process originates, one that falls on it."""

    def __init__(
        self,
        settings: Settings,
        ports: RtpPortPool,
        on_incoming: IncomingHandler,
        *,
        client: AriClient | None = None,
        own_events: bool = True,
        owns: Callable[[str], bool] = _any_id,
        new_channel_id: Callable[[], str] = random_channel_id,
    ) -> None:
        ari = settings.ari
        self._settings = ari
        self._rtp = settings.rtp
        self._ports = ports
        self._on_incoming = on_incoming
        self._client = client or AriClient(
            ari.url, ari.username, ari.password, timeout=ari.request_timeout_s
        )
        self._owns_id = owns
        self._new_channel_id = new_channel_id
        self._by_id: dict[str, AriLeg] = {}  # channel, ExternalMedia and bridge ids
        self.legs: set[AriLeg] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events: EventsConnection | None = None
        self.connected = asyncio.Event()
        if own_events:
            self._events = EventsConnection(self._client, ari, self.dispatch, self._on_state)
            self.connected = self._events.connected
        self._throttle = LogThrottle()
        self.counters = StasisCounters()
        self.draining = False
        """Take no new call: one that enters the application is hung up (``congestion``, which
        Asterisk gives its caller as 503), for another worker or a retry to take."""

    # -- AriLegHost ------------------------------------------------------------------------------
    @property
    def client(self) -> AriClient:
        return self._client

    @property
    def settings(self) -> AriSettings:
        return self._settings

    def media_host(self) -> str:
        return self._settings.media_host or self._rtp.host

    async def open_media(self) -> ExternalMedia:
        endpoint = await self._ports.open()
        return ExternalMedia(endpoint, self._settings.media_format, self._rtp)

    def close_media(self, media: ExternalMedia) -> None:
        self._ports.close(media.endpoint)

    def release(self, leg: AriLeg) -> None:
        self.legs.discard(leg)
        for key in (leg.channel_id, leg.media_id, leg.bridge_id):
            if self._by_id.get(key) is leg:
                del self._by_id[key]

    def owns(self, leg: Leg) -> bool:
        return isinstance(leg, AriLeg) and leg in self.legs

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check that Asterisk takes our credentials (``AriAuthError`` if not) and start the
        events connection (``EventsConnection.start``). Behind a front, which does both,
        there is nothing to start."""
        if self._events is not None:
            await self._events.start()

    async def close(self, grace_s: float = 3.0) -> None:
        """Stop listening; hang up what is left; wait (bounded) for the legs' cleanup."""
        if self._events is not None:
            await self._events.close()
        for leg in list(self.legs):
            leg.hangup("shutdown", 503)
        teardowns = [leg.teardown for leg in self.legs if leg.teardown is not None]
        for task in list(self._tasks):
            task.cancel()
        if teardowns:
            await asyncio.wait(teardowns, timeout=grace_s)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        await self._client.aclose()

    # -- outbound --------------------------------------------------------------------------------
    async def place_call(
        self,
        trunk: str,
        number: str,
        *,
        from_user: str | None = None,
        ring_timeout_s: float = 30.0,
        media: bool = True,
    ) -> AriLeg:
        """Originate ``PJSIP/<number>@<trunk>`` into the application. Returns the leg at once
        (ringing, answer or failure arrive as its events). ``media=False``: a leg for a bridge
        inside Asterisk (``AriLeg.connect``), without an ExternalMedia channel."""
        if not _DIALABLE.fullmatch(number) or not _DIALABLE.fullmatch(trunk):
            raise RemoteError(f"not a dialable number and trunk: {number!r} @ {trunk!r}")
        if not self.connected.is_set():
            raise AriUnreachableError(
                "POST", "/channels", 0, "the events connection to Asterisk is down"
            )
        channel_id = self._new_channel_id()
        leg = AriLeg(
            self,
            channel_id=channel_id,
            direction="outbound",
            from_user=from_user or "",
            to_user=number,
            with_media=media,
            log=call_logger(channel_id),
        )
        self._register(leg)
        leg.start()
        try:
            await self._client.originate(
                f"PJSIP/{number}@{trunk}",
                self._settings.app,
                ["outbound", channel_id],
                channel_id=channel_id,
                caller_id=from_user,
                timeout_s=max(1, round(ring_timeout_s)),
            )
        except AriError:
            leg.gone()
            raise
        leg.placed = True
        return leg

    # -- the events connection -------------------------------------------------------------------
    def _on_state(self, up: bool) -> None:
        """The events connection (this process's own) came up, the trunks pushed, or went
        down."""
        if up:
            self.counters.connects += 1
            self._spawn(self.resync())

    def set_connected(self, up: bool) -> None:
        """Behind a front: its events connection came up (the trunks are pushed: resync this
        process's calls) or went down."""
        if up and not self.connected.is_set():
            self.counters.connects += 1
            self.connected.set()
            self._spawn(self.resync())
        elif not up:
            self.connected.clear()

    def dispatch(self, message: str | bytes) -> None:
        """One message from the events socket."""
        event = read_event(message, self.counters, self._throttle)
        if event is None:
            return
        if isinstance(event, ApplicationReplaced):
            if self._events is not None:
                self._events.replaced()
            return
        key = subject(event)
        leg = self._by_id.get(key) if key is not None else None
        if leg is None:
            if isinstance(event, StasisStart):
                self._stasis_start(event)
            else:
                self.counters.unrouted_events += 1
            return
        leg.on_event(event)

    def _stasis_start(self, event: StasisStart) -> None:
        if event.args[:1] == ["inbound"]:
            self._adopt(event.channel)
            return
        # Not ours to run (an originate or ExternalMedia channel of an earlier worker process).
        log.warning(
            "unexpected channel in the application; hanging it up",
            extra={"channel": event.channel.id, "stasis_args": event.args},
        )
        self.counters.orphans_removed += 1
        self._spawn(self._delete_channel(event.channel.id))

    def _adopt(self, channel: Channel) -> None:
        if self.draining:
            log.info("draining: call from Asterisk refused", extra={"channel": channel.id})
            self.counters.refused += 1
            self._spawn(self._delete_channel(channel.id, "congestion"))
            return
        dialplan = channel.dialplan
        leg = AriLeg(
            self,
            channel_id=channel.id,
            direction="inbound",
            from_user=channel.caller.number,
            to_user=dialplan.exten if dialplan is not None else "",
            caller_name=channel.caller.name,
            protocol_id=channel.protocol_id,
            log=call_logger(channel.protocol_id or channel.id),
        )
        leg.placed = True
        self._register(leg)
        leg.log.info(
            "call from Asterisk",
            extra={"channel": channel.id, "from": leg.info.from_user, "to": leg.info.to_user},
        )
        leg.start()
        self._spawn(self._run_incoming(leg))

    async def _run_incoming(self, leg: AriLeg) -> None:
        try:
            await self._on_incoming(leg)
        except Exception:
            leg.log.exception("call handler failed")
            leg.hangup("worker-error", 500)

    def _register(self, leg: AriLeg) -> None:
        self.legs.add(leg)
        self._by_id[leg.channel_id] = leg
        if leg.with_media:
            self._by_id[leg.media_id] = leg
            self._by_id[leg.bridge_id] = leg

    # -- resync after a (re)connect --------------------------------------------------------------
    async def resync(self) -> None:
        """Make the worker's view match Asterisk's (see the module docstring)."""
        client = self._client
        known = [leg for leg in self.legs if leg.placed]  # an originate in flight is not
        try:
            app = await client.application(self._settings.app)
        except AriError as exc:
            log.warning("resync failed", extra={"error": str(exc)})
            return
        present = {channel_id for channel_id in app.channel_ids if self._owns_id(channel_id)}
        for leg in known:
            if leg.ended or leg.channel_id in present:
                continue
            if leg.info.direction == "outbound" and leg.phase.value in ("new", "ringing"):
                try:  # still dialling: not in the application until it answers
                    await client.channel(leg.channel_id)
                    continue
                except AriNotFoundError:
                    pass
                except AriError:
                    continue
            leg.log.info("channel gone while the events connection was down")
            leg.gone()
        for channel_id in sorted(present - self._by_id.keys()):
            try:
                channel = await client.channel(channel_id)
            except AriError:
                continue
            dialplan = channel.dialplan
            ringing_inbound = (
                dialplan is not None
                and dialplan.app_name == "Stasis"
                and dialplan.app_data == f"{self._settings.app},inbound"
                and channel.state == "Ring"
            )
            if ringing_inbound:
                self.counters.adopted += 1
                self._adopt(channel)
            else:
                log.warning(
                    "orphan channel in the application; hanging it up",
                    extra={"channel": channel_id},
                )
                self.counters.orphans_removed += 1
                await self._delete_channel(channel_id)
        theirs = {bridge_id for bridge_id in app.bridge_ids if not self._owns_id(bridge_id)}
        orphans = set(app.bridge_ids) - self._by_id.keys() - theirs
        # A bridge created for a call that died before a channel joined it is in no
        # application: found among all of Asterisk's bridges by its id and name (empty ones).
        with contextlib.suppress(AriError):
            for bridge in await client.bridges():
                key = call_key(bridge.id)
                if (
                    bridge.id == key + BRIDGE_SUFFIX
                    and bridge.name == bridge_name(key)
                    and not bridge.channels
                    and bridge.id not in self._by_id
                    and self._owns_id(bridge.id)
                ):
                    orphans.add(bridge.id)
        for bridge_id in sorted(orphans):
            log.warning("orphan bridge; destroying it", extra={"bridge": bridge_id})
            self.counters.orphans_removed += 1
            with contextlib.suppress(AriError):
                await client.destroy_bridge(bridge_id)

    async def _delete_channel(self, channel_id: str, reason: str = "normal") -> None:
        with contextlib.suppress(AriError):
            await self._client.hangup(channel_id, reason)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("ARI task failed", exc_info=task.exception())

        task.add_done_callback(done)
        return task
