#!/usr/bin/env python3
"""Benchmark: where a call's CPU goes in the running worker, under load, by what runs it: the
kernel (split by the work its system calls do), the MP3 encoder (LAME), numpy, the Python
interpreter, uvloop, the C library; each in µs per call per 20 ms, beside the issue's CPU target
(0.35 % of a core per call: 70 µs per 20 ms).

It starts the load test (``aispinner-worker loadtest``, the same options) and, once every call
is up, reads the CPU time of every process of the worker (the front and the media processes)
from /proc for ``--seconds``, then samples them with ``perf record -e cpu-clock`` for as long:
the samples give the shares, the unobserved window the total (sampling with call chains costs
the sampled processes CPU too). With ``--pid`` it attaches to a worker already under load
instead (its process and descendants) and ``--calls`` says how many calls that worker has up.

The kernel's share is split by where its samples' call chains pass: ``udp_sendmsg`` (RTP sent;
on loopback the sender's system call also runs the receiver's half of the network stack, as a
real NIC would not), ``tcp_sendmsg`` (frames to the agent, the same), the receives
(``udp_recvmsg``, ``tcp_recvmsg``), ``do_epoll_wait`` (waiting and being woken: the event
loop's sleep and wake-up), file writes (``vfs_write`` but not ``sock_write_iter``: the
recordings, the logs) and the rest. ``scripts/bench_floor.py`` measures the same system calls
and LAME alone, in a loop.

Needs ``perf`` (Debian's ``linux-perf``; ``scripts/setup.sh`` installs it) and root, or a
``kernel.perf_event_paranoid`` that lets the user sample other processes.

Run: ``.venv/bin/python scripts/cpu_breakdown.py [--calls 100] [--rate 10] [--hold 30]
[--processes 0] [--seconds 10] [--out DIR] [--json PATH]``, or ``... --pid PID --calls N
[--seconds 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGET_PERCENT = 0.35
FRAME_US = 20_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# What runs the samples, by the object they were in (perf's "dso"), first match wins.
GROUPS: tuple[tuple[str, str], ...] = (
    ("kernel", r"^\[kernel|^\[vdso\]"),
    ("MP3 encoder (LAME)", r"lameenc"),
    ("numpy", r"_multiarray|openblas|_umath|numpy|libm\.so"),
    ("Python interpreter", r"libpython|^python3"),
    ("uvloop", r"^loop\.cpython|libuv"),
    ("C library", r"^libc\.so|^ld-linux"),
)
# The kernel's share, split by a function its samples' call chains pass through ("a-b": through
# a, not through b, when b runs only under a).
KERNEL_PARTS: tuple[tuple[str, str], ...] = (
    ("RTP sent (udp_sendmsg)", "udp_sendmsg"),
    ("agent frames sent (tcp_sendmsg)", "tcp_sendmsg"),
    ("RTP received (udp_recvmsg)", "udp_recvmsg"),
    ("agent frames received (tcp_recvmsg)", "tcp_recvmsg"),
    ("waiting, woken (do_epoll_wait)", "do_epoll_wait"),
    ("file writes (vfs_write, not to a socket)", "vfs_write-sock_write_iter"),
)
_ROW = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(?:(\d+(?:\.\d+)?)%\s+)?(.+?)\s*$")


def dso_shares(report: str) -> dict[str, float]:
    """``perf report --no-children --sort dso -g none`` text: percent of samples per object."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        if line.startswith("#"):
            continue
        match = _ROW.match(line)
        if match and match.group(2) is None:
            name = match.group(3)
            shares[name] = shares.get(name, 0.0) + float(match.group(1))
    return shares


def symbol_shares(report: str) -> dict[str, float]:
    """``perf report --children --sort sym -g none`` text: percent of samples whose chain passes
    through each kernel symbol (the "children" column)."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        match = _ROW.match(line)
        if match and match.group(2) is not None and match.group(3).startswith("[k] "):
            shares[match.group(3)[4:]] = float(match.group(1))
    return shares


def breakdown(
    dsos: dict[str, float], symbols: dict[str, float], us_per_call: float
) -> list[tuple[str, float, float]]:
    """Rows of (part, percent of the worker's samples, µs per call per 20 ms): the groups, the
    kernel's parts indented under it, then what no group took."""
    total = sum(dsos.values()) or 1.0
    grouped = dict.fromkeys([name for name, _ in GROUPS], 0.0)
    other = 0.0
    for dso, percent in dsos.items():
        name = next((g for g, pattern in GROUPS if re.search(pattern, dso)), None)
        if name is None:
            other += percent
        else:
            grouped[name] += percent
    rows: list[tuple[str, float, float]] = []
    for name, percent in grouped.items():
        share = percent / total
        rows.append((name, 100 * share, share * us_per_call))
        if name == "kernel":
            rest = share
            for part, symbol in KERNEL_PARTS:
                through, _, not_through = symbol.partition("-")
                percent = symbols.get(through, 0.0) - symbols.get(not_through, 0.0)
                part_share = min(max(percent, 0.0) / total, rest)
                rest -= part_share
                rows.append(("  " + part, 100 * part_share, part_share * us_per_call))
            rows.append(("  the kernel's other work", 100 * rest, rest * us_per_call))
    rows.append(("other", 100 * other / total, other / total * us_per_call))
    return rows


# -- processes ----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        found.setdefault(parent, []).append(int(entry))
    return found


def descendants(root: int) -> list[int]:
    tree = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def worker_pids(loadtest: int) -> list[int]:
    """The worker under a load test: the process running ``... run`` with a generated config,
    and its descendants (the media processes)."""
    for pid in descendants(loadtest):
        line = cmdline(pid)
        if "worker.toml" in line and line.rstrip().endswith(" run"):
            return descendants(pid)
    return []


# -- sampling -----------------------------------------------------------------------------------
def perf_binary() -> str:
    path = shutil.which("perf")
    if path is None:
        raise SystemExit("perf is missing: run scripts/setup.sh (it installs linux-perf)")
    probe = subprocess.run(
        [path, "stat", "-e", "cpu-clock", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise SystemExit(f"perf cannot count here: {probe.stderr.strip()[-500:]}")
    return path


def cpu_share(pids: list[int], seconds: float) -> float:
    """The processes' CPU over the next ``seconds``, in cores."""
    before, started = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / (time.monotonic() - started)


def sample(perf: str, pids: list[int], seconds: float, data: Path) -> tuple[float, float, str, str]:
    """The processes' CPU (in cores) over ``seconds`` unobserved, then over ``seconds`` while
    ``perf`` samples them (sampling with call chains costs them CPU: the shares come from the
    samples, the total from the first window), and perf's two reports."""
    used = cpu_share(pids, seconds)
    before, started = cpu_seconds(pids), time.monotonic()
    subprocess.run(
        [perf, "record", "-q", "-e", "cpu-clock", "-F", "499", "-g", "-o", str(data),
         "-p", ",".join(map(str, pids)), "--", "sleep", f"{seconds:g}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    sampled = (cpu_seconds(pids) - before) / (time.monotonic() - started)

    def report(*args: str) -> str:
        return subprocess.run(
            [perf, "report", "-i", str(data), "--stdio", "-g", "none", *args],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    dsos = report("--no-children", "--sort", "dso")
    return used, sampled, dsos, report("--children", "--sort", "sym")


def under_load(
    args: argparse.Namespace, perf: str, data: Path
) -> tuple[float, float, str, str, dict[str, Any]]:
    """Start the load test, sample the worker once every call is up, let the test finish."""
    out = args.out or Path(tempfile.mkdtemp(prefix="cpu-breakdown-"))
    command = [
        sys.executable, "-m", "worker.cli", "loadtest", "--calls", str(args.calls),
        "--rate", f"{args.rate:g}", "--hold", f"{args.hold:g}", "--processes",
        str(args.processes), "--out", str(out),
    ]  # fmt: skip
    print("starting:", " ".join(command[2:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its progress lines as they are printed
    test = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    assert test.stdout is not None
    try:
        up = re.compile(rf"calls\s+{args.calls}/{args.calls}\b")
        for line in test.stdout:
            print("  " + line.rstrip())
            if up.search(line):
                break
        else:
            raise SystemExit(f"the load test ended before every call was up (exit {test.wait()})")
        time.sleep(2.0)
        pids = worker_pids(test.pid)
        if not pids:
            raise SystemExit("no worker process found under the load test")
        print(f"measuring {len(pids)} worker processes for 2 x {args.seconds:g} s")
        used, sampled, dsos, symbols = sample(perf, pids, args.seconds, data)
        for line in test.stdout:
            print("  " + line.rstrip())
        code = test.wait()
        if args.out is None:
            print("(the load test's results are not kept: --out DIR keeps them)")
        try:
            results = json.loads((out / "results.json").read_text())
        except (OSError, ValueError):
            raise SystemExit(f"the load test wrote no results (exit {code}): see above") from None
        return used, sampled, dsos, symbols, results
    finally:
        if test.poll() is None:
            test.send_signal(signal.SIGINT)  # the load test stops what it started
            test.wait(60)
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    parser.add_argument("--rate", type=float, default=10, help="new calls per second (10)")
    parser.add_argument("--hold", type=float, default=30, help="seconds every call is up (30)")
    parser.add_argument("--processes", type=int, default=0, help="media processes (0: a core each)")
    parser.add_argument("--seconds", type=float, default=10, help="each window's length (10)")
    parser.add_argument("--pid", type=int, help="attach to this worker instead of a load test")
    parser.add_argument(
        "--out", type=Path, help="keep the load test's results here (default: not kept)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.calls <= 0 or args.seconds <= 0:
        parser.error("--calls and --seconds must be positive")
    if args.pid is None and args.hold < 2 * args.seconds + 5:
        parser.error("--hold must be at least 2 x --seconds + 5 (both windows sit in the hold)")
    perf = perf_binary()
    with tempfile.TemporaryDirectory(prefix="cpu-breakdown-perf-") as folder:
        data = Path(folder) / "perf.data"
        loadtest: dict[str, Any] = {}
        if args.pid is not None:
            if not Path(f"/proc/{args.pid}").exists():
                parser.error(f"--pid {args.pid}: no such process")
            pids = descendants(args.pid)
            used, sampled, dsos, symbols = sample(perf, pids, args.seconds, data)
        else:
            used, sampled, dsos, symbols, loadtest = under_load(args, perf, data)
    us_per_call = used / args.calls * FRAME_US
    target_us = TARGET_PERCENT / 100 * FRAME_US
    rows = breakdown(dso_shares(dsos), symbol_shares(symbols), us_per_call)
    print(
        f"\nThe worker: {100 * used:.1f} % of a core for {args.calls} calls,"
        f" {100 * used / args.calls:.3f} % per call = {us_per_call:.1f} µs per call per 20 ms"
        f" ({100 * sampled:.1f} % while perf sampled it: the shares below are of its samples)"
    )
    for name, percent, us in rows:
        print(f"  {name:<44} {percent:5.1f} %  {us:6.1f} µs")
    kernel_and_lame = sum(us for name, _, us in rows if name in ("kernel", "MP3 encoder (LAME)"))
    print(
        f"  the kernel and LAME together: {kernel_and_lame:.1f} µs,"
        f" {100 * kernel_and_lame / target_us:.0f} % of the target's {target_us:.0f} µs"
    )
    if loadtest:
        resources, calls = loadtest["resources"], loadtest["calls"]
        print(
            f"  the load test's own figure over the hold: {resources['cpu_per_call_percent']} %"
            f" per call (slope {resources['cpu_slope_percent_per_call']});"
            f" calls {calls['successful']} successful, {calls['failed']} failed"
        )
    if args.json:
        result = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "calls": args.calls,
            "seconds": args.seconds,
            "worker_cpu_percent": round(100 * used, 2),
            "worker_cpu_percent_sampled": round(100 * sampled, 2),
            "us_per_call_per_20ms": round(us_per_call, 2),
            "target_us": target_us,
            "parts": [
                {"part": name.strip(), "percent": round(p, 2), "us": round(us, 2)}
                for name, p, us in rows
            ],
            "loadtest_resources": loadtest.get("resources"),
            "loadtest_calls": loadtest.get("calls"),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.json}")
    if loadtest and loadtest["calls"]["failed"]:
        raise SystemExit(1)  # as the load test itself: a failed call is a failed run


if __name__ == "__main__":
    main()
