#!/usr/bin/env python3
"""Benchmark: events through the outbox to hub clients (issue 9).

A worker runs as ``aispinner-worker run`` in its own process (store on, its PostgreSQL given
by ``database_url``: a pgserver PostgreSQL this script starts in a temporary folder). This
process writes events into the outbox through the worker's own write path
(``worker.store.journal.write_events``, one transaction every 20 ms, as the outbox writer
batches) at
``--rate`` events per second for ``--seconds``, spread over 10 workspaces, while 100 hub
clients (10 per workspace, WebSocket ``/ws/events/{workspace}``) read them from the worker.

Figures, measured here, from outside the worker: delivered messages per second, the latency
from each batch's commit returning to each client receiving it (p50/p99/max; target p99 under
100 ms), events lost (written but never received by a client of their workspace) and ids
received twice (targets 0 and 0), and the worker's CPU.

Run: ``.venv/bin/python scripts/bench_events.py [--rate 1000] [--seconds 60] [--clients 100]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import uvloop
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_sip import WorkerProcess  # noqa: E402

from tests.pg import TestPostgres  # noqa: E402
from tests.sipp import free_port  # noqa: E402
from worker.events import models as ev  # noqa: E402
from worker.store.journal import write_events  # noqa: E402

SECRET = "bench-events-secret-long-enough-for-hs256"
WORKSPACES = 10


def token(workspace: int) -> str:
    claims = {"uid": "bench", "workspaces": [workspace], "exp": time.time() + 3600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Client:
    def __init__(self, workspace: int) -> None:
        self.workspace = workspace
        self.received: dict[int, float] = {}
        self.duplicates = 0
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None

    async def run(self, url: str) -> None:
        async with websockets.connect(url, max_size=None) as ws:
            self.ws = ws
            async for text in ws:
                now = time.monotonic()
                # The outbox id is the message's last field: no need to parse the rest here.
                head, _, tail = str(text).rpartition('"id": ')
                if not head:
                    continue  # a ping
                event_id = int(tail.rstrip("}"))
                if event_id in self.received:
                    self.duplicates += 1
                self.received[event_id] = now


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    postgres = TestPostgres()
    postgres.start_server()
    folder = Path(tempfile.mkdtemp(prefix="bench-events-"))
    worker: WorkerProcess | None = None
    try:
        url = await postgres.database()
        api_port = free_port()
        api = f'\n[api]\nport = {api_port}\njwt_secret = "{SECRET}"\nhub_queue_events = 5000\n'
        worker = WorkerProcess(folder, rtp_ports=20, database_url=url, tail=api)
        await asyncio.to_thread(worker.start)
        clients = [Client(1 + n % WORKSPACES) for n in range(args.clients)]
        for client in clients:
            hub = f"ws://127.0.0.1:{api_port}/ws/events/{client.workspace}"
            client.task = asyncio.create_task(client.run(f"{hub}?token={token(client.workspace)}"))
        for _ in range(600):
            if all(c.ws is not None for c in clients):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # subscribed
        print(
            f"{args.clients} hub clients on {WORKSPACES} workspaces; writing {args.rate} events/s"
            f" for {args.seconds} s"
        )
        conn = await asyncpg.connect(url)
        committed: dict[int, tuple[int, float]] = {}  # outbox id -> (workspace, commit time)
        per_tick = max(1, args.rate // 50)  # one transaction per 20 ms, as the writer batches
        cpu0, wall0 = worker.cpu_seconds(), time.monotonic()
        start = time.monotonic()
        n = 0
        tick = 0
        while time.monotonic() - start < args.seconds:
            batch = []
            for _ in range(per_tick):
                workspace = 1 + n % WORKSPACES
                event = ev.CallTranscriptEvent(
                    call_id=f"bench-{n}", workspace_id=workspace, role="user", text="hello",
                    at_sec=float(n),
                )  # fmt: skip
                batch.append((f"b{n}", event))
                n += 1
            written = await write_events(conn, batch, "bench")
            done = time.monotonic()
            for row in written:
                committed[row.id] = (row.workspace_id, done)
            tick += 1
            delay = start + tick * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if tick % 500 == 0:
                print(f"  {int(time.monotonic() - start)} s: {n} events written")
        elapsed = time.monotonic() - start
        await asyncio.sleep(3.0)  # the last ones in flight
        cpu = (worker.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
        await conn.close()
        for client in clients:
            assert client.task is not None
            client.task.cancel()
        code = await asyncio.to_thread(worker.stop)
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)  # after an error: the worker is not left running
        postgres.close()
        shutil.rmtree(folder, ignore_errors=True)
    latencies: list[float] = []
    lost = 0
    delivered = 0
    for client in clients:
        for event_id, (workspace, at) in committed.items():
            if workspace != client.workspace:
                continue
            got = client.received.get(event_id)
            if got is None:
                lost += 1
            else:
                delivered += 1
                latencies.append(got - at)
    duplicates = sum(c.duplicates for c in clients)
    return {
        "benchmark": "bench_events",
        "host": platform.node(),
        "events_written": n,
        "write_rate_per_s": round(n / elapsed, 1),
        "clients": args.clients,
        "workspaces": WORKSPACES,
        "messages_delivered": delivered,
        "delivered_per_s": round(delivered / elapsed, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5) * 1000, 2),
            "p99": round(percentile(latencies, 0.99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
        "lost": lost,
        "duplicated_ids": duplicates,
        "worker_cpu_share": round(cpu, 3),
        "worker_exit_code": code,
        "target_p99_ms": 100,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=1000, help="events written per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = uvloop.run(run(args))
    latency = figures["latency_ms"]
    print(
        f"written {figures['events_written']} ({figures['write_rate_per_s']}/s); delivered "
        f"{figures['messages_delivered']} messages ({figures['delivered_per_s']}/s) to "
        f"{figures['clients']} clients\n"
        f"commit -> client latency p50 {latency['p50']} ms, p99 {latency['p99']} ms, "
        f"max {latency['max']} ms (target p99 < 100 ms)\n"
        f"lost {figures['lost']}, duplicated ids {figures['duplicated_ids']}; worker CPU "
        f"{figures['worker_cpu_share'] * 100:.0f} % of a core"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    ok = (
        figures["lost"] == 0 and figures["duplicated_ids"] == 0 and figures["worker_exit_code"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
