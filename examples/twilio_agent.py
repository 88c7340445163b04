"""A runnable demo Twilio Media Streams agent: echoes the caller's µ-law audio back one second
later in 40 ms ``media`` messages, sends ``mark``s and counts them returning, and keeps per-call
statistics.

Run it: ``python examples/twilio_agent.py --host 127.0.0.1 --port 8766`` and point a
``<Connect><Stream url="ws://127.0.0.1:8766/">`` (or the aispinner worker) at it. Import it to run
it in-process: ``agent = TwilioDemoAgent(port=0); await agent.start(); ...; await agent.stop()``.

Any path is accepted, no subprotocol. All frames are text JSON (PROTOCOLS.md §3):

* expects ``connected``, then ``start`` (reads ``streamSid``, ``start.callSid``,
  ``start.customParameters``, ``start.mediaFormat``), then ``media``, ``dtmf``, ``mark``, ``stop``;
  ``media`` before ``start`` is ignored;
* inbound ``media`` payloads (base64 µ-law 8 kHz) are cut into 40 ms (320-byte) chunks and each
  is sent back ``delay`` seconds after it arrived as
  ``{"event":"media","streamSid":…,"media":{"payload":"<base64 µ-law>"}}``; at most
  ``max_backlog_seconds`` are queued (the oldest are dropped beyond that);
* after every ``mark_every_chunks``-th echoed chunk it sends
  ``{"event":"mark","streamSid":…,"mark":{"name":"echo-N"}}`` (N = 1, 2, …) and counts the
  ``mark`` events that come back (Twilio returns them when played or cleared alike);
* ``dtmf`` digits are recorded; ``*`` sends ``{"event":"clear","streamSid":…}`` and drops the
  echo backlog; ``#`` closes the socket with code 1000 (Twilio then runs the next TwiML verb).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["CHUNK_BYTES", "CallStats", "TwilioDemoAgent", "main"]

log = logging.getLogger("examples.twilio_agent")

SAMPLE_RATE = 8000  # Twilio Media Streams: µ-law, 8 kHz, mono, one byte per sample
CHUNK_BYTES = 320  # 40 ms


@dataclass
class CallStats:
    """What happened on one stream, by ``call_sid``; updated live by the agent.

    Audio byte counts are µ-law bytes (one per sample), as carried in the payloads.
    """

    call_sid: str
    stream_sid: str = ""
    account_sid: str = ""
    custom_parameters: dict[str, Any] = field(default_factory=dict)
    media_format: dict[str, Any] = field(default_factory=dict)
    digits: list[str] = field(default_factory=list)
    media_in: int = 0
    media_out: int = 0
    audio_bytes_in: int = 0
    audio_bytes_out: int = 0
    audio_bytes_dropped: int = 0
    marks_sent: int = 0
    marks_returned: list[str] = field(default_factory=list)
    clears_sent: int = 0
    stopped: bool = False
    closed_by_agent: bool = False


class _DelayLine:
    """Chunks of audio held back for ``delay`` seconds; at most ``max_bytes`` are queued."""

    def __init__(self, delay: float, max_bytes: int) -> None:
        self.delay = delay
        self.max_bytes = max_bytes
        self._queue: deque[tuple[float, bytes]] = deque()
        self._size = 0
        self._ready = asyncio.Event()

    def push(self, chunk: bytes, now: float) -> int:
        """Queue ``chunk``; return how many bytes of the oldest audio were dropped for it."""
        self._queue.append((now + self.delay, chunk))
        self._size += len(chunk)
        dropped = 0
        while self._size > self.max_bytes:
            _, old = self._queue.popleft()
            self._size -= len(old)
            dropped += len(old)
        self._ready.set()
        return dropped

    def clear(self) -> int:
        """Forget everything queued; return how many bytes that was."""
        dropped = self._size
        self._queue.clear()
        self._size = 0
        return dropped

    async def next_chunk(self) -> bytes:
        """Wait for the oldest chunk to be due, and return it."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            due, chunk = self._queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the queue may have been cleared meanwhile
            self._queue.popleft()
            self._size -= len(chunk)
            return chunk


class TwilioDemoAgent:
    """The demo agent: a ``websockets`` server speaking Twilio Media Streams (see module doc).

    ``port=0`` picks a free port; read ``port`` and ``url`` after ``start()``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8766,
        delay: float = 1.0,
        max_backlog_seconds: float = 3.0,
        mark_every_chunks: int = 25,
    ) -> None:
        if delay < 0 or max_backlog_seconds <= 0 or mark_every_chunks <= 0:
            raise ValueError("delay, max_backlog_seconds and mark_every_chunks must be positive")
        self.host = host
        self.port = port
        self.delay = delay
        self.max_backlog_seconds = max_backlog_seconds
        self.mark_every_chunks = mark_every_chunks
        self.calls: dict[str, CallStats] = {}
        self._server: Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and start serving; returns once the socket listens."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = await serve(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s", self.url)

    async def stop(self) -> None:
        """Close every connection and the listening socket; wait for the handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        log.info("stopped")

    async def _handle(self, ws: ServerConnection) -> None:
        log.info("connected from %s", ws.remote_address)
        max_bytes = int(self.max_backlog_seconds * SAMPLE_RATE)
        stream = _Stream(self, ws, _DelayLine(self.delay, max_bytes))
        await stream.run()
        stats = stream.stats
        if stats is None:
            log.info("closed before start (code %s)", ws.close_code)
            return
        log.info(
            "call %s: closed (code %s): in %d B, out %d B, dropped %d B, "
            "marks sent %d returned %d, clears %d, digits %s",
            stats.call_sid,
            ws.close_code,
            stats.audio_bytes_in,
            stats.audio_bytes_out,
            stats.audio_bytes_dropped,
            stats.marks_sent,
            len(stats.marks_returned),
            stats.clears_sent,
            "".join(stats.digits) or "-",
        )


class _Stream:
    """One Media Streams socket: the reader (this task) and the echo sender (a child task)."""

    def __init__(self, agent: TwilioDemoAgent, ws: ServerConnection, line: _DelayLine) -> None:
        self.agent = agent
        self.ws = ws
        self.line = line
        self.stats: CallStats | None = None
        self.pending = bytearray()  # inbound µ-law not yet a whole chunk
        self.chunks_out = 0
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    log.warning("ignoring a binary frame (%d bytes)", len(message))
                    continue
                try:
                    msg = json.loads(message)
                except ValueError:
                    log.warning("ignoring invalid JSON %.80r", message)
                    continue
                if not isinstance(msg, dict):
                    log.warning("ignoring non-object JSON %.80r", message)
                    continue
                await self._on_message(msg)
        except ConnectionClosed:
            pass
        finally:
            if self.sender is not None:
                self.sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await self.sender

    async def _on_message(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "media":
            self._on_media(msg)
        elif event == "connected":
            log.info("connected: protocol %s version %s", msg.get("protocol"), msg.get("version"))
        elif event == "start":
            self._on_start(msg)
        elif self.stats is None:
            log.warning("ignoring %s before start", event)
        elif event == "dtmf":
            await self._on_dtmf(self.stats, msg)
        elif event == "mark":
            name = str(_object(msg.get("mark")).get("name", ""))
            self.stats.marks_returned.append(name)
            log.info("call %s: mark %s returned", self.stats.call_sid, name)
        elif event == "stop":
            self.stats.stopped = True
            log.info("call %s: stop", self.stats.call_sid)
        else:
            log.info("call %s: ignoring event %s", self.stats.call_sid, event)

    def _on_start(self, msg: dict[str, Any]) -> None:
        start = _object(msg.get("start"))
        call_sid = str(start.get("callSid", ""))
        stats = CallStats(
            call_sid=call_sid,
            stream_sid=str(msg.get("streamSid") or start.get("streamSid", "")),
            account_sid=str(start.get("accountSid", "")),
            custom_parameters=_object(start.get("customParameters")),
            media_format=_object(start.get("mediaFormat")),
        )
        self.agent.calls[call_sid] = stats
        self.stats = stats
        log.info(
            "call %s: start stream %s, parameters %s, format %s",
            call_sid,
            stats.stream_sid,
            stats.custom_parameters,
            stats.media_format,
        )
        if self.sender is None:
            self.sender = asyncio.create_task(self._send_echo(stats))

    def _on_media(self, msg: dict[str, Any]) -> None:
        stats = self.stats
        if stats is None:
            return  # the log line would be per 20 ms packet: stay quiet
        media = _object(msg.get("media"))
        if media.get("track", "inbound") != "inbound":
            return
        try:
            payload = base64.b64decode(str(media.get("payload", "")), validate=True)
        except binascii.Error:
            log.warning("call %s: media payload is not base64", stats.call_sid)
            return
        stats.media_in += 1
        stats.audio_bytes_in += len(payload)
        self.pending += payload
        now = asyncio.get_running_loop().time()
        while len(self.pending) >= CHUNK_BYTES:
            chunk = bytes(self.pending[:CHUNK_BYTES])
            del self.pending[:CHUNK_BYTES]
            stats.audio_bytes_dropped += self.line.push(chunk, now)

    async def _on_dtmf(self, stats: CallStats, msg: dict[str, Any]) -> None:
        digit = str(_object(msg.get("dtmf")).get("digit", ""))
        stats.digits.append(digit)
        log.info("call %s: dtmf %s", stats.call_sid, digit)
        if digit == "*":
            stats.audio_bytes_dropped += self.line.clear() + len(self.pending)
            self.pending.clear()
            await self.ws.send(json.dumps({"event": "clear", "streamSid": stats.stream_sid}))
            stats.clears_sent += 1
            log.info("call %s: > clear", stats.call_sid)
        elif digit == "#":
            stats.closed_by_agent = True
            log.info("call %s: > close 1000", stats.call_sid)
            await self.ws.close(1000, "caller pressed #")

    async def _send_echo(self, stats: CallStats) -> None:
        while True:
            chunk = await self.line.next_chunk()
            payload = base64.b64encode(chunk).decode("ascii")
            await self.ws.send(
                json.dumps(
                    {"event": "media", "streamSid": stats.stream_sid, "media": {"payload": payload}}
                )
            )
            stats.media_out += 1
            stats.audio_bytes_out += len(chunk)
            self.chunks_out += 1
            if self.chunks_out % self.agent.mark_every_chunks == 0:
                stats.marks_sent += 1
                name = f"echo-{stats.marks_sent}"
                await self.ws.send(
                    json.dumps(
                        {"event": "mark", "streamSid": stats.stream_sid, "mark": {"name": name}}
                    )
                )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def _serve_until_signalled(agent: TwilioDemoAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()
        for stats in agent.calls.values():
            log.info("summary %s", stats)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python examples/twilio_agent.py --host 127.0.0.1 --port 8766``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8766, help="port (default 8766, 0 = any)")
    parser.add_argument("--delay", type=float, default=1.0, help="echo delay in seconds")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-5s %(name)s %(message)s"
    )
    asyncio.run(
        _serve_until_signalled(TwilioDemoAgent(host=args.host, port=args.port, delay=args.delay))
    )


if __name__ == "__main__":
    main()
