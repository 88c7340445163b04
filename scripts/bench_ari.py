#!/usr/bin/env python3
"""Benchmark: an inbound Asterisk call from StasisStart to audio flowing both ways (issue 8).

The ARI test double (``tests/ari_double``, behaving as the recordings of Asterisk 22 do) runs
in this process; the worker runs as ``aispinner-worker run`` in its own process (ingress
``sip`` + ``ari``, the echo route, so no agent is involved). For each call a caller enters
the Stasis application and talks from that moment on, one 20 ms frame every 20 ms, as a phone
does. Measured by the double, from outside the worker:

- ``t_in``: the caller's first frame sent into the worker's ExternalMedia socket (the bridge
  holds the answered caller and the ExternalMedia channel);
- ``t_out``: the worker's first RTP packet received from that socket;
- **headline: max(t_in, t_out) - StasisStart**, p50/p99/max over ``--calls`` calls (target:
  p99 under 50 ms). It counts every wait: the REST round trips, the caller's 20 ms cadence and
  the worker's media tick.

Baseline, in the same run and measured the same way: the application the recordings were made
with, done in this process over the same kind of keep-alive HTTP client: on StasisStart it
answers, creates the bridge, creates the ExternalMedia channel and adds both channels, one
request after the other, then sends its first packet at once. The ratio worker / baseline is
printed (below 1: the worker's concurrent set-up beats the sequential one despite its tick).

With ``--processes`` above 1 the worker runs as deployed on a multi-core host: its front holds
the events connection and hands each event to the media process of its call, one hop more.

Run: ``.venv/bin/python scripts/bench_ari.py [--calls 100] [--format slin16|ulaw]
[--processes 1] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_sip import CpuMeter, WorkerProcess  # noqa: E402

from media.rtp import RtpSender  # noqa: E402
from tests.ari_double import AriDouble, Phone  # noqa: E402

USER = PASSWORD = "bench"
WORKER_APP = "aispinner"
BASELINE_APP = "baseline"
TALK_S = 0.5
WAIT_S = 5.0


async def _until(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not check():
        if loop.time() > deadline:
            raise RuntimeError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.001)


async def one_call(
    asterisk: AriDouble, app: str, media_id: Callable[[Phone], Awaitable[str]]
) -> dict[str, float]:
    """One call into ``app``: seconds from StasisStart to each direction's first packet."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    phone = await asterisk.call_in("echo", app=app)
    talking = asyncio.create_task(phone.send_audio(bytes(int(TALK_S * 16000))))
    em = await media_id(phone)
    stats = asterisk.em_stats(em)
    await _until(lambda: bool(stats.sent) and bool(stats.received), "audio both ways")
    t_in = stats.sent[0].at - started
    t_out = stats.received[0].at - started
    talking.cancel()
    await phone.hang_up()
    return {"in": t_in, "out": t_out, "both": max(t_in, t_out)}


async def worker_media_id(asterisk: AriDouble, phone: Phone) -> str:
    em = f"{phone.channel_id}-media"  # the worker's ExternalMedia channel id
    await _until(lambda: em in asterisk.channels, "the worker's ExternalMedia channel")
    return em


class BaselineApp:
    """The recordings' application: sequential answer, bridge, externalMedia, addChannel."""

    def __init__(self, asterisk: AriDouble, media_format: str) -> None:
        self.asterisk = asterisk
        self.format = media_format
        self.http = httpx.AsyncClient(base_url=f"{asterisk.url}/ari", auth=(USER, PASSWORD))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.media: dict[str, asyncio.Future[str]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ws: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        url = asterisk_ws(self.asterisk, BASELINE_APP)
        self._ws = await websockets.connect(url)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        await self.http.aclose()
        self.sock.close()

    async def _read(self) -> None:
        async for message in self._ws:
            event = json.loads(message)
            if event["type"] == "StasisStart" and event["args"] == ["inbound"]:
                channel = event["channel"]["id"]
                future = self.media.setdefault(channel, asyncio.get_running_loop().create_future())
                task = asyncio.create_task(self._set_up(channel, future))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _set_up(self, channel: str, future: asyncio.Future[str]) -> None:
        http = self.http
        await http.post(f"/channels/{channel}/answer")
        bridge = (await http.post("/bridges", params={"type": "mixing,dtmf_events"})).json()
        port = self.sock.getsockname()[1]
        em = (
            await http.post(
                "/channels/externalMedia",
                params={
                    "app": BASELINE_APP,
                    "external_host": f"127.0.0.1:{port}",
                    "format": self.format,
                },
            )
        ).json()
        await http.post(
            f"/bridges/{bridge['id']}/addChannel", params={"channel": f"{channel},{em['id']}"}
        )
        variables = em["channelvars"]
        target = (variables["UNICASTRTP_LOCAL_ADDRESS"], int(variables["UNICASTRTP_LOCAL_PORT"]))
        payload_type, size = (118, 640) if self.format == "slin16" else (0, 160)
        packet = RtpSender(payload_type, 1).build(bytes(size), size // 2 if size == 640 else size)
        self.sock.sendto(packet, target)
        future.set_result(em["id"])

    async def media_id(self, phone: Phone) -> str:
        future = self.media.setdefault(phone.channel_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(future, WAIT_S)


def asterisk_ws(asterisk: AriDouble, app: str) -> str:
    return (
        f"ws://127.0.0.1:{asterisk.port}/ari/events?app={app}&subscribeAll=false"
        f"&api_key={USER}:{PASSWORD}"
    )


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with AriDouble(username=USER, password=PASSWORD) as asterisk:
        with tempfile.TemporaryDirectory(prefix="bench-ari-") as tmp:
            worker = WorkerProcess(
                Path(tmp),
                rtp_ports=400,
                processes=args.processes,
                top='ingress = ["sip", "ari"]',
                tail=(
                    f'\n[ari]\nurl = "{asterisk.url}"\nusername = "{USER}"\n'
                    f'password = "{PASSWORD}"\nmedia_format = "{args.format}"\n'
                ),
            )
            await asyncio.to_thread(worker.start)
            try:
                await _until(lambda: len(asterisk.ws_labels) >= 1, "the worker's events socket")
                baseline = BaselineApp(asterisk, args.format)
                await baseline.start()
                try:
                    meter = CpuMeter(worker)
                    results: dict[str, list[dict[str, float]]] = {"worker": [], "baseline": []}
                    print(
                        f"{args.calls} calls each, {args.format}, one at a time, alternating;"
                        f" the worker with {args.processes} media process(es)"
                    )
                    meter.start()
                    for i in range(args.calls):
                        results["worker"].append(
                            await one_call(
                                asterisk, WORKER_APP, lambda p: worker_media_id(asterisk, p)
                            )
                        )
                        results["baseline"].append(
                            await one_call(asterisk, BASELINE_APP, baseline.media_id)
                        )
                        if (i + 1) % 20 == 0:
                            print(f"  {i + 1} calls done")
                        await asyncio.sleep(0.02)
                    cpu = meter.stop()
                finally:
                    await baseline.close()
            finally:
                code = await asyncio.to_thread(worker.stop)
    figures: dict[str, Any] = {
        "benchmark": "bench_ari",
        "calls": args.calls,
        "format": args.format,
        "processes": args.processes,
        "host": platform.node(),
        "worker_exit_code": code,
        "worker_cpu_share": round(cpu, 3),
    }
    for who, rows in results.items():
        figures[who] = {
            "stasis_start_to_media_both_ways": summary([r["both"] for r in rows]),
            "caller_frame_in": summary([r["in"] for r in rows]),
            "first_packet_out": summary([r["out"] for r in rows]),
        }
    worker_p99 = figures["worker"]["stasis_start_to_media_both_ways"]["p99_ms"]
    base_p99 = figures["baseline"]["stasis_start_to_media_both_ways"]["p99_ms"]
    worker_p50 = figures["worker"]["stasis_start_to_media_both_ways"]["p50_ms"]
    base_p50 = figures["baseline"]["stasis_start_to_media_both_ways"]["p50_ms"]
    figures["ratio_p50_worker_over_baseline"] = round(worker_p50 / base_p50, 2)
    figures["ratio_p99_worker_over_baseline"] = round(worker_p99 / base_p99, 2)
    figures["target_p99_ms"] = 50
    figures["target_met"] = worker_p99 < 50
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--format", choices=("slin16", "ulaw"), default="slin16")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="the worker's media processes (1: one process; more: a front holds the events "
        "connection and hands each call's events to its process)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures = asyncio.run(run(args))
    figures["seconds"] = round(time.monotonic() - started, 1)
    for who in ("worker", "baseline"):
        row = figures[who]["stasis_start_to_media_both_ways"]
        print(
            f"{who:>8}: StasisStart -> media both ways  p50 {row['p50_ms']} ms  "
            f"p99 {row['p99_ms']} ms  max {row['max_ms']} ms"
        )
        for part in ("caller_frame_in", "first_packet_out"):
            sub = figures[who][part]
            print(f"{'':>10}{part:<18} p50 {sub['p50_ms']} ms  p99 {sub['p99_ms']} ms")
    print(
        f"ratio worker/baseline: p50 {figures['ratio_p50_worker_over_baseline']}, "
        f"p99 {figures['ratio_p99_worker_over_baseline']}; target p99 < 50 ms: "
        f"{'met' if figures['target_met'] else 'NOT met'}; worker CPU "
        f"{figures['worker_cpu_share'] * 100:.1f} % of a core"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0 if figures["worker_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
