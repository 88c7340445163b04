"""Outgoing audio queue for one call leg: takes the agent's audio in chunks of any size and hands
out exact frames on the pacer's tick, with named marks reported once the audio before them is out.

Choices worth knowing:

* Bound. At most ``max_ms`` of audio waits. By default (``overflow="drop-oldest"``, as the issue
  asks: never grow latency) a write that overflows drops the oldest queued audio; with
  ``overflow="drop-newest"`` the excess of the write itself is dropped instead. Either way the
  dropped time is counted in ``counters.dropped_ms``. Marks whose audio was dropped count as
  passed and are reported with the next frame.
* Partial frames. When less than a frame is queued, the buffer waits one tick for the rest
  (producers often send 30 ms or odd-sized chunks in real time) and then sends what it has padded
  with silence; it does not wait when a mark is outstanding, so the mark is not delayed.
* Underrun. With nothing queued a frame of silence goes out; frames stay exactly ``frame_ms`` long
  and a mark placed while the buffer is empty is reported with the next frame.
* Standing queue. ``trim`` drops whole frames from the head: for a stream sent in real time
  whose one late frame left a frame waiting at every tick since (the caller would hear it 20 ms
  late for the rest of the call). Counted in ``counters.trimmed_ms``. ``head_is_quiet`` tells
  whether the frame at the head is quiet enough to drop unheard.
* Odd bytes. A trailing odd byte is carried to the next write; a mark placed while a byte is
  carried sits before that half sample.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["MAX_MARK_NAME_LENGTH", "MarkReached", "PlayoutBuffer", "PlayoutCounters"]

MAX_MARK_NAME_LENGTH = 256
_COMPACT_BYTES = 16 * 1024  # reclaim consumed buffer space once this much has gone out

OverflowPolicy = Literal["drop-oldest", "drop-newest"]


@dataclass(frozen=True, slots=True)
class MarkReached:
    """All audio written before mark ``name`` has been emitted (or dropped by the bound)."""

    name: str


@dataclass(frozen=True, slots=True)
class PlayoutCounters:
    """Totals since creation. ``silent_frames`` are frames sent with no real audio in them."""

    frames: int
    audio_frames: int
    silent_frames: int
    padded_frames: int
    written_ms: float
    dropped_ms: float
    cleared_ms: float
    marks_reached: int
    marks_cleared: int
    invalid_writes: int
    trimmed_ms: float = 0.0


class PlayoutBuffer:
    """A bounded FIFO of 16-bit mono PCM read out in exact frames, with marks."""

    __slots__ = (
        "_audio_frames",
        "_buf",
        "_bytes_per_ms",
        "_carry",
        "_cleared_bytes",
        "_drop_oldest",
        "_dropped_bytes",
        "_frame_bytes",
        "_frames",
        "_head",
        "_held",
        "_invalid",
        "_last_real",
        "_marks",
        "_marks_cleared",
        "_marks_reached",
        "_max_bytes",
        "_max_marks",
        "_padded_frames",
        "_read_total",
        "_silence",
        "_silent_frames",
        "_trimmed_bytes",
        "_write_total",
    )

    def __init__(
        self,
        sample_rate: int,
        frame_ms: int = 20,
        max_ms: int = 10_000,
        *,
        max_marks: int = 100,
        overflow: OverflowPolicy = "drop-oldest",
    ) -> None:
        if sample_rate <= 0 or frame_ms <= 0 or (sample_rate * frame_ms) % 1000:
            raise ValueError(f"{frame_ms} ms at {sample_rate} Hz is not a whole number of samples")
        if max_ms < frame_ms:
            raise ValueError(f"max_ms ({max_ms}) must hold at least one frame ({frame_ms} ms)")
        if max_marks < 1:
            raise ValueError(f"max_marks must be at least 1, not {max_marks}")
        if overflow not in ("drop-oldest", "drop-newest"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self._frame_bytes = sample_rate * frame_ms // 1000 * 2
        self._bytes_per_ms = sample_rate * 2 / 1000.0
        self._max_bytes = sample_rate * max_ms // 1000 * 2
        self._max_marks = max_marks
        self._drop_oldest = overflow == "drop-oldest"
        self._silence = bytes(self._frame_bytes)
        self._buf = bytearray()
        self._head = 0  # read offset into _buf
        self._carry: int | None = None  # odd trailing byte waiting for its other half
        self._held = False  # a partial frame already waited one tick
        self._last_real = False
        # Absolute byte positions: everything before _read_total has gone out (or was dropped).
        self._read_total = 0
        self._write_total = 0
        self._marks: deque[tuple[int, str]] = deque()
        self._frames = 0
        self._audio_frames = 0
        self._silent_frames = 0
        self._padded_frames = 0
        self._dropped_bytes = 0
        self._cleared_bytes = 0
        self._trimmed_bytes = 0
        self._marks_reached = 0
        self._marks_cleared = 0
        self._invalid = 0

    @property
    def frame_bytes(self) -> int:
        """Size of every frame ``next_frame`` returns."""
        return self._frame_bytes

    @property
    def queued_ms(self) -> float:
        """Audio waiting to go out, in ms."""
        return (len(self._buf) - self._head) / self._bytes_per_ms

    @property
    def playing(self) -> bool:
        """True while real audio is going out: audio is queued or the last frame carried some."""
        return self._last_real or len(self._buf) > self._head

    @property
    def outstanding_marks(self) -> tuple[str, ...]:
        """Names of marks not yet reached, oldest first."""
        return tuple(name for _, name in self._marks)

    @property
    def counters(self) -> PlayoutCounters:
        """A snapshot of the counters."""
        per_ms = self._bytes_per_ms
        return PlayoutCounters(
            frames=self._frames,
            audio_frames=self._audio_frames,
            silent_frames=self._silent_frames,
            padded_frames=self._padded_frames,
            written_ms=self._write_total / per_ms,
            dropped_ms=self._dropped_bytes / per_ms,
            cleared_ms=self._cleared_bytes / per_ms,
            marks_reached=self._marks_reached,
            marks_cleared=self._marks_cleared,
            invalid_writes=self._invalid,
            trimmed_ms=self._trimmed_bytes / per_ms,
        )

    def write(self, pcm: bytes) -> None:
        """Queue ``pcm`` (16-bit mono, any length). Never raises; a non-bytes chunk is counted."""
        data: object = pcm
        if not isinstance(data, bytes | bytearray | memoryview):
            self._invalid += 1
            return
        if not data:
            return
        buf = self._buf
        before = len(buf)
        if self._carry is not None:
            buf.append(self._carry)
            self._carry = None
        buf += data
        if (len(buf) - self._head) % 2:
            self._carry = buf.pop()
        added = len(buf) - before
        self._write_total += added
        excess = len(buf) - self._head - self._max_bytes
        if excess > 0:
            self._dropped_bytes += excess
            if self._drop_oldest:
                self._head += excess
                self._read_total += excess
            else:
                del buf[len(buf) - excess :]
                self._write_total -= excess
                self._carry = None

    def mark(self, name: str) -> None:
        """Put mark ``name`` after the audio written so far.

        Raises ``ValueError`` if ``name`` is not a string of 1 to ``MAX_MARK_NAME_LENGTH``
        characters or ``max_marks`` marks are already outstanding (the session layer validates
        before calling, so this is a local error).
        """
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MARK_NAME_LENGTH:
            raise ValueError(f"mark name must be a str of 1..{MAX_MARK_NAME_LENGTH} characters")
        if len(self._marks) >= self._max_marks:
            raise ValueError(f"too many outstanding marks (limit {self._max_marks})")
        self._marks.append((self._write_total, name))

    def next_frame(self) -> tuple[bytes, list[MarkReached]]:
        """The next ``frame_ms`` of audio (silence-padded if short) and the marks now passed."""
        size = self._frame_bytes
        buf = self._buf
        head = self._head
        queued = len(buf) - head
        self._frames += 1
        if queued >= size:
            frame = bytes(buf[head : head + size])
            self._head = head + size
            self._read_total += size
            self._held = False
            self._last_real = True
            self._audio_frames += 1
        elif queued and (self._held or self._marks):
            frame = bytes(buf[head:]) + self._silence[queued:]
            self._head = len(buf)
            self._read_total += queued
            self._held = False
            self._last_real = True
            self._audio_frames += 1
            self._padded_frames += 1
        else:
            frame = self._silence
            self._held = queued > 0
            self._last_real = False
            self._silent_frames += 1
        if self._head == len(buf):
            buf.clear()  # all played (a real-time stream, every tick): nothing to keep
            self._head = 0
        elif self._head >= _COMPACT_BYTES and self._head * 2 >= len(buf):
            del buf[: self._head]
            self._head = 0
        reached: list[MarkReached] = []
        marks = self._marks
        while marks and marks[0][0] <= self._read_total:
            reached.append(MarkReached(marks.popleft()[1]))
        self._marks_reached += len(reached)
        return frame, reached

    def head_is_quiet(self, peak: int) -> bool:
        """The next whole frame's samples all lie within ``±peak`` (False with less than a
        frame queued)."""
        head, size = self._head, self._frame_bytes
        if len(self._buf) - head < size:
            return False
        samples = np.frombuffer(bytes(self._buf[head : head + size]), dtype="<i2")
        return int(samples.max()) <= peak and int(samples.min()) >= -peak

    def trim(self, ms: float) -> float:
        """Drop up to ``ms`` of the oldest queued audio, in whole frames (see the module
        docstring); returns the ms dropped. Marks whose audio went are reported with the next
        frame."""
        queued = len(self._buf) - self._head
        size = self._frame_bytes
        drop = min(int(ms * self._bytes_per_ms) // size, queued // size) * size
        if drop <= 0:
            return 0.0
        self._head += drop
        self._read_total += drop
        self._trimmed_bytes += drop
        return drop / self._bytes_per_ms

    def clear(self) -> list[str]:
        """Drop all queued audio; return the outstanding marks' names (to report as cleared)."""
        queued = len(self._buf) - self._head
        self._cleared_bytes += queued
        self._buf.clear()
        self._head = 0
        self._carry = None
        self._held = False
        self._last_real = False
        self._read_total = self._write_total
        names = [name for _, name in self._marks]
        self._marks.clear()
        self._marks_cleared += len(names)
        return names

    def forget_marks(self) -> int:
        """Drop the outstanding marks without reporting them (jambonz ``clearMarks``)."""
        count = len(self._marks)
        self._marks.clear()
        return count
