"""Python's garbage collector and the 20 ms tick: measured, and kept out of the way.

A full (generation 2) collection walks every tracked object in the process; with hundreds of
calls (their SIP transactions, buffers, sessions) one can take several milliseconds, stalling
every call's tick at once. ``settle()`` runs once a worker process has started: a full
collection, then ``gc.freeze()`` (everything alive after start-up, the imported modules and
settings, is never walked again), and a higher first threshold so the young generation is
collected less often (objects of a tick die young by reference counting, not by the GC).

``GcPauses`` times every collection by generation through ``gc.callbacks`` (two clock reads
per collection, not per object): the count, the total and the longest pause, read by the
metrics at scrape time and logged when a worker stops.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

GEN0_THRESHOLD = 10_000
"""Allocations minus deallocations of tracked objects before a young collection (Python's
default: 700). Middle and old generations keep their default ratios (10, 10)."""


@dataclass
class GenerationPauses:
    collections: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0


@dataclass
class GcPauses:
    """Collection pauses by generation, from ``gc.callbacks`` (``install`` / ``remove``)."""

    generations: list[GenerationPauses] = field(
        default_factory=lambda: [GenerationPauses() for _ in range(3)]
    )
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = self.generations[min(2, max(0, info.get("generation", 2)))]
        generation.collections += 1
        generation.seconds += pause
        if pause > generation.longest_s:
            generation.longest_s = pause

    def install(self) -> GcPauses:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


_PAUSES: GcPauses | None = None


def pauses() -> GcPauses:
    """This process's recorder (installed on first use)."""
    global _PAUSES
    if _PAUSES is None:
        _PAUSES = GcPauses().install()
    return _PAUSES


def settle(threshold: int = GEN0_THRESHOLD) -> int:
    """After start-up: collect everything, freeze the survivors, raise the young threshold.
    Returns how many objects were frozen."""
    pauses()
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
    return gc.get_freeze_count()
