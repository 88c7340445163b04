"""worker/loadtest/procs.py reads a process tree's schedulers from /proc: what the load test's
report says the worker ran under."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.privileges import may_realtime
from worker.loadtest.procs import read_stat, scheduling


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A shell that has started a ``sleep``: a tree of two."""
    process = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        yield process
    finally:
        for child in _children(process.pid):  # by PID, before the shell goes
            os.kill(child, signal.SIGKILL)
        process.kill()
        process.wait()


def _children(pid: int) -> list[int]:
    for _ in range(200):
        text = f"/proc/{pid}/task/{pid}/children"
        with open(text, encoding="ascii") as f:
            found = [int(x) for x in f.read().split()]
        if found:
            return found
        os.sched_yield()
    raise AssertionError("the shell started nothing")


def test_a_tree_at_the_normal_scheduler(sleeper: subprocess.Popen[bytes]) -> None:
    _children(sleeper.pid)
    assert scheduling(sleeper.pid) == {"SCHED_OTHER": 2}
    stat = read_stat(sleeper.pid)
    assert stat is not None
    assert (stat.policy, stat.rt_priority) == (os.SCHED_OTHER, 0)


def test_a_real_time_process_is_named_with_its_priority(
    sleeper: subprocess.Popen[bytes],
) -> None:
    (child,) = _children(sleeper.pid)
    if not may_realtime(7):
        with pytest.raises(PermissionError):
            os.sched_setscheduler(child, os.SCHED_RR, os.sched_param(7))
        return
    os.sched_setscheduler(child, os.SCHED_RR, os.sched_param(7))
    assert scheduling(sleeper.pid) == {"SCHED_OTHER": 1, "SCHED_RR 7": 1}


def test_a_tree_that_is_gone_reads_empty() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert scheduling(gone.pid) == {}
