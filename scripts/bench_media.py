#!/usr/bin/env python3
"""Benchmark: the cost of one call's whole media path per 20 ms, both directions.

Caller → agent: RTP parse → jitter buffer → G.711 decode → VAD → resample 8→16 kHz → recorder.
Agent → caller: playout buffer → resample 16→8 kHz → G.711 encode → RTP build → recorder.
The recorder is the stereo MP3 (caller left, agent right). Prints µs per 20 ms of call and what
that means in calls per core; ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from media.g711 import PCMU
from media.playout import PlayoutBuffer
from media.recorder import StereoMp3Recorder
from media.resample import Resampler
from media.rtp import RtpCounters, RtpSender, parse_or_count
from media.stream import FRAME_SAMPLES, RtpStream
from media.vad import VoiceActivityDetector

TICK = 0.020
AGENT_RATE = 16000


def speechlike(seconds: float, rate: int, seed: int) -> bytes:
    """Bursts of harmonics and noise with pauses: exercises VAD, codec and MP3 realistically."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 0.4 * t) > -0.2).astype(np.float64)
    signal = 6000 * voice * envelope + 300 * rng.standard_normal(t.size)
    return np.clip(signal, -32768, 32767).astype("<i2").tobytes()


def run(calls: int, seconds: float, low_latency: bool, workdir: Path) -> dict[str, Any]:
    ticks = int(seconds / TICK)
    caller_pcm = speechlike(seconds, 8000, 1)
    agent_pcm = speechlike(seconds, AGENT_RATE, 2)
    # What the caller's phone sends: pre-built RTP datagrams, as they would arrive.
    phone = RtpSender(PCMU.payload_type, 0x1234)
    frame_bytes = FRAME_SAMPLES * 2
    datagrams = [
        phone.build(PCMU.encode(caller_pcm[i * frame_bytes : (i + 1) * frame_bytes]), FRAME_SAMPLES)
        for i in range(ticks)
    ]
    agent_chunk = AGENT_RATE * 2 * 20 // 1000

    in_total = 0.0
    out_total = 0.0
    for call in range(calls):
        stream = RtpStream(PCMU, 101)
        counters = RtpCounters()
        vad = VoiceActivityDetector(8000, 2)
        up = Resampler(8000, AGENT_RATE, low_latency=low_latency)
        down = Resampler(AGENT_RATE, 8000, low_latency=low_latency)
        playout = PlayoutBuffer(AGENT_RATE)
        recorder = StereoMp3Recorder(workdir / f"call{call}.mp3", 8000)
        agent_pending = bytearray()
        clock = time.perf_counter
        for i in range(ticks):
            now = 100.0 + i * TICK
            # caller -> agent
            t0 = clock()
            packet = parse_or_count(datagrams[i], counters)
            if packet is not None:
                stream.receive(packet, now)
            frame = stream.pull_frame(now)
            if frame is not None:
                vad.process(frame, now)
                to_agent = up.process(frame)
                recorder.write("caller", frame)
            t1 = clock()
            # agent -> caller (the agent's 20 ms arrives; one frame leaves)
            playout.write(agent_pcm[i * agent_chunk : (i + 1) * agent_chunk])
            out16, _marks = playout.next_frame()
            agent_pending += down.process(out16)
            if len(agent_pending) >= frame_bytes:
                out8 = bytes(agent_pending[:frame_bytes])
                del agent_pending[:frame_bytes]
                stream.send_frame(out8)
                recorder.write("agent", out8)
            t2 = clock()
            in_total += t1 - t0
            out_total += t2 - t1
        del to_agent
        recorder.close()
    frames = calls * ticks
    per_tick_us = (in_total + out_total) / frames * 1e6
    return {
        "calls": calls,
        "seconds_per_call": seconds,
        "resampler_low_latency": low_latency,
        "caller_to_agent_us_per_20ms": round(in_total / frames * 1e6, 2),
        "agent_to_caller_us_per_20ms": round(out_total / frames * 1e6, 2),
        "total_us_per_20ms": round(per_tick_us, 2),
        "calls_per_core": math.floor(20_000 / per_tick_us),
        "target_us_per_20ms": 80.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls simulated (default 20)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per call (default 10)")
    parser.add_argument(
        "--high-latency-resampler",
        action="store_true",
        help="use soxr's cheaper fixed-rate engine (bursty, ~80 ms extra latency)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        # Warm up (tables, soxr, lame), then measure.
        run(1, 1.0, not args.high_latency_resampler, Path(tmp))
        result = run(args.calls, args.seconds, not args.high_latency_resampler, Path(tmp))
    result["python"] = platform.python_version()
    result["cpu_count"] = os.cpu_count() or 0
    print("media path, one call, per 20 ms of audio (both directions, stereo MP3 included)")
    print(f"  caller → agent : {result['caller_to_agent_us_per_20ms']:8.2f} µs")
    print(f"  agent → caller : {result['agent_to_caller_us_per_20ms']:8.2f} µs")
    print(f"  total          : {result['total_us_per_20ms']:8.2f} µs   (target ≤ 80 µs)")
    print(f"  calls per core : {result['calls_per_core']:8d}       (target ≥ 250)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
