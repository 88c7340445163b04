"""Hangup causes between Asterisk and the worker: the Q.850 cause (and SIP status, Asterisk's
``tech_cause``) an Asterisk channel ended with, as the ``LegEnd`` a session reads; and the SIP
status a session hangs up with, as the ``reason`` of ``DELETE /channels/{id}``.

The pairs follow RFC 3398 §7.2.4.1 (Q.850 → SIP), as Asterisk's chan_pjsip maps them; what the
recordings show is kept: a busy callee ends with 17 and tech_cause 486, a callee that rings
without answer (or never answers at all) with 19 and tech_cause 480.
"""

from __future__ import annotations

from worker.legs import LegEnd

NORMAL_CLEARING = 16

# Q.850 cause → (LegEnd cause token, SIP status) for a call that never connected.
_UNANSWERED: dict[int, tuple[str, int]] = {
    1: ("unallocated", 404),
    2: ("unallocated", 404),
    3: ("unallocated", 404),
    16: ("failed", 480),  # normal clearing before an answer: nobody took the call
    17: ("busy", 486),
    18: ("no-answer", 408),
    19: ("no-answer", 480),
    20: ("no-answer", 480),
    21: ("rejected", 603),
    22: ("failed", 410),
    26: ("failed", 404),
    27: ("failed", 502),
    28: ("failed", 484),
    29: ("rejected", 501),
    31: ("failed", 480),
    34: ("congestion", 503),
    38: ("congestion", 503),
    41: ("congestion", 503),
    42: ("congestion", 503),
    47: ("congestion", 503),
    55: ("rejected", 403),
    57: ("rejected", 403),
    58: ("failed", 503),
    65: ("failed", 488),
    69: ("failed", 501),
    79: ("failed", 501),
    87: ("rejected", 403),
    88: ("failed", 488),
    102: ("no-answer", 504),
    111: ("failed", 500),
    127: ("failed", 500),
}


def unanswered_end(cause: int | None, tech_cause: int | None) -> LegEnd:
    """Why an Asterisk channel that was never answered ended. ``tech_cause`` (the SIP status
    Asterisk got) wins over the Q.850 mapping when it is one."""
    token, status = _UNANSWERED.get(cause or 0, ("failed", 500))
    if tech_cause is not None and 300 <= tech_cause <= 699:
        status = tech_cause
    return LegEnd(token, status)


# SIP status a session hangs up an unanswered call with → ARI hangup ``reason``.
_REASONS: dict[int, str] = {
    404: "unallocated",
    410: "unallocated",
    480: "no_answer",
    484: "number_incomplete",
    486: "busy",
    600: "busy",
    403: "rejected",
    603: "rejected",
    488: "codec_mismatch",
    500: "failure",
    502: "failure",
    503: "congestion",
    408: "timeout",
    504: "timeout",
}


def hangup_reason(status: int, answered: bool) -> str:
    """The ``reason`` for ``DELETE /channels/{id}``: ``normal`` for an answered call (Asterisk
    then sends BYE with ``Reason: Q.850;cause=16``), else what ``status`` means."""
    if answered:
        return "normal"
    return _REASONS.get(status, "normal" if status < 400 else "failure")
