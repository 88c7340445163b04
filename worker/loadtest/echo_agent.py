"""The load test's voice agent, a process of its own: it sends every call's audio straight back,
and times the probe phones' markers as they arrive.

One WebSocket server speaks both protocols, told apart by the subprotocol offered:

* jambonz (``ws.jambonz.org``): ``session:new`` is acked with one ``listen`` verb, 16 kHz L16
  mono with ``bidirectionalAudio.streaming`` at 16 kHz and ``passDtmf``; other messages with a
  ``msgid`` get an empty ack. On the listen socket (``audio.jambonz.org``) every binary frame is
  sent back as it is, at once; DTMF events are counted.
* Twilio Media Streams (no subprotocol): every ``media`` message is sent back with the same
  payload and ``streamSid``; ``dtmf`` events are counted.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
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
            "bytes_in": sum(a.bytes_in for a in audio),
            "dtmf_digits": sum(len(a.dtmf) for a in audio),
            "markers": sum(a.markers for a in audio),
            "errors": self.errors[:20],
            "connections": [asdict(a) for a in audio],
        }


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
            compression=None,
            max_size=1 << 20,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        try:
            if ws.subprotocol == CONTROL:
                await self._control(ws, path)
            elif ws.subprotocol in AUDIO:
                await self._listen(ws, path)
            else:
                await self._twilio(ws, path)
        except ConnectionClosed:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            self.summary.errors.append(f"{path}: {type(exc).__name__}: {exc}")
            await ws.close(1011, "agent error")

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

    async def _listen(self, ws: ServerConnection, path: str) -> None:
        first = await asyncio.wait_for(ws.recv(), METADATA_TIMEOUT_S)
        metadata = json.loads(first) if isinstance(first, str) else {}
        probe = probe_of(path, metadata.get("from"))
        rate = int(metadata.get("sampleRate") or SAMPLE_RATE)
        audio = AudioConnection("jambonz", probe, time.monotonic())
        self.summary.audio.append(audio)
        detector = MarkerDetector(rate) if probe is not None else None
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    if not message:
                        continue
                    at = time.monotonic()
                    await ws.send(message)
                    audio.frames_in += 1
                    audio.frames_out += 1
                    audio.bytes_in += len(message)
                    if detector is not None:
                        self._heard(audio, detector.feed(message, at))
                else:
                    event = json.loads(message)
                    if isinstance(event, dict) and event.get("event") == "dtmf":
                        audio.dtmf += str(event.get("dtmf", ""))
        finally:
            audio.closed_at = time.monotonic()

    # -- Twilio ---------------------------------------------------------------------------------
    async def _twilio(self, ws: ServerConnection, path: str) -> None:
        probe = probe_of(path)
        audio = AudioConnection("twilio", probe, time.monotonic())
        self.summary.audio.append(audio)
        detector = MarkerDetector(8000) if probe is not None else None
        stream_sid = ""
        try:
            async for message in ws:
                msg = json.loads(message)
                event = msg.get("event")
                if event == "media":
                    at = time.monotonic()
                    payload = msg["media"]["payload"]
                    await ws.send(
                        json.dumps(
                            {
                                "event": "media",
                                "streamSid": stream_sid,
                                "media": {"payload": payload},
                            }
                        )
                    )
                    audio.frames_in += 1
                    audio.frames_out += 1
                    if detector is not None:
                        try:
                            ulaw = base64.b64decode(payload, validate=True)
                        except binascii.Error:
                            continue
                        audio.bytes_in += len(ulaw)
                        self._heard(audio, detector.feed(ulaw_decode(ulaw), at))
                elif event == "start":
                    stream_sid = str(msg.get("streamSid") or msg["start"].get("streamSid", ""))
                elif event == "dtmf":
                    audio.dtmf += str((msg.get("dtmf") or {}).get("digit", ""))
                elif event == "stop":
                    break
        finally:
            audio.closed_at = time.monotonic()

    def _heard(self, audio: AudioConnection, detections: list[Detection]) -> None:
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
