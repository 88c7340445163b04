"""Issue 11 against a running user agent on loopback: peers that misbehave on purpose. Every
test runs a healthy call (or timer) beside the probe where the finding was about other calls."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.integration.test_sip_sipp import (
    PCAP_AUDIO_PACKETS,
    UaHarness,
    assert_audio_arrived,
    assert_ok,
    eventually,
    first_call_ended,
    running,
    sipp,
)
from tests.sipp import free_port
from worker.sip.leg import SipLeg
from worker.sip.message import SipResponse, parse
from worker.sip.transaction import Transport

pytestmark = pytest.mark.sipp


class Peer(asyncio.DatagramProtocol):
    """A raw UDP SIP peer on 127.0.0.1 that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)

    def responses(self) -> list[SipResponse]:
        out = []
        for data in self.received:
            message = parse(data)
            if isinstance(message, SipResponse):
                out.append(message)
        return out


@asynccontextmanager
async def peer_at(host: str = "127.0.0.1") -> AsyncIterator[tuple[Peer, int]]:
    loop = asyncio.get_running_loop()
    port = free_port(host=host)
    transport, protocol = await loop.create_datagram_endpoint(Peer, local_addr=(host, port))
    try:
        yield protocol, port
    finally:
        transport.close()


def invite(worker: UaHarness, port: int, *, via_extra: str = "", contact: str | None = None,
           number: str = "echo", tag: str = "t1") -> bytes:  # fmt: skip
    body = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port + 10} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    contact = contact or f"<sip:peer@127.0.0.1:{port}>"
    return (
        f"INVITE sip:{number}@127.0.0.1:{worker.ua.port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{tag}{via_extra}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:peer@127.0.0.1>;tag={tag}\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: {tag}@peer\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: {contact}\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


class TestFinding2Reflection:
    """A request whose Via names other addresses (maddr, its own received) is answered only at
    its real source: nothing is sent anywhere else."""

    async def test_nothing_goes_anywhere_but_the_source(self, tmp_path: Path) -> None:
        async with running(tmp_path, sip={"trusted_sources": []}) as worker:
            sent_to: list[tuple[str, int]] = []
            original = worker.ua.transport.send

            def spy(
                data: bytes,
                destination: tuple[str, int],
                transport: Transport,
                on_failure: Callable[[str], None] | None = None,
            ) -> None:
                sent_to.append(destination)
                original(data, destination, transport, on_failure)

            worker.ua.transport.send = spy  # type: ignore[method-assign]
            async with peer_at() as (peer, port), peer_at("127.0.0.2") as (victim, _):
                assert peer.transport is not None
                extra = ";maddr=127.0.0.2;received=127.0.0.2;rport=9"
                peer.transport.sendto(
                    invite(worker, port, via_extra=extra), ("127.0.0.1", worker.ua.port)
                )
                await eventually(lambda: len(peer.received) >= 1)
                await asyncio.sleep(1.2)  # long enough for a retransmission, if there were one
            assert [r.status for r in peer.responses()] == [403]
            assert victim.received == []
            assert set(sent_to) == {("127.0.0.1", port)}


class TestFinding1And4UnsendableDestinations:
    """A peer whose Contact cannot be sent to (an IPv6 host on the IPv4 socket): hanging up its
    call never raises, and another call's timers go on."""

    async def test_hangup_to_an_ipv6_contact_and_other_timers(self, tmp_path: Path) -> None:
        answered: list[SipLeg] = []

        async def answer_only(call: SipLeg) -> None:
            call.answer()
            answered.append(call)

        async with running(tmp_path, answer_only) as worker:
            async with peer_at() as (bad, bad_port), peer_at() as (slow, slow_port):
                assert bad.transport is not None
                assert slow.transport is not None
                target = ("127.0.0.1", worker.ua.port)
                bad.transport.sendto(
                    invite(worker, bad_port, contact=f"<sip:peer@[::1]:{bad_port}>", tag="bad"),
                    target,
                )
                slow.transport.sendto(invite(worker, slow_port, tag="slow"), target)  # never ACKs
                await eventually(lambda: len(answered) == 2)
                from worker.sip.leg import SipLeg

                bad_call = next(
                    c for c in answered if isinstance(c, SipLeg) and c.info.call_id == "bad@peer"
                )
                assert isinstance(bad_call, SipLeg)
                bad_call.hangup()  # the BYE cannot be sent: logged and counted, not raised
                assert bad_call.end is not None
                before = len(slow.responses())
                await asyncio.sleep(1.6)
                assert len(slow.responses()) > before  # the 200 is still retransmitted
            assert worker.ua.transport.counters.send_failures >= 1


class TestFinding6RtpHijack:
    """A sender on another address spraying RTP at every port of the range takes nothing: the
    caller's audio arrives whole and the latch is the caller's."""

    async def test_spraying_the_port_range(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            caller = sipp(tmp_path, "sipp", worker.target, "-sn", "uac_pcap", "-s", "echo",
                          "-m", "1", timeout_s=30)  # fmt: skip
            low, high = worker.settings.rtp.port_min, worker.settings.rtp.port_max
            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            attacker.bind(("127.0.0.2", 0))
            packet = bytes([0x80, 8, 0, 1, 0, 0, 0, 0, 0xAB, 0xCD, 0, 1]) + b"\xd5" * 160
            sprayed = 0
            try:
                async with caller:
                    deadline = time.monotonic() + 4.0
                    while time.monotonic() < deadline:
                        for port in range(low, high, 2):
                            attacker.sendto(packet, ("127.0.0.1", port))
                            sprayed += 1
                        await asyncio.sleep(0.02)
                    result = await caller.wait()
            finally:
                attacker.close()
            assert_ok(result)
            call, end = await first_call_ended(worker)
            assert end.cause == "remote-bye"
            assert call.endpoint.latched is not None
            assert call.endpoint.latched[0] == "127.0.0.1"
            assert call.endpoint.endpoint_counters.foreign_source > 0
            assert_audio_arrived(call, PCAP_AUDIO_PACKETS)
            assert sprayed > 1000
            await worker.assert_released()


class TestFinding9SlowTcpClients:
    """Connections that trickle bytes or send nothing are closed after the message timeout; a
    source may hold only so many at once."""

    async def test_trickle_and_cap(self, tmp_path: Path) -> None:
        sip = {"tcp_message_timeout_s": 1.0, "tcp_max_connections_per_source": 5}
        async with running(tmp_path, sip=sip) as worker:
            port = worker.ua.port
            streams = []
            for _ in range(8):
                streams.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.2)
            counters = worker.ua.transport.counters
            assert counters.tcp_refused == 3
            assert len(worker.ua.transport.connections) == 5
            for _, writer in streams:
                writer.write(b"I")  # the start of a message that never ends
            closed = 0
            for _ in range(40):
                await asyncio.sleep(0.1)
                for _, writer in streams:
                    if not writer.is_closing():
                        writer.write(b"N")
                if not worker.ua.transport.connections:
                    break
            assert worker.ua.transport.connections == {}
            assert counters.tcp_timed_out == 5
            for _reader, writer in streams:
                closed += 1
                writer.close()
            assert closed == 8


class TestFinding3NoImmortalCalls:
    """Whatever a call's media does, ``sip.max_call_seconds`` ends it."""

    async def test_session_limit(self, tmp_path: Path) -> None:
        async with running(tmp_path, sip={"max_call_seconds": 1.5}) as worker:
            started = time.monotonic()
            result = await sipp(
                tmp_path, "sipp", worker.target, "-sf",
                str(Path(__file__).parent / "scenarios" / "uac_wait_bye.xml"),
                "-s", "echo", "-m", "1", timeout_s=20,
            ).run()  # fmt: skip
            assert_ok(result)
            _, end = await first_call_ended(worker)
            assert end.cause == "session-limit"
            assert 1.5 <= time.monotonic() - started < 4.0


class TestFinding1TimersSurviveAFault:
    """Whatever goes wrong while the user agent's timer fires (here: the core raising once, as
    a bug or an unsendable destination used to), the timer is re-armed (the adapter pumps after
    every input whatever happened, and its once-a-second sweep pumps too): an INVITE with no
    answer keeps being retransmitted."""

    async def test_retransmissions_go_on(self, tmp_path: Path) -> None:
        async with peer_at() as (trunk, trunk_port):
            trunks = {"dead": {"host": "127.0.0.1", "port": trunk_port}}
            async with running(tmp_path, trunks=trunks) as worker:
                await worker.ua.place_call("dead", "100")
                await eventually(lambda: len(trunk.received) >= 1)
                core = worker.ua.core
                real = core.handle_timeout
                faults: list[float] = []

                def once_broken(now: float) -> None:
                    if not faults:
                        faults.append(now)
                        raise RuntimeError("a bug the timer found")
                    real(now)

                core.handle_timeout = once_broken  # type: ignore[method-assign]
                await eventually(lambda: bool(faults), within=3.0)
                before = len(trunk.received)
                await eventually(lambda: len(trunk.received) > before, within=3.0)


class TestMediaThatCannotBeSetUp:
    """A call whose media cannot be set up (here the leg's codec set-up raising, as a setting
    the jitter buffer refuses once did) is ended, not left answered without audio; the user
    agent takes the next call."""

    async def test_the_call_ends_and_the_next_one_talks(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        real = SipLeg.apply_media
        broken: list[str] = []

        def apply_media(self: SipLeg, media: object, now: float) -> None:
            if not broken:
                broken.append(self.info.call_id)
                raise ValueError("need 0 < min_ms < max_ms, got 0 and 200.0")
            real(self, media, now)  # type: ignore[arg-type]

        monkeypatch.setattr(SipLeg, "apply_media", apply_media)
        async with running(tmp_path) as worker:
            async with peer_at() as (peer, port):
                assert peer.transport is not None
                peer.transport.sendto(invite(worker, port), ("127.0.0.1", worker.ua.port))
                await eventually(lambda: bool(worker.calls))
                _, end = await first_call_ended(worker)
                assert end.cause == "worker-error"
                await eventually(
                    lambda: (
                        any(r.status == 500 for r in peer.responses())
                        or any(m.startswith(b"BYE ") for m in peer.received)
                    )
                )
            assert broken == ["t1@peer"]
            result = await sipp(
                tmp_path, "next", worker.target, "-sn", "uac", "-d", "300",
                "-s", "echo", "-m", "1", timeout_s=20,
            ).run()  # fmt: skip
            assert_ok(result)
            assert worker.calls[-1].end is not None
            assert worker.calls[-1].end.cause == "remote-bye"
