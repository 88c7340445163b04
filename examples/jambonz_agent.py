"""A runnable demo jambonz WebSocket agent: answers ``session:new`` with ``say`` + ``listen``,
echoes the caller's listen audio back one second later, and keeps per-call statistics.

Run it: ``python examples/jambonz_agent.py --host 127.0.0.1 --port 8765`` and point a jambonz
application (or the aispinner worker) at ``ws://127.0.0.1:8765/``. Import it to run it in-process:
``agent = JambonzDemoAgent(port=0); await agent.start(); ...; await agent.stop()``.

One server, two paths:

* control, ``/`` or ``/agent``, subprotocol ``ws.jambonz.org`` (text JSON):

  - ``session:new`` → ``{"type":"ack","msgid":…,"data":[{"verb":"say","text":GREETING},
    {"verb":"listen","url":"ws://<host>:<port>/listen","mixType":"mono","sampleRate":8000,
    "passDtmf":true,"bidirectionalAudio":{"enabled":true,"streaming":true,"sampleRate":8000},
    "actionHook":"/listen-done","metadata":{"agent":"aispinner-demo"}}]}``
  - ``verb:hook`` with ``hook == "/listen-done"`` → ack with
    ``[{"verb":"say","text":"Goodbye"},{"verb":"hangup"}]``; any other hook → empty ack
    ``{"type":"ack","msgid":…}`` (so are ``session:reconnect``, ``session:redirect``,
    ``session:adulting``, ``dial:confirm``, ``queue:status``);
  - ``call:status``, ``verb:status``, ``jambonz:error``, ``llm:*``, ``tts:*`` → logged, no ack.

* listen audio, ``/listen``, subprotocol ``audio.jambonz.org`` (``audio.drachtio.org`` accepted):

  - expects the metadata text frame first (``{"sampleRate":…,"callSid":…}``), then replies with
    one text frame ``{"type":"transcription","data":{"role":"agent","text":GREETING,
    "final":true}}`` — what the agent said, for the platform's transcript;
  - binary frames (L16 PCM) are echoed back unchanged ``delay`` seconds after they arrived, at
    most ``max_backlog_seconds`` of them queued (the oldest are dropped beyond that); a
    zero-length binary frame (end of audio) is not echoed;
  - before every ``mark_every_frames``-th echoed frame (the first included) it sends
    ``{"type":"mark","data":{"name":"echo-N"}}`` (N = 1, 2, …; a mark tags the next audio sent)
    and counts the ``{"type":"mark","data":{"name":…,"event":"playout"|"cleared"}}`` that come
    back;
  - DTMF ``{"event":"dtmf","dtmf":"5","duration":"1600"}`` is recorded; ``*`` sends
    ``{"type":"killAudio"}`` and drops the echo backlog; ``#`` sends ``{"type":"disconnect"}``
    (the platform then ends the listen verb and calls ``/listen-done``) and stops echoing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

__all__ = [
    "AUDIO_SUBPROTOCOLS",
    "CONTROL_PATHS",
    "CONTROL_SUBPROTOCOL",
    "GOODBYE_VERBS",
    "GREETING",
    "LISTEN_DONE_HOOK",
    "LISTEN_PATH",
    "CallStats",
    "JambonzDemoAgent",
    "main",
]

log = logging.getLogger("examples.jambonz_agent")

CONTROL_SUBPROTOCOL = Subprotocol("ws.jambonz.org")
AUDIO_SUBPROTOCOLS = (Subprotocol("audio.jambonz.org"), Subprotocol("audio.drachtio.org"))
CONTROL_PATHS = ("/", "/agent")
LISTEN_PATH = "/listen"
LISTEN_DONE_HOOK = "/listen-done"
GREETING = "Hello. I repeat what you say, one second later. Press pound to finish."
GOODBYE_VERBS: list[dict[str, Any]] = [{"verb": "say", "text": "Goodbye"}, {"verb": "hangup"}]

# Messages jambonz sends without waiting for an ack (PROTOCOLS.md §1.3).
_NO_ACK_TYPES = frozenset(
    {
        "call:status",
        "verb:status",
        "jambonz:error",
        "llm:event",
        "llm:tool-call",
        "tts:tokens-result",
        "tts:streaming-event",
    }
)


@dataclass
class CallStats:
    """What happened on one call, by ``call_sid``; updated live by the agent."""

    call_sid: str
    caller: str = ""
    called: str = ""
    hooks: list[str] = field(default_factory=list)
    call_statuses: list[str] = field(default_factory=list)
    listen_metadata: dict[str, Any] | None = None
    listen_connections: int = 0
    digits: list[str] = field(default_factory=list)
    marks_sent: int = 0
    marks_played: int = 0
    marks_cleared: int = 0
    audio_bytes_in: int = 0
    audio_bytes_out: int = 0
    audio_bytes_dropped: int = 0
    transcriptions_sent: int = 0
    kill_audio_sent: int = 0
    disconnect_sent: bool = False


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


class JambonzDemoAgent:
    """The demo agent: a ``websockets`` server with the control and listen paths (see module doc).

    ``port=0`` picks a free port; read ``port``, ``control_url`` and ``listen_url`` after
    ``start()``. ``public_url`` (``ws://host:port``) overrides the address put in the ``listen``
    verb when the platform reaches this agent by another name.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        sample_rate: int = 8000,
        delay: float = 1.0,
        max_backlog_seconds: float = 3.0,
        mark_every_frames: int = 50,
        public_url: str | None = None,
    ) -> None:
        if sample_rate not in (8000, 16000):
            raise ValueError("sample_rate must be 8000 or 16000")
        if delay < 0 or max_backlog_seconds <= 0 or mark_every_frames <= 0:
            raise ValueError("delay, max_backlog_seconds and mark_every_frames must be positive")
        self.host = host
        self.port = port
        self.sample_rate = sample_rate
        self.delay = delay
        self.max_backlog_seconds = max_backlog_seconds
        self.mark_every_frames = mark_every_frames
        self.public_url = public_url.rstrip("/") if public_url else None
        self.calls: dict[str, CallStats] = {}
        self._server: Server | None = None
        self._anonymous_listens = 0

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def control_url(self) -> str:
        return f"{self.base_url}/"

    @property
    def listen_url(self) -> str:
        return f"{self.base_url}{LISTEN_PATH}"

    async def start(self) -> None:
        """Bind and start serving; returns once the socket listens."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._check_path,
            select_subprotocol=self._select_subprotocol,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s (control) and %s (audio)", self.control_url, self.listen_url)

    async def stop(self) -> None:
        """Close every connection and the listening socket; wait for the handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        log.info("stopped")

    # -- handshake -------------------------------------------------------------------------

    @staticmethod
    def _check_path(connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in CONTROL_PATHS or path == LISTEN_PATH:
            return None
        return connection.respond(HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {path}\n")

    @staticmethod
    def _select_subprotocol(
        connection: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        assert connection.request is not None
        if urlsplit(connection.request.path).path == LISTEN_PATH:
            for name in AUDIO_SUBPROTOCOLS:
                if name in offered:
                    return name
            raise NegotiationError(f"the listen path needs subprotocol {AUDIO_SUBPROTOCOLS[0]}")
        if CONTROL_SUBPROTOCOL in offered:
            return CONTROL_SUBPROTOCOL
        raise NegotiationError(f"the control path needs subprotocol {CONTROL_SUBPROTOCOL}")

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if urlsplit(ws.request.path).path == LISTEN_PATH:
            await self._serve_listen(ws)
        else:
            await self._serve_control(ws)

    # -- control socket (ws.jambonz.org) ----------------------------------------------------

    async def _serve_control(self, ws: ServerConnection) -> None:
        log.info("control: connected from %s", ws.remote_address)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    log.warning("control: ignoring a binary frame (%d bytes)", len(message))
                    continue
                try:
                    msg = json.loads(message)
                except ValueError:
                    log.warning("control: ignoring invalid JSON %.80r", message)
                    continue
                if not isinstance(msg, dict):
                    log.warning("control: ignoring non-object JSON %.80r", message)
                    continue
                await self._on_control_message(ws, msg)
        except ConnectionClosed:
            pass
        log.info("control: closed (code %s)", ws.close_code)

    async def _on_control_message(self, ws: ServerConnection, msg: dict[str, Any]) -> None:
        mtype = str(msg.get("type", ""))
        msgid = msg.get("msgid")
        data = _object(msg.get("data"))
        call_sid = str(msg.get("call_sid") or data.get("call_sid") or "")
        if mtype == "session:new":
            stats = CallStats(
                call_sid=call_sid, caller=str(data.get("from", "")), called=str(data.get("to", ""))
            )
            self.calls[call_sid] = stats
            log.info("call %s: session:new from %s to %s", call_sid, stats.caller, stats.called)
            await self._ack(ws, msgid, self.greeting_verbs())
            log.info("call %s: > ack say + listen %s", call_sid, self.listen_url)
        elif mtype == "verb:hook":
            hook = str(msg.get("hook", ""))
            self._stats(call_sid).hooks.append(hook)
            if hook == LISTEN_DONE_HOOK:
                log.info("call %s: verb:hook %s digits=%r", call_sid, hook, data.get("digits"))
                await self._ack(ws, msgid, GOODBYE_VERBS)
                log.info("call %s: > ack say Goodbye + hangup", call_sid)
            else:
                log.info("call %s: verb:hook %s, > empty ack", call_sid, hook)
                await self._ack(ws, msgid, None)
        elif mtype == "call:status":
            status = str(data.get("call_status", ""))
            self._stats(call_sid).call_statuses.append(status)
            log.info("call %s: call:status %s", call_sid, status)
        elif mtype in _NO_ACK_TYPES:
            log.info("call %s: %s %.200s", call_sid, mtype, json.dumps(data))
        elif msgid is not None:
            log.info("call %s: %s, > empty ack", call_sid, mtype or "<no type>")
            await self._ack(ws, msgid, None)
        else:
            log.warning("control: ignoring %s without msgid", mtype or "a message")

    def greeting_verbs(self) -> list[dict[str, Any]]:
        """The verbs that answer ``session:new``."""
        return [
            {"verb": "say", "text": GREETING},
            {
                "verb": "listen",
                "url": self.listen_url,
                "mixType": "mono",
                "sampleRate": self.sample_rate,
                "passDtmf": True,
                "bidirectionalAudio": {
                    "enabled": True,
                    "streaming": True,
                    "sampleRate": self.sample_rate,
                },
                "actionHook": LISTEN_DONE_HOOK,
                "metadata": {"agent": "aispinner-demo"},
            },
        ]

    @staticmethod
    async def _ack(ws: ServerConnection, msgid: Any, verbs: list[dict[str, Any]] | None) -> None:
        ack: dict[str, Any] = {"type": "ack", "msgid": msgid}
        if verbs is not None:
            ack["data"] = verbs
        await ws.send(json.dumps(ack))

    def _stats(self, call_sid: str) -> CallStats:
        stats = self.calls.get(call_sid)
        if stats is None:
            stats = self.calls[call_sid] = CallStats(call_sid=call_sid)
        return stats

    # -- listen socket (audio.jambonz.org) --------------------------------------------------

    async def _serve_listen(self, ws: ServerConnection) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), timeout=10.0)
        except (TimeoutError, ConnectionClosed):
            log.warning("listen: no metadata frame, closing")
            await ws.close(1008, "expected the metadata text frame")
            return
        metadata = _parse_object(first)
        if metadata is None:
            log.warning("listen: first frame is not a JSON metadata object, closing")
            await ws.close(1008, "expected the metadata text frame first")
            return
        call_sid = str(metadata.get("callSid") or "")
        if not call_sid:
            self._anonymous_listens += 1
            call_sid = f"unknown-{self._anonymous_listens}"
        stats = self._stats(call_sid)
        stats.listen_metadata = metadata
        stats.listen_connections += 1
        rate = metadata.get("sampleRate", self.sample_rate)
        log.info("call %s: listen connected (%s Hz, %s)", call_sid, rate, metadata.get("mixType"))
        max_bytes = int(self.max_backlog_seconds * self.sample_rate) * 2
        session = _ListenSession(self, ws, stats, _DelayLine(self.delay, max_bytes))
        await session.run()
        log.info(
            "call %s: listen closed (code %s): in %d B, out %d B, dropped %d B, "
            "marks sent %d played %d cleared %d, digits %s",
            call_sid,
            ws.close_code,
            stats.audio_bytes_in,
            stats.audio_bytes_out,
            stats.audio_bytes_dropped,
            stats.marks_sent,
            stats.marks_played,
            stats.marks_cleared,
            "".join(stats.digits) or "-",
        )


class _ListenSession:
    """One listen socket: the reader (this task) and the echo sender (a child task)."""

    def __init__(
        self, agent: JambonzDemoAgent, ws: ServerConnection, stats: CallStats, line: _DelayLine
    ) -> None:
        self.agent = agent
        self.ws = ws
        self.stats = stats
        self.line = line
        self.echoing = True
        self.frames_out = 0

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_echo())
        try:
            await self._send_json(
                {
                    "type": "transcription",
                    "data": {"role": "agent", "text": GREETING, "final": True},
                }
            )
            self.stats.transcriptions_sent += 1
            loop = asyncio.get_running_loop()
            async for message in self.ws:
                if isinstance(message, bytes):
                    if not message:
                        log.info("call %s: end of audio", self.stats.call_sid)
                        continue
                    self.stats.audio_bytes_in += len(message)
                    if self.echoing:
                        self.stats.audio_bytes_dropped += self.line.push(message, loop.time())
                else:
                    await self._on_text(message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    async def _on_text(self, text: str) -> None:
        call_sid = self.stats.call_sid
        msg = _parse_object(text)
        if msg is None:
            log.warning("call %s: listen: ignoring %.80r", call_sid, text)
            return
        if msg.get("event") == "dtmf":
            digit = str(msg.get("dtmf", ""))
            self.stats.digits.append(digit)
            log.info("call %s: dtmf %s (duration %s)", call_sid, digit, msg.get("duration"))
            if digit == "*":
                self.stats.audio_bytes_dropped += self.line.clear()
                await self._send_json({"type": "killAudio"})
                self.stats.kill_audio_sent += 1
                log.info("call %s: > killAudio", call_sid)
            elif digit == "#":
                self.echoing = False
                self.stats.audio_bytes_dropped += self.line.clear()
                await self._send_json({"type": "disconnect"})
                self.stats.disconnect_sent = True
                log.info("call %s: > disconnect", call_sid)
            return
        mtype = msg.get("type")
        data = _object(msg.get("data"))
        if mtype == "mark":
            event = data.get("event")
            if event == "playout":
                self.stats.marks_played += 1
            elif event == "cleared":
                self.stats.marks_cleared += 1
            log.info("call %s: mark %s %s", call_sid, data.get("name"), event)
        elif mtype == "playDone":
            log.info("call %s: playDone %s", call_sid, data.get("id"))
        else:
            log.info("call %s: listen text %.200s", call_sid, text)

    async def _send_echo(self) -> None:
        while True:
            chunk = await self.line.next_chunk()
            if self.frames_out % self.agent.mark_every_frames == 0:
                self.stats.marks_sent += 1
                await self._send_json(
                    {"type": "mark", "data": {"name": f"echo-{self.stats.marks_sent}"}}
                )
            self.frames_out += 1
            await self.ws.send(chunk)
            self.stats.audio_bytes_out += len(chunk)

    async def _send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _parse_object(frame: str | bytes) -> dict[str, Any] | None:
    if not isinstance(frame, str):
        return None
    try:
        value = json.loads(frame)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _serve_until_signalled(agent: JambonzDemoAgent) -> None:
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
    """Command line: ``python examples/jambonz_agent.py --host 127.0.0.1 --port 8765``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765, 0 = any)")
    parser.add_argument("--sample-rate", type=int, choices=(8000, 16000), default=8000)
    parser.add_argument("--delay", type=float, default=1.0, help="echo delay in seconds")
    parser.add_argument("--public-url", help="ws://host:port the platform uses to reach us")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)-5s %(name)s %(message)s"
    )
    agent = JambonzDemoAgent(
        host=args.host,
        port=args.port,
        sample_rate=args.sample_rate,
        delay=args.delay,
        public_url=args.public_url,
    )
    asyncio.run(_serve_until_signalled(agent))


if __name__ == "__main__":
    main()
