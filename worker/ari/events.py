"""The Stasis application's events: ``EventsConnection``, its one events WebSocket to Asterisk
(``/ari/events?app=<app>&subscribeAll=false``), kept connected; and ``read_event``, how a
message from it becomes an event to act on, wherever it is read.

The connection hands each message to ``on_message`` as received. After every connect it pushes
the configured trunks (Asterisk keeps nothing of them across its restarts) and then calls
``on_state(True)``, while messages go on being read; ``on_state(False)`` when it drops. Whoever
reads the messages parses them; on ``ApplicationReplaced`` it calls ``replaced()``.

When the connection drops or cannot be made, it is tried again after 1, 2, 4 ...
``ari.reconnect_max_s`` seconds; each kind of failure is logged once at warning level until the
connection comes back. A second client subscribing to the same application takes it over
(Asterisk sends ``ApplicationReplaced`` and nothing more): that is logged as an error, and the
longest backoff is waited before taking it back, so two workers configured alike do not fight
every second.

A worker in one process runs it inside its ``StasisApp``; a worker with media processes runs
it in the front (``worker/front/ari_relay.py``), which hands each event to the process whose
call it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.exceptions import InvalidHandshake, InvalidStatus

from worker.ari.client import AriClient, AriUnreachableError
from worker.ari.models import AriEvent, AriProtocolError, UnknownEvent, parse_event
from worker.ari.trunks import push_trunks
from worker.config import AriSettings
from worker.log import LogThrottle

log = logging.getLogger("worker.ari")

MAX_EVENT_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class EventCounters:
    """What came on the events socket: events read, messages that were not valid ARI events,
    event types the worker does not use, events that named no call this reader knows."""

    events: int = 0
    invalid_events: int = 0
    unknown_events: int = 0
    unrouted_events: int = 0


def read_event(
    message: str | bytes, counters: EventCounters, throttle: LogThrottle
) -> AriEvent | None:
    """The event in ``message`` to act on; None for a message that is not a valid ARI event
    (counted, and logged at most as often as ``throttle`` allows) or a type the worker does not
    use (counted)."""
    try:
        event = parse_event(message)
    except AriProtocolError as exc:
        counters.invalid_events += 1
        skipped = throttle.allow("invalid", asyncio.get_running_loop().time())
        if skipped is not None:
            log.warning(
                "invalid ARI event ignored",
                extra={"error": str(exc), "similar_lines_skipped": skipped},
            )
        return None
    counters.events += 1
    if isinstance(event, UnknownEvent):
        counters.unknown_events += 1
        return None
    return event


class EventsConnection:
    """See the module docstring. ``start`` starts the connection loop; ``close`` stops it."""

    def __init__(
        self,
        client: AriClient,
        settings: AriSettings,
        on_message: Callable[[str | bytes], None],
        on_state: Callable[[bool], None],
    ) -> None:
        self._client = client
        self._settings = settings
        self._on_message = on_message
        self._on_state = on_state
        self._run: asyncio.Task[None] | None = None
        self._ws: websockets.ClientConnection | None = None
        self._replaced = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Check that Asterisk takes the credentials (``AriAuthError`` if not) and start the
        connection loop. Asterisk being unreachable is not an error: the loop keeps trying."""
        try:
            info = await self._client.info()
        except AriUnreachableError as exc:
            log.warning(
                "Asterisk is not reachable; retrying in the background",
                extra={"url": self._client.url, "error": exc.message},
            )
        else:
            log.info(
                "Asterisk reachable",
                extra={"url": self._client.url, "version": info.system.version},
            )
        self._run = asyncio.get_running_loop().create_task(self._loop(), name="ari-events")

    async def close(self) -> None:
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._run
            self._run = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def replaced(self) -> None:
        """Another client took the application over: let go, and take it back later."""
        self._replaced = True
        if self._ws is not None:
            self._spawn(self._ws.close())

    async def _ready(self) -> None:
        """After a connect: push the trunks, then say the application is up."""
        await push_trunks(self._client, self._settings.trunks)
        if self.connected.is_set():
            self._on_state(True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("ARI task failed", exc_info=task.exception())

        task.add_done_callback(done)
        return task

    async def _loop(self) -> None:
        delay = 1.0
        failures: set[str] = set()
        client = self._client
        while True:
            kind = ""
            try:
                async with websockets.connect(
                    client.events_url(self._settings.app),
                    additional_headers=client.events_headers(),
                    open_timeout=self._settings.request_timeout_s,
                    max_size=MAX_EVENT_BYTES,
                ) as ws:
                    self._ws = ws
                    self._replaced = False
                    self.connected.set()
                    log.info("connected to Asterisk's events", extra={"app": self._settings.app})
                    delay = 1.0
                    failures.clear()
                    self._spawn(self._ready())
                    async for message in ws:
                        self._on_message(message)
                    kind = "closed by Asterisk"
            except InvalidStatus as exc:
                status = exc.response.status_code
                kind = f"HTTP {status}"
                if status == 401:
                    kind += ": credentials refused (ari.username / ari.password)"
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                kind = type(exc).__name__
            except websockets.ConnectionClosed:
                kind = "connection lost"
            finally:
                was_connected = self.connected.is_set()
                self._ws = None
                self.connected.clear()
                if was_connected:
                    self._on_state(False)
            if self._replaced:
                log.error(
                    "another client took over the Stasis application; taking it back later",
                    extra={"app": self._settings.app, "after_s": self._settings.reconnect_max_s},
                )
                delay = self._settings.reconnect_max_s
            elif kind not in failures:
                failures.add(kind)
                log.warning(
                    "Asterisk's events connection failed; retrying",
                    extra={"url": client.url, "reason": kind, "retry_in_s": delay},
                )
            else:
                log.debug("still cannot connect to Asterisk", extra={"reason": kind})
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.reconnect_max_s)
