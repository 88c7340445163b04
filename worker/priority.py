"""The CPU scheduling of the worker's processes (the front and the media processes, or the one
process that does everything): SCHED_RR, as telephony servers run (Asterisk's ``-p``,
FreeSWITCH's packaged systemd unit).

Under the normal scheduler a media process that wakes for its 20 ms slot can wait on the run
queue behind whatever else the host runs (the agent, SIPp, a database): measured here at 100
calls, each media process spent 11-14 % of its time runnable but not running, and the RTP it
sent the phones showed it (pacing jitter p99 3.4-5.5 ms). Under SCHED_RR it runs as soon as it
wakes (0.2 % waiting; jitter p99 1.3-1.6 ms). The price: it wakes for each event instead of
finding several at once (CPU per call 8 % more in the same session's runs), and busy real-time
processes leave the rest of the host only what the kernel's real-time throttling keeps for it
(``/proc/sys/kernel/sched_rt_runtime_us``: 95 % of each core for real-time work by default).
The front runs at the same priority: were it left at the normal scheduler, media processes
that fill the cores would starve the SIP signalling (measured: INVITE → 200 p99 9 s at 200
calls on this 2-core machine).

Children (the private PostgreSQL, ffmpeg, espeak-ng) start at the normal scheduler
(``SCHED_RESET_ON_FORK``), and so do threads started afterwards (the flag applies to every new
task: the event loop's executor, for DNS look-ups and file work): only the event loop's thread,
where the 20 ms path runs, is real-time.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("worker.priority")


def to_realtime(priority: int) -> str | None:
    """Run the calling thread under SCHED_RR at ``priority`` (1-99; 0 leaves the scheduler
    alone). None when done or not asked for; otherwise why the kernel refused (it needs root,
    ``CAP_SYS_NICE``, or an ``RLIMIT_RTPRIO`` of at least ``priority``)."""
    if priority == 0:
        return None
    try:
        policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except AttributeError:  # not Linux
        refused = "this system has no SCHED_RR"
    except OSError as exc:
        refused = f"{exc.strerror or exc} (needs root, CAP_SYS_NICE or RLIMIT_RTPRIO >= {priority})"
    else:
        log.info("real-time priority", extra={"priority": priority, "pid": os.getpid()})
        return None
    log.warning(
        "real-time priority refused: running at the normal scheduler",
        extra={"priority": priority, "error": refused, "pid": os.getpid()},
    )
    return refused


def current() -> int:
    """The real-time priority the calling thread runs at; 0 under the normal scheduler."""
    try:
        policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
        if policy not in (os.SCHED_RR, os.SCHED_FIFO):
            return 0
        return os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):  # not Linux
        return 0
