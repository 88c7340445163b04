"""The asyncio side of the agent protocols: thin adapters that put the sans-I/O cores on real
``websockets`` client connections. :class:`JambonzConnection` drives :class:`JambonzControl`
(acks, timers, reconnect); :class:`ListenConnection` and :class:`TwilioConnection` carry call
audio with a priority text lane and a bounded audio lane.

Rules:

1. The worker is the WebSocket client. ``connect()`` raises :class:`AgentConnectError` when the
   agent cannot be reached: refused, reset, timed out, an HTTP status instead of the upgrade, or
   a missing subprotocol (``ws.jambonz.org`` / ``audio.jambonz.org`` must be selected).
2. jambonz control: the first connect honours the URL's retry fragment ``#rc=N&rp=ct,4xx,...``
   (``rc`` capped at 5, default 5; ``rp`` default ``ct``; the fragment is never sent). Unlike
   jambonz (feature-server#1565) a handshake timeout counts as a connect error (``ct``, also
   ``rt``).
3. jambonz control: the core decides, the adapter obeys. Every frame goes to
   ``JambonzControl.receive``; the writer task sends ``messages_to_send()`` only while the socket is
   open; one ``loop.call_at`` timer drives ``handle_timeout`` at ``next_timeout()``; a close from
   the far end goes to ``on_close`` and its :class:`ReconnectDecision` is followed (backoff,
   ``session:reconnect`` first, held messages after its ack). ``session_new`` / ``verb_hook``
   never raise for a missing ack: they return the :class:`AckReceived`, :class:`AckTimedOut` or
   :class:`AckFailed` outcome.
4. Audio lanes: ``send_audio`` / ``send_media`` are synchronous and never block. Frames wait in an
   :class:`AudioQueue` bounded in milliseconds of audio; when it is full the oldest frames are
   dropped and counted, so a stalled agent never adds more than ``max_queue_ms`` of latency.
   When nothing waits (the writer task is idle, no text or audio queued, the socket open and
   taking data) a frame is written to the socket at once, in the tick that made it: what
   ``ws.send`` does, without the writer task's wake-up (a loop iteration later, behind every
   other call of the tick) and its await. ``send_text`` (DTMF, marks, ``playDone``) jumps
   ahead of queued audio. An open audio lane is
   read at scrape time by ``metrics`` (``worker.metrics``: queued audio, drops), when given.
5. Unsolicited events go to ``on_event`` in arrival order; on the audio lanes, from the
   event-loop callback that read them (``LaneSocket``, ``worker/agent/lanesocket.py``), not from
   a task woken per frame. An exception in ``on_event`` is logged and never stops the
   connection. Closing is idempotent, leaves no task behind and takes at most about three
   ``close_timeout`` (drain, closing handshake, reader) even against a stalled peer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State
from websockets.typing import Subprotocol

from worker.agent import listen_audio, twilio
from worker.agent.jambonz import (
    ACK_TIMEOUT,
    SUBPROTOCOL,
    TYPES_WANTING_ACK,
    AckDiscarded,
    AckFailed,
    AckReceived,
    AckTimedOut,
    CommandReceived,
    ControlEvent,
    ControlState,
    HangupRequired,
    JambonzControl,
    OutgoingMessage,
    backoff_delays,
)
from worker.agent.jambonz import (
    InvalidMessage as InvalidAppMessage,
)
from worker.agent.lanesocket import LaneSocket
from worker.agent.listen_audio import ListenAudioProtocol, ListenEvent
from worker.agent.twilio import TwilioEvent, TwilioStream
from worker.agent.verbs import Hook
from worker.errors import LocalError, RemoteError
from worker.metrics import WorkerMetrics

__all__ = [
    "AUDIO_MAX_SIZE",
    "CONTROL_MAX_SIZE",
    "DEFAULT_CONNECT_RETRIES",
    "DEFAULT_MAX_QUEUE_MS",
    "DEFAULT_OPEN_TIMEOUT",
    "AckOutcome",
    "AgentConnectError",
    "AudioQueue",
    "ConnectionLost",
    "JambonzConnection",
    "JambonzConnectionEvent",
    "ListenClosed",
    "ListenConnection",
    "ListenConnectionEvent",
    "Reconnected",
    "RetryPolicy",
    "TwilioClosed",
    "TwilioConnection",
    "TwilioConnectionEvent",
    "parse_retry_fragment",
]

DEFAULT_OPEN_TIMEOUT = 5.0
"""Seconds for TCP connect + the WebSocket handshake."""
DEFAULT_CLOSE_TIMEOUT = 2.0
"""Seconds a close may take (draining the final frames, then the closing handshake)."""
MESSAGE_TOO_BIG = 1009
CONTROL_MAX_SIZE = 24 * 1024
"""Largest frame accepted from a jambonz app (``JAMBONES_WS_MAX_PAYLOAD`` default)."""
AUDIO_MAX_SIZE = 16 * 1024 * 1024
"""Largest frame accepted on an audio socket (``playAudio`` clips are base64 in one frame)."""
DEFAULT_MAX_QUEUE_MS = 300.0
"""Audio allowed to wait for a slow socket before the oldest is dropped."""
DEFAULT_CONNECT_RETRIES = 5
"""Retries of the first jambonz connect when the URL has no ``rc`` (PROTOCOLS.md §1.8)."""
MAX_CONNECT_RETRIES = 5
NORMAL_CLOSURE = 1000
ABNORMAL_CLOSURE = 1006

_log = logging.getLogger("worker.agent")

Logger: TypeAlias = logging.Logger | logging.LoggerAdapter[Any]


# --------------------------------------------------------------------------- errors and events


ConnectErrorKind: TypeAlias = Literal[
    "refused",
    "reset",
    "timeout",
    "unreachable",
    "status",
    "subprotocol",
    "handshake",
    "url",
    "closed",
]


class AgentConnectError(RemoteError):
    """The agent's WebSocket could not be opened. ``kind`` says why; ``status`` is the HTTP
    status when the server answered without upgrading. The message never carries credentials."""

    def __init__(
        self, url: str, kind: ConnectErrorKind, detail: str, status: int | None = None
    ) -> None:
        super().__init__(f"cannot connect to {url}: {detail}")
        self.url = url
        self.kind = kind
        self.status = status


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The far end closed the control socket (or it dropped) with ``code``. ``reconnecting``:
    the connection is being re-established; ``False`` means the agent is gone (1000 = it ended
    the session on purpose) and the session decides what to do."""

    code: int
    reason: str
    reconnecting: bool


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The control socket is open again and the agent acked ``session:reconnect``."""

    attempt: int


@dataclass(frozen=True, slots=True)
class ListenClosed:
    """The listen/stream audio socket closed (``code`` as received, 1006 if it just dropped)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class TwilioClosed:
    """The Media Streams socket closed (``code`` as received, 1006 if it just dropped)."""

    code: int
    reason: str


AckOutcome: TypeAlias = AckReceived | AckTimedOut | AckFailed
JambonzConnectionEvent: TypeAlias = (
    CommandReceived | InvalidAppMessage | HangupRequired | ConnectionLost | Reconnected
)
ListenConnectionEvent: TypeAlias = ListenEvent | ListenClosed
TwilioConnectionEvent: TypeAlias = TwilioEvent | TwilioClosed


# --------------------------------------------------------------------------- retry fragment

_RETRY_CLASSES = frozenset({"ct", "rt", "4xx", "5xx", "all"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and for which errors, the first connect is retried (jambonz ``#rc=&rp=``)."""

    retries: int = DEFAULT_CONNECT_RETRIES
    retry_on: frozenset[str] = field(default_factory=lambda: frozenset({"ct"}))

    def allows(self, error: AgentConnectError) -> bool:
        """Whether ``error`` is one this policy retries."""
        if error.kind in ("url", "closed"):
            return False
        if "all" in self.retry_on:
            return True
        if error.kind in ("refused", "reset"):
            return "ct" in self.retry_on
        if error.kind == "timeout":
            return bool({"ct", "rt"} & self.retry_on)
        if error.kind == "status" and error.status is not None:
            return f"{error.status // 100}xx" in self.retry_on
        return False


def parse_retry_fragment(url: str) -> tuple[str, RetryPolicy]:
    """Split ``wss://host/path#rc=3&rp=ct,5xx`` into the URL to dial (no fragment) and the
    policy. Missing or unreadable values keep the defaults; ``rc`` is capped at 5."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, RetryPolicy()
    params = urllib.parse.parse_qs(fragment)
    retries = DEFAULT_CONNECT_RETRIES
    raw_rc = params.get("rc", [""])[0]
    if raw_rc.isdigit():
        retries = min(int(raw_rc), MAX_CONNECT_RETRIES)
    retry_on = frozenset({"ct"})
    if "rp" in params:
        wanted = {p.strip() for p in ",".join(params["rp"]).split(",")} & _RETRY_CLASSES
        retry_on = frozenset(wanted) or retry_on
    return base, RetryPolicy(retries, retry_on)


# --------------------------------------------------------------------------- opening a socket


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path``: no credentials, query or fragment (safe for logs);
    ``<invalid URL>`` when it cannot be parsed. Never raises."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _basic_auth(url: str, username: str | None, password: str | None) -> dict[str, str]:
    if username is None and password is None:
        return {}
    try:
        in_url = urllib.parse.urlsplit(url).username is not None
    except ValueError:
        in_url = False  # connect() reports the malformed URL
    if in_url:
        raise LocalError("credentials given both in the URL and as username/password")
    token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


async def _open_websocket(
    url: str,
    *,
    subprotocol: str | None,
    headers: Mapping[str, str],
    open_timeout: float,
    close_timeout: float,
    max_size: int,
    write_limit: int,
) -> LaneSocket:
    """Open one client connection, turning every failure into :class:`AgentConnectError`."""
    shown = redact_url(url)
    try:
        _ = urllib.parse.urlsplit(url).port  # raises for a bad host or port
    except ValueError as exc:
        raise AgentConnectError(shown, "url", f"invalid URL ({exc})") from None
    try:
        ws = await connect(
            url,
            subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
            additional_headers=dict(headers) or None,
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            write_limit=write_limit,
            compression=None,
            proxy=None,
            create_connection=LaneSocket,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise AgentConnectError(
            shown, "status", f"HTTP {status} instead of a WebSocket upgrade", status
        ) from None
    except InvalidURI as exc:
        raise AgentConnectError(shown, "url", f"invalid URL ({exc})") from None
    except TimeoutError:
        raise AgentConnectError(
            shown, "timeout", f"no WebSocket handshake within {open_timeout:g} s"
        ) from None
    except ConnectionRefusedError:
        raise AgentConnectError(shown, "refused", "connection refused") from None
    except (ConnectionResetError, ConnectionAbortedError, EOFError) as exc:
        raise AgentConnectError(shown, "reset", f"connection reset ({exc})") from None
    except InvalidMessage as exc:
        kind: ConnectErrorKind = "reset" if isinstance(exc.__cause__, EOFError) else "handshake"
        raise AgentConnectError(shown, kind, f"bad handshake response ({exc})") from None
    except InvalidHandshake as exc:
        raise AgentConnectError(shown, "handshake", f"handshake failed ({exc})") from None
    except OSError as exc:
        raise AgentConnectError(shown, "unreachable", f"{exc.strerror or exc}") from None
    if subprotocol is not None and ws.subprotocol != subprotocol:
        await ws.close(NORMAL_CLOSURE)
        chosen = repr(ws.subprotocol) if ws.subprotocol else "none"
        raise AgentConnectError(
            shown,
            "subprotocol",
            f"the server did not select subprotocol {subprotocol!r} (it selected {chosen})",
        )
    assert isinstance(ws, LaneSocket)
    return ws


def _closed_code(ws: ClientConnection) -> tuple[int, str]:
    """Why a socket closed: the peer's close frame, else ours (1009 when the peer sent a frame
    over the size limit), else 1006 (the connection just dropped)."""
    protocol = ws.protocol
    close = protocol.close_rcvd or protocol.close_sent
    if close is None:
        return ABNORMAL_CLOSURE, ""
    return close.code, close.reason


async def _cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


# --------------------------------------------------------------------------- the audio queue


class AudioQueue:
    """A FIFO of audio frames bounded by duration.

    ``push`` never blocks: when the queued audio would exceed ``max_ms``, the oldest frames are
    dropped (``dropped_frames``, ``dropped_ms``) until it fits; the newest frame is always kept.
    ``pop`` returns a frame with its stream offset in bytes (counting dropped audio too), so a
    timestamp stays true to the call's clock.
    """

    __slots__ = (
        "_bytes",
        "_bytes_per_ms",
        "_frames",
        "_max_bytes",
        "_position",
        "dropped_bytes",
        "dropped_frames",
    )

    def __init__(self, max_ms: float, bytes_per_ms: float) -> None:
        if max_ms <= 0 or bytes_per_ms <= 0:
            raise LocalError("max_ms and bytes_per_ms must be positive")
        self._frames: deque[tuple[bytes, int]] = deque()
        self._bytes_per_ms = bytes_per_ms
        self._max_bytes = max(1, math.floor(max_ms * bytes_per_ms))
        self._bytes = 0
        self._position = 0
        self.dropped_frames = 0
        self.dropped_bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def queued_ms(self) -> float:
        return self._bytes / self._bytes_per_ms

    @property
    def dropped_ms(self) -> float:
        return self.dropped_bytes / self._bytes_per_ms

    def push(self, frame: bytes) -> None:
        frames = self._frames
        frames.append((frame, self._position))
        size = len(frame)
        self._position += size
        self._bytes += size
        while self._bytes > self._max_bytes and len(frames) > 1:
            old, _ = frames.popleft()
            self._bytes -= len(old)
            self.dropped_frames += 1
            self.dropped_bytes += len(old)

    def pop(self) -> tuple[bytes, int]:
        """The oldest frame and its stream offset (bytes); ``IndexError`` when empty."""
        frame, offset = self._frames.popleft()
        self._bytes -= len(frame)
        return frame, offset

    def bypass(self, frame: bytes) -> int:
        """The stream offset of a frame sent without waiting in the queue (it takes its place
        in the stream all the same)."""
        offset = self._position
        self._position += len(frame)
        return offset

    def clear(self) -> int:
        """Forget every queued frame (not counted as dropped); returns how many there were."""
        count = len(self._frames)
        self._frames.clear()
        self._bytes = 0
        return count


# --------------------------------------------------------------------------- audio lanes

_E = TypeVar("_E")


class _AudioLaneConnection(Generic[_E]):
    """A WebSocket client with a priority text lane and a bounded audio lane.

    Subclasses say what goes first after connect, how a queued frame is encoded, what goes last
    on a graceful close, how frames from the agent are parsed and what the close event is.
    """

    subprotocol: ClassVar[str | None] = None

    def __init__(
        self,
        url: str,
        *,
        bytes_per_ms: float,
        max_queue_ms: float,
        headers: Mapping[str, str],
        open_timeout: float,
        close_timeout: float,
        max_size: int,
        on_event: Callable[[_E], None] | None,
        logger: Logger | None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.url = url
        self._metrics = metrics
        self.log: Logger = logger if logger is not None else _log
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self._headers = dict(headers)
        self._max_size = max_size
        # About 200 ms of audio (with framing) may sit in the transport before send() waits;
        # beyond that frames wait in the bounded queue, where the oldest can be dropped.
        self._write_limit = max(4096, math.ceil(bytes_per_ms * 200))
        self._on_event = on_event
        self._texts: deque[str] = deque()
        self._audio = AudioQueue(max_queue_ms, bytes_per_ms)
        self._wake = asyncio.Event()
        self._parked = False  # the writer task waits for work: nothing of ours is in flight
        self._ws: LaneSocket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._ended = False  # closing, or the socket is gone: lanes accept nothing more
        self._socket_closed = False
        self._closing = False
        self._graceful = True
        self._close_reported = False
        self._done = asyncio.Event()
        self.sent_frames = 0
        self.sent_texts = 0
        self.discarded_texts = 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """The socket is open and not closing."""
        return self._ws is not None and not self._ended

    @property
    def dropped_frames(self) -> int:
        """Audio frames dropped because the agent's socket could not keep up."""
        return self._audio.dropped_frames

    @property
    def dropped_ms(self) -> float:
        return self._audio.dropped_ms

    @property
    def queued_ms(self) -> float:
        return self._audio.queued_ms

    def _closed_meanwhile(self) -> bool:
        """``close()`` ran while we awaited (a method, so type checkers do not narrow it)."""
        return self._closing

    # ------------------------------------------------------------------ subclass hooks

    def _first_messages(self) -> list[str]:
        raise NotImplementedError

    def _encode_audio(self, frame: bytes, offset: int) -> str | bytes:
        raise NotImplementedError

    def _final_messages(self) -> list[str | bytes]:
        raise NotImplementedError

    def _receive(self, data: str | bytes, now: float) -> list[_E]:
        raise NotImplementedError

    def _closed_event(self, code: int, reason: str) -> _E:
        raise NotImplementedError

    # ------------------------------------------------------------------ connect

    async def connect(self) -> None:
        """Open the socket and send the first messages; raises :class:`AgentConnectError`."""
        if self._ws is not None or self._closing:
            raise LocalError("connect() may be called once, before close()")
        ws = await _open_websocket(
            self.url,
            subprotocol=self.subprotocol,
            headers=self._headers,
            open_timeout=self.open_timeout,
            close_timeout=self.close_timeout,
            max_size=self._max_size,
            write_limit=self._write_limit,
        )
        shown = redact_url(self.url)
        if self._closed_meanwhile():
            await ws.close(NORMAL_CLOSURE)
            raise AgentConnectError(shown, "closed", "closed while connecting")
        try:
            for message in self._first_messages():
                await ws.send(message)
        except ConnectionClosed as exc:
            await ws.close(NORMAL_CLOSURE)
            raise AgentConnectError(shown, "reset", f"closed right after connect ({exc})") from None
        except BaseException:
            # Cancelled (the call ended) while sending the first frames: the socket is not ours
            # to keep, and nobody else knows about it yet.
            ws.transport.abort()
            raise
        self._ws = ws
        if self._metrics is not None:
            self._metrics.lane_opened(self)
        self.log.info("agent socket open", extra={"url": shown, "subprotocol": self.subprotocol})
        self._writer = asyncio.create_task(self._write_loop(ws), name=f"{shown} writer")
        self._reader = asyncio.create_task(self._read_loop(ws), name=f"{shown} reader")

    # ------------------------------------------------------------------ sending

    def send_text(self, text: str) -> None:
        """Queue a text frame ahead of all queued audio (control before media). Non-blocking;
        ignored (counted in ``discarded_texts``) once the socket is closing or gone."""
        if self._ended:
            self.discarded_texts += 1
            return
        self._texts.append(text)
        self._wake.set()

    async def _write_loop(self, ws: ClientConnection) -> None:
        texts, audio, wake = self._texts, self._audio, self._wake
        try:
            while not self._socket_closed:
                if texts:
                    await ws.send(texts[0])
                    texts.popleft()
                    self.sent_texts += 1
                elif audio:
                    frame, offset = audio.pop()
                    await ws.send(self._encode_audio(frame, offset))
                    self.sent_frames += 1
                elif self._closing:
                    if self._graceful:
                        for message in self._final_messages():
                            await ws.send(message)
                    return
                else:
                    wake.clear()
                    self._parked = True
                    try:
                        await wake.wait()
                    finally:
                        self._parked = False
        except ConnectionClosed:
            return

    def _queue_audio(self, frame: bytes) -> None:
        """One audio frame for the agent: written at once when nothing waits, else queued."""
        if self._ended:
            return
        ws = self._ws
        if (
            self._parked
            and ws is not None
            and not self._audio
            and not self._texts
            and not ws.paused
            and ws.protocol.state is State.OPEN
        ):
            message = self._encode_audio(frame, self._audio.bypass(frame))
            if isinstance(message, bytes):
                ws.write_message(message, text=False)
            else:
                ws.write_message(message.encode(), text=True)
            self.sent_frames += 1
            return
        self._audio.push(frame)
        self._wake.set()

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self, ws: LaneSocket) -> None:
        loop = asyncio.get_running_loop()

        def on_message(message: str | bytes) -> None:
            for event in self._receive(message, loop.time()):
                self._deliver(event)

        try:
            # From now on each message is handed over as it is read (worker/agent/lanesocket.py);
            # those read before wait in recv's queue, and this loop drains them first, in order
            # (nothing is read until it waits): the socket hands none over until it has them.
            ws.on_message = on_message
            async for message in ws:
                ws.taken()
                on_message(message)
        except ConnectionClosed:
            pass
        self._socket_closed = True
        self._ended = True
        self._wake.set()
        code, reason = _closed_code(ws)
        if not self._closing:
            self.log.info("agent closed the audio socket", extra={"code": code, "reason": reason})
        self._report_closed(code, reason)

    def _deliver(self, event: _E) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            self.log.exception("agent event handler failed", extra={"event": type(event).__name__})

    def _report_closed(self, code: int, reason: str) -> None:
        if not self._close_reported:
            self._close_reported = True
            self._deliver(self._closed_event(code, reason))

    # ------------------------------------------------------------------ closing

    async def close(self, graceful: bool = True) -> None:
        """Close with 1000. ``graceful``: first send the queued texts and audio, then the final
        messages (see the subclass); otherwise drop them. Idempotent."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        self._ended = True
        self._graceful = graceful
        ws = self._ws
        try:
            if ws is None:
                return
            if not graceful:
                self._texts.clear()
                self._audio.clear()
            self._wake.set()
            if self._writer is not None:
                await asyncio.wait({self._writer}, timeout=self.close_timeout)
            await ws.close(NORMAL_CLOSURE)
            if self._reader is not None:
                await asyncio.wait({self._reader}, timeout=self.close_timeout)
        finally:
            await _cancel_and_wait(self._writer, self._reader)
            if ws is not None:
                self._report_closed(*_closed_code(ws))
            if self._metrics is not None:
                self._metrics.lane_closed(self)
            if self.dropped_frames:
                self.log.info(
                    "agent audio dropped",
                    extra={"frames": self.dropped_frames, "ms": round(self.dropped_ms)},
                )
            self._done.set()


class ListenConnection(_AudioLaneConnection[ListenConnectionEvent]):
    """One jambonz ``listen``/``stream`` audio socket (``audio.jambonz.org``).

    ``connect()`` sends ``metadata_text`` as the first frame. ``send_audio`` takes the frames
    :meth:`ListenAudioProtocol.audio_frame` builds; ``send_text`` takes DTMF, mark and
    ``playDone`` texts. What the agent sends arrives at ``on_event`` as the protocol's events;
    the socket closing (whoever closed it) arrives once as :class:`ListenClosed`. A graceful
    ``close()`` ends with a zero-length binary frame (mod_audio_fork's end of audio). There is no
    reconnect: jambonz ends the verb when this socket drops.
    """

    subprotocol = listen_audio.SUBPROTOCOL

    def __init__(
        self,
        url: str,
        protocol: ListenAudioProtocol,
        metadata_text: str,
        *,
        username: str | None = None,
        password: str | None = None,
        on_event: Callable[[ListenConnectionEvent], None] | None = None,
        max_queue_ms: float = DEFAULT_MAX_QUEUE_MS,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        max_size: int = AUDIO_MAX_SIZE,
        logger: Logger | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        channels = 2 if protocol.mix_type == "stereo" else 1
        super().__init__(
            url,
            bytes_per_ms=protocol.sample_rate * 2 * channels / 1000,
            max_queue_ms=max_queue_ms,
            headers=_basic_auth(url, username, password),
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            on_event=on_event,
            logger=logger,
            metrics=metrics,
        )
        self.protocol = protocol
        self.metadata_text = metadata_text

    def send_audio(self, pcm: bytes) -> None:
        """Send or queue one binary audio frame (L16 LE at the socket's rate and mix). Never
        blocks."""
        self._queue_audio(pcm)

    def _first_messages(self) -> list[str]:
        return [self.metadata_text]

    def _encode_audio(self, frame: bytes, offset: int) -> bytes:
        return frame

    def _final_messages(self) -> list[str | bytes]:
        return [self.protocol.end_of_audio()]

    def _receive(self, data: str | bytes, now: float) -> list[ListenConnectionEvent]:
        return list(self.protocol.receive(data, now))

    def _closed_event(self, code: int, reason: str) -> ListenClosed:
        return ListenClosed(code, reason)


class TwilioConnection(_AudioLaneConnection[TwilioConnectionEvent]):
    """One Twilio Media Streams socket (no subprotocol), with the worker in Twilio's place.

    ``connect()`` sends ``connected`` then ``start``. ``send_media`` takes µ-law 8 kHz bytes;
    each queued chunk becomes a ``media`` message when it is sent (sequence numbers stay in wire
    order; the timestamp is the chunk's place in the call, dropped audio included).
    ``send_text`` / ``send_dtmf`` / ``send_mark`` jump ahead of queued media. What the agent
    sends arrives at ``on_event``; the socket closing arrives once as :class:`TwilioClosed`. A
    graceful ``close()`` ends with ``stop``.
    """

    subprotocol = None

    def __init__(
        self,
        url: str,
        stream: TwilioStream,
        *,
        on_event: Callable[[TwilioConnectionEvent], None] | None = None,
        max_queue_ms: float = DEFAULT_MAX_QUEUE_MS,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        max_size: int = AUDIO_MAX_SIZE,
        logger: Logger | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        super().__init__(
            url,
            bytes_per_ms=twilio.SAMPLE_RATE / 1000,
            max_queue_ms=max_queue_ms,
            headers={},
            open_timeout=open_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            on_event=on_event,
            logger=logger,
            metrics=metrics,
        )
        self.stream = stream

    def send_media(self, ulaw: bytes) -> None:
        """Send or queue µ-law 8 kHz caller audio. Never blocks."""
        self._queue_audio(ulaw)

    def send_dtmf(self, digit: str) -> bool:
        """Send a caller key press; ``False`` for keys Twilio cannot carry (A-D) or when the
        socket is closing."""
        if self._ended:
            return False
        text = self.stream.dtmf(digit)
        if text is None:
            return False
        self.send_text(text)
        return True

    def send_mark(self, name: str) -> None:
        """Echo a mark (its audio played, or was cleared)."""
        if not self._ended:
            self.send_text(self.stream.mark(name))

    def _first_messages(self) -> list[str]:
        return [self.stream.connected(), self.stream.start()]

    def _encode_audio(self, frame: bytes, offset: int) -> str:
        return self.stream.media(frame, timestamp_ms=offset * 1000 // twilio.SAMPLE_RATE)

    def _final_messages(self) -> list[str | bytes]:
        return [self.stream.stop()]

    def _receive(self, data: str | bytes, now: float) -> list[TwilioConnectionEvent]:
        return list(self.stream.receive(data, now))

    def _closed_event(self, code: int, reason: str) -> TwilioClosed:
        return TwilioClosed(code, reason)


# --------------------------------------------------------------------------- jambonz control


class JambonzConnection:
    """One call's ``ws.jambonz.org`` control socket, with the worker in jambonz's place.

    Typical use: ``await connect()``, ``await session_new(data)``, then ``verb_hook`` for each
    hook and ``call_status`` on every status change; commands and connection news arrive at
    ``on_event``; ``await close()`` when the call ends. After :class:`HangupRequired` the agent
    is gone for good: end the call (and ``close()``).
    """

    def __init__(
        self,
        url: str,
        call_sid: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ack_timeout: float = ACK_TIMEOUT,
        max_reconnects: int = 5,
        connect_retries: int | None = None,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        max_size: int = CONTROL_MAX_SIZE,
        on_event: Callable[[JambonzConnectionEvent], None] | None = None,
        logger: Logger | None = None,
    ) -> None:
        self.url, policy = parse_retry_fragment(url)
        if connect_retries is not None:
            policy = RetryPolicy(min(connect_retries, MAX_CONNECT_RETRIES), policy.retry_on)
        self.retry_policy = policy
        self.control = JambonzControl(
            call_sid, ack_timeout=ack_timeout, max_reconnects=max_reconnects
        )
        self.log: Logger = logger if logger is not None else _log
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self._headers = _basic_auth(self.url, username, password)
        self._max_size = max_size
        self._on_event = on_event
        self._shown = redact_url(self.url)
        self._waiters: dict[str, asyncio.Future[AckOutcome]] = {}
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._connecting = False
        self._closing = False
        self._closing_event = asyncio.Event()
        self._done = asyncio.Event()
        self.lost_messages = 0
        """Messages taken from the core that the socket failed to carry."""

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> ControlState:
        return self.control.state

    @property
    def notify_events(self) -> bool:
        """Whether ``verb_status`` sends anything (set from a ``config`` verb's notifyEvents)."""
        return self.control.notify_events

    @notify_events.setter
    def notify_events(self, value: bool) -> None:
        self.control.notify_events = value

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ws.state is State.OPEN and not self._closing

    def counters(self) -> tuple[int, int, int]:
        """(invalid messages answered, late acks, reconnect attempts) so far."""
        core = self.control
        return core.invalid_messages, core.late_acks, core.reconnects

    # ------------------------------------------------------------------ connect

    async def connect(self) -> None:
        """Open the control socket, retrying as the URL fragment allows. Raises
        :class:`AgentConnectError` (and fails whatever was already waiting for an ack)."""
        if self._ws is not None or self._connecting or self._closing:
            raise LocalError("connect() may be called once, before close()")
        self._connecting = True
        loop = asyncio.get_running_loop()
        delays = backoff_delays()
        attempt = 0
        try:
            while True:
                if self._closing:
                    raise AgentConnectError(self._shown, "closed", "closed while connecting")
                try:
                    ws = await self._open()
                except AgentConnectError as exc:
                    if self._closing:
                        raise
                    if attempt < self.retry_policy.retries and self.retry_policy.allows(exc):
                        attempt += 1
                        delay = next(delays)
                        self.log.info(
                            "agent connect failed, retrying",
                            extra={"url": self._shown, "why": str(exc), "delay": delay},
                        )
                        await self._sleep_unless_closing(delay)
                        continue
                    self._resolve(self.control.on_connect_failed(loop.time()).failed)
                    self.log.warning(
                        "agent unreachable", extra={"url": self._shown, "why": str(exc)}
                    )
                    raise
                if self._closed_meanwhile():
                    await ws.close(NORMAL_CLOSURE)
                    raise AgentConnectError(self._shown, "closed", "closed while connecting")
                break
            self.log.info("agent control socket open", extra={"url": self._shown})
            self._attach(ws)
            self._run_task = asyncio.create_task(self._run(ws), name=f"{self._shown} control")
        finally:
            self._connecting = False

    def _closed_meanwhile(self) -> bool:
        """``close()`` ran while we awaited (a method, so type checkers do not narrow it)."""
        return self._closing

    async def _sleep_unless_closing(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing_event.wait(), delay)

    async def _open(self) -> ClientConnection:
        return await _open_websocket(
            self.url,
            subprotocol=SUBPROTOCOL,
            headers=self._headers,
            open_timeout=self.open_timeout,
            close_timeout=self.close_timeout,
            max_size=self._max_size,
            write_limit=32 * 1024,
        )

    def _attach(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.control.connection_made(asyncio.get_running_loop().time())
        self._writer = asyncio.create_task(self._write_loop(ws), name=f"{self._shown} writer")
        self._kick()

    # ------------------------------------------------------------------ requests

    async def session_new(self, data: Mapping[str, Any]) -> AckOutcome:
        """Send ``session:new`` and wait for its ack (or its failure)."""
        return await self._await_ack(self.control.send_session_new(data, self._now()))

    async def verb_hook(
        self,
        hook: Hook,
        call_info: Mapping[str, Any],
        results: Mapping[str, Any] | None = None,
        verb_id: str | None = None,
    ) -> AckOutcome:
        """Send ``verb:hook`` and wait for its ack; ``AckReceived.verbs`` may replace the app."""
        message = self.control.send_verb_hook(
            hook, call_info, results, self._now(), verb_id=verb_id
        )
        return await self._await_ack(message)

    async def request(
        self, type: str, data: Mapping[str, Any], *, hook: Hook | None = None
    ) -> AckOutcome:
        """Any other ack-awaiting message (``session:redirect``, ``dial:confirm``, ...)."""
        if type not in TYPES_WANTING_ACK:
            raise LocalError(f"{type} is not acked: use notify()")
        return await self._await_ack(self.control.send(type, data, self._now(), hook=hook))

    def call_status(
        self, call_info: Mapping[str, Any], duration: float | None = None
    ) -> OutgoingMessage:
        """``call:status`` (no ack); ``duration`` only with ``completed``."""
        message = self.control.send_call_status(call_info, self._now(), duration=duration)
        self._kick()
        return message

    def verb_status(
        self,
        event: str,
        *,
        verb: str,
        verb_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> OutgoingMessage | None:
        """``verb:status`` (no ack) when ``notify_events`` is on, else nothing."""
        message = self.control.send_verb_status(
            event, self._now(), verb=verb, verb_id=verb_id, extra=extra
        )
        self._kick()
        return message

    def verb_error(
        self,
        error: str,
        *,
        verb: str,
        verb_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> OutgoingMessage:
        """``jambonz:error`` for a failed verb (no ack)."""
        message = self.control.send_verb_error(
            error, self._now(), verb=verb, verb_id=verb_id, extra=extra
        )
        self._kick()
        return message

    def notify(
        self, type: str, data: Mapping[str, Any], *, hook: Hook | None = None
    ) -> OutgoingMessage:
        """Any other notification (``llm:event``, ``tts:streaming-event``, ...)."""
        if type in TYPES_WANTING_ACK:
            raise LocalError(f"{type} wants an ack: use request()")
        message = self.control.send(type, data, self._now(), hook=hook)
        self._kick()
        return message

    async def _await_ack(self, message: OutgoingMessage) -> AckOutcome:
        if message.discarded:
            return AckFailed(message.msgid, message.type, message.msgid, "connection closed")
        future: asyncio.Future[AckOutcome] = asyncio.get_running_loop().create_future()
        self._waiters[message.msgid] = future
        self._kick()
        try:
            return await future
        finally:
            self._waiters.pop(message.msgid, None)

    # ------------------------------------------------------------------ core plumbing

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _kick(self) -> None:
        """After any call into the core: wake the writer and re-arm the timer."""
        self._wake.set()
        deadline = self.control.next_timeout()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not self._closing:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._handle(self.control.handle_timeout(self._now()))
        self._kick()

    def _handle(self, events: Iterable[ControlEvent]) -> None:
        for event in events:
            if isinstance(event, AckReceived | AckTimedOut | AckFailed):
                waiter = self._waiters.pop(event.request_msgid, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(event)
                elif not isinstance(event, AckReceived):
                    self.log.info(
                        "agent ack failed", extra={"for": event.for_type, "outcome": repr(event)}
                    )
            elif isinstance(event, AckDiscarded):
                self.log.info(
                    "agent ack discarded", extra={"msgid": event.msgid, "why": event.reason}
                )
            else:
                if isinstance(event, InvalidAppMessage):
                    self.log.info("invalid message from agent", extra={"why": event.details})
                elif isinstance(event, HangupRequired):
                    self.log.warning("agent lost for good", extra={"why": event.reason})
                self._emit(event)

    def _resolve(self, failed: Iterable[AckFailed]) -> None:
        self._handle(failed)

    def _emit(self, event: JambonzConnectionEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            self.log.exception("agent event handler failed", extra={"event": type(event).__name__})

    # ------------------------------------------------------------------ tasks

    async def _write_loop(self, ws: ClientConnection) -> None:
        control, wake = self.control, self._wake
        while ws.state is State.OPEN:
            texts = control.messages_to_send()
            if not texts:
                if self._closing:
                    return
                wake.clear()
                await wake.wait()
                continue
            for index, text in enumerate(texts):
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    self.lost_messages += len(texts) - index
                    self.log.info(
                        "agent socket closed under messages",
                        extra={"lost": len(texts) - index},
                    )
                    return

    async def _run(self, ws: ClientConnection | None) -> None:
        """Read the current socket; when it closes, follow the core (reconnect or stop)."""
        try:
            while ws is not None:
                await self._read(ws)
                ws = await self._after_close(ws)
        except Exception:
            self.log.exception("agent control connection failed")
            self._emit(HangupRequired("internal error in the agent connection"))

    async def _read(self, ws: ClientConnection) -> None:
        control = self.control
        try:
            async for message in ws:
                awaiting = control.state is ControlState.AWAITING_RECONNECT_ACK
                self._handle(control.receive(message, self._now()))
                if awaiting and control.state is ControlState.OPEN:
                    self.log.info("agent reconnected", extra={"attempt": control.reconnects})
                    self._emit(Reconnected(control.reconnects))
                self._kick()
        except ConnectionClosed:
            pass

    async def _after_close(self, ws: ClientConnection) -> ClientConnection | None:
        await _cancel_and_wait(self._writer)
        self._writer = None
        if self._closing:
            return None
        code, reason = _closed_code(ws)
        loop = asyncio.get_running_loop()
        if code == MESSAGE_TOO_BIG:
            self.log.warning(
                "agent sent a message over the size limit",
                extra={"limit": self._max_size, "why": reason},
            )
            self.control.message_too_big(reason, loop.time())
        decision = self.control.on_close(code, loop.time())
        self._ws = None
        self._resolve(decision.failed)
        self._kick()
        self.log.info(
            "agent control socket closed",
            extra={"code": code, "reason": reason, "reconnect": decision.reconnect},
        )
        self._emit(ConnectionLost(code, reason, decision.reconnect))
        while decision.reconnect:
            assert decision.reconnect_at is not None
            await self._sleep_unless_closing(max(0.0, decision.reconnect_at - loop.time()))
            if self._closed_meanwhile():
                return None
            try:
                new = await self._open()
            except AgentConnectError as exc:
                if self._closed_meanwhile():
                    return None
                self.log.info("agent reconnect failed", extra={"why": str(exc)})
                decision = self.control.on_connect_failed(loop.time())
                self._resolve(decision.failed)
                continue
            if self._closed_meanwhile():
                await new.close(NORMAL_CLOSURE)
                return None
            self.log.info("agent control socket reopened", extra={"attempt": decision.attempt})
            self._attach(new)
            return new
        if decision.hangup:
            self._emit(HangupRequired(decision.reason))
        self._kick()
        return None

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        """Close with 1000 (the call ended): every waiting hook gets :class:`AckFailed`, later
        sends are discarded. Idempotent; bounded by ``close_timeout``."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        self._closing_event.set()
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
                self._timer_at = None
            if self._writer is not None:
                # Let the writer send what the core has released (the final call:status).
                self._wake.set()
                await asyncio.wait({self._writer}, timeout=self.close_timeout)
            self._resolve(self.control.close())
            await _cancel_and_wait(self._writer)
            ws = self._ws
            if ws is not None:
                await ws.close(NORMAL_CLOSURE)
            if self._run_task is not None:
                await asyncio.wait({self._run_task}, timeout=self.close_timeout)
        finally:
            await _cancel_and_wait(self._writer, self._run_task)
            for msgid, waiter in list(self._waiters.items()):
                if not waiter.done():
                    waiter.set_result(AckFailed(msgid, "", msgid, "connection closed"))
            self._done.set()
