"""The thin asyncio adapter under the SIP user agent: one UDP socket and one TCP listener on
the configured address, plus outbound TCP connections reused per destination.

It only moves bytes. Datagrams and framed TCP messages are parsed with ``message.parse`` and
handed up with their source; bytes that do not parse are handed up as the ``SipMessageError``
(the user agent answers 400/513 or drops and counts). Nothing a peer sends raises out of here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

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

    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner
        self.framer = StreamFramer(max_body_size=owner.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        self.owner.counters.tcp_connections += 1
        self.owner.connections[self.peer] = self

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


class SipTransport:
    """UDP and TCP on one address. ``send`` picks the socket by transport and destination."""

    def __init__(
        self,
        host: str,
        port: int,
        on_message: MessageHandler,
        on_error: ErrorHandler,
        *,
        max_message_bytes: int = 65535,
        transports: tuple[str, ...] = ("udp", "tcp"),
    ) -> None:
        self.host = host
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
        if "tcp" in self.enabled:
            self._server = await loop.create_server(
                lambda: _Tcp(self), self.host, self.port, reuse_address=True
            )

    async def close(self) -> None:
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
        if is_keepalive(data):
            self.counters.keepalives += 1
            return
        try:
            message = parse(data, max_size=self.max_message_bytes)
        except SipMessageError as exc:  # MessageTooLarge included
            self.on_error(exc, source, Transport.UDP)
            return
        self.on_message(message, source, Transport.UDP)

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
        log.warning("sip send failed", extra={"destination": repr(destination), "why": reason})
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
                loop.create_connection(lambda: _Tcp(self), destination[0], destination[1]), 5.0
            )
            future.set_result(proto)
            return proto
        except (OSError, TimeoutError) as exc:
            future.set_exception(OSError(str(exc)))
            future.exception()  # retrieved: no "never retrieved" warning
            raise OSError(str(exc)) from exc
        finally:
            del self._connecting[destination]
