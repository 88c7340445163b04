#!/usr/bin/env python3
"""Benchmark: an INVITE flood beside live calls (issue 11), measured from outside the worker.

Runs ``aispinner-worker run`` in its own process (``bench_sip.WorkerProcess``: loopback,
``sip.trusted_sources`` = 127.0.0.1 only, the default per-source rate limits) and:

1. starts ``--calls`` live SIPp calls (127.0.0.1) streaming µ-law to the echo route;
2. floods INVITEs from one other source (127.0.0.2, not trusted: an attacker on the internet)
   at ``--rate`` per second for ``--seconds``, reading every datagram the worker sends back to
   it: the headline is **packets the worker sent per flood INVITE** (target at most 1);
3. once the flood stops, times a normal call from 127.0.0.1: **seconds until it is accepted**
   (target under 1 s);
4. reads the live calls' RTP figures from the worker's ``call ended`` log records: **loss**
   (lost + late + overflow in the jitter buffer over packets received, target under 0.1 %);
5. reports the worker's CPU (``/proc``) during the flood.

Run: ``.venv/bin/python scripts/bench_flood.py [--rate 2000] [--seconds 10] [--calls 50]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_sip import CpuMeter, WorkerProcess, sipp_in  # noqa: E402

from media.g711 import PCMU  # noqa: E402

FLOOD_SOURCE = "127.0.0.2"


def flood_invite(port: int, n: int, worker_port: int) -> bytes:
    body = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
        "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    return (
        f"INVITE sip:echo@127.0.0.1:{worker_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {FLOOD_SOURCE}:{port};branch=z9hG4bKflood{n}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:flood@{FLOOD_SOURCE}>;tag=f{n}\r\n"
        "To: <sip:echo@127.0.0.1>\r\n"
        f"Call-ID: flood-{n}@{FLOOD_SOURCE}\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:flood@{FLOOD_SOURCE}:{port}>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


async def flood(worker: WorkerProcess, rate: int, seconds: float) -> dict[str, Any]:
    """Send INVITEs at ``rate``/s from one socket; count what comes back to it (everything the
    worker sends about them goes there, if anywhere)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((FLOOD_SOURCE, 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    target = ("127.0.0.1", worker.port)
    received: dict[str, int] = {}

    def drain() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            status = data.split(b" ", 2)[1].decode(errors="replace") if data else "?"
            received[status] = received.get(status, 0) + 1

    sent = 0
    started = time.monotonic()
    period = 0.01
    per_tick = max(1, round(rate * period))
    try:
        while time.monotonic() - started < seconds:
            for _ in range(per_tick):
                try:
                    sock.sendto(flood_invite(port, sent, worker.port), target)
                except BlockingIOError:
                    continue
                sent += 1
            drain()
            await asyncio.sleep(period)
        stop = time.monotonic()
        while time.monotonic() - stop < 2.0:  # late answers, retransmissions if any
            drain()
            await asyncio.sleep(0.05)
    finally:
        sock.close()
    total = sum(received.values())
    return {
        "invites_sent": sent,
        "rate_achieved": round(sent / seconds, 1),
        "packets_back": total,
        "packets_back_by_status": received,
        "packets_per_invite": round(total / max(sent, 1), 4),
    }


async def normal_call_after(worker: WorkerProcess, workdir: Path) -> float:
    """Seconds from now until a normal INVITE from 127.0.0.1 is answered (its whole setup)."""
    started = time.monotonic()
    sipp = sipp_in(workdir / "after", worker, "uac_setup.xml", "-m", "1", timeout=20)
    result = await sipp.run()
    if result.returncode != 0:
        print(result.explain()[-1500:], file=sys.stderr)
        return float("inf")
    return round(time.monotonic() - started, 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    worker = WorkerProcess(
        workdir,
        rtp_ports=max(1000, 4 * args.calls),
        sip_extra='trusted_sources = ["127.0.0.1/32"]',
    )
    worker.start()
    figures: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rate": args.rate,
        "seconds": args.seconds,
        "live_calls": args.calls,
    }
    try:
        folder = workdir / "live"
        folder.mkdir(parents=True)
        t = np.arange(8000 * 3) / 8000
        tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
        (folder / "tone.ulaw").write_bytes(PCMU.encode(tone))
        live_seconds = args.seconds + 10
        live = sipp_in(
            folder, worker, "uac_talk.xml",
            "-d", str(int(live_seconds * 1000)), "-l", str(args.calls), "-m", str(args.calls),
            "-r", "50", timeout=live_seconds + 60,
        )  # fmt: skip
        ended_before = len(worker.records("call ended"))
        await live.start()
        await asyncio.sleep(args.calls / 50 + 2.0)
        print(f"flooding {args.rate}/s for {args.seconds:g} s beside {args.calls} live calls",
              flush=True)  # fmt: skip
        meter = CpuMeter(worker)
        meter.start()
        flooded = await flood(worker, args.rate, args.seconds)
        cpu = meter.stop()
        figures["flood"] = {**flooded, "worker_cpu": round(cpu, 3)}
        figures["seconds_until_a_normal_call"] = await normal_call_after(worker, workdir)
        result = await live.wait()
        await asyncio.sleep(1.0)
        records = worker.records("call ended")[ended_before:]
        live_records = [r for r in records if r.get("rtp_in")]
        received = sum(int(r.get("rtp_in") or 0) for r in live_records)
        lost = sum(
            int(r.get(k) or 0)
            for r in live_records
            for k in ("rtp_lost", "rtp_late", "rtp_overflow")
        )
        figures["live"] = {
            "sipp_exit": result.returncode,
            "successful": result.stat("SuccessfulCall") if result.stats else None,
            "failed": result.stat("FailedCall") if result.stats else None,
            "packets_in": received,
            "packets_lost_or_late": lost,
            "loss_percent": round(100 * lost / max(received, 1), 4),
        }
    finally:
        figures["worker_exit"] = worker.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=2000, help="flood INVITEs per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="flood duration")
    parser.add_argument("--calls", type=int, default=50, help="live calls beside the flood")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    flood_ = figures["flood"]
    live = figures["live"]
    print(
        f"flood: {flood_['invites_sent']} INVITEs at {flood_['rate_achieved']}/s, "
        f"{flood_['packets_back']} packets back ({flood_['packets_back_by_status']}): "
        f"{flood_['packets_per_invite']} per INVITE (target <= 1), "
        f"worker CPU {flood_['worker_cpu']:.0%}"
    )
    print(
        f"live calls: {live['successful']}/{args.calls} ok, {live['failed']} failed, "
        f"RTP loss {live['loss_percent']} % of {live['packets_in']} packets (target < 0.1 %)"
    )
    print(
        f"a normal call after the flood was accepted in {figures['seconds_until_a_normal_call']} s "
        "(target < 1 s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.json}")
    ok = (
        flood_["packets_per_invite"] <= 1
        and live["loss_percent"] < 0.1
        and live["failed"] == 0
        and figures["seconds_until_a_normal_call"] < 1
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
