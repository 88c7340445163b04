"""RTP endpoints for call legs: a port allocator over the configured range (ports handed out in
an unpredictable order) and one asyncio datagram endpoint per leg with symmetric RTP, with its
RTCP socket on the next port (RFC 3550 §11) and RTCP multiplexed on the RTP port when
negotiated (RFC 5761).

The endpoint only moves bytes: it parses with ``media.rtp`` (counting, never raising), latches,
and hands packets to the leg with the loop's ``now``. The latch: only packets from the host the
peer's SDP names are taken and latch at once (another sender on the path cannot take the call's
audio by racing to its port); with ``rtp.nat_latch`` (callers behind NAT, whose SDP names a
private address) another source latches after ``NAT_LATCH_PACKETS`` valid packets in a row.
Sending goes to the latched source once there is one, else to the address from the SDP. When a
new SDP moves the peer's media elsewhere (RFC 3264 §8.3.1) the latch is learnt again, and the
former source can no longer win it: its last packets in flight are still taken, but sending
follows the new address.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from media.rtp import RtpCounters, RtpPacket, parse_or_count
from worker.errors import LocalError

Address = tuple[str, int]
NAT_LATCH_PACKETS = 3
"""With ``rtp.nat_latch``: valid packets in a row from one unexpected source before it wins."""


class PacketReceiver(Protocol):
    """Who gets a leg's RTP and RTCP: ``worker.sip.leg.SipLeg``, or
    ``worker.ari.media.ExternalMedia``."""

    def rtp_received(self, packet: RtpPacket, now: float) -> None: ...

    def rtcp_received(self, data: bytes, now: float) -> None: ...


class PortsExhaustedError(LocalError):
    """Every RTP port in the configured range is in use."""


class PortAllocator:
    """Hands out even RTP ports from ``[port_min, port_max]`` in an unpredictable order (a
    sender cannot guess the next call's port and race its audio to it)."""

    def __init__(self, port_min: int, port_max: int) -> None:
        first = port_min + (port_min % 2)
        self._ports = list(range(first, port_max, 2))
        if not self._ports:
            raise LocalError(f"no even port in {port_min}-{port_max}")
        self._range = frozenset(self._ports)
        self._free = list(self._ports)
        self._where = {port: i for i, port in enumerate(self._free)}  # position in _free
        self._random = random.SystemRandom()

    def __len__(self) -> int:
        """How many ports are free."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """How many ports the range holds."""
        return len(self._ports)

    def candidates(self, limit: int | None = None) -> list[int]:
        """Free ports in a random order, at most ``limit`` of them."""
        count = len(self._free) if limit is None else min(limit, len(self._free))
        return self._random.sample(self._free, count)

    def take(self, port: int) -> None:
        i = self._where.pop(port, None)
        if i is None:
            return
        last = self._free.pop()
        if last != port:  # move the last free port into the hole
            self._free[i] = last
            self._where[last] = i

    def release(self, port: int) -> None:
        if port in self._where or port not in self._range:
            return
        self._where[port] = len(self._free)
        self._free.append(port)


@dataclass(slots=True)
class EndpointCounters:
    sent: int = 0
    send_errors: int = 0
    foreign_source: int = 0
    unattached: int = 0
    rtcp_in: int = 0
    rtcp_out: int = 0
    rtcp_foreign: int = 0


class _RtcpSocket(asyncio.DatagramProtocol):
    """The RTCP port of one endpoint: hands datagrams to it, sends what it is given."""

    def __init__(self, endpoint: RtpEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.endpoint.rtcp_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.endpoint.endpoint_counters.send_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True
        self.endpoint.socket_lost()


class RtpEndpoint(asyncio.DatagramProtocol):
    """One leg's RTP socket. Its receiver (``attach``) gets every valid packet from the peer;
    packets before a receiver is attached are counted and dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, nat_latch: bool = False) -> None:
        self._receiver: PacketReceiver | None = None
        self._loop = loop
        self._nat_latch = nat_latch
        self._candidate: Address | None = None  # an unexpected source seen (NAT mode)
        self._candidate_packets = 0
        self._transport: asyncio.DatagramTransport | None = None
        self.remote: Address | None = None
        self.latched: Address | None = None
        self._former: Address | None = None  # latched before the peer's media moved
        self.counters = RtpCounters()
        self.endpoint_counters = EndpointCounters()
        self.last_received: float | None = None
        self.local: Address = ("", 0)
        self.on_closed: Callable[[], None] | None = None  # once both sockets are really closed
        self.socket_closed = False
        self.pool_port: int | None = None  # the pool's port this endpoint holds, until released
        self.rtcp: _RtcpSocket | None = None
        self.rtcp_latched: Address | None = None

    # asyncio.DatagramProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport: cast, not assert.
        self._transport = cast(asyncio.DatagramTransport, transport)
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])

    def attach(self, receiver: PacketReceiver) -> None:
        self._receiver = receiver

    def set_remote(self, remote: Address, *, exact: bool = False) -> None:
        """Send to ``remote`` (the address of the peer's SDP). If it differs from the address
        the peer gave before, the peer's media moved: forget the latched source. With ``exact``
        (an Asterisk ExternalMedia channel, whose address is known for certain) the latch is
        ``remote`` at once: no other source, even on the same host, is ever taken."""
        if exact:
            self.remote = self.latched = remote
            self._former = None
            return
        if remote == self.remote:
            return
        if self.remote is not None and self.latched is not None:
            self._former = self.latched
            self.latched = None
        self.remote = remote

    def datagram_received(self, data: bytes, addr: Address) -> None:
        # Runs for every packet: compare fields, build no tuple. ``addr`` has four items over
        # IPv6 (host, port, flowinfo, scope id); only host and port are the source.
        latched = self.latched
        if latched is not None and (addr[1] != latched[1] or addr[0] != latched[0]):
            self.endpoint_counters.foreign_source += 1
            return
        if len(data) > 1 and 192 <= data[1] <= 223:  # RTCP multiplexed on this port (RFC 5761)
            self.rtcp_datagram(data, addr)
            return
        if latched is None and not self._may_take(addr):
            return
        packet = parse_or_count(data, self.counters)
        if packet is None:
            return
        if latched is None:
            source = (addr[0], addr[1])
            if source != self._former:
                if not self._may_latch(source):
                    return  # a NAT candidate not trusted yet
                self.latched = source
        now = self._loop.time()
        self.last_received = now
        receiver = self._receiver
        if receiver is None:
            self.endpoint_counters.unattached += 1
            return
        receiver.rtp_received(packet, now)

    def _may_take(self, addr: Address) -> bool:
        """Before the latch: only from the host the SDP names (or the former source, whose
        last packets are still in flight), unless NAT latching is on."""
        remote = self.remote
        if remote is not None and addr[0] == remote[0]:
            return True
        former = self._former
        if former is not None and addr[0] == former[0] and addr[1] == former[1]:
            return True
        if not self._nat_latch or remote is None:
            self.endpoint_counters.foreign_source += 1
            return False
        return True

    def _may_latch(self, source: Address) -> bool:
        """The SDP's host latches at once; another source (NAT) only after ``NAT_LATCH_PACKETS``
        valid packets in a row from it, which are dropped meanwhile."""
        remote = self.remote
        if remote is not None and source[0] == remote[0]:
            return True
        if source == self._candidate:
            self._candidate_packets += 1
        else:
            self._candidate, self._candidate_packets = source, 1
        return self._candidate_packets >= NAT_LATCH_PACKETS

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.socket_lost()

    def socket_lost(self) -> None:
        """One of the sockets is closed; once both are, the port pair can be reused."""
        if self._transport is not None or (self.rtcp is not None and not self.rtcp.closed):
            return
        self.socket_closed = True
        if self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed()

    def rtcp_datagram(self, data: bytes, addr: Address) -> None:
        """RTCP from the peer: only from the host its RTP comes from (or its SDP names)."""
        expected = self.latched or self.remote
        if expected is not None and addr[0] != expected[0]:
            self.endpoint_counters.rtcp_foreign += 1
            return
        self.rtcp_latched = (addr[0], addr[1])
        self.endpoint_counters.rtcp_in += 1
        if self._receiver is not None:
            self._receiver.rtcp_received(data, self._loop.time())

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that went away: counted, the inactivity timer ends it.
        self.endpoint_counters.send_errors += 1

    # sending
    def send(self, data: bytes) -> None:
        target = self.latched or self.remote
        if target is None or self._transport is None:
            return
        try:
            self._transport.sendto(data, target)
        except (OSError, ValueError, TypeError, OverflowError):
            self.endpoint_counters.send_errors += 1  # an address the socket refuses
            return
        self.endpoint_counters.sent += 1

    def send_rtcp(self, data: bytes, port: int, mux: bool) -> None:
        """Send an RTCP compound packet: on the RTP socket to the RTP target when multiplexed,
        else from the RTCP socket to where the peer's RTCP comes from (or its RTP host at
        ``port``)."""
        if mux:
            target = self.latched or self.remote
            sender = self._transport
        else:
            target = self.rtcp_latched
            if target is None:
                rtp = self.latched or self.remote
                target = None if rtp is None else (rtp[0], port)
            sender = self.rtcp.transport if self.rtcp is not None else None
        if target is None or sender is None:
            return
        try:
            sender.sendto(data, target)
        except (OSError, ValueError, TypeError, OverflowError):
            self.endpoint_counters.send_errors += 1
            return
        self.endpoint_counters.rtcp_out += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self.rtcp is not None and self.rtcp.transport is not None:
            self.rtcp.transport.close()

    @property
    def closed(self) -> bool:
        return self._transport is None


class RtpPortPool:
    """Binds ``RtpEndpoint``s on free ports of the allocator; releases them on close."""

    def __init__(self, host: str, port_min: int, port_max: int, *, nat_latch: bool = False) -> None:
        self.host = host
        self.allocator = PortAllocator(port_min, port_max)
        self.nat_latch = nat_latch

    async def open(self) -> RtpEndpoint:
        """Bind an endpoint on the next free even port and its RTCP socket on the odd one
        above. Both are bound and taken before the first await, so concurrent opens never race
        for the same candidate."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for port in self.allocator.candidates(limit=64):
            rtp_sock = socket.socket(family, socket.SOCK_DGRAM)
            rtcp_sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                for sock, number in ((rtp_sock, port), (rtcp_sock, port + 1)):
                    sock.setblocking(False)
                    sock.bind((self.host, number))
            except OSError:
                rtp_sock.close()
                rtcp_sock.close()
                continue  # taken by another process: try the next pair
            self.allocator.take(port)
            endpoint = RtpEndpoint(loop, nat_latch=self.nat_latch)
            rtcp = _RtcpSocket(endpoint)
            opened = False
            try:
                await loop.create_datagram_endpoint(_factory(endpoint), sock=rtp_sock)
                opened = True
                await loop.create_datagram_endpoint(_factory(rtcp), sock=rtcp_sock)
            except BaseException:
                if opened:
                    endpoint.close()
                else:
                    rtp_sock.close()
                rtcp_sock.close()
                self.allocator.release(port)
                raise
            endpoint.rtcp = rtcp
            endpoint.pool_port = port
            return endpoint
        raise PortsExhaustedError(f"no free RTP port on {self.host} in the configured range")

    def close(self, endpoint: RtpEndpoint) -> None:
        """Close the endpoint; its port goes back to the pool once the socket is closed (the
        loop closes it on its next iteration, and binding it before would fail)."""
        port, endpoint.pool_port = endpoint.pool_port, None
        if port is None:  # released already, or on its way
            endpoint.close()
            return
        if endpoint.socket_closed:
            self.allocator.release(port)
            return
        endpoint.on_closed = lambda: self.allocator.release(port)
        endpoint.close()


_P = TypeVar("_P", bound=asyncio.DatagramProtocol)


def _factory(protocol: _P) -> Callable[[], _P]:
    return lambda: protocol
