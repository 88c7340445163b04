"""The call status state machine: one table, the only place call status changes.

Rules:
1. Statuses are jambonz's: ``trying`` → ``ringing`` / ``early-media`` → ``in-progress`` →
   ``completed``, or one of the unanswered endings ``failed``, ``busy``, ``no-answer``.
2. Everything that changes a call's status is an ``Event`` fed to ``CallStatusMachine.feed``;
   the new status comes only from ``TRANSITIONS``.
3. Terminal statuses absorb every event. A pair missing from the table (a late ``ring`` after
   the answer, a second ``hangup``) is ignored and counted, never raised: the network reorders.
4. ``completed`` is reachable only through ``in-progress``: a call that was never answered ends
   as ``no-answer``, ``busy`` or ``failed``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CallStatus(enum.StrEnum):
    TRYING = "trying"
    RINGING = "ringing"
    EARLY_MEDIA = "early-media"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    FAILED = "failed"
    BUSY = "busy"
    NO_ANSWER = "no-answer"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


class Event(enum.StrEnum):
    RING = "ring"  # 180 sent or received
    EARLY_MEDIA = "early-media"  # 183 with SDP
    ANSWER = "answer"  # 200 OK
    HANGUP = "hangup"  # either side ended the call (BYE, CANCEL, agent hangup, limit)
    BUSY = "busy"  # 486 / 600
    NO_ANSWER = "no-answer"  # ring timeout, 408/480/487
    FAIL = "fail"  # any other failure before answer (agent unreachable, 4xx/5xx)


_TERMINAL = frozenset(
    {CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.BUSY, CallStatus.NO_ANSWER}
)
_UNANSWERED = (CallStatus.TRYING, CallStatus.RINGING, CallStatus.EARLY_MEDIA)

TRANSITIONS: dict[tuple[CallStatus, Event], CallStatus] = {
    (CallStatus.TRYING, Event.RING): CallStatus.RINGING,
    (CallStatus.TRYING, Event.EARLY_MEDIA): CallStatus.EARLY_MEDIA,
    (CallStatus.RINGING, Event.EARLY_MEDIA): CallStatus.EARLY_MEDIA,
    **{(s, Event.ANSWER): CallStatus.IN_PROGRESS for s in _UNANSWERED},
    **{(s, Event.HANGUP): CallStatus.NO_ANSWER for s in _UNANSWERED},
    **{(s, Event.BUSY): CallStatus.BUSY for s in _UNANSWERED},
    **{(s, Event.NO_ANSWER): CallStatus.NO_ANSWER for s in _UNANSWERED},
    **{(s, Event.FAIL): CallStatus.FAILED for s in _UNANSWERED},
    (CallStatus.IN_PROGRESS, Event.HANGUP): CallStatus.COMPLETED,
    (CallStatus.IN_PROGRESS, Event.FAIL): CallStatus.COMPLETED,
}


@dataclass(frozen=True, slots=True)
class StatusChange:
    old: CallStatus
    new: CallStatus
    event: Event
    at: float


class CallStatusMachine:
    """Feeds events through ``TRANSITIONS``; remembers when the call was answered and ended."""

    def __init__(self, now: float) -> None:
        self.status = CallStatus.TRYING
        self.started_at = now
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.ignored = 0

    def feed(self, event: Event, now: float) -> StatusChange | None:
        """Apply ``event``; the change, or None when the table ignores it (rule 3)."""
        new = TRANSITIONS.get((self.status, event))
        if new is None:
            self.ignored += 1
            return None
        change = StatusChange(self.status, new, event, now)
        self.status = new
        if new is CallStatus.IN_PROGRESS:
            self.answered_at = now
        if new.terminal:
            self.ended_at = now
        return change

    def duration(self, now: float) -> int:
        """Whole seconds in conversation (0 for a call never answered), truncated as jambonz
        reports them (``moment().diff(connectTime, 'seconds')``): 1.9 s is 1."""
        if self.answered_at is None:
            return 0
        end = self.ended_at if self.ended_at is not None else now
        return max(0, int(end - self.answered_at))
