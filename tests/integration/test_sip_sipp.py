"""The worker's SIP user agent against the real SIPp, on loopback: inbound and outbound calls
with media, digest authentication, registration refresh, CANCEL, hold, BYE either way,
malformed and refused requests, SIP over TCP, and fifty concurrent calls.

Each test runs the user agent in process (with the process-wide pacer and the worker's echo
route) on free loopback ports, runs SIPp with a bounded timeout, and checks both sides: SIPp's
exit status and message log, and the calls' SIP outcome, RTP counters and jitter statistics.
The scenarios are in ``scenarios/``; SIPp's own captures in ``/usr/share/sip-tester``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from media.g711 import PCMU
from tests.sipp import SCENARIOS, Sipp, SippResult, free_port
from worker.config import Settings, load_settings
from worker.legs import FRAME_BYTES, CallFailedError, LegDtmf, LegEnd, LegEnded, LegEvent
from worker.pacer import MediaPacer
from worker.sip.core import CallPhase
from worker.sip.leg import SipLeg
from worker.sip.transaction import Transport
from worker.sip.ua import UserAgent

pytestmark = pytest.mark.sipp

RTP_SPAN = 400  # ports in each test's RTP range
WAIT = 10.0  # bound on any single wait for the worker side
PCAP_AUDIO_PACKETS = 236  # RTP packets in SIPp's g711a.pcap (30 ms each)
DTMF_PCAP_MS = 280  # the event duration of SIPp's dtmf_2833_*.pcap captures (2240 samples)
PASSWORD = "s3cret-pw"

Handler = Callable[[SipLeg], Awaitable[None]]
PACER: list[MediaPacer] = []  # the running harness's pacer


class MediaTap:
    """What a session does with a leg, for the user agent's own tests: observes its events
    and ticks its media on the pacer. ``source(now)`` gives what the caller hears (default:
    their own frame back, like the ``echo`` route), ``sink(frame, now)`` gets their audio."""

    def __init__(
        self,
        leg: SipLeg,
        *,
        source: Callable[[float], bytes | None] | None = None,
        sink: Callable[[bytes, float], None] | None = None,
        on_event: Callable[[LegEvent], None] | None = None,
    ) -> None:
        self.leg = leg
        self.source = source
        self.sink = sink
        self.on_event = on_event
        self.pacer = PACER[-1]
        leg.attach(self)
        self.pacer.add(leg, self.tick)

    def on_caller_audio(self, now: float) -> None:
        """Frames are taken at the tick."""

    def on_leg_event(self, event: LegEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if isinstance(event, LegEnded):
            self.pacer.remove(self.leg)

    def tick(self, now: float) -> None:
        frame = self.leg.pull_frame(now)
        if frame is not None and self.sink is not None:
            self.sink(frame, now)
        out = self.source(now) if self.source is not None else frame
        self.leg.send_frame(out if out is not None else bytes(FRAME_BYTES))


async def echo(call: SipLeg) -> None:
    """What the worker's ``echo`` route does: answer and return the caller's audio."""
    MediaTap(call)
    call.answer()


class UaHarness:
    """The user agent with its own pacer on free loopback ports, recording every call."""

    def __init__(self, settings: Settings, handler: Handler = echo) -> None:
        self.settings = settings
        self.handler = handler
        self.calls: list[SipLeg] = []
        self.incoming: asyncio.Queue[SipLeg] = asyncio.Queue()
        self.pacer = MediaPacer(asyncio.get_running_loop())
        PACER.append(self.pacer)
        self.ua = UserAgent(settings, self._on_incoming)

    async def _on_incoming(self, call: SipLeg) -> None:
        self.calls.append(call)
        self.incoming.put_nowait(call)
        await self.handler(call)

    async def next_call(self) -> SipLeg:
        return await asyncio.wait_for(self.incoming.get(), WAIT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ua.port}"

    async def assert_released(self) -> None:
        """Every call is gone from the user agent and every RTP port is back in the pool (once
        the loop has closed its socket)."""
        assert self.ua.calls == {}
        assert len(self.pacer) == 0
        for call in self.calls:
            assert call.endpoint.closed
        allocator = self.ua.rtp.allocator
        await eventually(lambda: len(allocator) == allocator.capacity, 1.0)


async def eventually(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms; TimeoutError after ``within``."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def make_settings(
    tmp_path: Path,
    *,
    sip: dict[str, Any] | None = None,
    rtp: dict[str, Any] | None = None,
    trunks: dict[str, Any] | None = None,
) -> Settings:
    base = random.randrange(20000, 32000 - RTP_SPAN, 2)  # below Linux's ephemeral ports
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        sip={"port": free_port(), **(sip or {})},
        rtp={"port_min": base, "port_max": base + RTP_SPAN, **(rtp or {})},
        trunks=trunks or {},
        routes=[{"match": "*", "action": "echo"}],
    )


@asynccontextmanager
async def running(
    tmp_path: Path,
    handler: Handler = echo,
    *,
    sip: dict[str, Any] | None = None,
    rtp: dict[str, Any] | None = None,
    trunks: dict[str, Any] | None = None,
) -> AsyncIterator[UaHarness]:
    worker = UaHarness(make_settings(tmp_path, sip=sip, rtp=rtp, trunks=trunks), handler)
    await worker.ua.start()
    try:
        yield worker
    finally:
        await worker.ua.close()
        worker.pacer.close()
        PACER.remove(worker.pacer)


def sipp(tmp_path: Path, name: str, remote: str | None, *args: str, **kw: Any) -> Sipp:
    return Sipp(tmp_path / name, remote, list(args), **kw)


def scenario(name: str) -> str:
    return str(SCENARIOS / name)


async def uac_call(
    tmp_path: Path,
    worker: UaHarness,
    name: str,
    *args: str,
    service: str | None = "echo",
    timeout_s: float = 20,
) -> SippResult:
    """SIPp places one call to the worker with scenario ``name`` (a file in ``scenarios/``, or
    one of SIPp's own); its result, checked to have passed."""
    which = ["-sf", scenario(name)] if name.endswith(".xml") else ["-sn", name]
    called = ["-s", service] if service is not None else []
    caller = sipp(
        tmp_path, "sipp", worker.target, *which, *called, *args, "-m", "1", timeout_s=timeout_s
    )
    result = await caller.run()
    assert_ok(result)
    return result


async def first_call_ended(worker: UaHarness) -> tuple[SipLeg, LegEnd]:
    """The worker's first call, once it has ended, and why it ended."""
    call = worker.calls[0]
    return call, await asyncio.wait_for(call.ended, WAIT)


def assert_ok(result: SippResult) -> None:
    assert result.returncode == 0, result.explain()


def assert_audio_arrived(call: SipLeg, expected_packets: int) -> None:
    """At least 95 % of the caller's audio packets reached the jitter buffer and were played,
    not dropped as lost or late."""
    assert call.stream is not None
    stats = call.stream.jitter_stats
    assert stats.received >= 0.95 * expected_packets, stats
    assert stats.lost + stats.late + stats.overflow_dropped <= 0.05 * expected_packets, stats
    assert stats.invalid == 0, stats
    assert call.endpoint.counters.malformed == 0


def tone_file(path: Path, seconds: float = 3.0) -> Path:
    """Raw µ-law (what SIPp's rtp_stream plays): a 440 Hz tone."""
    t = np.arange(int(8000 * seconds)) / 8000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PCMU.encode(pcm))
    return path


def digest_params(header: str) -> dict[str, str]:
    return {k.lower(): v or w for k, v, w in re.findall(r'(\w+)=(?:"([^"]*)"|([^\s,]+))', header)}


def header_value(message: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", message, re.MULTILINE | re.IGNORECASE)
    assert match is not None, f"no {name} in\n{message}"
    return match.group(1).strip()


# -- inbound calls ------------------------------------------------------------------------------


class TestRfc3261Section13InboundCallWithSippPcap:
    """SIPp's bundled ``uac_pcap``: INVITE (PCMA + telephone-event), 200, ACK, 7 s of PCMA in
    30 ms packets, RFC 4733 digit 1, BYE."""

    async def test_uac_pcap_call_media_dtmf_and_bye(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            result = await uac_call(tmp_path, worker, "uac_pcap", timeout_s=30)
            assert len(worker.calls) == 1
            call, end = await first_call_ended(worker)
            assert end.cause == "remote-bye"
            assert call.media is not None
            assert call.media.codec == "PCMA"
            assert call.stats.dtmf_received == ["1"]
            assert_audio_arrived(call, PCAP_AUDIO_PACKETS)
            assert call.stream is not None
            assert call.stream.jitter_stats.jitter_ms < 30.0
            # The echo went back: one packet per 20 ms tick while the call was up.
            assert call.endpoint.endpoint_counters.sent >= 0.9 * (7.0 + 1.0) / 0.020
            assert len(result.received("SIP/2.0 200")) == 2  # the INVITE's and the BYE's
            await worker.assert_released()


class TestRfc4733Section2_5DigitsFromSippCaptures:
    """Three key presses played from SIPp's RFC 4733 captures arrive as exactly those digits,
    each once, with the duration of its end packets."""

    async def test_one_five_pound(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            await uac_call(tmp_path, worker, "uac_dtmf_sequence.xml", timeout_s=30)
            call, _ = await first_call_ended(worker)
            assert call.stats.dtmf_received == ["1", "5", "#"]
            assert call.stream is not None
            assert call.stream.counters.dtmf_in == 3
            await worker.assert_released()

    async def test_digits_reach_on_dtmf_with_their_duration(self, tmp_path: Path) -> None:
        presses: list[tuple[str, int, str]] = []

        def pressed(event: LegEvent) -> None:
            if isinstance(event, LegDtmf):
                presses.append((event.digit, event.duration_ms, event.method))

        async def handler(call: SipLeg) -> None:
            MediaTap(call, on_event=pressed)
            call.answer()

        async with running(tmp_path, handler) as worker:
            await uac_call(tmp_path, worker, "uac_dtmf_sequence.xml", timeout_s=30)
            await asyncio.wait_for(worker.calls[0].ended, WAIT)
        assert presses == [(d, DTMF_PCAP_MS, "rfc4733") for d in ("1", "5", "#")]


class TestRfc3261Section18_3SipOverTcp:
    """One inbound call with SIP over TCP (SIPp ``-t t1``): framing by Content-Length, responses
    and the BYE's 200 on the caller's connection."""

    async def test_inbound_call_over_tcp(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            await uac_call(tmp_path, worker, "uac_dtmf_sequence.xml", "-t", "t1", timeout_s=30)
            call, end = await first_call_ended(worker)
            assert call.transport is Transport.TCP
            assert end.cause == "remote-bye"
            assert call.stats.dtmf_received == ["1", "5", "#"]
            assert "TCP message sent" in (tmp_path / "sipp" / "messages.log").read_text()
            assert worker.ua.transport.counters.tcp_connections >= 1
            await worker.assert_released()


# -- outbound calls -----------------------------------------------------------------------------


def noise_frames(count: int, seed: int = 20) -> list[bytes]:
    """20 ms frames of white noise: any alignment of the echo with it is unambiguous."""
    rng = np.random.default_rng(seed)
    samples = np.clip(rng.standard_normal(count * 160) * 5000, -30000, 30000).astype("<i2")
    return [samples[i * 160 : (i + 1) * 160].tobytes() for i in range(count)]


def best_alignment(
    sent: npt.NDArray[np.float64], received: npt.NDArray[np.float64]
) -> tuple[int, float]:
    """The lag (in samples) of ``sent`` inside ``received`` and the correlation there."""
    n = len(sent) + len(received)
    spectrum = np.fft.rfft(received, n) * np.conj(np.fft.rfft(sent, n))
    correlation = np.fft.irfft(spectrum, n)[: len(received)]
    lag = int(np.argmax(correlation))
    window = received[lag : lag + len(sent)]
    if len(window) < len(sent):
        return lag, 0.0
    return lag, float(np.corrcoef(sent, window)[0, 1])


class TestRfc3261Section13_2UacCallToSippEcho:
    """The worker calls SIPp's ``uas`` with ``-rtp_echo`` through a trunk, plays a known
    pattern, hears it come back, and hangs up."""

    async def test_outbound_call_audio_round_trip_and_hangup(self, tmp_path: Path) -> None:
        frames = noise_frames(100)  # 2 s
        heard: list[bytes] = []
        uas = sipp(tmp_path, "sipp", None, "-sn", "uas", "-rtp_echo", "-m", "1", timeout_s=30)
        async with uas:
            await uas.ready()
            trunks = {"sipp": {"host": "127.0.0.1", "port": uas.port}}
            async with running(tmp_path, trunks=trunks) as worker:
                call = await worker.ua.place_call("sipp", "service")
                source = iter(frames)
                sent_at: list[float] = []

                def play(now: float) -> bytes | None:
                    frame = next(source, None)
                    if frame is not None:
                        sent_at.append(now)
                    return frame

                heard_at: list[float] = []

                def hear(frame: bytes, now: float) -> None:
                    heard.append(frame)
                    heard_at.append(now)

                MediaTap(call, source=play, sink=hear)
                await asyncio.wait_for(call.answered, WAIT)
                assert call.phase is CallPhase.ANSWERED
                assert call.media is not None
                assert call.media.codec == "PCMU"
                await asyncio.sleep(2.6)  # the pattern, then its echo through the jitter buffer
                call.hangup()
                assert call.end is not None
                assert call.end.cause == "local-hangup"
                result = await uas.wait()
                assert_ok(result)
                assert len(result.received("BYE ")) == 1
                await worker.assert_released()
        sent = np.frombuffer(b"".join(frames), "<i2").astype(np.float64)
        received = np.frombuffer(b"".join(heard), "<i2").astype(np.float64)
        lag, correlation = best_alignment(sent, received)
        assert correlation > 0.95, (lag, correlation)
        assert lag < 2 * 160  # the first frames of the pattern came back too
        assert len(sent_at) == len(frames)
        assert 0 < heard_at[0] - sent_at[0] < 0.3  # the echo comes back within 300 ms
        assert call.endpoint.counters.received >= 0.95 * len(frames)


class TestRfc3261Section22_3ProxyAuthentication:
    """SIPp's UAS answers the first INVITE 407 with a digest challenge; the worker retries with
    Proxy-Authorization (RFC 3261 §22.3, RFC 2617 with qop=auth) and the call completes."""

    async def test_407_then_200(self, tmp_path: Path) -> None:
        await self._challenged_call(tmp_path, "uas_auth_407.xml", "Proxy-Authorization")

    async def test_401_then_200_verified_by_sipp(self, tmp_path: Path) -> None:
        # SIPp's <verifyauth> reads Authorization only: with a 401 SIPp checks the response.
        await self._challenged_call(tmp_path, "uas_auth_401.xml", "Authorization")

    async def test_407_then_200_over_tcp(self, tmp_path: Path) -> None:
        """The same through a TCP trunk: the worker opens the connection, retries and hangs
        up on it."""
        await self._challenged_call(tmp_path, "uas_auth_407.xml", "Proxy-Authorization", "tcp")

    async def _challenged_call(
        self, tmp_path: Path, name: str, header: str, transport: str = "udp"
    ) -> None:
        uas = sipp(
            tmp_path, "sipp", None, "-sf", scenario(name), "-m", "1",
            *(["-t", "t1"] if transport == "tcp" else []), timeout_s=30,
        )  # fmt: skip
        async with uas:
            await uas.ready()
            trunk = {"host": "127.0.0.1", "port": uas.port, "username": "alice"}
            trunks = {"sipp": {**trunk, "password": PASSWORD, "transport": transport}}
            async with running(tmp_path, trunks=trunks) as worker:
                call = await worker.ua.place_call("sipp", "service")
                await asyncio.wait_for(call.answered, WAIT)
                call.hangup()
                result = await uas.wait()
                assert_ok(result)
                await worker.assert_released()
        invites = result.received("INVITE ")
        assert len(invites) == 2
        assert all(f"SIP/2.0/{transport.upper()} " in header_value(m, "Via") for m in invites)
        assert header.lower() + ":" not in invites[0].lower()
        # Check the digest independently of worker.sip.auth (RFC 2617 §3.2.2).
        params = digest_params(header_value(invites[1], header))
        assert params["username"] == "alice"
        assert params["realm"] == "sipp.test"
        assert params["nonce"] == "5a1d0e8c3b9f7a2e"
        assert params["qop"] == "auth"

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()

        ha1 = md5(f"alice:sipp.test:{PASSWORD}")
        ha2 = md5(f"INVITE:{params['uri']}")
        expected = md5(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:auth:{ha2}")
        assert params["response"] == expected


class TestRfc3261Section10_2_4RegistrationRefresh:
    """REGISTER through a digest challenge; the registrar grants 4 s; the worker refreshes the
    binding before it expires (and is challenged and registered again)."""

    async def test_register_and_refresh_before_expiry(self, tmp_path: Path) -> None:
        registrar = sipp(
            tmp_path, "sipp", None, "-sf", scenario("uas_register_refresh.xml"), "-m", "1",
            timeout_s=30,
        )  # fmt: skip
        async with registrar:
            await registrar.ready()
            trunk = {
                "host": "127.0.0.1",
                "port": registrar.port,
                "username": "alice",
                "password": PASSWORD,
                "registration": True,
                "registration_expires_s": 60,
            }
            async with running(tmp_path, trunks={"sipp": trunk}) as worker:
                reg = worker.ua.registrations["sipp"]
                registered_at: float | None = None
                async with asyncio.timeout(WAIT):
                    changed = worker.ua.registration_changed["sipp"]
                    while reg.refreshes < 1:
                        await changed.wait()
                        changed.clear()
                        if reg.registered and registered_at is None:
                            registered_at = time.monotonic()
                refreshed_at = time.monotonic()
                assert reg.registered
                assert reg.expires == 4
                assert reg.last_status == 200
                assert registered_at is not None
                assert refreshed_at - registered_at < 4.0
            result = await registrar.wait()
        assert_ok(result)
        registers = result.received("REGISTER ")
        assert len(registers) == 4
        assert len({header_value(r, "Call-ID") for r in registers}) == 1  # one binding
        cseqs = [int(header_value(r, "CSeq").split()[0]) for r in registers]
        assert cseqs == sorted(cseqs)
        assert len(set(cseqs)) == 4


# -- CANCEL, re-INVITE, BYE ---------------------------------------------------------------------


class TestRfc3261Section9_1Cancel:
    """The caller cancels while the worker rings: 200 for the CANCEL, 487 for the INVITE, the
    ACK absorbed, and the call ends as cancelled."""

    async def test_cancel_while_ringing(self, tmp_path: Path) -> None:
        async def ring_only(call: SipLeg) -> None:
            call.ring()
            await asyncio.wait_for(asyncio.shield(call.ended), WAIT)

        async with running(tmp_path, ring_only) as worker:
            result = await uac_call(
                tmp_path, worker, "uac_cancel.xml", service="ring", timeout_s=30
            )
            call, end = await first_call_ended(worker)
            assert end.cause == "cancelled"
            assert end.sip_status == 487
            with pytest.raises(CallFailedError):
                call.answered.result()
            await worker.assert_released()
        assert len(result.received("SIP/2.0 487")) == 1  # no retransmission: the ACK matched
        assert len(result.received("SIP/2.0 180")) == 1

    async def test_cancel_while_another_call_is_being_set_up(self, tmp_path: Path) -> None:
        """A CANCEL must end its own INVITE, not another one still opening its RTP port."""
        gate = asyncio.Event()

        async def handler(call: SipLeg) -> None:
            if call.to_user == "ring":
                call.ring()
                await asyncio.wait_for(asyncio.shield(call.ended), WAIT)
            else:
                await echo(call)
                await asyncio.sleep(0.3)
                call.hangup()

        async with running(tmp_path, handler) as worker:
            pool_open = worker.ua.rtp.open
            opens = 0

            async def first_open_waits() -> Any:
                nonlocal opens
                opens += 1
                if opens == 1:
                    await gate.wait()
                return await pool_open()

            worker.ua.rtp.open = first_open_waits  # type: ignore[method-assign]
            first = sipp(
                tmp_path, "first", worker.target, "-sf", scenario("uac_wait_bye.xml"),
                "-s", "echo", "-m", "1", timeout_s=20,
            )  # fmt: skip
            async with first:
                await eventually(lambda: opens >= 1)
                cancelled = await sipp(
                    tmp_path, "cancel", worker.target, "-sf", scenario("uac_cancel.xml"),
                    "-s", "ring", "-m", "1", timeout_s=20,
                ).run()  # fmt: skip
                gate.set()
                first_result = await first.wait()
            assert_ok(cancelled)
            assert_ok(first_result)
            by_number = {call.to_user: call for call in worker.calls}
            ring_end = await asyncio.wait_for(by_number["ring"].ended, WAIT)
            assert ring_end.cause == "cancelled"
            echo_end = await asyncio.wait_for(by_number["echo"].ended, WAIT)
            assert echo_end.cause == "local-hangup"
            await worker.assert_released()


class TestRfc3264Section8_4HoldAndResume:
    """SIPp puts the call on hold (re-INVITE, a=sendonly) and resumes it (a=sendrecv): each is
    answered 200 with the reverse direction, ``on_hold`` follows, no RTP leaves during the hold,
    and a hold longer than the RTP inactivity timeout does not end the call."""

    async def test_hold_then_resume(self, tmp_path: Path) -> None:
        seen: list[tuple[bool, int]] = []

        async def handler(call: SipLeg) -> None:
            def changed(event: LegEvent) -> None:
                seen.append((call.on_hold, call.endpoint.endpoint_counters.sent))

            MediaTap(call, on_event=changed)
            call.answer()

        # The caller sends no RTP at all: only the hold keeps the inactivity timer away.
        async with running(tmp_path, handler, rtp={"inactivity_timeout_s": 1.5}) as worker:
            result = await uac_call(
                tmp_path, worker, "uac_hold_resume.xml", "-d", "2000", timeout_s=30
            )
            _, end = await first_call_ended(worker)
            assert end.cause == "remote-bye"
            await worker.assert_released()
        # answered, held, resumed, ended
        assert [hold for hold, _ in seen] == [False, True, False, False], seen
        held_sent, resumed_sent = seen[1][1], seen[2][1]
        assert resumed_sent - held_sent <= 1  # 2 s on hold: nothing sent (one tick in flight)
        assert seen[3][1] - resumed_sent >= 10  # sending again after the resume
        answers = [m for m in result.received("SIP/2.0 200") if "application/sdp" in m]
        directions = [
            re.findall(r"^a=(sendrecv|sendonly|recvonly|inactive)$", m, re.M) for m in answers
        ]
        assert directions == [["sendrecv"], ["recvonly"], ["sendrecv"]]


class TestRfc3264Section8_3_1ChangingTheMediaAddress:
    """A re-INVITE moves the caller's media to another address: the worker's RTP follows it,
    even though it had latched onto the caller's first source (symmetric RTP), and the packets
    from the new address are taken."""

    async def test_rtp_follows_the_new_address(self, tmp_path: Path) -> None:
        loop = asyncio.get_running_loop()
        moved_to = free_port()
        arrived: list[tuple[bytes, tuple[str, int]]] = []

        class Receiver(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                arrived.append((data, addr))

        transport, _ = await loop.create_datagram_endpoint(
            Receiver, local_addr=("127.0.0.1", moved_to)
        )
        try:
            async with running(tmp_path) as worker:
                caller = sipp(
                    tmp_path, "sipp", worker.target, "-sf", scenario("uac_move_media.xml"),
                    "-s", "echo", "-key", "moved_port", str(moved_to), "-m", "1", timeout_s=30,
                )  # fmt: skip
                async with caller:
                    call = await worker.next_call()
                    await asyncio.wait_for(call.answered, WAIT)
                    await eventually(lambda: call.endpoint.latched is not None)  # first RTP
                    first_source = call.endpoint.latched
                    await eventually(  # the re-INVITE
                        lambda: call.media is not None and call.media.remote_port == moved_to
                    )
                    await asyncio.sleep(0.5)
                    # The new address talks too: 20 packets of PCMA silence.
                    assert call.stream is not None
                    received_before = call.endpoint.counters.received
                    for seq in range(20):
                        header = bytes([0x80, 8]) + seq.to_bytes(2, "big")
                        packet = header + (seq * 160).to_bytes(4, "big") + b"\x12\x34\x56\x78"
                        transport.sendto(packet + b"\xd5" * 160, call.endpoint.local)
                        await asyncio.sleep(0.02)
                    result = await caller.wait()
                assert_ok(result)
                await asyncio.wait_for(call.ended, WAIT)
                assert call.endpoint.counters.received - received_before == 20
                assert call.endpoint.endpoint_counters.foreign_source == 0
                await worker.assert_released()
        finally:
            transport.close()
        assert first_source is not None
        assert first_source[1] != moved_to
        from_worker = [addr for _, addr in arrived]
        assert len(from_worker) >= 40  # about 1.5 s of 20 ms packets after the move
        assert set(from_worker) == {call.endpoint.local}


class TestRfc3261Section15_1ByeFromTheWorker:
    """The worker ends an answered call: SIPp receives the BYE and answers 200."""

    async def test_worker_hangs_up(self, tmp_path: Path) -> None:
        async def answer_then_hang_up(call: SipLeg) -> None:
            await echo(call)
            await asyncio.sleep(0.5)
            call.hangup()

        async with running(tmp_path, answer_then_hang_up) as worker:
            result = await uac_call(tmp_path, worker, "uac_wait_bye.xml", timeout_s=30)
            _, end = await first_call_ended(worker)
            assert end.cause == "local-hangup"
            byes = result.received("BYE ")
            assert len(byes) == 1
            # In-dialog request (RFC 3261 §12.2.1.1): to the remote target, the dialog's tags.
            assert byes[0].startswith("BYE sip:sipp@127.0.0.1:")
            assert header_value(byes[0], "CSeq").endswith("BYE")
            await worker.assert_released()

    async def test_closing_the_user_agent_hangs_up_its_calls(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            caller = sipp(
                tmp_path, "sipp", worker.target, "-sf", scenario("uac_wait_bye.xml"),
                "-s", "echo", "-m", "1", timeout_s=20,
            )  # fmt: skip
            async with caller:
                call = await worker.next_call()
                await asyncio.wait_for(call.answered, WAIT)
                await worker.ua.close()  # what the worker does on SIGTERM
                assert call.end is not None
                assert call.end.cause == "shutdown"
                assert worker.ua.core.requests_in_flight == 0  # it waited for the BYE's 200
                result = await caller.wait()
        assert_ok(result)
        assert len(result.received("BYE ")) == 1


class TestRfc3550Section6_3_5RtpInactivity:
    """A caller that sends no RTP at all is hung up once the inactivity timeout has passed."""

    async def test_silent_caller_is_hung_up(self, tmp_path: Path) -> None:
        async with running(tmp_path, rtp={"inactivity_timeout_s": 1.0}) as worker:
            started = time.monotonic()
            result = await uac_call(tmp_path, worker, "uac_wait_bye.xml")
            _, end = await first_call_ended(worker)
            assert end.cause == "rtp-timeout"
            assert 1.0 <= time.monotonic() - started < 3.0
            assert len(result.received("BYE ")) == 1
            await worker.assert_released()


class TestRfc3261Section13_3_1_4AckNeverComes:
    """The caller never ACKs the 200: the worker retransmits it for 64*T1, then ends the session
    with a BYE (T1 is 50 ms here, so 3.2 s)."""

    async def test_bye_after_64_t1_without_ack(self, tmp_path: Path) -> None:
        async with running(tmp_path, sip={"t1_ms": 50}) as worker:
            result = await uac_call(tmp_path, worker, "uac_no_ack.xml")
            call, end = await first_call_ended(worker)
            assert end.cause == "ack-timeout"
            assert call.ended_at is not None
            assert call.answered_at is not None
            # uvloop keeps timers in whole milliseconds: timer H may fire up to 1 ms early
            assert 3.2 - 0.001 <= call.ended_at - call.answered_at < 4.5
            assert len(result.received("SIP/2.0 200")) >= 5  # the 2xx, retransmitted
            assert len(result.received("BYE ")) == 1
            await worker.assert_released()


class TestRfc3264Section5OfferInThe2xx:
    """An INVITE without SDP: the worker offers in its 200, takes the answer from the ACK, and
    its media starts (RFC 3261 §13.2.1)."""

    async def test_late_offer(self, tmp_path: Path) -> None:
        async def answer_then_hang_up(call: SipLeg) -> None:
            await echo(call)
            await asyncio.sleep(1.0)
            call.hangup()

        async with running(tmp_path, answer_then_hang_up) as worker:
            result = await uac_call(tmp_path, worker, "uac_late_offer.xml")
            call, _ = await first_call_ended(worker)
            assert call.media is not None
            assert call.media.codec == "PCMU"
            assert call.endpoint.remote is not None
            assert call.endpoint.endpoint_counters.sent >= 40  # about 1 s of 20 ms packets
            await worker.assert_released()
        offers = [m for m in result.received("SIP/2.0 200") if "application/sdp" in m]
        assert len(offers) == 1
        assert re.search(r"^m=audio \d+ RTP/AVP 0 8 101$", offers[0], re.M), offers[0]


# -- malformed and refused requests -------------------------------------------------------------


class TestRfc3261Section21_4_1MalformedRequests:
    """Requests that do not parse are answered 400/505 (or dropped and counted when no
    response can be routed) while a good call through the same socket carries on."""

    async def test_malformed_requests_during_a_call(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            good = sipp(
                tmp_path, "good", worker.target, "-sn", "uac_pcap", "-s", "echo", "-m", "1",
                timeout_s=30,
            )  # fmt: skip
            async with good:
                call = await worker.next_call()
                await asyncio.wait_for(call.answered, WAIT)
                bad = await sipp(
                    tmp_path, "bad", worker.target, "-sf", scenario("uac_malformed.xml"),
                    "-s", "echo", "-m", "1", timeout_s=20,
                ).run()  # fmt: skip
                assert_ok(bad)
                counters = worker.ua.counters
                assert counters.malformed_answered == 5
                assert counters.malformed_dropped == 1
                assert not call.is_ended
                good_result = await good.wait()
            assert_ok(good_result)
            await asyncio.wait_for(call.ended, WAIT)
            assert call.end is not None
            assert call.end.cause == "remote-bye"
            assert call.stats.dtmf_received == ["1"]
            assert_audio_arrived(call, PCAP_AUDIO_PACKETS)
            assert len(worker.calls) == 1  # the malformed INVITE never became a call
            await worker.assert_released()


class TestRfc3261Section21RefusedRequests:
    """Well-formed requests the worker must refuse, each with its status code."""

    async def test_oversized_request_gets_513(self, tmp_path: Path) -> None:
        async with running(tmp_path, sip={"max_message_bytes": 1024}) as worker:
            await uac_call(tmp_path, worker, "uac_options_oversized.xml", service=None)
            assert worker.ua.counters.malformed_answered == 1

    async def test_invite_from_untrusted_source_gets_403(self, tmp_path: Path) -> None:
        async with running(tmp_path, sip={"trusted_sources": []}) as worker:
            result = await uac_call(tmp_path, worker, "uac_invite_forbidden.xml")
            assert worker.ua.counters.forbidden == 1
            assert worker.calls == []
            await worker.assert_released()
        assert len(result.received("SIP/2.0 403")) == 1  # the ACK stopped retransmissions

    async def test_offer_without_a_common_codec_gets_488(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            result = await uac_call(tmp_path, worker, "uac_invite_g729.xml")
            assert worker.ua.counters.no_common_codec == 1
            assert worker.calls == []
            await worker.assert_released()
        assert len(result.received("SIP/2.0 488")) == 1

    async def test_request_in_unknown_dialog_gets_481(self, tmp_path: Path) -> None:
        async with running(tmp_path) as worker:
            await uac_call(tmp_path, worker, "uac_bye_unknown_dialog.xml")
            assert worker.ua.counters.no_dialog == 1

    async def test_rate_limit_gets_503_with_retry_after(self, tmp_path: Path) -> None:
        limits = {"rate_limit_per_second": 0.5, "rate_limit_burst": 2}
        async with running(tmp_path, sip=limits) as worker:
            result = await uac_call(tmp_path, worker, "uac_options_rate_limited.xml")
            assert worker.ua.counters.rate_limited == 1
        refused = result.received("SIP/2.0 503")
        assert len(refused) == 1
        assert header_value(refused[0], "Retry-After") == "2"


class TestRfc3261Section21_5_4CallCapacity:
    """``sip.max_calls`` counts each call once, ringing or answered; the call beyond it is
    refused with 503 and a Retry-After."""

    async def test_max_calls(self, tmp_path: Path) -> None:
        release = asyncio.Event()

        async def handler(call: SipLeg) -> None:
            if call.to_user == "ring":
                call.ring()
                await asyncio.wait_for(asyncio.shield(call.ended), WAIT)
            else:
                await echo(call)
                await asyncio.wait_for(release.wait(), WAIT)
                call.hangup()

        async with running(tmp_path, handler, sip={"max_calls": 2}) as worker:
            ringing = sipp(
                tmp_path, "ringing", worker.target, "-sf", scenario("uac_cancel.xml"),
                "-s", "ring", "-d", "4000", "-m", "1", timeout_s=20,
            )  # fmt: skip
            answered = sipp(
                tmp_path, "answered", worker.target, "-sf", scenario("uac_wait_bye.xml"),
                "-s", "talk", "-m", "1", timeout_s=20,
            )  # fmt: skip
            async with ringing:
                first = await worker.next_call()
                assert first.to_user == "ring"
                await eventually(lambda: first.phase is CallPhase.RINGING)
                async with answered:
                    second = await worker.next_call()  # the ringing call leaves room for it
                    await asyncio.wait_for(second.answered, WAIT)
                    refused = await sipp(
                        tmp_path, "refused", worker.target,
                        "-sf", scenario("uac_invite_over_capacity.xml"), "-s", "talk",
                        "-m", "1", timeout_s=20,
                    ).run()  # fmt: skip
                    assert_ok(refused)
                    assert worker.ua.counters.over_capacity == 1
                    assert first.phase is CallPhase.RINGING
                    release.set()
                    assert_ok(await answered.wait())
                assert_ok(await ringing.wait())
            assert len(worker.calls) == 2
            await worker.assert_released()


# -- load ---------------------------------------------------------------------------------------


class TestRfc3550Section6LoadFiftyConcurrentCalls:
    """Fifty concurrent SIPp calls streaming µ-law for 30 s each to the echo route: no failed
    call on either side, and every call's audio arrived."""

    CALLS = 50
    SECONDS = 30

    async def test_fifty_calls_for_thirty_seconds(self, tmp_path: Path) -> None:
        tone_file(tmp_path / "sipp" / "tone.ulaw")
        async with running(tmp_path) as worker:
            result = await sipp(
                tmp_path, "sipp", worker.target, "-sf", scenario("uac_talk.xml"), "-s", "echo",
                "-d", str(self.SECONDS * 1000), "-l", str(self.CALLS), "-m", str(self.CALLS),
                "-r", str(self.CALLS), timeout_s=self.SECONDS + 30, trace_msg=False,
            ).run()  # fmt: skip
            assert_ok(result)
            assert result.stat("SuccessfulCall") == self.CALLS
            assert result.stat("FailedCall") == 0
            assert len(worker.calls) == self.CALLS
            await asyncio.wait_for(asyncio.gather(*(c.ended for c in worker.calls)), WAIT)
            for call in worker.calls:
                assert call.end is not None
                assert call.end.cause == "remote-bye"
                assert_audio_arrived(call, self.SECONDS * 50)
            await worker.assert_released()


class TestRfc3550Section6RtcpWithThePeer:
    """Defect 9: the worker's RTCP port (RTP + 1) is open, it sends sender reports to the
    peer's RTP port + 1 at the RFC 3550 interval, and what the peer reports about the worker's
    stream ends up in the call's media figures."""

    async def test_reports_both_ways(self, tmp_path: Path) -> None:
        from media.rtcp import ReportBlock, build_report, parse_compound

        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[bytes] = asyncio.Queue()

        class PeerRtcp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reports.put_nowait(data)

        async with running(tmp_path) as worker:
            caller = sipp(tmp_path, "sipp", worker.target, "-sn", "uac_pcap", "-s", "echo",
                          "-m", "1", timeout_s=30)  # fmt: skip
            peer, _ = await loop.create_datagram_endpoint(
                PeerRtcp, local_addr=("127.0.0.1", caller.media_port + 1)
            )
            try:
                async with caller:
                    call = await worker.next_call()
                    await asyncio.wait_for(call.answered, WAIT)
                    first = await asyncio.wait_for(reports.get(), 5.0)  # within 3.75 s
                    sr = parse_compound(first)[0]
                    assert sr.sender is not None
                    assert sr.sender.packets > 0
                    lsr = (sr.sender.ntp >> 16) & 0xFFFFFFFF
                    block = ReportBlock(sr.ssrc, 64, 7, 1000, 240, lsr, 0)
                    rtcp_port = call.endpoint.local[1] + 1
                    peer.sendto(
                        build_report(0x5EED, None, (block,), "peer"), ("127.0.0.1", rtcp_port)
                    )
                    result = await caller.wait()
                assert_ok(result)
                await asyncio.wait_for(call.ended, WAIT)
            finally:
                peer.close()
            quality = call.quality()
            assert quality.rtcp_in == 1
            assert quality.rtcp_out >= 2  # a report, and the BYE at the end
            assert quality.peer_fraction_lost == 0.25
            assert quality.peer_cumulative_lost == 7
            assert quality.peer_jitter_ms == 30.0
            assert quality.round_trip_ms is not None
            assert 0 <= quality.round_trip_ms < 1000
            await worker.assert_released()
