"""CPU time and memory of a process and all its descendants, read from /proc (Linux): what the
load test charges to the worker (its front and every media process) and to each part of the
harness. Descendants are found from every process's parent id, so a media process restarted
during the run is counted too."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    start_ticks: int
    """When the process started (clock ticks since boot): with ``pid``, a process's identity."""
    cpu_s: float
    """utime + stime, in seconds."""
    policy: int = 0
    """Its scheduling policy (``os.SCHED_*``)."""
    rt_priority: int = 0
    """Its real-time priority (0 under the normal scheduler)."""


def read_stat(pid: int) -> ProcStat | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    # fields[0] is then stat's field 3; rt_priority is field 40, policy field 41.
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(
        pid,
        int(fields[1]),
        int(fields[19]),
        (int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        policy=int(fields[38]),
        rt_priority=int(fields[37]),
    )


POLICIES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE"}


def scheduling(root: int) -> dict[str, int]:
    """How many processes of the tree run under each scheduler: ``{"SCHED_RR 10": 2,
    "SCHED_OTHER": 1}`` (real-time ones with their priority)."""
    counts: dict[str, int] = {}
    for stat in filter(None, map(read_stat, tree(root))):
        name = POLICIES.get(stat.policy, f"policy {stat.policy}")
        key = f"{name} {stat.rt_priority}" if stat.rt_priority else name
        counts[key] = counts.get(key, 0) + 1
    return counts


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(root: int) -> list[int]:
    """``root`` and its descendants that are alive now (``root`` first)."""
    children = _parents()
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in KiB: the proportional set size shares each page among the processes that
    map it, so the PSS of several processes adds up honestly (RSS counts shared pages in each)."""
    pss = rss = None
    try:
        with (PROC / str(pid) / "smaps_rollup").open() as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    if pss is None or rss is None:
        return None
    return pss, rss


@dataclass(frozen=True, slots=True)
class TreeSample:
    at: float
    cpu_percent: float | None
    """CPU used by the tree since the previous sample, in % of one core (None the first time)."""
    pss_kb: int
    rss_kb: int
    processes: int


@dataclass
class TreeMeter:
    """Samples a process tree: CPU % of a core between samples, PSS and RSS summed."""

    root: int
    seen: dict[int, ProcStat] = field(default_factory=dict)
    """Every process of the tree ever sampled, by pid (the latest identity)."""
    _cpu: dict[tuple[int, int], float] = field(default_factory=dict)
    _last_at: float | None = None

    def sample(self, at: float) -> TreeSample | None:
        """None once the root is gone."""
        stats = [s for s in (read_stat(pid) for pid in tree(self.root)) if s is not None]
        if not stats or stats[0].pid != self.root:
            return None
        used = 0.0
        cpu: dict[tuple[int, int], float] = {}
        pss = rss = 0
        for stat in stats:
            key = (stat.pid, stat.start_ticks)
            cpu[key] = stat.cpu_s
            used += stat.cpu_s - self._cpu.get(key, 0.0)
            self.seen[stat.pid] = stat
            memory = memory_kb(stat.pid)
            if memory is not None:
                pss += memory[0]
                rss += memory[1]
        percent = None
        if self._last_at is not None and at > self._last_at:
            percent = 100.0 * used / (at - self._last_at)
        self._cpu = cpu
        self._last_at = at
        return TreeSample(at, percent, pss, rss, len(stats))

    def kill_survivors(self) -> list[int]:
        """SIGKILL every process of the tree seen while sampling that is still alive (the same
        process: pid and start time), e.g. media processes orphaned by a killed front."""
        killed = []
        for pid, stat in self.seen.items():
            now = read_stat(pid)
            if now is None or now.start_ticks != stat.start_ticks:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed
