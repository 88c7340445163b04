"""A media process: one ``Worker`` whose SIP goes through the front (``FrontWire``), started by
the front as ``python -m worker.front.media FD`` with its end of the socket as ``FD``.

The first frame it reads is ``{"op": "settings", ...}``: its settings (already given their
share of RTP ports and capacity by the front), its index and the number of processes. It
answers ``ready`` once the worker runs, then serves:

- SIP frames: messages the front received for calls that fall on this process, parsed here;
  what the user agent sends goes back as SIP frames for the front to put on the wire.
- ARI frames: the events of the Asterisk calls that fall on this process, from the front's one
  events connection, to its Stasis application; ``ari`` (``up``: true or false) when that
  connection comes or goes (on true the application resyncs its calls).
- ``call``: place an outbound call (the API's ``POST /telephony/calls``), answered ``called``
  with the call id or the error.
- ``drain`` (or SIGTERM): take no new calls (503), let live calls end within ``grace_s``, then
  hang up the rest, flush recordings and events, exit 0.

When the front goes away (the socket closes) the process ends its calls and exits. SIGINT is
ignored: a Ctrl-C in a terminal reaches the whole process group, and the front decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any

import uvloop

from worker import gcpause, heap, priority
from worker.app import Shard, StartError, Worker
from worker.config import Settings
from worker.errors import ConfigError, RemoteError
from worker.front.channel import Channel
from worker.front.ipc import (
    MAX_FRAME,
    AriFrame,
    ControlFrame,
    Frame,
    FrameError,
    SipFrame,
    decode,
    encode_control,
    encode_sip,
)
from worker.front.shard import owned_call_id, owned_channel_id, owns_ari_id
from worker.legs import Address
from worker.log import setup_logging
from worker.metrics import process_metrics
from worker.sip.transaction import Transport
from worker.sip.transport import (
    ErrorHandler,
    MessageHandler,
    SendFailed,
    TransportCounters,
    hand_up,
)

log = logging.getLogger("worker.front.media")


class FrontWire:
    """The user agent's transport in a media process: messages arrive from the front (parsed
    here, as ``SipTransport`` would) and leave through it."""

    def __init__(
        self,
        channel_ref: list[Channel],
        port: int,
        max_message_bytes: int,
        on_message: MessageHandler,
        on_error: ErrorHandler,
    ) -> None:
        self._channel_ref = channel_ref
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.on_message = on_message
        self.on_error = on_error
        self.counters = TransportCounters()
        self.connections: dict[Address, Any] = {}  # the front holds the TCP connections

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def deliver(self, frame: SipFrame) -> None:
        if hand_up(frame.data, frame.peer, frame.transport, self.max_message_bytes,
                   self.on_message, self.on_error):  # fmt: skip
            self.counters.datagrams_in += 1
        else:
            self.counters.keepalives += 1

    def send(
        self,
        data: bytes,
        destination: Address,
        transport: Transport,
        on_failure: SendFailed | None = None,
    ) -> None:
        channel = self._channel_ref[0] if self._channel_ref else None
        if channel is None or channel.closed:
            self.counters.send_failures += 1
            if on_failure is not None:
                on_failure("the front is gone")
            return
        try:
            channel.send(encode_sip(transport, destination, data))
        except (FrameError, UnicodeEncodeError) as exc:
            self.counters.send_failures += 1
            if on_failure is not None:
                on_failure(f"cannot send to {destination!r}: {exc}")
            return
        self.counters.datagrams_out += 1


class MediaProcess:
    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        self.index = int(config["index"])
        self.processes = int(config["processes"])
        self.grace_s = float(config.get("grace_s", 30.0))
        self.settings = Settings.model_validate(config["settings"])
        self._channel_ref: list[Channel] = []
        self.wire: FrontWire | None = None
        shard = Shard(
            self.index,
            self.processes,
            self._make_wire,
            functools.partial(owned_call_id, self.index, self.processes),
            functools.partial(owns_ari_id, self.index, self.processes),
            functools.partial(owned_channel_id, self.index, self.processes),
        )
        self.worker = Worker(self.settings, shard)
        self.channel = Channel(sock, self._on_frame, self._on_closed)
        self._channel_ref.append(self.channel)
        self.stop = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _make_wire(self, on_message: MessageHandler, on_error: ErrorHandler) -> FrontWire:
        sip = self.settings.sip
        self.wire = FrontWire(
            self._channel_ref, sip.port, sip.max_message_bytes, on_message, on_error
        )
        return self.wire

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.channel.start()
        loop.add_signal_handler(signal.SIGTERM, self._sigterm)
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        heap.tune()
        priority.to_realtime(self.settings.realtime_priority)
        try:
            await self.worker.start()
        except StartError as exc:
            self.channel.send(encode_control({"op": "failed", "error": str(exc)}))
            log.error("media process cannot start", extra={"error": str(exc)})
            return 1
        gcpause.settle()
        self.channel.send(encode_control({"op": "ready", "index": self.index}))
        log.info("media process ready", extra={"index": self.index, "pid": os.getpid()})
        await self.stop.wait()
        await self.worker.close()
        self.channel.close()
        return 0

    # -- frames from the front ----------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, SipFrame):
            if self.wire is not None:
                self.wire.deliver(frame)
        elif isinstance(frame, AriFrame):
            if self.worker.stasis is not None:
                self.worker.stasis.dispatch(frame.data)
        else:
            self._control(frame)

    def _control(self, frame: ControlFrame) -> None:
        if frame.op == "call":
            self._spawn(self._call(frame.message))
        elif frame.op == "metrics":
            text = process_metrics().render().decode()
            self.channel.send(
                encode_control({"op": "metrics", "id": frame.message.get("id"), "text": text})
            )
        elif frame.op == "ari":
            if self.worker.stasis is not None:
                self.worker.stasis.set_connected(frame.message.get("up") is True)
        elif frame.op == "drain":
            self.grace_s = float(frame.message.get("grace_s", self.grace_s))
            self.drain()
        else:
            log.warning("unknown control message", extra={"op": frame.op})

    def _on_closed(self) -> None:
        if not self.stop.is_set():
            log.warning("the front is gone: ending this process's calls")
            self.stop.set()

    # -- placing a call ------------------------------------------------------------------------
    async def _call(self, message: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"op": "called", "id": message.get("id")}
        try:
            reply["call_id"] = await self.worker.call_out(
                str(message["number"]),
                str(message["trunk"]),
                message.get("route"),
                message.get("from_user"),
            )
        except ConfigError as exc:
            reply.update(error=str(exc), kind="config")
        except RemoteError as exc:
            reply.update(error=str(exc), kind="remote")
        except Exception as exc:
            reply.update(error=str(exc) or type(exc).__name__, kind="other")
        self.channel.send(encode_control(reply))

    # -- draining -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Start draining; called again while draining (a second SIGTERM), stop now."""
        if self._drain_task is None:
            self._drain_task = self._spawn(self._drain())
        else:
            self.stop.set()

    async def _drain(self) -> None:
        worker = self.worker
        worker.stop_taking_calls()
        log.info(
            "draining: no new calls",
            extra={"calls": len(worker.sessions), "grace_s": self.grace_s},
        )
        await worker.wait_idle(self.grace_s)
        self.stop.set()

    def _sigterm(self) -> None:
        self.drain()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m worker.front.media FD (started by the front)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    first = sock.recv(MAX_FRAME)
    frame = decode(first) if first else None
    if not isinstance(frame, ControlFrame) or frame.op != "settings":
        print("media process: the first frame must be the settings", file=sys.stderr)
        return 2
    settings = frame.message["settings"]
    log_settings = settings.get("log", {})
    setup_logging(log_settings.get("level", "info"), log_settings.get("format", "json"))

    async def run() -> int:
        return await MediaProcess(sock, frame.message).run()

    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
