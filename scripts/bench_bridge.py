#!/usr/bin/env python3
"""Benchmark: bridge latency inside the worker, caller ↔ agent, at 100 concurrent calls.

Method. The worker runs in this process on uvloop, as in production, with a jambonz route
whose agent answers every call with ``listen`` (8 kHz, bidirectional streaming). Everything
else runs in a second process (its own core and uvloop): a minimal SIP UAC that places the calls
over UDP (INVITE with a PCMU + telephone-event offer, ACK, and a BYE at the end), one real UDP
socket per call acting as the phone (a 20 ms PCMU packet per call every 20 ms, the calls spread
over the 20 ms period, and reading what the worker sends back), and the agent (a ``websockets``
server that echoes every binary audio frame straight back on the listen socket, so the
agent → caller direction carries as much audio as the other one).

The worker's code is timed, not changed: a few of its methods are wrapped with
``time.perf_counter_ns`` probes. The jitter buffer's and the pacer's intended delays are
excluded by measuring the two processing halves of each direction separately:

caller → agent
  ``in.arrival``  RtpEndpoint.datagram_received: entry → return (parse, latch, jitter buffer)
  ``in.tick``     the tick's RtpStream.pull_frame → ListenConnection.send_audio for that call
                  (jitter buffer read, beep detector, resampler, agent sink; VAD only with
                  barge-in; G.711 decoding happens on arrival, the recorder after the send)
agent → caller
  ``out.arrival`` the listen socket's reader gets a binary frame → the playout buffer has it
                  (ListenConnection._receive → MediaPipeline.agent_audio returns)
  ``out.tick``    the tick's MediaPipeline.next_out → RtpEndpoint.send has handed the packet
                  to the socket (playout read, G.711 encode, RTP build, sendto)

The headline per direction is ``arrival p99 + tick p99``, an upper bound of the processing
path's p99 (target: below 2 ms). Also reported, for context, not part of the target:
``in.queue`` (send_audio → the socket writer's ``ws.send``: the bounded send queue and the
writer task's wake-up), ``out.wakeup`` (the last bytes read from the agent's TCP connection →
the reader gets the frame; approximate when several reads are pending), ``tick.all`` (one
pacer tick for every call: the last call of a tick waits for the others) and the ticks the pacer
skipped. Percentiles are over every sample taken during the measured window (after warm-up).

Run: ``.venv/bin/python scripts/bench_bridge.py [--calls 100] [--seconds 10] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import struct
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import uvloop  # noqa: E402

from tests.sipp import free_port  # noqa: E402

TARGET_MS = 2.0
FRAME_S = 0.020
NUMBER = "bench"

# --------------------------------------------------------------------------- the probes


class Probes:
    """Latency samples in ns per metric, taken only while ``enabled``."""

    NAMES = (
        "in.arrival",
        "in.tick",
        "in.queue",
        "out.wakeup",
        "out.arrival",
        "out.tick",
        "tick.all",
    )

    def __init__(self) -> None:
        self.enabled = False
        self.samples: dict[str, list[int]] = {name: [] for name in self.NAMES}

    def add(self, name: str, ns: int) -> None:
        if self.enabled:
            self.samples[name].append(ns)


def install_probes(probes: Probes) -> None:
    """Wrap the worker's methods on the two processing paths (see the module docstring)."""
    from websockets.asyncio.connection import Connection as WsConnection

    from media.stream import RtpStream
    from worker.agent.connection import AudioQueue, ListenConnection
    from worker.pacer import MediaPacer
    from worker.rtp import RtpEndpoint
    from worker.session.pipeline import MediaPipeline

    now = time.perf_counter_ns
    state: dict[str, int | None] = {"pull": None, "next_out": None, "arrival": None}
    last_read: dict[int, int] = {}
    pushed: dict[int, deque[int]] = {}

    def wrap(cls: Any, name: str, make: Callable[[Any], Any]) -> None:
        setattr(cls, name, make(getattr(cls, name)))

    def datagram_received(orig: Any) -> Any:
        def f(self: Any, data: bytes, addr: Any) -> None:
            t0 = now()
            orig(self, data, addr)
            probes.add("in.arrival", now() - t0)

        return f

    def pull_frame(orig: Any) -> Any:
        def f(self: Any, at: float) -> Any:
            state["pull"] = now()
            return orig(self, at)

        return f

    def send_audio(orig: Any) -> Any:
        def f(self: Any, pcm: bytes) -> None:
            t0 = state["pull"]
            if t0 is not None:
                probes.add("in.tick", now() - t0)
                state["pull"] = None
            orig(self, pcm)

        return f

    def push(orig: Any) -> Any:
        def f(self: Any, frame: bytes) -> None:
            before = len(self)
            orig(self, frame)
            stamps = pushed.setdefault(id(self), deque())
            stamps.append(now())
            for _ in range(before + 1 - len(self)):  # the oldest were dropped
                stamps.popleft()

        return f

    def pop(orig: Any) -> Any:
        def f(self: Any) -> Any:
            out = orig(self)
            stamps = pushed.get(id(self))
            if stamps:
                probes.add("in.queue", now() - stamps.popleft())
            return out

        return f

    def data_received(orig: Any) -> Any:
        def f(self: Any, data: bytes) -> None:
            last_read[id(self)] = now()
            orig(self, data)

        return f

    def receive(orig: Any) -> Any:
        def f(self: Any, data: Any, at: float) -> Any:
            t0 = now()
            if isinstance(data, bytes) and data and self._ws is not None:
                read = last_read.get(id(self._ws))
                if read is not None:
                    probes.add("out.wakeup", t0 - read)
                state["arrival"] = t0
            return orig(self, data, at)

        return f

    def agent_audio(orig: Any) -> Any:
        def f(self: Any, pcm: bytes, rate: int) -> None:
            orig(self, pcm, rate)
            t0 = state["arrival"]
            if t0 is not None:
                probes.add("out.arrival", now() - t0)
                state["arrival"] = None

        return f

    def next_out(orig: Any) -> Any:
        def f(self: Any) -> bytes:
            state["next_out"] = now()
            out: bytes = orig(self)
            return out

        return f

    def send(orig: Any) -> Any:
        def f(self: Any, data: bytes) -> None:
            orig(self, data)
            t0 = state["next_out"]
            if t0 is not None:
                probes.add("out.tick", now() - t0)
                state["next_out"] = None

        return f

    def run_tick(orig: Any) -> Any:
        def f(self: Any) -> None:
            t0 = now()
            orig(self)
            probes.add("tick.all", now() - t0)

        return f

    wrap(RtpEndpoint, "datagram_received", datagram_received)
    wrap(RtpEndpoint, "send", send)
    wrap(RtpStream, "pull_frame", pull_frame)
    wrap(ListenConnection, "send_audio", send_audio)
    wrap(ListenConnection, "_receive", receive)
    wrap(AudioQueue, "push", push)
    wrap(AudioQueue, "pop", pop)
    wrap(WsConnection, "data_received", data_received)
    wrap(MediaPipeline, "agent_audio", agent_audio)
    wrap(MediaPipeline, "next_out", next_out)
    wrap(MediaPacer, "_run", run_tick)


def listening(worker: Any) -> Iterator[Any]:
    """The running ``listen`` verbs of the worker's calls."""
    from worker.session.jambonz_driver import JambonzDriver

    for session in worker.sessions.values():
        driver = session.driver
        if isinstance(driver, JambonzDriver) and driver.listen is not None:
            yield driver.listen


# --------------------------------------------------------------------------- the load process


class Phone(asyncio.DatagramProtocol):
    """One call's RTP peer: sends PCMU every 20 ms when told, counts what comes back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.remote: tuple[str, int] | None = None
        self.received = 0
        self.seq = random.randrange(65536)
        self.ts = random.randrange(1 << 32)
        self.ssrc = random.randrange(1 << 32)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1

    def send(self, payload: bytes) -> None:
        if self.transport is None or self.remote is None:
            return
        header = struct.pack("!BBHII", 0x80, 0, self.seq & 0xFFFF, self.ts & 0xFFFFFFFF, self.ssrc)
        self.transport.sendto(header + payload, self.remote)
        self.seq += 1
        self.ts += 160


class MiniUac(asyncio.DatagramProtocol):
    """Just enough of a SIP UAC for the bench: INVITE, ACK the 200 (and its retransmissions),
    BYE. Not a SIP implementation; the worker's own tests cover SIP."""

    def __init__(self, worker: tuple[str, int]) -> None:
        self.worker = worker
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.calls: dict[str, dict[str, Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def _send(self, text: str) -> None:
        assert self.transport is not None
        self.transport.sendto(text.replace("\n", "\r\n").encode(), self.worker)

    def invite(self, index: int, rtp_port: int) -> asyncio.Future[None]:
        call_id = f"bench-{index}-{os.getpid()}@127.0.0.1"
        sdp = (
            "v=0\no=- 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\n"
            f"m=audio {rtp_port} RTP/AVP 0 101\na=rtpmap:0 PCMU/8000\n"
            "a=rtpmap:101 telephone-event/8000\na=fmtp:101 0-16\n"
        )
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls[call_id] = {"index": index, "answered": answered, "to": None, "rtp_port": None}
        length = len(sdp) + sdp.count("\n")  # sent with CRLF line ends
        self._send(
            f"INVITE sip:{NUMBER}@{self.worker[0]}:{self.worker[1]} SIP/2.0\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-inv-{index}\n"
            f"From: <sip:load{index}@127.0.0.1>;tag=load{index}\n"
            f"To: <sip:{NUMBER}@127.0.0.1>\n"
            f"Call-ID: {call_id}\nCSeq: 1 INVITE\n"
            f"Contact: <sip:load@127.0.0.1:{self.port}>\nMax-Forwards: 70\n"
            f"Content-Type: application/sdp\nContent-Length: {length}\n\n" + sdp
        )
        return answered

    def _in_dialog(self, method: str, call_id: str, cseq: int, branch: str) -> None:
        call = self.calls[call_id]
        index = call["index"]
        self._send(
            f"{method} sip:{NUMBER}@{self.worker[0]}:{self.worker[1]} SIP/2.0\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch}\n"
            f"From: <sip:load{index}@127.0.0.1>;tag=load{index}\n"
            f"To: {call['to']}\nCall-ID: {call_id}\nCSeq: {cseq} {method}\n"
            f"Max-Forwards: 70\nContent-Length: 0\n\n"
        )

    def bye(self, call_id: str) -> None:
        self._in_dialog("BYE", call_id, 2, f"z9hG4bK-bye-{self.calls[call_id]['index']}")

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        text = data.decode(errors="replace")
        head, _, body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
        call_id = headers.get("call-id", "")
        call = self.calls.get(call_id)
        if lines[0].startswith("SIP/2.0 "):
            code = int(lines[0].split()[1])
            if call is None or not headers.get("cseq", "").endswith("INVITE") or code < 200:
                return
            call["to"] = headers.get("to")
            index = call["index"]
            self._in_dialog("ACK", call_id, 1, f"z9hG4bK-ack-{index}")
            if code == 200 and not call["answered"].done():
                call["rtp_port"] = next(
                    int(line.split()[1]) for line in body.split("\r\n") if line.startswith("m=")
                )
                call["answered"].set_result(None)
            elif not call["answered"].done():
                call["answered"].set_exception(RuntimeError(f"call {index} got {code}"))
        elif call is not None:  # a request from the worker (BYE): answer 200
            self._send(
                "SIP/2.0 200 OK\n"
                + "".join(
                    f"{name}: {headers[name.lower()]}\n"
                    for name in ("Via", "From", "To", "Call-ID", "CSeq")
                    if name.lower() in headers
                )
                + "Content-Length: 0\n\n"
            )


async def _agent_server(ready: Callable[[str], None], stop: asyncio.Event) -> dict[str, int]:
    """The echo agent: ``listen`` with streaming, every audio frame sent straight back."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    counts = {"control": 0, "listen": 0, "frames": 0}
    listen_url = ""

    async def handle(ws: ServerConnection) -> None:
        assert ws.request is not None
        try:
            if ws.request.path.startswith("/listen"):
                counts["listen"] += 1
                async for message in ws:
                    if isinstance(message, bytes) and message:
                        counts["frames"] += 1
                        await ws.send(message)
                return
            counts["control"] += 1
            async for message in ws:
                msg = json.loads(message)
                if msg.get("type") == "session:new":
                    verb = {
                        "verb": "listen",
                        "url": listen_url,
                        "sampleRate": 8000,
                        "bidirectionalAudio": {"streaming": True, "sampleRate": 8000},
                    }
                    await ws.send(
                        json.dumps({"type": "ack", "msgid": msg["msgid"], "data": [verb]})
                    )
                elif msg.get("msgid") and msg.get("type") not in ("call:status", "verb:status"):
                    await ws.send(json.dumps({"type": "ack", "msgid": msg["msgid"]}))
        except ConnectionClosed:
            pass

    def select(connection: ServerConnection, offered: Any) -> Any:
        for name in ("ws.jambonz.org", "audio.jambonz.org"):
            if name in offered:
                return name
        return None

    async with serve(handle, "127.0.0.1", 0, select_subprotocol=select, compression=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        listen_url = f"ws://127.0.0.1:{port}/listen"
        ready(f"ws://127.0.0.1:{port}/app")
        await stop.wait()
    return counts


async def _load(pipe: Connection, calls: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    agent = asyncio.create_task(_agent_server(pipe.send, stop))
    worker_sip: int = await loop.run_in_executor(None, pipe.recv)
    _, uac = await loop.create_datagram_endpoint(
        lambda: MiniUac(("127.0.0.1", worker_sip)), local_addr=("127.0.0.1", 0)
    )
    phones: list[Phone] = []
    answers = []
    for index in range(calls):
        _, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
        phones.append(phone)
        assert phone.transport is not None
        answers.append(uac.invite(index, phone.transport.get_extra_info("sockname")[1]))
        await asyncio.sleep(0.01)  # 100 call attempts per second
    await asyncio.wait_for(asyncio.gather(*answers), 30)
    by_index = {c["index"]: c for c in uac.calls.values()}
    for index, phone in enumerate(phones):
        phone.remote = ("127.0.0.1", by_index[index]["rtp_port"])
    pipe.send("answered")

    # Speech-like PCMU payloads, one per call (caller audio the VAD and recorder see as real).
    from media.g711 import ulaw_encode

    t = np.arange(8000 * 4) / 8000
    voice = sum(np.sin(2 * math.pi * k * 140 * t) / k for k in range(1, 6))
    pcm = (5000 * voice * (np.sin(2 * math.pi * 0.5 * t) > -0.3)).astype("<i2").tobytes()
    payloads = [ulaw_encode(pcm[i : i + 320]) for i in range(0, len(pcm), 320)]

    async def stream() -> None:
        groups = 10  # calls spread over the 20 ms period, 2 ms apart
        start = loop.time()
        tick = 0
        while True:
            for group in range(groups):
                due = start + tick * FRAME_S + group * FRAME_S / groups
                await asyncio.sleep(max(0.0, due - loop.time()))
                payload = payloads[tick % len(payloads)]
                for phone in phones[group::groups]:
                    phone.send(payload)
            tick += 1

    sender = asyncio.create_task(stream())
    await loop.run_in_executor(None, pipe.recv)  # "hang up"
    sender.cancel()
    for call_id in uac.calls:
        uac.bye(call_id)
    await asyncio.sleep(1.0)
    stop.set()
    counts = await agent
    pipe.send({"rtp_back": sum(p.received for p in phones), **counts})


def load_main(pipe: Connection, calls: int) -> None:
    uvloop.run(_load(pipe, calls))


# --------------------------------------------------------------------------- the run


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    a = np.asarray(values, dtype=np.float64) / 1e6
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "max_ms": round(float(a.max()), 4),
    }


LOAD_SILENCE_S = 60.0  # the load process answers each step well within this


async def run(calls: int, seconds: float, warmup: float, record: bool) -> dict[str, Any]:
    from worker.app import Worker
    from worker.config import load_settings

    probes = Probes()
    install_probes(probes)
    parent, child = mp.get_context("spawn").Pipe()
    load = mp.get_context("spawn").Process(target=load_main, args=(child, calls), daemon=True)
    load.start()
    loop = asyncio.get_running_loop()

    async def from_load() -> Any:
        """The load process's next message; fails (never hangs) if it died or went silent."""
        ready = await loop.run_in_executor(None, parent.poll, LOAD_SILENCE_S)
        if not ready:
            alive = "alive" if load.is_alive() else f"exited with {load.exitcode}"
            raise RuntimeError(f"no word from the load process in {LOAD_SILENCE_S:.0f} s ({alive})")
        return parent.recv()

    try:
        agent_url: str = await from_load()
        sip_port = free_port()
        rtp_span = 4 * calls + 8  # the worker's RTP ports, with room to spare
        rtp_low = free_port(span=rtp_span)
        with tempfile.TemporaryDirectory(prefix="bench-bridge-") as data_dir:
            settings = load_settings(
                None,
                data_dir=data_dir,
                log={"level": "warning"},
                sip={"port": sip_port},
                rtp={"port_min": rtp_low, "port_max": rtp_low + rtp_span},
                store=False,
                routes=[
                    {"match": NUMBER, "action": "agent", "agent_url": agent_url, "record": record}
                ],
            )
            worker = Worker(settings)
            await worker.start()
            try:
                parent.send(sip_port)
                answered = await from_load()
                assert answered == "answered"
                deadline = loop.time() + 15
                while sum(1 for _ in listening(worker)) < calls:
                    if loop.time() > deadline:
                        raise RuntimeError(
                            f"only {len(worker.sessions)} of {calls} calls reached the agent"
                        )
                    await asyncio.sleep(0.05)
                await asyncio.sleep(warmup)
                assert worker.pacer is not None
                skipped = worker.pacer.skipped
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                wall0 = time.perf_counter()
                probes.enabled = True
                await asyncio.sleep(seconds)
                probes.enabled = False
                wall = time.perf_counter() - wall0
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                skipped = worker.pacer.skipped - skipped
                live = len(worker.sessions)
                dropped_to_agent = sum(
                    listen.connection.dropped_frames for listen in listening(worker)
                )
                parent.send("hang up")
                load_counts = await from_load()
                await asyncio.sleep(0.5)
            finally:
                await worker.close()
    finally:
        load.join(10)
        if load.is_alive():
            load.kill()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    metrics = {name: _percentiles(values) for name, values in probes.samples.items()}
    inbound = metrics["in.arrival"]["p99_ms"] + metrics["in.tick"]["p99_ms"]
    outbound = metrics["out.arrival"]["p99_ms"] + metrics["out.tick"]["p99_ms"]
    return {
        "calls": calls,
        "live_calls_during_window": live,
        "seconds": round(wall, 2),
        "record": record,
        "worker_cpu_percent": round(100 * cpu / wall, 1),
        "pacer_ticks_skipped": skipped,
        "frames_dropped_to_agent": dropped_to_agent,
        "metrics": metrics,
        "caller_to_agent_p99_ms": round(inbound, 4),
        "agent_to_caller_p99_ms": round(outbound, 4),
        "target_p99_ms": TARGET_MS,
        "meets_target": inbound < TARGET_MS and outbound < TARGET_MS,
        "load": load_counts,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--no-record", action="store_true", help="do not record the calls")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = uvloop.run(run(args.calls, args.seconds, args.warmup, not args.no_record))
    print(
        f"bridge latency inside the worker, {result['calls']} calls, {result['seconds']} s "
        f"measured, worker CPU {result['worker_cpu_percent']} %, "
        f"pacer ticks skipped {result['pacer_ticks_skipped']}"
    )
    print(f"{'metric':<12} {'samples':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, m in result["metrics"].items():
        print(
            f"{name:<12} {m['count']:>8} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} "
            f"{m['max_ms']:>8.3f}"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(
        f"caller->agent p99 {result['caller_to_agent_p99_ms']:.3f} ms, "
        f"agent->caller p99 {result['agent_to_caller_p99_ms']:.3f} ms "
        f"(arrival p99 + tick p99): {verdict} the {TARGET_MS:g} ms target"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
