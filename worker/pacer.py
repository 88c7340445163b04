"""The process-wide 20 ms media clock: one timer drives every call's pacing.

Calls register a ``tick(now)`` callback; the pacer calls each one every 20 ms on absolute
deadlines (no drift). If the loop stalls for more than ``max_catch_up`` ticks the lost ones are
skipped and counted, so a stall never becomes permanent latency. A callback that raises is
removed and reported through ``on_error``; it never stops the other calls' ticks.

Each tick's duration (every call's work) goes to ``aispinner_media_tick_duration_seconds`` and
skipped ticks to ``aispinner_media_ticks_skipped_total`` (``worker.metrics``): one histogram
observation per tick, whatever the number of calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from worker.metrics import WorkerMetrics, process_metrics

TICK_S = 0.020
Tick = Callable[[float], None]

log = logging.getLogger("worker.pacer")


class MediaPacer:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_catch_up: int = 3,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """``metrics``: where tick durations and skipped ticks are counted (None: this
        process's ``process_metrics()``)."""
        self._loop = loop
        metrics = metrics if metrics is not None else process_metrics()
        self._observe_tick = metrics.tick_duration.observe
        self._skipped_counter = metrics.ticks_skipped
        self._callbacks: dict[object, Tick] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._max_catch_up = max_catch_up
        self.ticks = 0
        self.skipped = 0
        self.on_error: Callable[[object, BaseException], None] | None = None

    def add(self, key: object, tick: Tick) -> None:
        self._callbacks[key] = tick
        if self._handle is None:
            self._deadline = self._loop.time() + TICK_S
            self._handle = self._loop.call_at(self._deadline, self._run)

    def remove(self, key: object) -> None:
        self._callbacks.pop(key, None)
        if not self._callbacks and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def __len__(self) -> int:
        return len(self._callbacks)

    def close(self) -> None:
        self._callbacks.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        started = time.perf_counter()
        now = self._loop.time()
        behind = int((now - self._deadline) / TICK_S)
        if behind > self._max_catch_up:
            self.skipped += behind
            self._skipped_counter.inc(behind)
            self._deadline += behind * TICK_S
        tick_time = self._deadline
        for key, tick in list(self._callbacks.items()):
            if key not in self._callbacks:
                continue  # removed by an earlier callback of this tick
            try:
                tick(tick_time)
            except Exception as exc:
                self._callbacks.pop(key, None)
                if self.on_error is not None:
                    self.on_error(key, exc)
                else:
                    log.exception("media tick failed; removed", extra={"key": repr(key)})
        self.ticks += 1
        self._observe_tick(time.perf_counter() - started)
        self._deadline += TICK_S
        if self._callbacks:
            self._handle = self._loop.call_at(self._deadline, self._run)
        else:
            self._handle = None
