#!/usr/bin/env python3
"""Benchmark: the worker's SIP user agent and RTP path under SIPp load, on loopback.

Runs ``aispinner-worker run`` in its own process (a temporary TOML config, loopback ports) and
drives it with SIPp:

(a) call setup rate: INVITE/200/ACK/BYE with no media, at rising rates (a few seconds each);
    reports each step's failed calls, retransmissions, INVITE response times and worker CPU, and
    the highest rate with no failed call;
(b) RTP echo: N concurrent calls streaming µ-law (SIPp ``rtp_stream``) to the echo route; SIPp
    cannot count the RTP it gets back, so the worker's per-call RTP counters are read from its
    ``call ended`` log records: packets in, echoed out, lost and late in the jitter buffer.

Worker CPU comes from ``/proc/<pid>/stat``. Prints the figures; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media.g711 import PCMU  # noqa: E402
from tests.sipp import SCENARIOS, Sipp, SippResult, free_port, port_in_use  # noqa: E402
from worker.loadtest.procs import read_stat, tree  # noqa: E402
from worker.loadtest.run import log_records  # noqa: E402

NO_RATE_LIMIT = """# The per-source limiter would measure itself, not the user agent: out of the way
# (bench_flood.py measures it).
rate_limit_per_second = 100000
rate_limit_burst = 100000"""


# -- the worker process -------------------------------------------------------------------------


class WorkerProcess:
    """``aispinner-worker run`` with a temporary config; its JSON log goes to a file."""

    def __init__(
        self,
        workdir: Path,
        rtp_ports: int,
        *,
        processes: int = 1,
        sip_extra: str = NO_RATE_LIMIT,
        top: str = "",
        tail: str = "",
        database_url: str | None = None,
    ) -> None:
        """``top``: settings before the first table (``ingress``); ``tail``: more tables;
        ``database_url``: the journal and events there (store on), else store off."""
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "worker.log"
        base = random.randrange(20000, 32000 - rtp_ports, 2)
        store = (
            f'store = true\ndatabase_url = "{database_url}"' if database_url else "store = false"
        )
        self.config = workdir / "worker.toml"
        self.config.write_text(
            f"""data_dir = "{workdir / "data"}"
{store}
processes = {processes}
{top}

[log]
level = "info"
format = "json"

[sip]
host = "127.0.0.1"
port = {self.port}
max_calls = 2000
{sip_extra}

[rtp]
host = "127.0.0.1"
port_min = {base}
port_max = {base + rtp_ports}

[[routes]]
match = "echo"
action = "echo"
record = false
{tail}
""",
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("aispinner-worker", path=str(Path(sys.executable).parent))
        command = [exe] if exe else [sys.executable, "-m", "worker.cli"]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*command, "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")},
        )
        # Ready when it says so: with media processes the front listens before they are up
        # and holds what it gets until they are, which would count their start-up as setup.
        deadline = time.monotonic() + 30
        while not (port_in_use(self.port) and self.ready()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def ready(self) -> bool:
        """``started`` (one process) or ``front listening`` (front and media processes)."""
        return bool(self.records("started") or self.records("front listening"))

    def cpu_seconds(self) -> float:
        """utime + stime of the worker and its media processes (those alive now)."""
        assert self.process is not None
        stats = (read_stat(pid) for pid in tree(self.process.pid))
        return sum(s.cpu_s for s in stats if s is not None)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def records(self, message: str) -> list[dict[str, Any]]:
        return log_records(self.log_path, message)


class CpuMeter:
    """CPU seconds the worker used between ``start`` and ``stop``, as a share of one core."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.cpu0 = self.wall0 = 0.0
        self.share: float | None = None

    def start(self) -> None:
        self.cpu0, self.wall0 = self.worker.cpu_seconds(), time.monotonic()

    def stop(self) -> float:
        cpu, wall = self.worker.cpu_seconds(), time.monotonic()
        self.share = (cpu - self.cpu0) / max(wall - self.wall0, 1e-9)
        return self.share


# -- SIPp ---------------------------------------------------------------------------------------


def sipp_in(
    workdir: Path, worker: WorkerProcess, scenario: str, *args: str, timeout: float
) -> Sipp:
    """A SIPp run from its own folder with a copy of the scenario (its -trace_rtt file is
    written next to the scenario)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCENARIOS / scenario, workdir / scenario)
    return Sipp(
        workdir,
        f"127.0.0.1:{worker.port}",
        ["-sf", scenario, "-s", "echo", *args],
        timeout_s=timeout,
        trace_msg=False,
    )


def response_times_ms(workdir: Path) -> list[float]:
    """Every INVITE's response time (rtd 1) from SIPp's -trace_rtt file: lines of
    ``date_ms;response_time_ms;rtd_no``, in whole milliseconds (SIPp's clock)."""
    times: list[float] = []
    for path in workdir.glob("*_rtt.csv"):
        for line in path.read_text().splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 3 and parts[2].strip() == "1":
                times.append(float(parts[1]))
    return times


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def setup_rate(
    worker: WorkerProcess, workdir: Path, rates: list[int], seconds: float
) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for rate in rates:
        calls = max(1, round(rate * seconds))
        sipp = sipp_in(
            workdir / f"setup-{rate}", worker, "uac_setup.xml",
            "-r", str(rate), "-m", str(calls), "-l", str(max(rate, 50)),
            "-trace_rtt", "-rtt_freq", "1",
            timeout=seconds + 40,
        )  # fmt: skip
        meter = CpuMeter(worker)
        meter.start()
        started = time.monotonic()
        result = await sipp.run()
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        times = response_times_ms(sipp.workdir)
        rt = {
            "mean": round(statistics.fmean(times), 2) if times else None,
            "p50": _round(percentile(times, 50)),
            "p95": _round(percentile(times, 95)),
            "p99": _round(percentile(times, 99)),
            "max": _round(max(times) if times else None),
        }
        step: dict[str, Any] = {
            "rate_cps": rate,
            "calls": calls,
            "successful": _stat(result, "SuccessfulCall"),
            "failed": _stat(result, "FailedCall"),
            "retransmissions": _stat(result, "Retransmissions"),
            "achieved_cps": round(calls / elapsed, 1),
            "sipp_exit": result.returncode,
            "invite_response_ms": rt,
            "worker_cpu": round(cpu, 3),
        }
        steps.append(step)
        ok = step["failed"] == 0 and step["successful"] == calls and result.returncode == 0
        print(
            f"  {rate:4d} cps: {step['successful']}/{calls} ok, {step['failed']} failed, "
            f"{step['retransmissions']} retransmissions, {step['achieved_cps']} cps achieved, "
            f"INVITE->200 p50 {rt['p50']} ms p99 {rt['p99']} ms, worker CPU {cpu:.0%}"
            + ("" if ok else "  <- FAILED"),
            flush=True,
        )
        if not ok:
            print(result.explain()[-1500:], file=sys.stderr)
            break
        await asyncio.sleep(1.0)  # let the worker's transactions drain
    return steps


async def rtp_echo(
    worker: WorkerProcess, workdir: Path, calls: int, seconds: float, ramp_cps: int
) -> dict[str, Any]:
    folder = workdir / "rtp"
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(8000 * 3) / 8000
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    (folder / "tone.ulaw").write_bytes(PCMU.encode(tone))
    ended_before = len(worker.records("call ended"))
    sipp = sipp_in(
        folder, worker, "uac_talk.xml",
        "-d", str(int(seconds * 1000)), "-l", str(calls), "-m", str(calls), "-r", str(ramp_cps),
        timeout=seconds + calls / ramp_cps + 60,
    )  # fmt: skip
    await sipp.start()
    ramp = calls / ramp_cps
    # Measure the worker's CPU while every call is up: after the ramp, before the first ends.
    await asyncio.sleep(ramp + 1.0)
    meter = CpuMeter(worker)
    meter.start()
    await asyncio.sleep(max(1.0, seconds - ramp - 2.0))
    cpu = meter.stop()
    result = await sipp.wait()
    await asyncio.sleep(1.0)
    records = worker.records("call ended")[ended_before:]
    totals = {
        key: sum(int(r.get(key) or 0) for r in records)
        for key in ("rtp_in", "rtp_out", "rtp_played", "rtp_lost", "rtp_late", "rtp_overflow")
    }
    expected = sum(round(float(r.get("seconds") or 0) * 50) for r in records)
    lost = totals["rtp_lost"] + totals["rtp_late"] + totals["rtp_overflow"]
    out = {
        "calls": calls,
        "seconds_per_call": seconds,
        "successful": _stat(result, "SuccessfulCall"),
        "failed": _stat(result, "FailedCall"),
        "sipp_exit": result.returncode,
        "calls_logged": len(records),
        "packets_expected": expected,
        "packets_in": totals["rtp_in"],
        "packets_echoed": totals["rtp_out"],
        "packets_lost_or_late": lost,
        "loss_percent": round(100 * lost / max(totals["rtp_in"], 1), 4),
        "max_jitter_ms": max((float(r.get("jitter_ms") or 0) for r in records), default=None),
        "concealed_ms_total": round(sum(float(r.get("concealed_ms") or 0) for r in records), 1),
        "worker_cpu": round(cpu, 3),
    }
    if result.returncode != 0:
        print(result.explain()[-1500:], file=sys.stderr)
    return out


def _stat(result: SippResult, name: str) -> int | None:
    try:
        return result.stat(name)
    except (KeyError, ValueError):
        return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        }
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-sip-"))
    if args.keep:
        print(f"keeping the worker's log and SIPp's files in {workdir}")
    try:
        worker = WorkerProcess(
            workdir, rtp_ports=max(1000, 4 * args.rtp_calls), processes=args.processes
        )
        worker.start()
        try:
            if not args.skip_setup:
                print(f"(a) call setup rate, {args.step_seconds:g} s per step:", flush=True)
                steps = await setup_rate(worker, workdir, args.rates, args.step_seconds)
                clean = [s for s in steps if s["failed"] == 0 and s["successful"] == s["calls"]]
                best = max(clean, key=lambda s: s["rate_cps"]) if clean else None
                figures["setup"] = {"steps": steps, "best": best}
                if best is not None:
                    print(f"  highest rate with no failed call: {best['rate_cps']} cps")
            if not args.skip_rtp:
                print(
                    f"(b) RTP echo, {args.rtp_calls} concurrent calls for {args.rtp_seconds:g} s:",
                    flush=True,
                )
                echo = await rtp_echo(
                    worker, workdir, args.rtp_calls, args.rtp_seconds, args.ramp_cps
                )
                figures["rtp_echo"] = echo
                print(
                    f"  {echo['successful']}/{echo['calls']} calls ok ({echo['failed']} failed); "
                    f"packets in {echo['packets_in']} (expected ~{echo['packets_expected']}), "
                    f"echoed {echo['packets_echoed']}, lost or late {echo['packets_lost_or_late']}"
                    f" ({echo['loss_percent']} %), max jitter {echo['max_jitter_ms']} ms, "
                    f"worker CPU {echo['worker_cpu']:.0%}"
                )
        finally:
            figures["worker_exit"] = worker.stop()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[25, 50, 100, 150, 200, 300, 400],
        help="call setup rates to try, in calls per second (default: 25,50,100,150,200,300,400)",
    )
    parser.add_argument("--step-seconds", type=float, default=4.0, help="per rate (default 4)")
    parser.add_argument("--rtp-calls", type=int, default=200, help="concurrent RTP calls")
    parser.add_argument("--rtp-seconds", type=float, default=20.0, help="length of each call")
    parser.add_argument("--ramp-cps", type=int, default=50, help="rate the RTP calls start at")
    parser.add_argument("--skip-setup", action="store_true", help="skip (a)")
    parser.add_argument("--skip-rtp", action="store_true", help="skip (b)")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="the worker's media processes (default 0: one per core, as deployed; 1: one "
        "process doing everything); CPU counts all of them",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and SIPp's files")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if shutil.which("sipp") is None:
        print("sipp is not installed: run `make setup` (it installs sip-tester)", file=sys.stderr)
        return 2
    figures = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    setup_ok = args.skip_setup or (figures.get("setup", {}).get("best") or {}).get("rate_cps", 0)
    echo = figures.get("rtp_echo")
    echo_ok = args.skip_rtp or (echo is not None and echo["failed"] == 0)
    return 0 if setup_ok and echo_ok else 1


if __name__ == "__main__":
    sys.exit(main())
