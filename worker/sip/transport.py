"""The thin asyncio adapter under the SIP user agent: one UDP socket and one TCP listener on
the configured address, plus outbound TCP connections reused per destination.

It only moves bytes. Datagrams and framed TCP messages are parsed with ``message.parse`` and
handed up with their source; bytes that do not parse are handed up as the ``SipMessageError``
(the user agent answers 400/513 or drops and counts). Nothing a peer sends raises out of here.

Guards against peers that hold resources: the UDP socket's receive buffer is sized for bursts
(``receive_buffer_bytes``); a source may hold at most ``tcp_max_per_source`` TCP connections;
a connection that has sent nothing, or the start of a message it does not finish, within
``tcp_message_timeout_s`` is closed (one byte every few seconds keeps nothing open).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from worker.config import SipSettings
from worker.log import LogThrottle
from worker.sip.message import (
    Message,
    SipMessageError,
    StreamFramer,
    is_keepalive,
    parse,
)
from worker.sip.transaction import Transport

Address = tuple[str, int]
MessageHandler = Callable[[Message, Address, Transport], None]
ErrorHandler = Callable[[SipMessageError, Address, Transport], None]
SendFailed = Callable[[str], None]

log = logging.getLogger("worker.sip.transport")


@dataclass(slots=True)
class TransportCounters:
    datagrams_in: int = 0
    datagrams_out: int = 0
    keepalives: int = 0
    tcp_connections: int = 0
    tcp_framing_errors: int = 0
    tcp_refused: int = 0  # over the per-source cap
    tcp_timed_out: int = 0  # a message never finished
    send_failures: int = 0


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport: cast, not assert.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.counters.datagrams_in += 1
        self.owner.deliver(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.owner.counters.send_failures += 1


class _Tcp(asyncio.Protocol):
    """One TCP connection, either accepted or opened by us."""

    def __init__(self, owner: SipTransport, accepted: bool = True) -> None:
        self.owner = owner
        self.framer = StreamFramer(max_body_size=owner.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("", 0)
        self.accepted = accepted
        self.waiting_since: float | None = None  # a message is due (connected, or partial)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        owner = self.owner
        if self.accepted and owner.tcp_from(self.peer[0]) >= owner.tcp_max_per_source:
            owner.counters.tcp_refused += 1
            self.transport.abort()
            return
        owner.counters.tcp_connections += 1
        owner.connections[self.peer] = self
        if self.accepted:
            self.waiting_since = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        try:
            items = self.framer.feed(data)
        except SipMessageError as exc:
            # The stream cannot be re-synchronised: answer if possible, then close.
            self.owner.counters.tcp_framing_errors += 1
            self.owner.on_error(exc, self.peer, Transport.TCP)
            if self.transport is not None:
                self.transport.close()
            return
        if self.framer.buffered:  # the start of a message: it must be finished in time
            if items or self.waiting_since is None:
                self.waiting_since = asyncio.get_running_loop().time()
        else:
            self.waiting_since = None
        for item in items:
            if isinstance(item, SipMessageError):
                self.owner.on_error(item, self.peer, Transport.TCP)
            else:
                self.owner.on_message(item, self.peer, Transport.TCP)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner.connections.get(self.peer) is self:
            del self.owner.connections[self.peer]

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class SipWire(Protocol):
    """What the user agent needs of its transport: ``SipTransport`` (its own sockets) or, in a
    media process behind the front, ``worker.front.media.FrontWire`` (the front's sockets)."""

    port: int
    counters: TransportCounters
    connections: dict[Address, Any]

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def send(
        self,
        data: bytes,
        destination: Address,
        transport: Transport,
        on_failure: SendFailed | None = None,
    ) -> None: ...


WireFactory = Callable[[MessageHandler, ErrorHandler], SipWire]
"""Builds a user agent's wire around its two input handlers."""


def hand_up(
    data: bytes,
    source: Address,
    transport: Transport,
    max_size: int,
    on_message: MessageHandler,
    on_error: ErrorHandler,
) -> bool:
    """Parse one message's bytes and hand it (or why it does not parse) up; False for a
    keep-alive, which goes nowhere. Never raises."""
    if is_keepalive(data):
        return False
    try:
        message = parse(data, max_size=max_size)
    except SipMessageError as exc:  # MessageTooLarge included
        on_error(exc, source, transport)
        return True
    on_message(message, source, transport)
    return True


class SipTransport:
    """UDP and TCP on one address. ``send`` picks the socket by transport and destination."""

    @classmethod
    def from_settings(
        cls, sip: SipSettings, on_message: MessageHandler, on_error: ErrorHandler
    ) -> SipTransport:
        """The transport ``[sip]`` describes (the user agent's, or the front's)."""
        return cls(
            sip.host,
            sip.port,
            on_message,
            on_error,
            max_message_bytes=sip.max_message_bytes,
            transports=tuple(sip.transports),
            receive_buffer_bytes=sip.receive_buffer_bytes,
            tcp_max_per_source=sip.tcp_max_connections_per_source,
            tcp_message_timeout_s=sip.tcp_message_timeout_s,
        )

    def __init__(
        self,
        host: str,
        port: int,
        on_message: MessageHandler,
        on_error: ErrorHandler,
        *,
        max_message_bytes: int = 65535,
        transports: tuple[str, ...] = ("udp", "tcp"),
        receive_buffer_bytes: int = 4 * 1024 * 1024,
        tcp_max_per_source: int = 32,
        tcp_message_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.receive_buffer_bytes = receive_buffer_bytes
        self.tcp_max_per_source = tcp_max_per_source
        self.tcp_message_timeout_s = tcp_message_timeout_s
        self.receive_buffer_granted = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._throttle = LogThrottle()
        self.port = port
        self.on_message = on_message
        self.on_error = on_error
        self.max_message_bytes = max_message_bytes
        self.enabled = transports
        self.counters = TransportCounters()
        self.connections: dict[Address, _Tcp] = {}
        self._udp: _Udp | None = None
        self._server: asyncio.Server | None = None
        self._connecting: dict[Address, asyncio.Future[_Tcp]] = {}
        self._sending: set[asyncio.Task[None]] = set()  # connect-then-send tasks (referenced)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if "udp" in self.enabled:
            _, proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port)
            )
            self._udp = proto
            assert proto.transport is not None
            self.port = proto.transport.get_extra_info("sockname")[1]
            self._size_receive_buffer(proto.transport.get_extra_info("socket"))
        if "tcp" in self.enabled:
            self._server = await loop.create_server(
                lambda: _Tcp(self), self.host, self.port, reuse_address=True
            )
            self._sweep = loop.call_later(1.0, self._sweep_tcp)

    def _size_receive_buffer(self, sock: socket.socket | None) -> None:
        """Ask for ``receive_buffer_bytes`` (past the kernel's rmem_max when privileged) so a
        burst is queued rather than dropped unseen; log what was granted."""
        if sock is None:
            return
        wanted = self.receive_buffer_bytes
        force = getattr(socket, "SO_RCVBUFFORCE", None)
        try:
            if force is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, force, wanted)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
            except OSError as exc:
                log.warning("cannot size the SIP receive buffer", extra={"why": str(exc)})
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.receive_buffer_granted = granted
        if granted < wanted:  # Linux reports twice what it reserves for the data itself
            log.warning(
                "SIP receive buffer smaller than asked (raise net.core.rmem_max)",
                extra={"asked": wanted, "granted": granted},
            )

    def tcp_from(self, host: str) -> int:
        """TCP connections open with ``host`` now."""
        return sum(1 for peer in self.connections if peer[0] == host)

    def _sweep_tcp(self) -> None:
        """Close connections that owe a message for longer than ``tcp_message_timeout_s``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.connections.values()):
            since = conn.waiting_since
            if since is not None and now - since > self.tcp_message_timeout_s:
                self.counters.tcp_timed_out += 1
                log.info(
                    "closing a TCP connection that sends no message", extra={"peer": conn.peer}
                )
                if conn.transport is not None:
                    conn.transport.abort()
        self._sweep = loop.call_later(1.0, self._sweep_tcp)

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def deliver(self, data: bytes, source: Address) -> None:
        """A datagram arrived: parse it and hand it up (never raises)."""
        if not hand_up(data, source, Transport.UDP, self.max_message_bytes, self.on_message,
                       self.on_error):  # fmt: skip
            self.counters.keepalives += 1

    def send(
        self,
        data: bytes,
        destination: Address,
        transport: Transport,
        on_failure: SendFailed | None = None,
    ) -> None:
        """Put ``data`` on the wire; never raises. A send that cannot happen (no socket, an
        address the socket refuses, a TCP connect that fails) is counted, logged and reported
        to ``on_failure`` with the reason."""
        if transport is Transport.UDP:
            if self._udp is None or self._udp.transport is None:
                self._failed(destination, "no UDP socket", on_failure)
                return
            try:
                self._udp.transport.sendto(data, destination)
            except (OSError, ValueError, TypeError, OverflowError) as exc:
                self._failed(destination, f"cannot send to {destination!r}: {exc}", on_failure)
                return
            self.counters.datagrams_out += 1
            return
        conn = self.connections.get(destination)
        if conn is not None:
            conn.send(data)
            return
        # The loop keeps only a weak reference to tasks: hold it until the bytes are out.
        task = asyncio.get_running_loop().create_task(
            self._connect_and_send(data, destination, on_failure)
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _failed(self, destination: Address, reason: str, on_failure: SendFailed | None) -> None:
        self.counters.send_failures += 1
        skipped = self._throttle.allow("send failed", asyncio.get_running_loop().time())
        if skipped is not None:
            log.warning(
                "sip send failed",
                extra={
                    "destination": repr(destination),
                    "why": reason,
                    "similar_lines_skipped": skipped,
                },
            )
        if on_failure is not None:
            on_failure(reason)

    async def _connect_and_send(
        self, data: bytes, destination: Address, on_failure: SendFailed | None
    ) -> None:
        try:
            conn = await self.connect(destination)
        except (OSError, ValueError, TypeError, OverflowError) as exc:
            self._failed(destination, f"tcp connect failed: {exc}", on_failure)
            return
        conn.send(data)

    async def connect(self, destination: Address) -> _Tcp:
        """An open TCP connection to ``destination``, reusing one if there is one."""
        conn = self.connections.get(destination)
        if conn is not None:
            return conn
        pending = self._connecting.get(destination)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Tcp] = loop.create_future()
        self._connecting[destination] = future
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Tcp(self, accepted=False), destination[0], destination[1]
                ),
                5.0,
            )
            future.set_result(proto)
            return proto
        except (OSError, TimeoutError) as exc:
            future.set_exception(OSError(str(exc)))
            future.exception()  # retrieved: no "never retrieved" warning
            raise OSError(str(exc)) from exc
        finally:
            del self._connecting[destination]
