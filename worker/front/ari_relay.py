"""The front's end of the Stasis application, when the worker has media processes and the
``ari`` ingress: the one events connection to Asterisk (an application has one subscriber), and
each event handed, as Asterisk sent it, to the media process whose call it is about.

Which process: ``worker.front.shard.shard_of`` of the call's key (``worker.ari.route``: the
channel id the event names, with its bridge's and ExternalMedia channel's suffix taken off), the
same pure function the processes use to draw the ids of the calls they originate, so no table
is kept here. A call's events keep their order (one socket per process, frames in order). After
every connect the trunks are pushed, then every process is told (``announce(True)``) and
resyncs the calls that fall on it; a process that starts (or starts again after a crash) is
told when it is ready.

What goes nowhere, counted: a message that is not a valid ARI event (logged, throttled), an
event type the worker does not use, an event that names no channel or bridge, and an event too
large for one frame (``worker.front.ipc.MAX_FRAME``, logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from worker.ari.client import AriClient
from worker.ari.events import EventCounters, EventsConnection, read_event
from worker.ari.models import ApplicationReplaced
from worker.ari.route import call_key, subject
from worker.config import AriSettings
from worker.front.ipc import FrameError, encode_ari
from worker.front.shard import shard_of
from worker.log import LogThrottle

log = logging.getLogger("worker.front.ari")


@dataclass(slots=True)
class RelayCounters(EventCounters):
    too_large: int = 0


class AriRelay:
    """See the module docstring. ``send(index, frame)`` gives a frame to media process
    ``index`` (held by the front while it is not ready); ``announce(up)`` tells them all."""

    def __init__(
        self,
        settings: AriSettings,
        processes: int,
        send: Callable[[int, bytes], None],
        announce: Callable[[bool], None],
        *,
        client: AriClient | None = None,
    ) -> None:
        self._processes = processes
        self._send = send
        self._announce = announce
        self._client = client or AriClient(
            settings.url, settings.username, settings.password, timeout=settings.request_timeout_s
        )
        self._events = EventsConnection(self._client, settings, self.relay, self._on_state)
        self.connected = self._events.connected
        self.up = False
        """Connected, and the trunks pushed: what a process that becomes ready is told."""
        self._throttle = LogThrottle()
        self.counters = RelayCounters()

    async def start(self) -> None:
        """Check the credentials (``AriAuthError`` if Asterisk refuses them) and start the
        events connection (``EventsConnection.start``)."""
        await self._events.start()

    async def close(self) -> None:
        await self._events.close()
        await self._client.aclose()

    def relay(self, message: str | bytes) -> None:
        """One message from the events socket, to the process whose call it is about."""
        event = read_event(message, self.counters, self._throttle)
        if event is None:
            return
        if isinstance(event, ApplicationReplaced):
            self._events.replaced()
            return
        key = subject(event)
        if key is None:
            self.counters.unrouted_events += 1
            return
        data = message.encode() if isinstance(message, str) else message
        try:
            frame = encode_ari(data)
        except FrameError as exc:
            self.counters.too_large += 1
            skipped = self._throttle.allow("too large", asyncio.get_running_loop().time())
            if skipped is not None:
                log.warning(
                    "ARI event too large to hand over; dropped",
                    extra={"error": str(exc), "similar_lines_skipped": skipped},
                )
            return
        self._send(shard_of(call_key(key), self._processes), frame)

    def _on_state(self, up: bool) -> None:
        """The events connection came up (the trunks pushed) or went down: every process is
        told."""
        self.up = up
        self._announce(up)
