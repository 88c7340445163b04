"""What the test runner may do to the scheduler: whether a process it starts may take SCHED_RR
(``realtime_priority``), so tests can say what the worker must have done."""

from __future__ import annotations

import resource
from pathlib import Path

CAP_SYS_NICE = 23


def may_realtime(priority: int) -> bool:
    """CAP_SYS_NICE (root, here), or an RLIMIT_RTPRIO of at least ``priority``."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    return bool(effective >> CAP_SYS_NICE & 1) or (
        resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= priority
    )
