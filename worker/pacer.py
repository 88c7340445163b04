"""The process-wide 20 ms media clock, in slots: no call waits for all the others.

Calls register a ``tick(now)`` callback; the pacer calls each one every 20 ms on absolute
deadlines (no drift). The 20 ms are cut into ``SLOTS`` slots, ``SLOT_S`` apart, each with its
own timer: a new call joins the slot with the fewest calls (the soonest one among equals), so
with N calls a frame waits behind about N / SLOTS others' work, not N, and the loop gets a
breath between slots for sockets. ``align`` moves a call to the slot just after the moment its
work becomes possible (its caller's next frame falls due in the jitter buffer), so the frame
does not wait for a slot chosen at random: up to 20 ms, 10 on average. If the loop stalls for
more than ``max_catch_up`` ticks the lost ones are skipped and counted, so a stall never becomes
permanent latency. A callback that raises is removed and reported through ``on_error``; it never
stops the other calls' ticks.

Each slot run's duration (the work of the calls in it) goes to
``aispinner_media_tick_duration_seconds`` and skipped ticks to
``aispinner_media_ticks_skipped_total`` (``worker.metrics``): one histogram observation per
slot run, whatever the number of calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.legs import FRAME_MS
from worker.metrics import WorkerMetrics, process_metrics

TICK_S = FRAME_MS / 1000
SLOTS = 10
SLOT_S = TICK_S / SLOTS
Tick = Callable[[float], None]

log = logging.getLogger("worker.pacer")


@dataclass(eq=False)
class _Slot:
    index: int
    callbacks: dict[object, Tick] = field(default_factory=dict)
    joining: dict[object, tuple[Tick, float]] = field(default_factory=dict)
    """Keys moved here (``align``) that join at the slot's first run at or after a time."""
    handle: asyncio.TimerHandle | None = None
    deadline: float = 0.0


class MediaPacer:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_catch_up: int = 3,
        metrics: WorkerMetrics | None = None,
        slots: int = SLOTS,
    ) -> None:
        """``metrics``: where tick durations and skipped ticks are counted (None: this
        process's ``process_metrics()``). ``slots``: how many timers share the 20 ms."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._loop = loop
        metrics = metrics if metrics is not None else process_metrics()
        self._observe_tick = metrics.tick_duration.observe
        self._skipped_counter = metrics.ticks_skipped
        self._slots = [_Slot(i) for i in range(slots)]
        self._slot_s = TICK_S / slots
        self._slot_of: dict[object, _Slot] = {}
        self._origin: float | None = None
        """The pacer's phase: slot k's deadlines are origin + k * slot_s + n * TICK_S."""
        self._max_catch_up = max_catch_up
        self.ticks = 0
        self.skipped = 0
        self.on_error: Callable[[object, BaseException], None] | None = None

    def add(self, key: object, tick: Tick, after: object = None) -> None:
        """Tick ``key`` every 20 ms from the next deadline of the least busy slot, or with
        ``after`` (a key already ticked) in its slot, right after it."""
        old = self._slot_of.get(key)
        if old is not None:
            old.callbacks[key] = tick
            return
        now = self._loop.time()
        if self._origin is None:
            self._origin = now
        slot = self._slot_of.get(after) if after is not None else None
        if slot is None:
            slot = min(self._slots, key=lambda s: (len(s.callbacks), self._next_deadline(s, now)))
        slot.callbacks[key] = tick
        self._slot_of[key] = slot
        if slot.handle is None:
            slot.deadline = self._next_deadline(slot, now)
            slot.handle = self._loop.call_at(slot.deadline, self._run, slot)

    def _next_deadline(self, slot: _Slot, now: float) -> float:
        assert self._origin is not None
        phase = self._origin + slot.index * self._slot_s
        periods = max(0, int((now - phase) // TICK_S) + 1)
        return phase + periods * TICK_S

    def align(self, key: object, due: float, now: float, tolerance: float = 0.0) -> bool:
        """Tick ``key`` from now on in the first slot at or after ``due``'s phase (modulo 20 ms),
        ``key`` having last been ticked at ``now``; ``due`` is when its next work becomes
        possible (after ``now``: its next frame). Its next tick is that slot's first deadline
        at or after ``due``: never a tick before there is work (an extra tick would send an
        extra frame), and the work is not kept waiting. A key whose slot already runs at most
        ``tolerance`` after ``due``'s phase stays (a moment that wavers across a slot boundary
        does not move it back and forth). True if it moved."""
        slot = self._slot_of.get(key)
        target = self._target(slot, due, tolerance)
        if slot is None or target is None:
            return False
        tick = slot.callbacks.pop(key) if key in slot.callbacks else slot.joining.pop(key)[0]
        self._release(slot)
        self._slot_of[key] = target
        if target.handle is None:
            target.deadline = self._next_deadline(target, max(now, due) - 1e-6)
            target.callbacks[key] = tick
            target.handle = self._loop.call_at(target.deadline, self._run, target)
        elif target.deadline >= due - 1e-6:
            target.callbacks[key] = tick
        else:
            target.joining[key] = (tick, due)
        return True

    def misaligned(self, key: object, due: float, tolerance: float = 0.0) -> bool:
        """Whether ``align`` would move ``key`` now (asked before moving: a caller may want
        the same answer a few times in a row first)."""
        return self._target(self._slot_of.get(key), due, tolerance) is not None

    def _target(self, slot: _Slot | None, due: float, tolerance: float) -> _Slot | None:
        """The slot a key ticked in ``slot`` moves to for ``due`` (None: it stays)."""
        if slot is None or self._origin is None:
            return None
        phase = (due - self._origin) % TICK_S
        late = (slot.index * self._slot_s - phase) % TICK_S  # how long after due it runs
        if late <= tolerance + 1e-6:
            return None
        target = self._slots[math.ceil(phase / self._slot_s - 1e-6) % len(self._slots)]
        return None if target is slot else target

    def _release(self, slot: _Slot) -> None:
        """Stop the slot's timer when nobody is left in it."""
        if not slot.callbacks and not slot.joining and slot.handle is not None:
            slot.handle.cancel()
            slot.handle = None

    def remove(self, key: object) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        slot.callbacks.pop(key, None)
        slot.joining.pop(key, None)
        self._release(slot)

    def slot_of(self, key: object) -> int | None:
        """The slot ``key`` is ticked in (None: not registered)."""
        slot = self._slot_of.get(key)
        return None if slot is None else slot.index

    def __len__(self) -> int:
        return len(self._slot_of)

    def close(self) -> None:
        self._slot_of.clear()
        for slot in self._slots:
            slot.callbacks.clear()
            slot.joining.clear()
            if slot.handle is not None:
                slot.handle.cancel()
                slot.handle = None

    def _run(self, slot: _Slot) -> None:
        started = time.perf_counter()
        now = self._loop.time()
        behind = int((now - slot.deadline) / TICK_S)
        if behind > self._max_catch_up:
            self.skipped += behind
            self._skipped_counter.inc(behind)
            slot.deadline += behind * TICK_S
        tick_time = slot.deadline
        callbacks = slot.callbacks
        if slot.joining:
            self._admit(slot, tick_time)
        for key, tick in list(callbacks.items()):
            if key not in callbacks:
                continue  # removed by an earlier callback of this tick
            try:
                tick(tick_time)
            except Exception as exc:
                callbacks.pop(key, None)
                self._slot_of.pop(key, None)
                if self.on_error is not None:
                    self.on_error(key, exc)
                else:
                    log.exception("media tick failed; removed", extra={"key": repr(key)})
        self.ticks += 1
        self._observe_tick(time.perf_counter() - started)
        slot.deadline += TICK_S
        if callbacks or slot.joining:
            slot.handle = self._loop.call_at(slot.deadline, self._run, slot)
        else:
            slot.handle = None

    @staticmethod
    def _admit(slot: _Slot, tick_time: float) -> None:
        for key, (tick, due) in list(slot.joining.items()):
            if tick_time >= due - 1e-6:
                del slot.joining[key]
                slot.callbacks[key] = tick
