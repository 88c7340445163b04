"""The call status table (jambonz call_status values; worker/session/status.py rules 1-4)."""

from __future__ import annotations

import pytest

from worker.session.status import TRANSITIONS, CallStatus, CallStatusMachine, Event


class TestJambonzCallStatusLifecycle:
    def test_inbound_answered_then_hung_up(self) -> None:
        machine = CallStatusMachine(now=0.0)
        seen = [machine.feed(e, t) for e, t in [(Event.RING, 0.1), (Event.ANSWER, 1.0)]]
        assert [c.new for c in seen if c] == [CallStatus.RINGING, CallStatus.IN_PROGRESS]
        change = machine.feed(Event.HANGUP, 43.6)
        assert change is not None
        assert change.new is CallStatus.COMPLETED
        assert machine.duration(100.0) == 42  # 42.6 s from answer to end, truncated (jambonz)

    @pytest.mark.parametrize(
        ("event", "status"),
        [
            (Event.HANGUP, CallStatus.NO_ANSWER),
            (Event.BUSY, CallStatus.BUSY),
            (Event.NO_ANSWER, CallStatus.NO_ANSWER),
            (Event.FAIL, CallStatus.FAILED),
        ],
    )
    def test_unanswered_endings(self, event: Event, status: CallStatus) -> None:
        machine = CallStatusMachine(now=0.0)
        machine.feed(Event.RING, 0.0)
        change = machine.feed(event, 5.0)
        assert change is not None
        assert change.new is status
        assert machine.duration(9.0) == 0


class TestRuleTerminalStatusesAbsorb:
    @pytest.mark.parametrize("event", list(Event))
    def test_nothing_leaves_completed(self, event: Event) -> None:
        machine = CallStatusMachine(now=0.0)
        machine.feed(Event.ANSWER, 0.0)
        machine.feed(Event.HANGUP, 1.0)
        assert machine.feed(event, 2.0) is None
        assert machine.status is CallStatus.COMPLETED

    def test_late_ring_after_answer_is_ignored_and_counted(self) -> None:
        machine = CallStatusMachine(now=0.0)
        machine.feed(Event.ANSWER, 0.0)
        assert machine.feed(Event.RING, 0.5) is None
        assert machine.ignored == 1

    def test_completed_only_through_in_progress(self) -> None:
        sources = {old for (old, _), new in TRANSITIONS.items() if new is CallStatus.COMPLETED}
        assert sources == {CallStatus.IN_PROGRESS}

    def test_no_transition_out_of_a_terminal_status(self) -> None:
        assert not [old for (old, _) in TRANSITIONS if old.terminal]
