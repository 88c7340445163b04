"""The agent sockets' ``websockets`` client connection, with the two shortcuts the 20 ms path
takes through it. Everything else (handshake, pings, the closing handshake, limits, errors) is
the library's own.

1. **Messages handed over where they are read.** Once ``on_message`` is set, each complete
   message is given to it from the connection's own frame processing (``process_event``, the
   hook ``websockets`` leaves to subclasses), in the event-loop callback that read it: no task
   wakes up per frame. Fragmented messages are put together here: the library's protocol has
   already bounded their size by ``max_size``, and more than the library's ``MAX_FRAGMENTS``
   pieces fail the connection with 1009, as its ``recv`` does (a message of a million one-byte
   fragments would otherwise cost far more memory than its size). A text message that is not
   UTF-8 fails the connection with 1007, as the library's ``recv`` does. Messages that
   arrived before ``on_message`` was set wait for ``recv`` as usual, and the reader drains
   them in order (it sets the hook, then reads; it tells :meth:`LaneSocket.taken` of each).
   Until it has taken them all, data frames keep going to ``recv``'s queue behind them, as does
   the rest of a message begun there: a message is never handed over ahead of one read before
   it.
2. **One frame written at once.** :meth:`LaneSocket.write_message` serializes an unfragmented
   message as ``Frame.serialize`` does for a client (RFC 6455 §5.2; no extension is ever
   negotiated on these sockets), with its masking key (§5.3) taken from a pool of
   ``os.urandom`` bytes drawn ``MASK_POOL`` at a time, instead of one ``getrandom`` system call
   per frame (3.5 % of a media process at 100 calls).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.frames import Frame, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build of websockets without its C extension
    from websockets.utils import apply_mask

__all__ = ["MASK_POOL", "LaneSocket"]

MASK_POOL = 4096
"""Bytes of ``os.urandom`` drawn at a time for masking keys: 1,024 frames' worth."""
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009

_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
_SHORT = struct.Struct("!BB4s")
_MEDIUM = struct.Struct("!BBH4s")
_LONG = struct.Struct("!BBQ4s")


class LaneSocket(ClientConnection):
    """A client connection whose complete messages go to ``on_message`` once it is set."""

    on_message: Callable[[str | bytes], None] | None = None
    _parts: list[bytes] | None = None
    _parts_text = False
    _failed = False
    _masks = b""
    _mask_at = 0
    _queued = 0
    """Complete messages put in ``recv``'s queue and not yet taken by the reader."""
    _queue_open = False
    """A message begun in ``recv``'s queue waits for more fragments."""

    def process_event(self, event: Any) -> None:
        if not isinstance(event, Frame) or event.opcode not in _DATA:
            super().process_event(event)
            return
        on_message = self.on_message
        if on_message is None or self.response is None or self._queued or self._queue_open:
            self._to_queue(event)
            return
        if self._failed:
            return  # read with the frame that failed the connection: never handed over
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not event.fin:
                self._parts = [bytes(event.data)]
                self._parts_text = opcode is Opcode.TEXT
                return
            self._hand_over(on_message, bytes(event.data), opcode is Opcode.TEXT)
        elif opcode is Opcode.CONT and self._parts is not None:
            self._parts.append(bytes(event.data))
            if len(self._parts) > MAX_FRAGMENTS:
                self._fail(MESSAGE_TOO_BIG, "too many fragments")
            elif event.fin:
                data, self._parts = b"".join(self._parts), None
                self._hand_over(on_message, data, self._parts_text)
        else:
            super().process_event(event)  # a continuation without a start: the library's error

    def _to_queue(self, event: Frame) -> None:
        """A data frame for ``recv``'s queue, counted so that no later message overtakes it."""
        self._queue_open = not event.fin
        if event.fin:
            self._queued += 1
        super().process_event(event)

    def taken(self) -> None:
        """The reader took a message from ``recv``: one fewer stands ahead of the next frames."""
        self._queued = max(0, self._queued - 1)

    def _hand_over(
        self, on_message: Callable[[str | bytes], None], data: bytes, text: bool
    ) -> None:
        if not text:
            on_message(data)
            return
        try:
            decoded = data.decode()
        except UnicodeDecodeError as exc:
            self._fail(INVALID_DATA, f"{exc.reason} at position {exc.start}")
            return
        on_message(decoded)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): nothing more is handed over."""
        self._failed = True
        self._parts = None
        self.protocol.fail(code, reason)
        self.send_data()

    def write_message(self, data: bytes, *, text: bool) -> None:
        """Write one whole message now. The caller has checked that the socket is open."""
        at = self._mask_at
        if at >= len(self._masks):
            self._masks = os.urandom(MASK_POOL)
            at = 0
        mask = self._masks[at : at + 4]
        self._mask_at = at + 4
        head = 0x81 if text else 0x82
        length = len(data)
        if length < 126:
            header = _SHORT.pack(head, 0x80 | length, mask)
        elif length < 65536:
            header = _MEDIUM.pack(head, 0x80 | 126, length, mask)
        else:
            header = _LONG.pack(head, 0x80 | 127, length, mask)
        self.send_data()  # what the protocol itself has to write (a pong) goes first
        self.transport.write(header + apply_mask(data, mask))
