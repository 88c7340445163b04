"""The clock a call session runs on: ``now``, ``sleep``, ``call_later`` and ``timeout``.

``LoopClock`` is the event loop's clock (production). ``ManualClock`` only moves when a test
calls ``advance``, so verb timing (pauses, gather timers, ``maxLength``, DTMF pacing) is tested
without sleeping and without patching ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running event loop's monotonic clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_later(max(0.0, delay), callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock for tests: time stands still until ``advance(seconds)``, which runs every timer
    that falls due, in order, letting the event loop run the woken tasks after each."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(callback)
        heapq.heappush(self._heap, (self._now + max(0.0, delay), next(self._seq), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    async def settle(self, rounds: int = 20) -> None:
        """Let woken tasks run (they may schedule more timers at the current time)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float | None = None) -> None:
        """Move time forward by ``seconds``, firing timers as their deadlines pass (in steps
        of ``step`` seconds when given, so periodic work in between can run)."""
        end = self._now + seconds
        await self.settle()
        while True:
            next_at = self._heap[0][0] if self._heap else None
            stop = end if step is None else min(end, self._now + step)
            if next_at is not None and next_at <= stop:
                _, _, timer = heapq.heappop(self._heap)
                self._now = max(self._now, next_at)
                if not timer.cancelled:
                    timer.callback()
                    await self.settle()
                continue
            self._now = stop
            await self.settle()
            if stop >= end:
                return


@asynccontextmanager
async def timeout(clock: Clock, seconds: float | None) -> AsyncIterator[None]:
    """Like ``asyncio.timeout`` on ``clock``: TimeoutError when the block outlives ``seconds``
    (None: no limit)."""
    if seconds is None:
        yield
        return
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = clock.call_later(seconds, expire)
    try:
        yield
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()


async def wait_for(clock: Clock, awaitable: Awaitable[T], seconds: float | None) -> T:
    """``asyncio.wait_for`` on ``clock``."""
    async with timeout(clock, seconds):
        return await awaitable
