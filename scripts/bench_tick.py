#!/usr/bin/env python3
"""Benchmark: the work of one call per 20 ms tick, as the worker's tick does it, in time and
in CPU instructions (callgrind), so a change to the 20 ms path shows as a stable figure.

Per call and per tick, with the production classes and the production settings of an agent
call (jambonz ``listen`` at 16 kHz, recording on, voicemail detection as the route's default for
the direction given): the caller's RTP datagram is parsed, goes through RTCP's receive side and
the stream (G.711 decode, jitter buffer); then what ``CallSession.tick_in`` and ``tick_out``
run: the leg's ``pull_frame``, ``MediaPipeline.take_caller`` (taps, 8 → 16 kHz to the agent
sink), ``next_out``, the RTP packet built for the caller (G.711 encode, RTCP's send side),
``MediaPipeline.after_send`` (the stereo MP3 recorder); and the agent's 16 kHz echo of that
frame back into the pipeline (16 → 8 kHz, playout buffer, its arrival time noted). The jitter
buffer has the worker's settings (``RtpSettings``; ``--jitter-early off`` for the other mode).
Sockets, the event loop and the WebSocket framing are not in it: ``make loadtest`` measures the
whole worker from outside.

Instructions: ``--instructions`` runs this script twice under ``valgrind --tool=callgrind``, with
``--ticks`` and with twice as many, and divides the difference by calls × ticks: start-up and
imports cancel out, and the figure does not depend on what else the machine is doing.

Run: ``.venv/bin/python scripts/bench_tick.py [--calls 20] [--ticks 500] [--direction inbound]
[--jitter-early on|off] [--instructions] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from media.g711 import PCMU  # noqa: E402
from media.recorder import StereoMp3Recorder  # noqa: E402
from media.rtcp import RtcpSession  # noqa: E402
from media.rtp import RtpCounters, RtpSender, parse_or_count  # noqa: E402
from media.stream import FRAME_SAMPLES, RtpStream  # noqa: E402
from worker.config import RouteSettings, RtpSettings  # noqa: E402
from worker.session.pipeline import AgentSink, MediaPipeline  # noqa: E402
from worker.session.session import detects_voicemail  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from bench_media import speechlike  # noqa: E402

TICK = 0.020
AGENT_RATE = 16000


class _Call:
    """One call's media objects, wired as the session wires them."""

    def __init__(self, index: int, workdir: Path, direction: str, rtp: RtpSettings) -> None:
        route = RouteSettings(match="bench", action="agent", agent_url="ws://127.0.0.1:1/")
        self.sent: list[bytes] = []
        self.stream = RtpStream(
            PCMU,
            101,
            jitter_min_ms=rtp.jitter_min_ms,
            jitter_max_ms=rtp.jitter_max_ms,
            jitter_early=rtp.jitter_early,
            ssrc=0x5000 + index,
        )
        self.rtcp = RtcpSession(self.stream.sender.ssrc, f"bench{index}")
        self.counters = RtpCounters()
        self.pipeline = MediaPipeline(
            barge_in=route.barge_in,
            detect_beep=detects_voicemail(route, direction),
            timer=time.perf_counter,
        )
        self.pipeline.sink = AgentSink(self.sent.append, AGENT_RATE)
        self.pipeline.recorder = StereoMp3Recorder(workdir / f"call{index}.mp3", 8000)

    def tick(self, datagram: bytes, now: float) -> bytes:
        packet = parse_or_count(datagram, self.counters)
        if packet is not None:
            self.rtcp.on_rtp(packet.ssrc, packet.sequence, packet.timestamp, now)
            self.stream.receive(packet, now)
        # CallSession.tick_in
        caller = self.stream.pull_frame(now)
        self.stream.poll_dtmf(now)
        pipeline = self.pipeline
        pipeline.take_caller(caller, now)
        # CallSession.tick_out
        out = pipeline.next_out()
        rtp = self.stream.send_frame(out)
        self.rtcp.on_sent(len(rtp) - 12)
        pipeline.after_send(caller, out)
        pipeline.events.clear()
        # the agent's echo of what it was sent
        sent = self.sent
        for chunk in sent:
            pipeline.agent_audio(chunk, AGENT_RATE, now)
        sent.clear()
        return rtp

    def close(self) -> None:
        self.pipeline.close()


def run(
    calls: int, ticks: int, direction: str, workdir: Path, jitter_early: bool = True
) -> dict[str, Any]:
    seconds = ticks * TICK
    caller_pcm = speechlike(seconds, 8000, 1)
    frame_bytes = FRAME_SAMPLES * 2
    datagrams = []
    for c in range(calls):
        phone = RtpSender(PCMU.payload_type, 0x1000 + c)
        datagrams.append(
            [
                phone.build(
                    PCMU.encode(caller_pcm[i * frame_bytes : (i + 1) * frame_bytes]),
                    FRAME_SAMPLES,
                )
                for i in range(ticks)
            ]
        )
    rtp = RtpSettings(jitter_early=jitter_early)
    legs = [_Call(c, workdir, direction, rtp) for c in range(calls)]
    started = time.perf_counter()
    for i in range(ticks):
        now = 100.0 + i * TICK
        for c, call in enumerate(legs):
            call.tick(datagrams[c][i], now)
    elapsed = time.perf_counter() - started
    for call in legs:
        call.close()
    per_tick_us = elapsed / (calls * ticks) * 1e6
    return {
        "calls": calls,
        "ticks": ticks,
        "direction": direction,
        "jitter_early": jitter_early,
        "us_per_call_per_20ms": round(per_tick_us, 2),
        "percent_of_a_core_per_call": round(per_tick_us / 20_000 * 100, 3),
    }


def _callgrind(calls: int, ticks: int, direction: str, jitter_early: bool) -> int:
    """Instructions of a whole run of this script under callgrind."""
    with tempfile.TemporaryDirectory(prefix="bench-tick-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--calls",
            str(calls),
            "--ticks",
            str(ticks),
            "--direction",
            direction,
            "--jitter-early",
            "on" if jitter_early else "off",
        ]
        env = dict(os.environ, PYTHONHASHSEED="0")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"valgrind failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        match = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
        if match is None:
            raise SystemExit(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
        return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls ticked (default 20)")
    parser.add_argument("--ticks", type=int, default=500, help="20 ms ticks (default 500)")
    parser.add_argument(
        "--direction",
        choices=("inbound", "outbound"),
        default="inbound",
        help="the calls' direction (voicemail detection follows the route's default for it)",
    )
    parser.add_argument(
        "--jitter-early",
        choices=("on", "off"),
        default="on",
        help="rtp.jitter_early for the calls' streams (default on, the worker's default)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per call per tick with callgrind (two runs; slow)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.ticks < 50:
        parser.error("need --calls >= 1 and --ticks >= 50")

    if args.instructions:
        if not args.json:
            print(f"callgrind: {args.calls} calls, {args.ticks} and {2 * args.ticks} ticks ...")
        early = args.jitter_early == "on"
        base = _callgrind(args.calls, args.ticks, args.direction, early)
        double = _callgrind(args.calls, 2 * args.ticks, args.direction, early)
        per = (double - base) / (args.calls * args.ticks)
        result: dict[str, Any] = {
            "calls": args.calls,
            "ticks": args.ticks,
            "direction": args.direction,
            "jitter_early": early,
            "instructions_per_call_per_20ms": round(per),
        }
        print(f"instructions per call per 20 ms ({args.direction}): {per:,.0f}")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-tick-") as tmp:
            result = run(
                args.calls, args.ticks, args.direction, Path(tmp), args.jitter_early == "on"
            )
        print(
            f"one call's tick ({args.direction}, {args.calls} calls, {args.ticks} ticks): "
            f"{result['us_per_call_per_20ms']:.1f} µs per 20 ms = "
            f"{result['percent_of_a_core_per_call']:.3f} % of a core"
        )
    result["python"] = platform.python_version()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
