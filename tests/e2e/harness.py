"""What the end-to-end session tests share: a scripted agent (a real ``websockets`` server on
127.0.0.1 whose every connection the test drives by hand), the worker started in-process on free
loopback ports, SIPp callers and callees, a tiny HTTP file server, and the audio maths used to
compare what was sent with what arrived.

Every wait here is bounded (``WAIT`` unless told) and fails the test with what was seen so far;
every server, process and task is closed on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import struct
import subprocess
import wave
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from media.g711 import alaw_decode
from tests.pcap import read_pcap
from tests.sipp import SIPP_SHARE, Sipp, SippResult, free_port
from worker.app import Worker
from worker.config import load_settings
from worker.session.session import CallSession, SessionResult

WAIT = 10.0
"""Bound on any single wait for a message, a connection or a call to end (seconds)."""
SCENARIOS = Path(__file__).parent / "scenarios"
CONTROL = Subprotocol("ws.jambonz.org")
AUDIO = Subprotocol("audio.jambonz.org")
Samples = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- the scripted agent


@dataclass(eq=False)
class Frame:
    """One frame the agent received, with the loop time it arrived."""

    at: float
    data: str | bytes

    @property
    def json(self) -> dict[str, Any]:
        assert isinstance(self.data, str), f"expected a text frame, got {len(self.data)} bytes"
        value = json.loads(self.data)
        assert isinstance(value, dict), self.data
        return value


@dataclass(eq=False)
class AgentPeer:
    """One connection the worker opened to the scripted agent. Everything it receives is kept in
    ``frames`` (in order, with arrival times); ``recv``/``next`` read it in order."""

    ws: ServerConnection
    path: str
    frames: list[Frame] = field(default_factory=list)
    sent_at: list[tuple[float, str | bytes]] = field(default_factory=list)
    close_code: int | None = None
    _cursor: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in self.ws:
                self.frames.append(Frame(loop.time(), message))
                self._arrived.set()
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code
        self._closed.set()
        self._arrived.set()

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def texts(self) -> list[dict[str, Any]]:
        """Every text frame received so far, parsed."""
        return [f.json for f in self.frames if isinstance(f.data, str)]

    def binary(self) -> list[Frame]:
        """Every binary frame received so far."""
        return [f for f in self.frames if isinstance(f.data, bytes)]

    async def recv(self, within: float = WAIT) -> Frame:
        """The next frame in arrival order (fails the test on timeout or close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._cursor >= len(self.frames):
            if self._closed.is_set():
                raise AssertionError(f"{self.path}: closed ({self.close_code}) while waiting")
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.path}: nothing arrived within {within} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        frame = self.frames[self._cursor]
        self._cursor += 1
        return frame

    async def next(
        self, match: Callable[[dict[str, Any]], bool], within: float = WAIT, what: str = ""
    ) -> dict[str, Any]:
        """The next text frame that ``match`` accepts; frames before it are passed over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            left = deadline - loop.time()
            try:
                frame = await self.recv(max(0.0, left))
            except AssertionError as exc:
                seen = [f.data for f in self.frames if isinstance(f.data, str)][-8:]
                raise AssertionError(
                    f"{self.path}: no {what or 'match'} ({exc}); last: {seen}"
                ) from None
            if isinstance(frame.data, str):
                msg = frame.json
                if match(msg):
                    return msg

    async def next_type(self, kind: str, within: float = WAIT) -> dict[str, Any]:
        """The next jambonz message of ``type`` ``kind``."""
        return await self.next(lambda m: m.get("type") == kind, within, kind)

    async def next_event(self, kind: str, within: float = WAIT) -> dict[str, Any]:
        """The next Twilio message of ``event`` ``kind``."""
        return await self.next(lambda m: m.get("event") == kind, within, kind)

    async def send(self, message: dict[str, Any] | list[Any] | str | bytes) -> None:
        data = message if isinstance(message, str | bytes) else json.dumps(message)
        self.sent_at.append((asyncio.get_running_loop().time(), data))
        await self.ws.send(data)

    async def ack(self, msg: dict[str, Any], verbs: list[dict[str, Any]] | None = None) -> None:
        """Ack a jambonz message, with ``verbs`` as its data when given."""
        reply: dict[str, Any] = {"type": "ack", "msgid": msg["msgid"]}
        if verbs is not None:
            reply["data"] = verbs
        await self.send(reply)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)
        await self.wait_closed()

    async def wait_closed(self, within: float = WAIT) -> int | None:
        """Wait for the socket to close; its close code."""
        try:
            await asyncio.wait_for(self._closed.wait(), within)
        except TimeoutError:
            raise AssertionError(f"{self.path}: still open after {within} s") from None
        return self.close_code


class ScriptedAgent:
    """A WebSocket server on 127.0.0.1 that accepts any path. ``ws.jambonz.org`` and
    ``audio.jambonz.org`` are selected when offered (Twilio connections offer none); each
    connection is queued for ``accept(path)`` and read in the background."""

    def __init__(self) -> None:
        self._server: Server | None = None
        self.port = 0
        self._queues: defaultdict[str, asyncio.Queue[AgentPeer]] = defaultdict(asyncio.Queue)
        self.connections: defaultdict[str, int] = defaultdict(int)
        self.peers: list[AgentPeer] = []

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> ScriptedAgent:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            select_subprotocol=self._select,
            max_size=32 * 1024 * 1024,
            ping_interval=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), WAIT)

    @staticmethod
    def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        for name in (CONTROL, AUDIO):
            if name in offered:
                return name
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = urlsplit(ws.request.path).path
        peer = AgentPeer(ws, path)
        self.peers.append(peer)
        self.connections[path] += 1
        self._queues[path].put_nowait(peer)
        await peer._read()

    async def accept(self, path: str, within: float = WAIT) -> AgentPeer:
        """The next connection the worker opened on ``path``."""
        try:
            return await asyncio.wait_for(self._queues[path].get(), within)
        except TimeoutError:
            raise AssertionError(
                f"the worker did not connect to {path} within {within} s"
            ) from None


# --------------------------------------------------------------------------- the worker


def agent_route(match: str, url: str, *, protocol: str = "jambonz", **extra: Any) -> dict[str, Any]:
    return {"match": match, "action": "agent", "agent_url": url, "protocol": protocol, **extra}


@contextlib.asynccontextmanager
async def running_worker(
    data_dir: Path,
    routes: list[dict[str, Any]],
    trunks: dict[str, dict[str, Any]] | None = None,
    *,
    database_url: str | None = None,
    jwt_secret: str | None = None,
    api: dict[str, Any] | None = None,
    events: dict[str, Any] | None = None,
) -> AsyncIterator[Worker]:
    """A Worker on free loopback ports, closed on the way out. With ``database_url`` it keeps
    its journal and outbox there and serves the API on a free port (``jwt_secret`` signs its
    tokens; ``api`` and ``events`` add to those sections); without, events only go to the JSONL
    file."""
    sip_port = free_port()
    rtp_low = free_port(span=202)
    store: dict[str, Any] = {"store": False}
    if database_url is not None:
        store = {
            "store": True,
            "database_url": database_url,
            "api": {"port": 0, "jwt_secret": jwt_secret, **(api or {})},
            "events": events or {},
        }
    settings = load_settings(
        None,
        data_dir=str(data_dir),
        sip={"port": sip_port},
        rtp={"port_min": rtp_low, "port_max": rtp_low + 200},
        routes=routes,
        trunks=trunks or {},
        **store,
    )
    worker = Worker(settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()


@dataclass(eq=False)
class AgentCall:
    """One SIPp call into the worker, routed to the scripted agent's ``/app``, once its
    ``session:new`` has arrived (not acked: that is the test's first move)."""

    worker: Worker
    agent: ScriptedAgent
    sipp: Sipp
    ctl: AgentPeer
    new: dict[str, Any]

    async def finish(self) -> tuple[SippResult, SessionResult]:
        """Wait for SIPp to end and check it passed; (SIPp's result, the session's result)."""
        result = await self.sipp.wait()
        assert_sipp_ok(result)
        return result, await wait_result(self.worker, self.new["call_sid"])


@contextlib.asynccontextmanager
async def agent_call(
    tmp_path: Path,
    scenario: str,
    number: str,
    *,
    data_dir: Path | None = None,
    route: dict[str, Any] | None = None,
    duration_ms: int = 0,
    echo: bool = False,
) -> AsyncIterator[AgentCall]:
    """The common set-up: a scripted agent, a worker (``data_dir``, default ``tmp_path/data``)
    routing every number to the agent's ``/app`` (``route`` adds route settings), and a SIPp
    caller (``tmp_path/sipp``) running ``scenario`` to ``number``; yields when ``session:new``
    has arrived. Everything is closed on the way out."""
    async with ScriptedAgent() as agent:
        routes = [agent_route("*", agent.url("/app"), **(route or {}))]
        async with (
            running_worker(data_dir or tmp_path / "data", routes) as worker,
            caller(
                tmp_path / "sipp", worker, scenario, number, duration_ms=duration_ms, echo=echo
            ) as sipp,
        ):
            try:
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
            except AssertionError as exc:  # say what SIPp saw, the likelier culprit
                sipp.kill()
                raise AssertionError(f"{exc}\n{(await sipp.wait()).explain()}") from None
            yield AgentCall(worker, agent, sipp, ctl, new)


def sip_target(worker: Worker) -> str:
    return f"127.0.0.1:{worker.settings.sip.port}"


async def wait_result(worker: Worker, call_sid: str, within: float = WAIT) -> SessionResult:
    """The result of call ``call_sid`` once its session has finished."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        for result in worker.results:
            if result.call_sid == call_sid:
                return result
        if loop.time() > deadline:
            raise AssertionError(f"call {call_sid} did not finish within {within} s")
        await asyncio.sleep(0.02)


async def wait_results(worker: Worker, count: int, within: float = WAIT) -> list[SessionResult]:
    """The first ``count`` session results (fails if fewer finish within ``within``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(worker.results) < count:
        if loop.time() > deadline:
            raise AssertionError(
                f"{len(worker.results)} of {count} calls finished within {within} s"
            )
        await asyncio.sleep(0.02)
    return list(worker.results)


def live_session(worker: Worker, call_sid: str) -> CallSession:
    session = worker.sessions.get(call_sid)
    assert session is not None, f"no live session {call_sid}"
    return session


# --------------------------------------------------------------------------- SIPp


def caller(
    workdir: Path,
    worker: Worker,
    scenario: str,
    number: str,
    *,
    duration_ms: int = 0,
    echo: bool = False,
    timeout_s: float = 40.0,
) -> Sipp:
    """A SIPp UAC running ``scenarios/<scenario>.xml`` once, calling ``number`` at the worker
    (``duration_ms`` is SIPp's ``-d``, the scenario's plain ``<pause/>``; ``echo`` adds
    ``-rtp_echo``)."""
    return Sipp(
        workdir=workdir,
        remote=sip_target(worker),
        args=["-sf", str(SCENARIOS / f"{scenario}.xml"), "-s", number, "-m", "1", "-l", "1",
              "-d", str(duration_ms), *(["-rtp_echo"] if echo else [])],
        timeout_s=timeout_s,
    )  # fmt: skip


def callee(workdir: Path, *, calls: int = 1, timeout_s: float = 40.0) -> Sipp:
    """A SIPp UAS that answers ``calls`` calls with PCMU + telephone-event and echoes RTP."""
    return Sipp(
        workdir=workdir,
        remote=None,
        args=["-sf", str(SCENARIOS / "uas_echo.xml"), "-rtp_echo", "-m", str(calls)],
        timeout_s=timeout_s,
    )


def assert_sipp_ok(result: SippResult) -> None:
    assert result.returncode == 0, result.explain()


def final_statuses(result: SippResult) -> list[int]:
    """The final (>= 200) response codes SIPp received for its INVITE."""
    codes = []
    for message in result.received("SIP/2.0 "):
        first, _, rest = message.partition("\n")
        code = int(first.split()[1])
        if code >= 200 and "INVITE" in _header(rest, "CSeq"):
            codes.append(code)
    return codes


def _header(block: str, name: str) -> str:
    for line in block.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return ""


# --------------------------------------------------------------------------- HTTP files


class FileServer:
    """A minimal HTTP/1.1 server on 127.0.0.1 serving ``files`` (path -> bytes); counts GETs."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> FileServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            body = self.files.get(path)
            if body is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# --------------------------------------------------------------------------- audio maths


def tone(freq: float, seconds: float, rate: int = 8000, amplitude: float = 8000.0) -> bytes:
    """A sine tone as L16 LE."""
    t = np.arange(int(seconds * rate)) / rate
    return bytes((amplitude * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes())


def pattern(seconds: float, rate: int = 8000, seed: int = 7) -> bytes:
    """A recognisable signal for correlation: tone bursts of changing pitch, 100 ms on, 60 ms
    off, so no two stretches look alike."""
    rng = np.random.default_rng(seed)
    out: list[npt.NDArray[np.float64]] = []
    total = int(seconds * rate)
    made = 0
    while made < total:
        freq = float(rng.uniform(300, 3000))
        on = np.sin(2 * math.pi * freq * np.arange(int(0.1 * rate)) / rate) * 9000
        out += [on, np.zeros(int(0.06 * rate))]
        made += int(0.16 * rate)
    signal = np.concatenate(out)[:total]
    return bytes(signal.astype("<i2").tobytes())


def wav_bytes(pcm: bytes, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buffer.getvalue()


def samples(pcm: bytes) -> Samples:
    return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)


def rms(x: Samples) -> float:
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def pcap_reference(name: str = "g711a.pcap") -> Samples:
    """SIPp's PCMA capture decoded to 8 kHz samples, placed by RTP timestamp."""
    chunks: list[tuple[int, bytes]] = []
    for datagram in read_pcap(SIPP_SHARE / name).datagrams:
        rtp = datagram.payload
        if len(rtp) < 12 or rtp[1] & 0x7F != 8:
            continue
        (timestamp,) = struct.unpack_from("!I", rtp, 4)
        chunks.append((timestamp, alaw_decode(rtp[12:])))
    first = chunks[0][0]
    end = max(ts - first + len(pcm) // 2 for ts, pcm in chunks)
    out = np.zeros(end)
    for ts, pcm in chunks:
        x = samples(pcm)
        out[ts - first : ts - first + len(x)] = x
    return out


@dataclass(frozen=True)
class Match:
    """Where ``needle`` sits in ``haystack`` (samples) and how well it fits (normalised
    correlation, 1.0 = identical up to gain)."""

    lag: int
    score: float


def best_match(haystack: Samples, needle: Samples) -> Match:
    """Normalised cross-correlation of ``needle`` against every offset of ``haystack``."""
    n, m = len(haystack), len(needle)
    assert m, "empty needle"
    assert n >= m, f"haystack ({n}) shorter than needle ({m})"
    size = 1 << (n + m).bit_length()
    spectrum = np.fft.rfft(haystack, size) * np.conj(np.fft.rfft(needle, size))
    corr = np.fft.irfft(spectrum, size)[: n - m + 1]
    energy = np.convolve(haystack * haystack, np.ones(m), mode="valid")
    norm = np.sqrt(np.maximum(energy, 1e-9) * float(np.dot(needle, needle)))
    scores = corr / norm
    lag = int(np.argmax(scores))
    return Match(lag, float(scores[lag]))


def envelope(x: Samples, rate: int, window_ms: int = 20) -> Samples:
    """RMS per ``window_ms`` window."""
    size = rate * window_ms // 1000
    count = len(x) // size
    frames = x[: count * size].reshape(count, size)
    rms_per_window: Samples = np.sqrt(np.mean(frames * frames, axis=1))
    return rms_per_window


def decode_mp3(path: str | Path, rate: int = 8000) -> tuple[Samples, Samples]:
    """The recording decoded by ffmpeg: (left, right) at ``rate``."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "2", "-ar", str(rate),
         "-"],
        capture_output=True,
        check=False,
        timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    both = samples(out.stdout)
    return both[0::2], both[1::2]


def first_with(items: Iterable[dict[str, Any]], **wanted: Any) -> dict[str, Any] | None:
    for item in items:
        if all(item.get(k) == v for k, v in wanted.items()):
            return item
    return None


def sipp_times(result: SippResult, direction: str, start_line: str) -> list[float]:
    """Wall-clock times (epoch seconds) of the messages SIPp ``sent``/``received`` whose first
    line starts with ``start_line``, from its ``-trace_msg`` log."""
    times: list[float] = []
    for block in result.messages.split("\n-----------------------------------------------"):
        lines = block.strip("\n").split("\n")
        if len(lines) < 3 or f"message {direction}" not in lines[1]:
            continue
        stamp = lines[0].lstrip("- ").strip()
        first = next((line for line in lines[2:] if line.strip()), "")
        if first.startswith(start_line):
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return times
