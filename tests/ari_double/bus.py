"""Stasis applications and the events websockets: which app has which socket (a second socket
replaces the first, which gets ``ApplicationReplaced`` and nothing more), what each app is
subscribed to, and the delivery of events in order. An event for an app without a connected
socket is lost, as in Asterisk. Events made during a REST request can be held back until its
response is written (``Capture``), to reproduce the recorded order of events and responses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.ari_double import events as ev

JsonObject = dict[str, Any]


def dumps(value: Any) -> str:
    """JSON as Asterisk writes it with ``pretty = no``."""
    return json.dumps(value, separators=(",", ":"))


class EventSocket:
    """One ``/ari/events`` websocket: a queue and a writer task, so events go out in order."""

    def __init__(
        self,
        label: str,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        apps: tuple[str, ...],
        on_sent: Callable[[str, JsonObject], None],
        on_lost: Callable[[str, JsonObject], None],
    ) -> None:
        self.label = label
        self.ws = ws
        self.transport = transport
        self.apps = apps
        self._on_sent = on_sent
        self._on_lost = on_lost
        self._queue: asyncio.Queue[JsonObject] = asyncio.Queue()
        self.closed = False
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def put(self, event: JsonObject) -> None:
        if self.closed:
            self._on_lost(str(event.get("application", "")), event)
        else:
            self._queue.put_nowait(event)

    async def _write(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                if self.closed:
                    self._on_lost(str(event.get("application", "")), event)
                else:
                    await self.ws.send_str(dumps(event))
                    self._on_sent(self.label, event)
            except (ConnectionError, RuntimeError):
                self.closed = True
                self._on_lost(str(event.get("application", "")), event)
            finally:
                self._queue.task_done()

    async def drained(self) -> None:
        await self._queue.join()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def stop(self) -> None:
        """Stop the writer; what it had not written is lost."""
        self.closed = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        while not self._queue.empty():
            event = self._queue.get_nowait()
            self._on_lost(str(event.get("application", "")), event)
            self._queue.task_done()


@dataclass(eq=False)
class App:
    name: str
    socket: EventSocket | None = None
    channel_ids: list[str] = field(default_factory=list)
    bridge_ids: list[str] = field(default_factory=list)

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "channel_ids": list(self.channel_ids),
            "bridge_ids": list(self.bridge_ids),
            "endpoint_ids": [],
            "device_names": [],
            "events_allowed": [],
            "events_disallowed": [],
        }


class Registry:
    """Stasis applications: registered by an events socket, deactivated when it goes, forgotten
    once inactive with no subscriptions (``app_is_finished`` in res_stasis.c)."""

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}

    def is_active(self, name: str) -> bool:
        app = self.apps.get(name)
        return app is not None and app.socket is not None

    def connect(self, socket: EventSocket) -> list[EventSocket]:
        """Register ``socket``'s apps; returns the sockets it replaces."""
        replaced = []
        for name in socket.apps:
            app = self.apps.setdefault(name, App(name))
            if app.socket is not None and app.socket is not socket:
                replaced.append(app.socket)
            app.socket = socket
        return replaced

    def disconnect(self, socket: EventSocket) -> None:
        for name in socket.apps:
            app = self.apps.get(name)
            if app is not None and app.socket is socket:
                app.socket = None
                self._prune(app)

    def _prune(self, app: App) -> None:
        if app.socket is None and not app.channel_ids and not app.bridge_ids:
            self.apps.pop(app.name, None)

    def subscribe_channel(self, name: str, channel_id: str) -> bool:
        app = self.apps.get(name)
        if app is None:
            return False
        if channel_id not in app.channel_ids:
            app.channel_ids.append(channel_id)
        return True

    def unsubscribe_channel(self, name: str, channel_id: str) -> None:
        app = self.apps.get(name)
        if app is not None and channel_id in app.channel_ids:
            app.channel_ids.remove(channel_id)
            self._prune(app)

    def subscribe_bridge(self, name: str, bridge_id: str) -> None:
        app = self.apps.get(name)
        if app is not None and bridge_id not in app.bridge_ids:
            app.bridge_ids.append(bridge_id)

    def unsubscribe_bridge(self, name: str, bridge_id: str) -> None:
        app = self.apps.get(name)
        if app is not None and bridge_id in app.bridge_ids:
            app.bridge_ids.remove(bridge_id)
            self._prune(app)


@dataclass(slots=True)
class Capture:
    """Events made during one REST request: those before ``response_at`` go out before the
    response, the rest after it."""

    events: list[ev.Event] = field(default_factory=list)
    response_at: int | None = None

    @property
    def before(self) -> list[ev.Event]:
        return self.events if self.response_at is None else self.events[: self.response_at]

    @property
    def after(self) -> list[ev.Event]:
        return [] if self.response_at is None else self.events[self.response_at :]


class EventBus:
    def __init__(
        self,
        registry: Registry,
        sent: list[tuple[str, JsonObject]],
        lost: list[tuple[str, JsonObject]],
    ) -> None:
        self.registry = registry
        self.sent = sent
        self.lost = lost
        self.sockets: list[EventSocket] = []
        self._capture: Capture | None = None

    def emit(self, event: ev.Event) -> None:
        if self._capture is not None:
            self._capture.events.append(event)
        else:
            self.publish([event])

    def response_point(self) -> None:
        """Inside a capture: the REST response goes out here (the first call counts)."""
        if self._capture is not None and self._capture.response_at is None:
            self._capture.response_at = len(self._capture.events)

    def response_after(self, count: int) -> None:
        """Inside a capture: the REST response goes out after the first ``count`` events."""
        if self._capture is not None and self._capture.response_at is None:
            self._capture.response_at = min(count, len(self._capture.events))

    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        if self._capture is not None:
            raise RuntimeError("captures do not nest")
        self._capture = Capture()
        try:
            yield self._capture
        finally:
            self._capture = None

    def publish(self, batch: list[ev.Event]) -> None:
        for event in batch:
            for name in event.apps:
                rendered = event.render(name)
                app = self.registry.apps.get(name)
                if app is not None and app.socket is not None and not app.socket.closed:
                    app.socket.put(rendered)
                else:
                    self.lost.append((name, rendered))

    def record_sent(self, label: str, event: JsonObject) -> None:
        self.sent.append((label, event))

    def record_lost(self, app: str, event: JsonObject) -> None:
        self.lost.append((app, event))

    async def drain(self) -> None:
        """Wait until every queued event has been written."""
        for socket in list(self.sockets):
            await socket.drained()
