"""The ``echo`` route runs as a session like an agent call, so its settings mean what they say
(defect 12): ``record = true`` records the call and its events are written. And a call that
never had media leaves no recording behind (defect 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import (
    agent_route,
    assert_sipp_ok,
    best_match,
    caller,
    decode_mp3,
    final_statuses,
    pcap_reference,
    running_worker,
    wait_results,
)
from tests.sipp import free_port
from worker.events import CallDoneEvent, CallStartedEvent, CallStatusEvent, EventLog

pytestmark = [pytest.mark.sipp, pytest.mark.ffmpeg]


class TestEchoRouteIsASession:
    async def test_echo_records_and_publishes(self, tmp_path: Path) -> None:
        routes = [{"match": "echo", "action": "echo", "record": True}]
        async with running_worker(tmp_path / "data", routes) as worker:
            sipp = caller(tmp_path / "sipp", worker, "uac_talk_bye", "echo", duration_ms=8000)
            result = await sipp.run()
            (done,) = await wait_results(worker, 1)
        assert_sipp_ok(result)
        assert done.status == "completed"
        assert done.recording is not None
        left, right = decode_mp3(done.recording)
        assert 7.5 <= len(left) / 8000 <= 9.5
        reference = pcap_reference()[8000:40000]  # 4 s of SIPp's capture
        assert best_match(left, reference).score > 0.95  # the caller, left
        assert best_match(right, reference).score > 0.95  # the echo they heard, right
        events = EventLog(tmp_path / "data" / "events.jsonl")
        assert [e.call_id for e in events.of_type(CallStartedEvent)] == [done.call_sid]
        assert [e.status for e in events.of_type(CallStatusEvent)] == ["in-progress", "completed"]
        (finished,) = events.of_type(CallDoneEvent)
        assert finished.recording_path == done.recording
        assert finished.media is not None
        assert finished.media.packets_in > 200

    async def test_echo_without_recording(self, tmp_path: Path) -> None:
        routes = [{"match": "echo", "action": "echo", "record": False}]
        async with running_worker(tmp_path / "data", routes) as worker:
            result = await caller(
                tmp_path / "sipp", worker, "uac_talk_bye", "echo", duration_ms=2000
            ).run()
            (done,) = await wait_results(worker, 1)
        assert_sipp_ok(result)
        assert done.recording is None
        assert not (tmp_path / "data" / "recordings").exists()


class TestNoRecordingWithoutMedia:
    async def test_unanswered_call_leaves_no_file(self, tmp_path: Path) -> None:
        routes = [agent_route("*", f"ws://127.0.0.1:{free_port()}/app#rc=0", record=True)]
        async with running_worker(tmp_path / "data", routes) as worker:
            result = await caller(tmp_path / "sipp", worker, "uac_rejected", "+15550003001").run()
            (done,) = await wait_results(worker, 1)
        assert_sipp_ok(result)
        assert final_statuses(result) == [480]
        assert done.status == "failed"
        assert done.recording is None
        (finished,) = EventLog(tmp_path / "data" / "events.jsonl").of_type(CallDoneEvent)
        assert finished.recording_path is None
        recordings = tmp_path / "data" / "recordings"
        assert not recordings.exists() or list(recordings.iterdir()) == []
