"""The load test's voice agent, a process of its own: it sends every call's audio straight back,
and times the probe phones' markers as they arrive.

One WebSocket server speaks both protocols, told apart by the subprotocol offered:

* jambonz (``ws.jambonz.org``): ``session:new`` is acked with one ``listen`` verb, 16 kHz L16
  mono with ``bidirectionalAudio.streaming`` at 16 kHz and ``passDtmf``; other messages with a
  ``msgid`` get an empty ack. On the listen socket (``audio.jambonz.org``) every binary frame is
  sent back as it is, at once; DTMF events are counted.
* Twilio Media Streams (no subprotocol): every ``media`` message is sent back with the same
  payload and ``streamSid``; ``dtmf`` events are counted.

The echo is written from the connection's own event processing (:class:`EchoConnection`), in the
same event-loop callback that read the frame: no task wakes up for it, so the harness costs the
machine it shares with the worker as little as it can (a task and ``await send`` per frame cost
it about twice as much). An echo that would grow the socket's write buffer past
``ECHO_BUFFER_LIMIT`` is dropped and counted (``frames_dropped``): a worker that stops reading
never makes the agent buffer without bound.

A call is a probe's when its agent URL's path is ``/probe/<i>`` or, for jambonz, when its caller
(``from``) is ``loadtest-probe-<i>``. For those the audio also goes through a
``MarkerDetector`` after the echo has been sent, and each marker heard is appended to the
``--markers`` file as a JSON line ``{"probe", "marker_id", "at", "frequency_hz"}`` where ``at`` is
``time.monotonic()`` when the frame holding the onset was read (the system-wide monotonic clock,
comparable with the probe process's). On SIGTERM or SIGINT it closes and writes ``--summary``.

Run: ``python -m worker.loadtest.echo_agent --port 8765 --markers m.jsonl --summary s.json``; it
prints ``{"url": "ws://HOST:PORT/"}`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from media.g711 import ulaw_decode
from worker.loadtest.marker import Detection, MarkerDetector

CONTROL = Subprotocol("ws.jambonz.org")
AUDIO = (Subprotocol("audio.jambonz.org"), Subprotocol("audio.drachtio.org"))
SAMPLE_RATE = 16000
PROBE_USER = re.compile(r"^loadtest-probe-(\d+)$")
PROBE_PATH = re.compile(r"/probe/(\d+)$")
NO_ACK = frozenset({"call:status", "verb:status", "jambonz:error", "llm:event", "llm:tool-call"})
METADATA_TIMEOUT_S = 10.0
ECHO_BUFFER_LIMIT = 256 * 1024  # bytes waiting in the socket's write buffer: past it, drop


def probe_of(path: str, caller: object = None) -> int | None:
    """The probe a call belongs to, from its WebSocket path or its caller; None: a bulk call."""
    match = PROBE_PATH.search(urlsplit(path).path)
    if match is None and isinstance(caller, str):
        match = PROBE_USER.match(caller)
    return int(match.group(1)) if match else None


@dataclass
class AudioConnection:
    """One audio socket (a jambonz listen or a Twilio stream), for the summary."""

    kind: str
    probe: int | None
    opened_at: float
    closed_at: float | None = None
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    bytes_in: int = 0
    dtmf: str = ""
    markers: int = 0


@dataclass
class Summary:
    control_connections: int = 0
    sessions: int = 0
    audio: list[AudioConnection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        audio = self.audio
        return {
            "control_connections": self.control_connections,
            "sessions": self.sessions,
            "audio_connections": len(audio),
            "probe_connections": sum(1 for a in audio if a.probe is not None),
            "frames_in": sum(a.frames_in for a in audio),
            "frames_out": sum(a.frames_out for a in audio),
            "frames_dropped": sum(a.frames_dropped for a in audio),
            "bytes_in": sum(a.bytes_in for a in audio),
            "dtmf_digits": sum(len(a.dtmf) for a in audio),
            "markers": sum(a.markers for a in audio),
            "errors": self.errors[:20],
            "connections": [asdict(a) for a in audio],
        }


class EchoConnection(ServerConnection):
    """A server connection that hands each complete frame to its ``echo`` hook first, from its
    own event processing (no task, no ``await``). The hook returns whether it took the frame;
    those it declines (DTMF events, anything it does not know) reach ``recv`` as before. An
    exception in the hook fails this connection with 1011 and is kept in ``echo_error``: one
    call's bad input never stops the others."""

    echo: Callable[[Frame], bool] | None = None
    echo_error: str | None = None

    def process_event(self, event: Any) -> None:
        echo = self.echo
        if (
            echo is not None
            and isinstance(event, Frame)
            and event.fin
            and event.opcode in (Opcode.TEXT, Opcode.BINARY)
        ):
            try:
                if echo(event):
                    return
            except Exception as exc:  # any bug of the hook closes this socket only
                self.echo = None
                self.echo_error = f"{type(exc).__name__}: {exc}"
                self.protocol.fail(1011, "agent error")
                self.send_data()
                return
        super().process_event(event)

    def echo_back(self, audio: AudioConnection, data: bytes, *, text: bool = False) -> None:
        """Write one message at once and count it in ``frames_out``; past ``ECHO_BUFFER_LIMIT``
        of unsent data, drop it and count it in ``frames_dropped``. Nothing is sent once the
        socket is closing (a frame that came with the worker's close frame)."""
        if self.protocol.state is not State.OPEN:
            return
        if self.transport.get_write_buffer_size() > ECHO_BUFFER_LIMIT:
            audio.frames_dropped += 1
            return
        if text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self.send_data()
        audio.frames_out += 1


class _ListenEcho:
    """A jambonz ``listen`` socket: the first text frame is the metadata, each binary frame goes
    back as it is; other text frames (DTMF events) are left to the handler."""

    def __init__(self, agent: EchoAgent, ws: EchoConnection, path: str) -> None:
        self.agent = agent
        self.ws = ws
        self.path = path
        self.audio: AudioConnection | None = None
        self.detector: MarkerDetector | None = None

    def __call__(self, frame: Frame) -> bool:
        audio = self.audio
        if audio is None:
            metadata = json.loads(bytes(frame.data)) if frame.opcode is Opcode.TEXT else {}
            if not isinstance(metadata, dict):
                raise ValueError("the listen metadata is not a JSON object")
            probe = probe_of(self.path, metadata.get("from"))
            audio = self.audio = AudioConnection("jambonz", probe, time.monotonic())
            self.agent.summary.audio.append(audio)
            if probe is not None:
                self.detector = MarkerDetector(int(metadata.get("sampleRate") or SAMPLE_RATE))
            return True
        if frame.opcode is not Opcode.BINARY:
            return False
        message = bytes(frame.data)
        if not message:
            return True
        at = time.monotonic()
        audio.frames_in += 1
        audio.bytes_in += len(message)
        self.ws.echo_back(audio, message)
        if self.detector is not None:
            self.agent.heard(audio, self.detector.feed(message, at))
        return True


class _TwilioEcho:
    """A Twilio Media Streams socket: ``start`` gives the ``streamSid``, each ``media`` message
    goes back with the same payload; other events are left to the handler."""

    def __init__(self, agent: EchoAgent, ws: EchoConnection, path: str) -> None:
        self.ws = ws
        self.agent = agent
        probe = probe_of(path)
        self.audio = AudioConnection("twilio", probe, time.monotonic())
        agent.summary.audio.append(self.audio)
        self.detector = MarkerDetector(8000) if probe is not None else None
        self.stream_sid = ""

    def __call__(self, frame: Frame) -> bool:
        if frame.opcode is not Opcode.TEXT:
            return False
        msg = json.loads(bytes(frame.data))
        event = msg.get("event")
        if event == "start":
            self.stream_sid = str(msg.get("streamSid") or msg["start"].get("streamSid", ""))
            return True
        if event != "media":
            return False
        at = time.monotonic()
        payload = msg["media"]["payload"]
        reply = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        audio = self.audio
        audio.frames_in += 1
        self.ws.echo_back(audio, json.dumps(reply).encode(), text=True)
        if self.detector is not None:
            try:
                ulaw = base64.b64decode(payload, validate=True)
            except binascii.Error:
                return True
            audio.bytes_in += len(ulaw)
            self.agent.heard(audio, self.detector.feed(ulaw_decode(ulaw), at))
        return True


class EchoAgent:
    def __init__(self, host: str, port: int, markers: IO[str] | None) -> None:
        self.host = host
        self.port = port
        self.markers = markers
        self.summary = Summary()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            select_subprotocol=_select,
            process_response=self._attach,
            create_connection=EchoConnection,
            compression=None,
            max_size=1 << 20,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _attach(self, ws: ServerConnection, request: Request, response: Response) -> None:
        """Give an audio socket its echo before the handshake's response goes out, so that its
        first frame already finds it."""
        if response.status_code != 101 or not isinstance(ws, EchoConnection):
            return
        if ws.subprotocol in AUDIO:
            ws.echo = _ListenEcho(self, ws, request.path)
        elif ws.subprotocol != CONTROL:
            ws.echo = _TwilioEcho(self, ws, request.path)

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        echo = ws.echo if isinstance(ws, EchoConnection) else None
        if not isinstance(echo, _ListenEcho | _TwilioEcho):
            echo = None
        try:
            if ws.subprotocol == CONTROL:
                await self._control(ws, path)
            else:
                await self._events(ws, echo)
        except ConnectionClosed:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.summary.errors.append(f"{path}: {type(exc).__name__}: {exc}")
            await ws.close(1011, "agent error")
        finally:
            if echo is not None and echo.audio is not None:
                echo.audio.closed_at = time.monotonic()
            if isinstance(ws, EchoConnection) and ws.echo_error is not None:
                self.summary.errors.append(f"{path}: {ws.echo_error}")

    def _authority(self, ws: ServerConnection) -> str:
        """Where the platform reached this agent (its ``Host`` header), for the listen URL: right
        even when the agent listens on every address."""
        assert ws.request is not None
        host = ws.request.headers.get("Host")
        return host or self.url.removeprefix("ws://").rstrip("/")

    # -- jambonz --------------------------------------------------------------------------------
    async def _control(self, ws: ServerConnection, path: str) -> None:
        self.summary.control_connections += 1
        async for message in ws:
            if not isinstance(message, str):
                continue
            msg = json.loads(message)
            kind = msg.get("type")
            msgid = msg.get("msgid")
            if kind == "session:new":
                self.summary.sessions += 1
                data = msg.get("data") or {}
                probe = probe_of(path, data.get("from"))
                suffix = "" if probe is None else f"/probe/{probe}"
                listen = f"ws://{self._authority(ws)}/listen{suffix}"
                verb = {
                    "verb": "listen",
                    "url": listen,
                    "mixType": "mono",
                    "sampleRate": SAMPLE_RATE,
                    "passDtmf": True,
                    "bidirectionalAudio": {
                        "enabled": True,
                        "streaming": True,
                        "sampleRate": SAMPLE_RATE,
                    },
                }
                await ws.send(json.dumps({"type": "ack", "msgid": msgid, "data": [verb]}))
            elif msgid is not None and kind not in NO_ACK:
                await ws.send(json.dumps({"type": "ack", "msgid": msgid}))

    # -- what the echo leaves: DTMF, Twilio's stop ----------------------------------------------
    async def _events(self, ws: ServerConnection, echo: _ListenEcho | _TwilioEcho | None) -> None:
        async for message in ws:
            if echo is None or echo.audio is None:
                continue
            msg = json.loads(message)
            if isinstance(echo, _ListenEcho):
                if isinstance(msg, dict) and msg.get("event") == "dtmf":
                    echo.audio.dtmf += str(msg.get("dtmf", ""))
            elif msg.get("event") == "dtmf":
                echo.audio.dtmf += str((msg.get("dtmf") or {}).get("digit", ""))
            elif msg.get("event") == "stop":
                break

    def heard(self, audio: AudioConnection, detections: list[Detection]) -> None:
        for detection in detections:
            audio.markers += 1
            if self.markers is not None:
                record = {
                    "probe": audio.probe,
                    "marker_id": detection.marker_id,
                    "at": detection.at,
                    "frequency_hz": detection.frequency_hz,
                }
                self.markers.write(json.dumps(record) + "\n")
                self.markers.flush()


def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    for name in (CONTROL, *AUDIO):
        if name in offered:
            return name
    return None


async def serve_until_signalled(
    host: str, port: int, markers_path: Path | None, summary_path: Path | None
) -> None:
    markers = markers_path.open("a", encoding="utf-8") if markers_path else None
    agent = EchoAgent(host, port, markers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        print(json.dumps({"url": agent.url}), flush=True)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await agent.stop()
        if markers is not None:
            markers.close()
        if summary_path is not None:
            _write_json(summary_path, agent.summary.as_dict())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.loadtest.echo_agent",
        description="The load test's echo agent (jambonz listen and Twilio Media Streams).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--markers", type=Path, help="append the probes' markers here (JSONL)")
    parser.add_argument("--summary", type=Path, help="write the counts here at exit (JSON)")
    args = parser.parse_args(argv)
    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    runner(serve_until_signalled(args.host, args.port, args.markers, args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
