#!/usr/bin/env python3
"""The worker's main job, end to end, on this machine: real SIP calls through the worker to a
voice agent.

Starts the example agent (jambonz by default, ``--twilio`` for the Twilio Media Streams one) and
the worker on its embedded defaults plus one route to that agent, places ``--calls`` SIPp calls
that talk (SIPp's PCMA capture) and press 1, 5, # (RFC 4733), shows progress, then prints a table
of the calls and exits 0 only if every call behaved: answered, the agent heard the caller and the
caller heard the agent, the digits arrived, the call completed, and its MP3 decodes.

The worker keeps its journal and outbox in its private PostgreSQL (``data_dir/postgres``) and
serves its API: the demo opens a realtime hub client (``/ws/events/1``, subscribed to
``telephony``) before the first call and prints the events it received, then reads the calls'
rows back through the journal API (``GET /telephony/journal``); both must show every call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.jambonz_agent import JambonzDemoAgent  # noqa: E402
from examples.twilio_agent import TwilioDemoAgent  # noqa: E402
from tests.sipp import Sipp, free_port  # noqa: E402
from worker.app import Worker  # noqa: E402
from worker.config import load_settings  # noqa: E402
from worker.log import setup_logging  # noqa: E402
from worker.session.session import SessionResult  # noqa: E402

SCENARIO = ROOT / "scripts" / "scenarios" / "demo_caller.xml"
EXPECTED_DIGITS = "15#"


def _mp3_seconds(path: str) -> float:
    """Duration of the MP3 as ffmpeg decodes it (0.0 when it does not decode)."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", path, "-f", "s16le", "-ac", "2", "-ar", "8000", "-"],
        capture_output=True,
        check=False,
    )
    return len(out.stdout) / (8000 * 4) if out.returncode == 0 else 0.0


async def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="aispinner-demo-"))
    if args.twilio:
        agent: Any = TwilioDemoAgent(host="127.0.0.1", port=0)
    else:
        agent = JambonzDemoAgent(host="127.0.0.1", port=0)
    await agent.start()
    url = agent.url if args.twilio else agent.control_url
    sip_port = free_port()
    rtp_low = free_port()
    settings = load_settings(
        None,
        data_dir=str(data_dir),
        sip={"port": sip_port},
        rtp={"port_min": rtp_low, "port_max": rtp_low + 200},
        api={"host": "127.0.0.1", "port": 0},
        routes=[
            {"match": "echo", "action": "echo"},
            {
                "match": "*",
                "action": "agent",
                "agent_url": url,
                "protocol": "twilio" if args.twilio else "jambonz",
            },
        ],
    )
    worker = Worker(settings)
    await worker.start()
    kind = "twilio" if args.twilio else "jambonz"
    print(f"demo: worker on sip:127.0.0.1:{sip_port}, agent ({kind}) at {url}")
    print(f"demo: data in {data_dir}")
    api = Api.of(worker)
    print(f"demo: API and realtime hub at {api.base}")
    hub = HubClient(api)
    await hub.start()
    workdir = data_dir / "sipp"
    sipp = Sipp(
        workdir=workdir,
        remote=f"127.0.0.1:{sip_port}",
        args=["-sf", str(SCENARIO), "-s", "agent", "-m", str(args.calls), "-l", str(args.calls),
              "-r", "1", "-rp", "1000"],
        timeout_s=90,
    )  # fmt: skip
    started = time.monotonic()
    await sipp.start()
    wait = asyncio.ensure_future(sipp.wait())
    while not wait.done():
        done = len(worker.results)
        print(
            f"\rdemo: {time.monotonic() - started:5.1f} s, calls finished {done}/{args.calls}",
            end="",
            flush=True,
        )
        await asyncio.sleep(0.5)
    result = wait.result()
    # the worker may still be writing the last call's summary
    for _ in range(50):
        if len(worker.results) >= args.calls:
            break
        await asyncio.sleep(0.1)
    print()
    calls_done = await hub.wait_done(args.calls)
    await hub.close()
    journal = await api.journal()
    await worker.close()
    await agent.stop()

    rows = []
    ok = result.returncode == 0
    if not ok:
        print(result.explain())
    stats = list(agent.calls.values())
    for index, res in enumerate(sorted(worker.results, key=lambda r: r.call_sid)):
        seconds = _mp3_seconds(res.recording) if res.recording else 0.0
        good = _good(res, seconds)
        ok = ok and good
        rows.append((index + 1, res, seconds, good))
    if len(worker.results) != args.calls:
        ok = False
        print(f"demo: expected {args.calls} calls, the worker saw {len(worker.results)}")
    heard = sum(getattr(s, "audio_bytes_in", 0) for s in stats)
    echoed = sum(getattr(s, "audio_bytes_out", 0) for s in stats)
    if heard == 0 or echoed == 0:
        ok = False
    print()
    print(f"{'#':>2}  {'status':<11} {'secs':>4}  {'digits':<7} {'mp3 s':>6}  {'ok':<3} recording")
    for index, res, seconds, good in rows:
        print(
            f"{index:>2}  {res.status:<11} {res.duration_sec:>4}  {res.digits:<7} "
            f"{seconds:>6.1f}  {'yes' if good else 'NO':<3} {res.recording}"
        )
    print()
    print(f"agent heard {heard} bytes of caller audio and sent back {echoed} bytes")
    events = data_dir / "events.jsonl"
    if events.exists():
        kinds: dict[str, int] = {}
        for line in events.read_text().splitlines():
            kind = json.loads(line).get("type", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
        print("events: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    print(
        "hub client got: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(hub.kinds.items()))
        + f" (ids {min(hub.ids, default=0)}..{max(hub.ids, default=0)}, in order:"
        f" {'yes' if hub.ids == sorted(hub.ids) else 'NO'})"
    )
    seen = {res.call_sid for res in worker.results}
    if calls_done != seen or hub.ids != sorted(hub.ids) or len(set(hub.ids)) != len(hub.ids):
        ok = False
        print(f"demo: the hub client saw call.done for {len(calls_done)} of {len(seen)} calls")
    print(f"journal API: {journal['total']} calls, {journal['total_duration_sec']} s in all")
    for row in journal["calls"]:
        print(
            f"    id {row['id']:>3}  {row['status']:<11} {row['duration_sec']:>3} s"
            f"  audio {'yes' if row['has_audio'] else 'no':<3}  {row['call_id']}"
        )
    rows_seen = {row["call_id"] for row in journal["calls"]}
    if rows_seen != seen or any(row["status"] != "completed" for row in journal["calls"]):
        ok = False
        print("demo: the journal API does not show every call as completed")
    print("demo: " + ("every call behaved" if ok else "SOME CALLS FAILED"))
    if ok and not args.keep and args.data_dir is None:
        shutil.rmtree(data_dir, ignore_errors=True)
        print(
            "demo: the recordings and events above were in a temporary folder, now removed; "
            'keep them with DEMO_ARGS="--keep" (or --data-dir DIR)'
        )
    else:
        print(f"demo: recordings and events kept in {data_dir}")
    return 0 if ok else 1


class Api:
    """The demo worker's API on loopback, with a token its own secret signs."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token

    @classmethod
    def of(cls, worker: Worker) -> Api:
        backend = worker.backend
        if backend is None or backend.api is None:
            raise SystemExit("demo: the worker serves no API (store or api.enabled is off)")
        token = backend.verifier.issue("demo", [1])
        return cls(f"http://127.0.0.1:{backend.api.port}", token)

    async def journal(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.base, timeout=10.0) as client:
            response = await client.get(
                "/telephony/journal", headers={"authorization": f"Bearer {self.token}"}
            )
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


class HubClient:
    """A realtime hub client of workspace 1, subscribed to every node's call-level events."""

    def __init__(self, api: Api) -> None:
        host = api.base.removeprefix("http://")
        self.url = f"ws://{host}/ws/events/1?token={api.token}&subscribe=telephony"
        self.kinds: dict[str, int] = {}
        self.ids: list[int] = []
        self.done: set[str] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ws = await websockets.connect(self.url, open_timeout=10)
        self._task = asyncio.ensure_future(self._read(ws))

    async def _read(self, ws: Any) -> None:
        async with ws:
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type", "?")
                if kind in ("ping", "pong", "subscribed"):
                    continue
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                if isinstance(message.get("id"), int):
                    self.ids.append(message["id"])
                if kind == "call.done":
                    self.done.add(str(message.get("call_id")))
                self._changed.set()

    async def wait_done(self, calls: int, within_s: float = 10.0) -> set[str]:
        """The calls whose ``call.done`` arrived, once ``calls`` have (or ``within_s``)."""
        deadline = time.monotonic() + within_s
        while len(self.done) < calls and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        return set(self.done)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _good(res: SessionResult, mp3_seconds: float) -> bool:
    return (
        res.status == "completed"
        and res.digits == EXPECTED_DIGITS
        and res.duration_sec >= 5
        and res.recording is not None
        and abs(mp3_seconds - res.duration_sec) <= 2.0
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3, help="SIPp calls to place (default 3)")
    parser.add_argument("--twilio", action="store_true", help="use the Twilio Media Streams agent")
    parser.add_argument("--data-dir", help="keep recordings and events here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir on success")
    parser.add_argument("--verbose", action="store_true", help="show the worker's log")
    args = parser.parse_args(argv)
    setup_logging("info" if args.verbose else "warning", "console")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
