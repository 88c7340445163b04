"""The probe phones, a process of their own: a few calls placed through the target like any
caller's, whose audio carries timing markers, measured from outside the worker.

Each probe is a minimal SIP UAC over UDP (INVITE with PCMU + telephone-event, ACK, BYE, with
retransmissions; a BYE or other request from the far end is answered 200) and an RTP endpoint
that sends µ-law every 20 ms on an absolute schedule: quiet noise, and every 0.5 s a marker
(``marker.py``) whose send time is kept. What comes back is timed by the kernel
(``SO_TIMESTAMPNS``, converted to the monotonic clock) where it can be, so the probe's own
scheduling delays do not count, and measured for:

* the echo of each marker (round trip, and with the agent's receipt time the two halves);
* loss towards the probe, by sequence numbers, and the pacing of the packets (each inter-arrival
  time against 20 ms: the worker's outgoing pacing jitter, at the receiver);
* loss towards the worker, from the RTCP receiver reports the far end sends about the probe's
  stream (the last report's cumulative loss).

Run: ``python -m worker.loadtest.probe --target 127.0.0.1:5060 --calls 4 --number loadtest
--seconds 30 --out probe.json``. Probe ``i`` calls ``<number>-probe-<i>`` as
``loadtest-probe-<i>``. Progress goes to stdout as JSON lines (``answered``, ``progress``,
``done``); SIGTERM or SIGINT hangs up early and still writes ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from media.g711 import ulaw_decode, ulaw_encode
from media.rtcp import RtcpParseError, parse_compound
from media.rtp import RtpPacket, RtpParseError
from worker.loadtest.marker import MarkerDetector, marker_id, marker_tone
from worker.loadtest.rtpstats import ReceiveStats

FRAME_S = 0.020
SAMPLES = 160
MARKER_PERIOD_FRAMES = 25
MARKER_LEAD_FRAMES = 25
TONE_FRAMES = 3
NOISE_LEVEL = 40
STAGGER_S = 0.005
"""Probe ``i`` sends ``i`` × 5 ms after probe 0 in each 20 ms period."""
T1 = 0.5
INVITE_TIMEOUT_S = 32.0
BYE_TIMEOUT_S = 8.0
RTCP_LINGER_S = 0.5
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not name it
USER_AGENT = "aispinner-loadtest-probe"


def probe_user(index: int) -> str:
    return f"loadtest-probe-{index}"


def probe_number(number: str, index: int) -> str:
    return f"{number}-probe-{index}"


class MonotonicClock:
    """Converts the kernel's receive timestamps (CLOCK_REALTIME) to ``time.monotonic()``; the
    offset is measured again each second (``refresh``), so clock slewing stays well below 1 ms."""

    def __init__(self) -> None:
        self.offset_ns = 0
        self.refresh()

    def refresh(self) -> None:
        best = None
        for _ in range(5):
            before = time.time_ns()
            mono = time.monotonic_ns()
            after = time.time_ns()
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) // 2 - mono)
        assert best is not None
        self.offset_ns = best[1]

    def monotonic(self, realtime_ns: int) -> float:
        return (realtime_ns - self.offset_ns) / 1e9


# -- SIP, just enough of it ---------------------------------------------------------------------

_COMPACT = {
    "i": "call-id",
    "v": "via",
    "f": "from",
    "t": "to",
    "m": "contact",
    "l": "content-length",
}


@dataclass
class SipMessage:
    start: str
    headers: list[tuple[str, str]]
    body: str

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def status(self) -> int | None:
        if not self.start.startswith("SIP/2.0 "):
            return None
        try:
            return int(self.start.split()[1])
        except (IndexError, ValueError):
            return None


def parse_sip(data: bytes) -> SipMessage | None:
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not lines or not lines[0]:
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    return SipMessage(lines[0], headers, body)


def _param(value: str, name: str) -> str | None:
    for part in value.split(";")[1:]:
        key, _, val = part.strip().partition("=")
        if key.lower() == name:
            return val
    return None


def _uri(value: str) -> str | None:
    if "<" in value and ">" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";")[0].strip() or None


def _new_branch() -> str:
    return f"z9hG4bK{random.getrandbits(64):016x}"


@dataclass
class _Transaction:
    message: bytes
    invite: bool
    final: asyncio.Future[SipMessage]
    provisional: bool = False


class SipEndpoint(asyncio.DatagramProtocol):
    """One UDP socket for every probe's signalling: client transactions with retransmission
    (RFC 3261 §17.1, shortened), requests from the far end answered 200."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("127.0.0.1", 0)
        self.calls: dict[str, ProbeCall] = {}
        self._transactions: dict[str, _Transaction] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(data, self.target)

    async def request(self, branch: str, data: bytes, *, invite: bool) -> SipMessage:
        """Send a request and retransmit it until its final response (an INVITE: until any
        response); raise ``TimeoutError`` after the transaction's time."""
        loop = asyncio.get_running_loop()
        transaction = _Transaction(data, invite, loop.create_future())
        self._transactions[branch] = transaction
        interval = T1
        deadline = loop.time() + (INVITE_TIMEOUT_S if invite else BYE_TIMEOUT_S)
        try:
            self.send(data)
            while True:
                timeout = min(interval, deadline - loop.time())
                if timeout <= 0:
                    raise TimeoutError("no final response")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(transaction.final), timeout)
                if not transaction.provisional:
                    self.send(data)
                interval = min(interval * 2, 4.0)
        finally:
            del self._transactions[branch]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_sip(data)
        if message is None:
            return
        status = message.status
        if status is not None:
            via = message.get("via") or ""
            transaction = self._transactions.get(_param(via, "branch") or "")
            call = self.calls.get(message.get("call-id") or "")
            if transaction is None:
                if (
                    call is not None
                    and 200 <= status < 300
                    and "INVITE" in (message.get("cseq") or "")
                ):
                    call.send_ack()  # a retransmitted 200: our ACK was lost
                return
            if status < 200:
                transaction.provisional = True
            elif not transaction.final.done():
                transaction.final.set_result(message)
            return
        self._answer(message, addr)

    def _answer(self, request: SipMessage, addr: tuple[str, int]) -> None:
        method = request.start.split(" ", 1)[0]
        if method == "ACK":
            return
        call = self.calls.get(request.get("call-id") or "")
        lines = ["SIP/2.0 200 OK"]
        lines += [f"Via: {via}" for via in request.all("via")]
        for name in ("from", "to", "call-id", "cseq"):
            value = request.get(name)
            if value is not None:
                lines.append(f"{name.title()}: {value}")
        body = ""
        if call is not None and method in ("INVITE", "UPDATE"):
            body = call.sdp()
            lines.append(f"Contact: <sip:{call.user}@{self.local[0]}:{self.local[1]}>")
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        if self.transport is not None:
            self.transport.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), addr)
        if call is not None and method == "BYE":
            call.remote_hangup()


# -- one probe call ---------------------------------------------------------------------------


def _noise_frames(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    frames = rng.integers(-NOISE_LEVEL, NOISE_LEVEL + 1, (count, SAMPLES))
    return [ulaw_encode(frame.astype("<i2").tobytes()) for frame in frames]


def _marker_frames() -> list[list[bytes]]:
    out = []
    for marker in range(8):
        tone = ulaw_encode(marker_tone(marker, 8000))
        out.append([tone[i * SAMPLES : (i + 1) * SAMPLES] for i in range(TONE_FRAMES)])
    return out


def _bind_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """An RTP socket on an even port and the RTCP socket on the next one."""
    for _ in range(100):
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtp.bind((host, 0))
            port = rtp.getsockname()[1]
            if port % 2 == 0 and port < 65534:
                rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    rtcp.bind((host, port + 1))
                except OSError:
                    rtcp.close()
                else:
                    return rtp, rtcp
        except OSError:
            pass
        rtp.close()
    raise OSError("no free RTP/RTCP port pair")


@dataclass
class ProbeCall:
    index: int
    sip: SipEndpoint
    number: str
    clock: MonotonicClock
    user: str = ""
    call_id: str = ""
    tag: str = ""
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    first_sequence: int = field(default_factory=lambda: random.getrandbits(15))
    remote_rtp: tuple[str, int] | None = None
    remote_contact: str | None = None
    to_header: str = ""
    invite_branch: str = ""
    status: int | None = None
    failure: str | None = None
    setup_ms: float | None = None
    answered_at: float | None = None
    ended_by: str | None = None
    bye_status: int | None = None
    sent: int = 0
    send_errors: int = 0
    receive_errors: int = 0
    other_packets: int = 0
    kernel_timestamps: int = 0
    media_started_at: float | None = None
    media_ended_at: float | None = None
    markers_sent: list[tuple[int, float]] = field(default_factory=list)
    echoes: list[tuple[int, float, float]] = field(default_factory=list)
    stats: ReceiveStats = field(default_factory=ReceiveStats)
    rtcp_reports: int = 0
    rtcp_block: dict[str, int] | None = None
    rtp_socket: socket.socket | None = None
    rtcp_socket: socket.socket | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _detector: MarkerDetector = field(default_factory=lambda: MarkerDetector(8000))

    def __post_init__(self) -> None:
        self.user = probe_user(self.index)
        self.call_id = f"{self.user}-{random.getrandbits(48):012x}@aispinner-loadtest"
        self.tag = f"{random.getrandbits(32):08x}"
        self.sip.calls[self.call_id] = self

    @property
    def up(self) -> bool:
        return self.answered_at is not None and self.ended_by is None

    # -- media sockets ------------------------------------------------------------------------
    def open_media(self, host: str) -> None:
        self.rtp_socket, self.rtcp_socket = _bind_pair(host)
        for sock in (self.rtp_socket, self.rtcp_socket):
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        with contextlib.suppress(OSError):
            self.rtp_socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.rtp_socket.fileno(), self._read_rtp)
        loop.add_reader(self.rtcp_socket.fileno(), self._read_rtcp)

    def close_media(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in (self.rtp_socket, self.rtcp_socket):
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
                sock.close()
        self.rtp_socket = self.rtcp_socket = None

    def _read_rtp(self) -> None:
        sock = self.rtp_socket
        assert sock is not None
        space = socket.CMSG_SPACE(16)
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(2048, space)
            except BlockingIOError:
                return
            except OSError:
                self.receive_errors += 1
                return
            arrival = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    seconds, nanos = struct.unpack_from("qq", value)
                    arrival = self.clock.monotonic(seconds * 1_000_000_000 + nanos)
                    self.kernel_timestamps += 1
            self.on_rtp(data, time.monotonic() if arrival is None else arrival)

    def on_rtp(self, data: bytes, arrival: float) -> None:
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError:
            self.other_packets += 1
            return
        if packet.payload_type != 0:
            self.other_packets += 1
            return
        self.stats.on_packet(packet.sequence, packet.timestamp, arrival)
        for detection in self._detector.feed(ulaw_decode(packet.payload), arrival):
            self.echoes.append((detection.marker_id, detection.at, detection.frequency_hz))

    def _read_rtcp(self) -> None:
        sock = self.rtcp_socket
        assert sock is not None
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:
                return
            try:
                packets = parse_compound(data)
            except RtcpParseError:
                continue
            for packet in packets:
                for block in packet.blocks:
                    if block.ssrc != self.ssrc:
                        continue
                    self.rtcp_reports += 1
                    last = self.rtcp_block
                    if last is None or block.highest_sequence >= last["highest_sequence"]:
                        self.rtcp_block = {
                            "cumulative_lost": block.cumulative_lost,
                            "highest_sequence": block.highest_sequence,
                            "fraction_lost": block.fraction_lost,
                        }

    # -- signalling ---------------------------------------------------------------------------
    def sdp(self) -> str:
        host = self.sip.local[0]
        assert self.rtp_socket is not None
        port = self.rtp_socket.getsockname()[1]
        return (
            f"v=0\r\no=probe {self.ssrc} {self.ssrc} IN IP4 {host}\r\ns=aispinner-loadtest\r\n"
            f"c=IN IP4 {host}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
        )

    def _request(self, method: str, cseq: int, branch: str, uri: str, to: str) -> bytes:
        host, port = self.sip.local
        body = self.sdp() if method == "INVITE" else ""
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.user}@{host}>;tag={self.tag}",
            f"To: {to}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{self.user}@{host}:{port}>",
            f"User-Agent: {USER_AGENT}",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body.encode())}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def _request_uri(self) -> str:
        host, port = self.sip.target
        return f"sip:{self.number}@{host}:{port}"

    async def setup(self) -> None:
        """INVITE and ACK; on failure ``failure`` says why."""
        self.invite_branch = _new_branch()
        uri = self._request_uri()
        invite = self._request("INVITE", 1, self.invite_branch, uri, f"<{uri}>")
        started = time.monotonic()
        try:
            response = await self.sip.request(self.invite_branch, invite, invite=True)
        except TimeoutError:
            self.failure = "no final response to INVITE"
            return
        self.status = response.status
        self.to_header = response.get("to") or f"<{uri}>"
        assert self.status is not None
        if self.status >= 300:
            self.failure = f"INVITE answered {response.start[8:]}"
            # RFC 3261 §17.1.1.3: the ACK of a non-2xx final response is in the INVITE's
            # transaction (its branch and Request-URI).
            self.sip.send(self._request("ACK", 1, self.invite_branch, uri, self.to_header))
            return
        self.setup_ms = round((time.monotonic() - started) * 1000, 3)
        contact = response.get("contact")
        self.remote_contact = _uri(contact) if contact else None
        remote = _sdp_media(response.body)
        if remote is None:
            self.failure = "200 OK without a usable SDP answer"
            self.send_ack()
            await self.hangup()
            return
        self.remote_rtp = remote
        self.answered_at = time.monotonic()
        self.send_ack()

    def send_ack(self) -> None:
        uri = self.remote_contact or self._request_uri()
        self.sip.send(self._request("ACK", 1, _new_branch(), uri, self.to_header))

    async def hangup(self) -> None:
        self.stopping.set()
        if self.answered_at is None or self.ended_by is not None:
            return
        self.ended_by = "probe"
        branch = _new_branch()
        uri = self.remote_contact or self._request_uri()
        bye = self._request("BYE", 2, branch, uri, self.to_header)
        try:
            response = await self.sip.request(branch, bye, invite=False)
        except TimeoutError:
            self.bye_status = None
        else:
            self.bye_status = response.status

    def remote_hangup(self) -> None:
        if self.ended_by is None:
            self.ended_by = "remote"
            if self.failure is None:
                self.failure = "the far end hung up"
        self.stopping.set()

    # -- sending ------------------------------------------------------------------------------
    async def send_media(self, start: float, end: float) -> None:
        noise = _noise_frames(50, self.index)
        markers = _marker_frames()
        sequence = self.first_sequence
        timestamp = random.getrandbits(32)
        n = 0
        self.media_started_at = start
        while not self.stopping.is_set():
            due = start + n * FRAME_S
            if due >= end:
                break
            delay = due - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                if self.stopping.is_set():
                    break
            marker = None
            phase = n - MARKER_LEAD_FRAMES
            if phase >= 0 and phase % MARKER_PERIOD_FRAMES < TONE_FRAMES:
                count, part = divmod(phase, MARKER_PERIOD_FRAMES)
                payload = markers[marker_id(count)][part]
                if part == 0:
                    marker = count
            else:
                payload = noise[n % len(noise)]
            header = struct.pack(
                "!BBHII", 0x80, 0, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, self.ssrc
            )
            sock = self.rtp_socket
            if sock is None or self.remote_rtp is None:
                break
            sent_at = time.monotonic()
            try:
                sock.sendto(header + payload, self.remote_rtp)
            except OSError:
                self.send_errors += 1
            else:
                self.sent += 1
                if marker is not None:
                    self.markers_sent.append((marker, sent_at))
            sequence += 1
            timestamp += SAMPLES
            n += 1
        self.media_ended_at = time.monotonic()

    def result(self) -> dict[str, Any]:
        stats = self.stats
        deviations = [round(d * 1000, 3) for d in stats.pacing_deviations_s]
        return {
            "index": self.index,
            "user": self.user,
            "call_id": self.call_id,
            "status": self.status,
            "answered": self.answered_at is not None,
            "failure": self.failure,
            "setup_ms": self.setup_ms,
            "ended_by": self.ended_by,
            "bye_status": self.bye_status,
            "ssrc": self.ssrc,
            "first_sequence": self.first_sequence,
            "sent": self.sent,
            "send_errors": self.send_errors,
            "media_started_at": self.media_started_at,
            "media_ended_at": self.media_ended_at,
            "markers_sent": self.markers_sent,
            "echoes": self.echoes,
            "received": {
                "packets": stats.received,
                "expected": stats.expected,
                "lost": stats.lost,
                "duplicates": stats.duplicates,
                "other_packets": self.other_packets,
                "rfc3550_jitter_ms": round(stats.jitter_s * 1000, 3),
                "pacing_deviation_ms": deviations,
                "kernel_timestamps": self.kernel_timestamps,
                "receive_errors": self.receive_errors,
            },
            "rtcp": None
            if self.rtcp_block is None
            else {"reports": self.rtcp_reports, **self.rtcp_block},
        }


def _sdp_media(body: str) -> tuple[str, int] | None:
    host = None
    port = None
    for line in body.replace("\r\n", "\n").split("\n"):
        if line.startswith("c=IN IP4 "):
            host = line.split()[2]
        elif line.startswith("m=audio "):
            try:
                port = int(line.split()[1])
            except (IndexError, ValueError):
                return None
    if host is None or not port:
        return None
    return host, port


def local_address_for(target: tuple[str, int]) -> str:
    """The address this host would send to ``target`` from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(target)
        return str(probe.getsockname()[0])


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def run_probes(
    target: tuple[str, int], count: int, number: str, seconds: float, local_ip: str
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    clock = MonotonicClock()
    transport, sip = await loop.create_datagram_endpoint(
        lambda: SipEndpoint(target), local_addr=(local_ip, 0)
    )
    calls = [ProbeCall(i, sip, probe_number(number, i), clock) for i in range(count)]
    try:
        for call in calls:
            call.open_media(local_ip)
        await asyncio.gather(*(call.setup() for call in calls))
        up = [call for call in calls if call.up]
        _emit(
            "answered",
            up=len(up),
            failed=len(calls) - len(up),
            setup_ms=[c.setup_ms for c in calls],
            failures=[c.failure for c in calls if c.failure],
        )
        start = time.monotonic() + 0.05
        end = start + seconds
        senders = [
            asyncio.create_task(call.send_media(start + call.index * STAGGER_S, end)) for call in up
        ]
        while time.monotonic() < end and not stop.is_set() and any(c.up for c in up):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            clock.refresh()
            _emit(
                "progress",
                at=time.monotonic(),
                up=sum(1 for c in calls if c.up),
                markers_sent=sum(len(c.markers_sent) for c in calls),
                echoes=sum(len(c.echoes) for c in calls),
            )
        for call in calls:
            call.stopping.set()
        await asyncio.gather(*senders)
        await asyncio.gather(*(call.hangup() for call in calls))
        await asyncio.sleep(RTCP_LINGER_S)
    finally:
        for call in calls:
            call.close_media()
        transport.close()
    results = [call.result() for call in calls]
    _emit("done", up=0)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.loadtest.probe",
        description="Probe phones: calls with timing markers, measured from outside.",
    )
    parser.add_argument("--target", required=True, help="HOST:PORT of the SIP address to call")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--number", default="loadtest", help="probe i calls NUMBER-probe-i")
    parser.add_argument("--seconds", type=float, required=True, help="media time per call")
    parser.add_argument("--local-ip", help="address to send from (default: the route's)")
    parser.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    target = (socket.gethostbyname(host.strip("[]")), int(port))
    local_ip = args.local_ip or local_address_for(target)
    runner: Any
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    results = runner(run_probes(target, args.calls, args.number, args.seconds, local_ip))
    args.out.write_text(json.dumps({"calls": results}) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
