"""Event models (one discriminated union on ``type``, the seed's shapes), the in-process bus with
bounded subscribers, the JSONL sink and the reader that reads it back."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.events import (
    CallDoneEvent,
    CallDtmfEvent,
    CallInterruptionEvent,
    CallStartedEvent,
    CallStatusEvent,
    CallTranscriptEvent,
    CallVoicemailDetectedEvent,
    Event,
    EventBus,
    EventLog,
    JournalEntry,
    JournalNewEvent,
    JsonlSink,
    Subscription,
    parse_event,
)

AT = datetime(2026, 5, 4, 10, 23, 45, tzinfo=UTC)
WAIT = 5.0


def _all_events() -> list[Event]:
    return [
        CallStartedEvent(
            call_id="call_abc",
            direction="inbound",
            from_="+15551234567",
            to="+15557654321",
            route="sales",
            started_at=AT,
        ),
        CallStatusEvent(call_id="call_abc", status="ringing", sip_status=180, at=AT),
        CallDoneEvent(
            call_id="call_abc",
            node_id="pbx_xyz",
            status="completed",
            duration_sec=142,
            recording_path="/data/recordings/a.mp3",
            cause="bye",
        ),
        CallDtmfEvent(call_id="call_abc", digit="5", duration_ms=120, method="rfc4733", at=AT),
        CallInterruptionEvent(call_id="call_abc", at=AT),
        CallVoicemailDetectedEvent(call_id="call_abc", at=AT, beep_hz=1000.0),
        CallTranscriptEvent(call_id="call_abc", role="user", text="Hi.", at_sec=1.2),
        JournalNewEvent(
            entries=(
                JournalEntry(
                    id=12345,
                    call_id="call_abc",
                    node_id="pbx_xyz",
                    status="done",
                    subscriber_phone="+1555",
                    duration_sec=142,
                    created_at=AT,
                ),
            )
        ),
    ]


class TestEventModelsRoundTrip:
    @pytest.mark.parametrize("event", _all_events(), ids=lambda e: e.type)
    def test_json_round_trip_is_identity(self, event: Event) -> None:
        text = event.to_json()
        again = parse_event(text)
        assert again == event
        assert type(again) is type(event)
        assert again.to_json() == text

    def test_every_type_is_covered(self) -> None:
        assert sorted(e.type for e in _all_events()) == sorted(
            [
                "call.started",
                "call.status",
                "call.done",
                "call.dtmf",
                "call.interruption",
                "call.voicemail_detected",
                "call.transcript",
                "journal.new",
            ]
        )

    def test_from_is_written_as_from(self) -> None:
        started = _all_events()[0]
        wire = json.loads(started.to_json())
        assert wire["from"] == "+15551234567"
        assert "from_" not in wire
        assert parse_event(wire).from_ == "+15551234567"  # type: ignore[union-attr]

    def test_times_are_iso_utc(self) -> None:
        wire = _all_events()[1].to_dict()
        assert wire["at"] == "2026-05-04T10:23:45Z"

    def test_timestamps_default_to_now(self) -> None:
        before = datetime.now(UTC)
        event = CallInterruptionEvent(call_id="c1")
        assert before <= event.at <= datetime.now(UTC)

    def test_models_are_frozen(self) -> None:
        event = CallInterruptionEvent(call_id="c1", at=AT)
        with pytest.raises(ValidationError):
            event.call_id = "c2"  # type: ignore[misc]


class TestSeedShapes:
    def test_the_seeds_journal_new_parses(self) -> None:
        seed = {
            "type": "journal.new",
            "entries": [
                {
                    "id": 12345,
                    "call_id": "call_abc",
                    "node_id": "pbx_xyz",
                    "status": "done",
                    "subscriber_phone": "+1555...",
                    "duration_sec": 142,
                    "created_at": "2026-05-04T10:23:45Z",
                }
            ],
        }
        event = parse_event(json.dumps(seed))
        assert isinstance(event, JournalNewEvent)
        assert event.entries[0].created_at == AT
        assert json.loads(event.to_json()) == seed

    def test_call_done_uses_the_seeds_field_names(self) -> None:
        wire = CallDoneEvent(
            call_id="call_abc", node_id="pbx_xyz", status="completed", duration_sec=142
        ).to_dict()
        assert {"type", "call_id", "node_id", "status", "duration_sec"} <= set(wire)


class TestDiscriminatedUnion:
    def test_unknown_type_is_rejected_naming_the_tag(self) -> None:
        with pytest.raises(ValidationError, match=r"call\.exploded") as info:
            parse_event('{"type": "call.exploded", "call_id": "c1"}')
        assert "call.started" in str(info.value)  # the expected tags are listed

    def test_missing_type_is_rejected(self) -> None:
        with pytest.raises(ValidationError, match="type"):
            parse_event('{"call_id": "c1"}')

    def test_unknown_fields_are_rejected(self) -> None:
        with pytest.raises(ValidationError, match="surprise"):
            parse_event('{"type": "call.interruption", "call_id": "c1", "surprise": 1}')

    def test_naive_times_are_rejected(self) -> None:
        with pytest.raises(ValidationError):
            parse_event('{"type": "call.interruption", "call_id": "c1", "at": "2026-05-04T10:00"}')

    @pytest.mark.parametrize(
        "payload",
        [
            {"type": "call.status", "call_id": "c1", "status": "exploded"},
            {"type": "call.status", "call_id": "c1", "status": "ringing", "sip_status": 99},
            {"type": "call.done", "call_id": "c1", "status": "ringing", "duration_sec": 1},
            {"type": "call.done", "call_id": "c1", "status": "failed", "duration_sec": -1},
            {
                "type": "call.dtmf",
                "call_id": "c1",
                "digit": "E",
                "duration_ms": 1,
                "method": "inband",
            },
            {"type": "call.dtmf", "call_id": "c1", "digit": "1", "duration_ms": 1, "method": "fax"},
            {
                "type": "call.transcript",
                "call_id": "c1",
                "role": "narrator",
                "text": "",
                "at_sec": 0,
            },
            {"type": "call.voicemail_detected", "call_id": "c1", "beep_hz": 0},
            {"type": "call.interruption", "call_id": ""},
            {"type": "journal.new", "entries": []},
        ],
    )
    def test_bad_values_are_rejected(self, payload: dict[str, object]) -> None:
        with pytest.raises(ValidationError):
            parse_event(payload)

    def test_dtmf_letters_are_upper_cased(self) -> None:
        event = CallDtmfEvent(call_id="c1", digit="b", duration_ms=80, method="sip-info")
        assert event.digit == "B"

    @pytest.mark.parametrize(("said", "role"), [("assistant", "agent"), ("caller", "user")])
    def test_transcript_roles_are_the_hubs_two(self, said: str, role: str) -> None:
        event = CallTranscriptEvent(call_id="c1", role=said, text="x", at_sec=0)
        assert event.role == role


class TestEventBusFanOut:
    def test_every_subscriber_gets_every_event_in_order(self) -> None:
        bus = EventBus()
        first, second = bus.subscribe(), bus.subscribe()
        events = _all_events()
        for event in events:
            bus.publish(event)
        assert first.drain() == events
        assert second.drain() == events
        assert bus.published == len(events)

    def test_unsubscribed_subscribers_get_nothing_more(self) -> None:
        bus = EventBus()
        sub = bus.subscribe()
        bus.unsubscribe(sub)
        bus.unsubscribe(sub)  # twice is fine
        bus.publish(CallInterruptionEvent(call_id="c1", at=AT))
        assert len(sub) == 0

    def test_a_failing_subscriber_does_not_stop_the_others(self) -> None:
        class Broken:
            def deliver(self, event: Event) -> None:
                raise RuntimeError("bug")

        bus = EventBus()
        bus.subscribe(Broken())
        good = bus.subscribe()
        bus.publish(CallInterruptionEvent(call_id="c1", at=AT))
        assert len(good) == 1
        assert bus.subscriber_errors == 1

    async def test_async_readers_get_events_as_published(self) -> None:
        bus = EventBus()
        sub = bus.subscribe()
        got: list[Event] = []

        async def read() -> None:
            async for event in sub:
                got.append(event)

        reader = asyncio.ensure_future(read())
        events = _all_events()
        for event in events:
            bus.publish(event)
            await asyncio.sleep(0)
        sub.close()
        await asyncio.wait_for(reader, WAIT)
        assert got == events

    async def test_get_after_close_and_drain_raises_eof(self) -> None:
        sub = Subscription()
        sub.deliver(CallInterruptionEvent(call_id="c1", at=AT))
        sub.close()
        assert (await sub.get()).type == "call.interruption"
        with pytest.raises(EOFError):
            await sub.get()


class TestSlowSubscriberDropsOldest:
    def test_a_full_subscriber_loses_its_oldest_events_and_counts_them(self) -> None:
        bus = EventBus()
        slow = bus.subscribe(maxsize=3)
        fast = bus.subscribe(maxsize=100)
        events = [CallStatusEvent(call_id=f"c{i}", status="trying", at=AT) for i in range(10)]
        for event in events:
            bus.publish(event)  # never blocks
        assert slow.drain() == events[-3:]
        assert slow.dropped == 7
        assert fast.drain() == events
        assert fast.dropped == 0

    def test_maxsize_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="maxsize"):
            Subscription(0)


class TestJsonlSink:
    async def test_one_valid_json_object_per_line(self, tmp_path: Path) -> None:
        path = tmp_path / "deep" / "folder" / "events.jsonl"
        bus = EventBus()
        sink = bus.subscribe(JsonlSink(path))
        events = _all_events()
        for event in events:
            bus.publish(event)
        await sink.close()
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(events)
        assert [json.loads(line)["type"] for line in lines] == [e.type for e in events]
        assert EventLog(path).events() == events
        assert sink.written == len(events)

    async def test_each_line_is_on_disk_before_close(self, tmp_path: Path) -> None:
        path = tmp_path / "events.jsonl"
        sink = JsonlSink(path)
        sink.deliver(CallInterruptionEvent(call_id="c1", at=AT))
        await asyncio.wait_for(sink.flush(), WAIT)
        assert path.read_text(encoding="utf-8").count("\n") == 1
        sink.deliver(CallInterruptionEvent(call_id="c2", at=AT))
        await asyncio.wait_for(sink.flush(), WAIT)
        assert [e.call_id for e in EventLog(path).of_type(CallInterruptionEvent)] == ["c1", "c2"]
        await sink.close()

    async def test_close_is_idempotent_and_later_events_are_ignored(self, tmp_path: Path) -> None:
        path = tmp_path / "events.jsonl"
        sink = JsonlSink(path)
        sink.deliver(CallInterruptionEvent(call_id="c1", at=AT))
        await sink.close()
        await sink.close()
        sink.deliver(CallInterruptionEvent(call_id="c2", at=AT))
        assert len(EventLog(path).events()) == 1

    async def test_appends_to_an_existing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "events.jsonl"
        for call_id in ("c1", "c2"):
            sink = JsonlSink(path)
            sink.deliver(CallInterruptionEvent(call_id=call_id, at=AT))
            await sink.close()
        assert [e.call_id for e in EventLog(path).for_call("c2")] == ["c2"]  # type: ignore[union-attr]
        assert len(EventLog(path).events()) == 2


class TestEventLog:
    def test_missing_file_is_empty(self, tmp_path: Path) -> None:
        assert EventLog(tmp_path / "none.jsonl").events() == []

    def test_a_partial_last_line_is_skipped(self, tmp_path: Path) -> None:
        path = tmp_path / "events.jsonl"
        whole = CallInterruptionEvent(call_id="c1", at=AT).to_json()
        path.write_text(whole + "\n" + whole[:10], encoding="utf-8")
        assert len(EventLog(path).events()) == 1

    def test_a_bad_complete_line_names_its_line_number(self, tmp_path: Path) -> None:
        path = tmp_path / "events.jsonl"
        whole = CallInterruptionEvent(call_id="c1", at=AT).to_json()
        path.write_text(whole + "\n{}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"events.jsonl:2"):
            EventLog(path).events()


class TestLogThrottle:
    def test_lines_per_interval_and_the_skipped_count(self) -> None:
        from worker.log import LogThrottle

        throttle = LogThrottle(lines=2, interval_s=10.0, max_keys=2)
        assert [throttle.allow("a", 0.0) for _ in range(5)] == [0, 0, None, None, None]
        assert throttle.allow("a", 10.0) == 3  # a new window says what was skipped
        assert throttle.allow("b", 10.0) == 0
        assert throttle.allow("c", 10.0) == 0  # "a" is forgotten: keys are bounded
        assert throttle.allow("a", 11.0) == 0
