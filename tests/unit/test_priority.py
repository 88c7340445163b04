"""worker/priority.py: a media process under SCHED_RR when the kernel allows it (root,
CAP_SYS_NICE, or an RLIMIT_RTPRIO high enough: the route of a container's ``ulimits``), its
children at the normal scheduler, and a clear reason when refused. Each case runs in a fresh
interpreter, so the test process itself never leaves the normal scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.privileges import may_realtime
from worker import priority

REPO = Path(__file__).resolve().parents[2]
# Runs in a fresh interpreter. With LIMIT >= 0 it lowers its RLIMIT_RTPRIO to LIMIT and, when it
# is root, drops to `nobody` (so only the limit could grant real-time); with -1 it keeps the
# runner's rights. Then it asks for PRIORITY, and reports what it got, and what
# a child process and a thread started afterwards got.
_PROBE = textwrap.dedent(
    """
    import json, logging, os, resource, subprocess, sys
    NOBODY = 65534
    limit, priority = int(sys.argv[1]), int(sys.argv[2])
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append({"msg": record.getMessage(), "level": record.levelname,
                            "error": getattr(record, "error", None)})
    logging.getLogger("worker.priority").addHandler(Keep())
    logging.getLogger("worker.priority").setLevel(logging.INFO)
    if limit >= 0:
        hard = resource.getrlimit(resource.RLIMIT_RTPRIO)[1]
        resource.setrlimit(resource.RLIMIT_RTPRIO, (min(limit, hard), min(limit, hard)))
        if os.geteuid() == 0:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    from worker.priority import to_realtime
    refused = to_realtime(priority)
    # /proc/PID/stat, the fields after the command's closing parenthesis: policy is field 41
    child = subprocess.run(["cat", "/proc/self/stat"], capture_output=True, text=True, check=True)
    child_policy = int(child.stdout.rpartition(")")[2].split()[41 - 3])
    import threading
    thread_policy = []
    helper = threading.Thread(target=lambda: thread_policy.append(os.sched_getscheduler(0)))
    helper.start()
    helper.join()
    print(json.dumps({
        "refused": refused,
        "policy": os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK,
        "priority": os.sched_getparam(0).sched_priority,
        "child_policy": child_policy,
        "thread_policy": thread_policy[0],
        "records": records,
    }))
    """
)


def _probe(limit: int, asked: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(limit), str(asked)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class TestRealtime:
    def test_zero_leaves_the_scheduler_alone(self) -> None:
        before = os.sched_getscheduler(0)
        assert priority.to_realtime(0) is None
        assert os.sched_getscheduler(0) == before == os.SCHED_OTHER

    def test_granted_it_runs_sched_rr_and_its_children_and_threads_start_normal(self) -> None:
        got = _probe(limit=-1, asked=10)
        if not may_realtime(10):  # a runner without root, CAP_SYS_NICE or RLIMIT_RTPRIO
            assert got["refused"]
            assert got["policy"] == os.SCHED_OTHER
            return
        assert got["refused"] is None
        assert got["policy"] == os.SCHED_RR
        assert got["priority"] == 10
        assert got["child_policy"] == os.SCHED_OTHER
        assert got["thread_policy"] == os.SCHED_OTHER  # executor threads: not the 20 ms path
        assert [r["msg"] for r in got["records"]] == ["real-time priority"]

    def test_refused_it_says_why_and_stays_at_the_normal_scheduler(self) -> None:
        got = _probe(limit=5, asked=10)
        assert got["policy"] == os.SCHED_OTHER
        assert got["refused"] is not None
        assert "RLIMIT_RTPRIO >= 10" in got["refused"]
        assert got["records"] == [
            {
                "msg": "real-time priority refused: running at the normal scheduler",
                "level": "WARNING",
                "error": got["refused"],
            }
        ]
