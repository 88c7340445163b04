"""The in-process event bus: ``publish`` never blocks and fans each event out to bounded
subscriber queues (a slow subscriber loses its oldest events, counted), plus the JSONL file sink
and :class:`EventLog`, which reads such a file back.

Rules:

1. ``EventBus.publish`` is synchronous and O(subscribers); it never waits and never raises for a
   subscriber's fault. Call it from the event loop's thread (nothing here is thread-safe).
2. A :class:`Subscription` holds at most ``maxsize`` events; when full, delivering drops the
   oldest one and counts it in ``dropped``. Closing it lets its reader drain what is left.
3. :class:`JsonlSink` appends each event as one JSON object per line, written (and flushed) by a
   worker thread so a slow disk never stalls the loop; the file's folders are created.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Protocol, TypeVar, overload

from worker.events.models import Event, parse_event

__all__ = ["DEFAULT_MAXSIZE", "EventBus", "EventLog", "JsonlSink", "Subscriber", "Subscription"]

DEFAULT_MAXSIZE = 1024
"""Events a subscriber may have waiting before the oldest are dropped."""

_log = logging.getLogger("worker.events")

_E = TypeVar("_E")


class Subscriber(Protocol):
    """Anything the bus can hand events to; ``deliver`` must not block."""

    def deliver(self, event: Event) -> None: ...


_S = TypeVar("_S", bound=Subscriber)


class Subscription:
    """A bounded queue of events for one async reader (``await get()`` or ``async for``)."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.dropped = 0
        """Events thrown away because the reader was behind."""
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def closed(self) -> bool:
        return self._closed

    def deliver(self, event: Event) -> None:
        """Queue ``event``; when full, drop the oldest. Ignored once closed."""
        if self._closed:
            return
        if len(self._events) >= self.maxsize:
            self._events.popleft()
            self.dropped += 1
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        """No more events; readers get what is queued, then the end."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> Event | None:
        """The oldest queued event, or ``None``."""
        return self._events.popleft() if self._events else None

    def drain(self) -> list[Event]:
        """Every queued event, oldest first; the queue is emptied."""
        events = list(self._events)
        self._events.clear()
        return events

    async def wait(self) -> bool:
        """Wait until an event is queued; ``False`` when closed and empty."""
        while not self._events:
            if self._closed:
                return False
            if self._waiter is not None:
                raise RuntimeError("a Subscription has one reader at a time")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    async def get(self) -> Event:
        """The next event; raises ``EOFError`` when closed and empty."""
        if not await self.wait():
            raise EOFError("subscription closed")
        return self._events.popleft()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while await self.wait():
            yield self._events.popleft()


class EventBus:
    """Fans published events out to subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self.published = 0
        self.subscriber_errors = 0

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        return tuple(self._subscribers)

    @overload
    def subscribe(
        self, subscriber: None = None, *, maxsize: int = DEFAULT_MAXSIZE
    ) -> Subscription: ...

    @overload
    def subscribe(self, subscriber: _S, *, maxsize: int = DEFAULT_MAXSIZE) -> _S: ...

    def subscribe(
        self, subscriber: Subscriber | None = None, *, maxsize: int = DEFAULT_MAXSIZE
    ) -> Subscriber:
        """Add ``subscriber`` (or a new :class:`Subscription` of ``maxsize``) and return it."""
        target = subscriber if subscriber is not None else Subscription(maxsize)
        self._subscribers.append(target)
        return target

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop delivering to ``subscriber`` (a no-op if it is not subscribed)."""
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber, now. Never blocks; a failing subscriber is logged
        and counted, and the others still get the event."""
        self.published += 1
        for subscriber in tuple(self._subscribers):
            try:
                subscriber.deliver(event)
            except Exception:
                self.subscriber_errors += 1
                _log.exception("event subscriber failed", extra={"event_type": event.type})


class JsonlSink:
    """Appends every event it is given to ``path``, one JSON object per line.

    Subscribe it to a bus (``bus.subscribe(JsonlSink(path))``) inside a running loop. Writing
    happens in a worker thread; up to ``maxsize`` events wait, then the oldest are dropped
    (counted in ``dropped``). ``await close()`` writes what is queued and closes the file.
    """

    def __init__(self, path: str | Path, *, maxsize: int = 10 * DEFAULT_MAXSIZE) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue = Subscription(maxsize)
        self._file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._accepted = 0
        self.written = 0
        self.write_errors = 0

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def deliver(self, event: Event) -> None:
        if self._queue.closed:
            return
        self._accepted += 1
        self._queue.deliver(event)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"jsonl-sink {self.path.name}"
            )

    async def _run(self) -> None:
        while await self._queue.wait():
            lines = [event.to_json() + "\n" for event in self._queue.drain()]
            try:
                await asyncio.to_thread(self._write, lines)
            except OSError:
                self.write_errors += len(lines)
                _log.exception("cannot write events", extra={"path": str(self.path)})
            else:
                self.written += len(lines)
            self._progress.set()

    def _write(self, lines: list[str]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.writelines(lines)
        self._file.flush()

    async def flush(self) -> None:
        """Wait until every event delivered so far is written (or dropped, or failed)."""
        target = self._accepted
        while self.written + self.write_errors + self.dropped < target:
            if self._task is None or self._task.done():
                return
            self._progress.clear()
            await self._progress.wait()

    async def close(self) -> None:
        """Write what is queued, then close the file. Idempotent."""
        self._queue.close()
        if self._task is not None:
            await self._task
        if self._file is not None:
            self._file.close()
            self._file = None


class EventLog:
    """Reads a JSONL event file back (for tests and demos)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    def events(self) -> list[Event]:
        """Every event in the file, in order. A last line without its newline (being written)
        is skipped; any other bad line raises ``ValueError`` naming its line number."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, _partial = lines[:-1], lines[-1]
        events: list[Event] = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                events.append(parse_event(line))
            except ValueError as exc:
                raise ValueError(f"{self.path}:{number}: not an event: {exc}") from exc
        return events

    def of_type(self, kind: type[_E]) -> list[_E]:
        """The events of one model class, in order."""
        return [event for event in self.events() if isinstance(event, kind)]

    def for_call(self, call_id: str) -> list[Event]:
        """The events of one call, in order."""
        return [event for event in self.events() if getattr(event, "call_id", None) == call_id]
