"""One end of the front ⇄ media process socket on the event loop: frames in (``on_frame``, in
order, up to 64 per wake-up) and out (``send``: written at once, or queued while the socket is
full, at most ``MAX_QUEUED`` frames; beyond, dropped and counted, as a full UDP socket would).
A frame that does not decode is counted and logged, never raised; the peer closing (or dying)
calls ``on_closed`` once."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable

from worker.front.ipc import MAX_FRAME, Frame, FrameError, decode
from worker.log import LogThrottle

log = logging.getLogger("worker.front.channel")

MAX_QUEUED = 10_000
READ_BATCH = 64


class Channel:
    def __init__(
        self,
        sock: socket.socket,
        on_frame: Callable[[Frame], None],
        on_closed: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_frame = on_frame
        self.on_closed = on_closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[bytes] = deque()
        self._closed = False
        self._throttle = LogThrottle()
        self.frames_in = 0
        self.frames_out = 0
        self.dropped = 0
        self.bad_frames = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, frame: bytes) -> None:
        if self._closed:
            self.dropped += 1
            return
        if self._queue:
            self._enqueue(frame)
            return
        try:
            self.sock.send(frame)
        except BlockingIOError:
            self._enqueue(frame)
            assert self._loop is not None
            self._loop.add_writer(self.sock.fileno(), self._writable)
            return
        except OSError:
            self.dropped += 1
            self._lost()
            return
        self.frames_out += 1

    def _enqueue(self, frame: bytes) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.append(frame)

    def _writable(self) -> None:
        while self._queue:
            try:
                self.sock.send(self._queue[0])
            except BlockingIOError:
                return
            except OSError:
                self._lost()
                return
            self._queue.popleft()
            self.frames_out += 1
        assert self._loop is not None
        self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data = self.sock.recv(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost()
                return
            if not data:
                self._lost()
                return
            self.frames_in += 1
            try:
                frame = decode(data)
            except FrameError as exc:
                self.bad_frames += 1
                skipped = self._throttle.allow("bad frame", asyncio.get_running_loop().time())
                if skipped is not None:
                    log.warning(
                        "bad frame from the other process",
                        extra={"why": str(exc), "similar_lines_skipped": skipped},
                    )
                continue
            try:
                self.on_frame(frame)
            except Exception:
                log.exception("frame handler failed")

    def _lost(self) -> None:
        if self._closed:
            return
        self.close()
        self.on_closed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        self._queue.clear()
        self.sock.close()
