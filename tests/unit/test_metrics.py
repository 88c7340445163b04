"""The worker's Prometheus metrics without sockets: the exposition (names, types, HELP, the
content type), the bounded ``cause`` label set (every cause token in the source has its own
value), call figures read from live calls at scrape time and kept in the totals once they end,
agent audio lanes and the outbox backlog read the same way, the pacer's tick histogram and
skipped ticks, the merge of several processes' expositions, and the README listing every
metric."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import make_harness
from worker.agent.connection import AudioQueue
from worker.config import RouteSettings
from worker.events import models as ev
from worker.legs import LegEnd
from worker.metrics import (
    CALL_CAUSES,
    CONTENT_TYPE,
    CallFigures,
    WorkerMetrics,
    cause_label,
    merge_expositions,
    process_metrics,
)
from worker.pacer import MediaPacer
from worker.session.session import AgentCounters, MarkEvent
from worker.session.status import StatusChange
from worker.store.outbox import OutboxWriter
from worker.store.spool import Spool

ROOT = Path(__file__).resolve().parents[2]


def families(metrics: WorkerMetrics) -> dict[str, Metric]:
    """The rendered exposition parsed back, by family name (counters without ``_total``)."""
    text = metrics.render().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(metrics: WorkerMetrics, sample: str, **labels: str) -> float:
    """One sample's value in the rendered exposition (0 when absent)."""
    for family in families(metrics).values():
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return float(s.value)
    return 0.0


@dataclass(eq=False)
class FakeCall:
    """A ``LiveCall`` whose figures the test sets."""

    figures: CallFigures

    def metric_figures(self) -> CallFigures:
        return self.figures


class FakeLane:
    """An agent audio lane on a real ``AudioQueue`` (8 bytes a millisecond: L16 at 4 kHz)."""

    def __init__(self, max_ms: float = 100.0) -> None:
        self.queue = AudioQueue(max_ms, 8.0)

    @property
    def queued_ms(self) -> float:
        return self.queue.queued_ms

    @property
    def dropped_frames(self) -> int:
        return self.queue.dropped_frames

    @property
    def dropped_ms(self) -> float:
        return self.queue.dropped_ms


class TestExposition:
    def test_every_family_is_prefixed_typed_and_explained(self) -> None:
        metrics = WorkerMetrics(process=False)
        got = families(metrics)
        assert got, "nothing rendered"
        for name, family in got.items():
            assert name.startswith("aispinner_"), name
            assert family.documentation, name
            assert family.type in ("counter", "gauge", "histogram"), name
        # Units in names: counters of seconds, durations in seconds, no milliseconds anywhere.
        assert got["aispinner_media_tick_duration_seconds"].type == "histogram"
        assert got["aispinner_rtp_jitter_seconds"].type == "histogram"
        assert got["aispinner_rtp_concealed_seconds"].type == "counter"
        assert got["aispinner_calls_active"].type == "gauge"
        assert not [name for name in got if "_ms" in name or "millis" in name]

    def test_counters_end_in_total_and_created_series_are_off(self) -> None:
        text = WorkerMetrics(process=False).render().decode()
        assert "# TYPE aispinner_call_setups_total counter" in text
        assert "# TYPE aispinner_rtp_received_packets_total counter" in text
        assert "_created" not in text

    def test_content_type_is_text_format_0_0_4(self) -> None:
        assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"

    def test_registries_are_separate_and_the_process_one_is_shared(self) -> None:
        one, two = WorkerMetrics(process=False), WorkerMetrics(process=False)
        one.call_setups.labels("inbound").inc()
        assert value(one, "aispinner_call_setups_total", direction="inbound") == 1
        assert value(two, "aispinner_call_setups_total", direction="inbound") == 0
        assert process_metrics() is process_metrics()

    def test_process_figures_are_optional(self) -> None:
        assert "process_cpu_seconds" in families(WorkerMetrics())
        assert "process_cpu_seconds" not in families(WorkerMetrics(process=False))


class TestCauseLabels:
    def test_known_tokens_keep_their_name_and_others_are_bounded(self) -> None:
        assert cause_label("remote-bye") == "remote-bye"
        assert cause_label("agent-unreachable") == "agent-unreachable"
        assert cause_label("x-peer-invented-this") == "other"
        assert cause_label(None) == "unknown"

    def test_every_cause_token_in_the_source_has_its_own_label(self) -> None:
        """The ``LegEnd`` / ``CallEnd`` / hangup cause literals in ``worker/`` (the ARI client's
        own hangup reasons aside) are all in ``CALL_CAUSES``: a new cause must be added there,
        or it is counted as ``other``."""
        token = re.compile(r'"([a-z]+(?:-[a-z]+)*)"')
        sites = re.compile(
            r"\b(?:hangup|hangup_call|_finish_unanswered|LegEnd|CallEnd)\("
            r'|\bcause(?:: str)? = |_FAILURE_CAUSES = |^\s+\d+: \("'
        )
        found: dict[str, str] = {}
        for path in sorted((ROOT / "worker").rglob("*.py")):
            if path.name == "client.py" and path.parent.name == "ari":
                continue  # DELETE /channels reasons ("normal", "busy" ...), not causes
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if sites.search(line) and "client.hangup(" not in line:
                    for name in token.findall(line):
                        found.setdefault(name, f"{path.relative_to(ROOT)}:{number}")
        assert len(found) > 20, found  # the scan still finds the sites
        missing = {name: where for name, where in found.items() if name not in CALL_CAUSES}
        assert missing == {}

    def test_failures_and_hangups_by_direction_and_cause(self) -> None:
        metrics = WorkerMetrics(process=False)
        calls = [FakeCall(CallFigures()) for _ in range(4)]
        for call in calls:
            metrics.call_started(call, "inbound")
        metrics.call_ended(calls[0], "inbound", "completed", "remote-bye")
        metrics.call_ended(calls[1], "inbound", "busy", "busy")
        metrics.call_ended(calls[2], "inbound", "failed", "made-up-by-a-peer")
        metrics.call_ended(calls[3], "inbound", None, None)  # cancelled: no result
        assert value(metrics, "aispinner_call_setups_total", direction="inbound") == 4
        assert value(metrics, "aispinner_call_setups_total", direction="outbound") == 0
        hangups = "aispinner_call_hangups_total"
        failures = "aispinner_call_failures_total"
        assert value(metrics, hangups, direction="inbound", cause="remote-bye") == 1
        assert value(metrics, failures, direction="inbound", cause="busy") == 1
        assert value(metrics, failures, direction="inbound", cause="other") == 1
        samples = [s for s in families(metrics)["aispinner_call_failures"].samples if s.value] + [
            s for s in families(metrics)["aispinner_call_hangups"].samples if s.value
        ]
        assert len(samples) == 3
        assert value(metrics, "aispinner_calls_active") == 0


class TestFiguresReadAtScrapeTime:
    def test_live_call_figures_then_totals_after_its_end(self) -> None:
        metrics = WorkerMetrics(process=False)
        call = FakeCall(CallFigures(packets_in=10, packets_out=9, lost=1, late=2))
        metrics.call_started(call, "inbound")
        assert value(metrics, "aispinner_calls_active") == 1
        assert value(metrics, "aispinner_rtp_received_packets_total") == 10
        call.figures = CallFigures(
            packets_in=250,
            packets_out=249,
            lost=3,
            late=4,
            concealed_s=0.06,
            jitter_s=0.004,
            recorder_s=0.01,
            recorder_frames=250,
        )
        assert value(metrics, "aispinner_rtp_received_packets_total") == 250
        assert value(metrics, "aispinner_rtp_jitter_max_seconds") == pytest.approx(0.004)
        metrics.call_ended(call, "inbound", "completed", "remote-bye")
        call.figures = CallFigures(packets_in=999)  # after its end, the call is not read again
        assert value(metrics, "aispinner_calls_active") == 0
        assert value(metrics, "aispinner_rtp_received_packets_total") == 250
        assert value(metrics, "aispinner_rtp_sent_packets_total") == 249
        assert value(metrics, "aispinner_rtp_lost_packets_total") == 3
        assert value(metrics, "aispinner_rtp_late_packets_total") == 4
        assert value(metrics, "aispinner_rtp_concealed_seconds_total") == pytest.approx(0.06)
        assert value(metrics, "aispinner_recorder_encode_seconds_total") == pytest.approx(0.01)
        assert value(metrics, "aispinner_recorder_frames_total") == 250
        assert value(metrics, "aispinner_rtp_jitter_max_seconds") == 0
        assert value(metrics, "aispinner_rtp_jitter_seconds_count") == 1
        assert value(metrics, "aispinner_rtp_jitter_seconds_bucket", le="0.005") == 1
        assert value(metrics, "aispinner_rtp_jitter_seconds_bucket", le="0.0025") == 0
        metrics.call_ended(call, "inbound", "completed", "remote-bye")  # twice: counted once
        assert value(metrics, "aispinner_rtp_received_packets_total") == 250

    def test_a_call_without_rtp_adds_no_jitter_observation(self) -> None:
        metrics = WorkerMetrics(process=False)
        call = FakeCall(CallFigures())
        metrics.call_started(call, "outbound")
        metrics.call_ended(call, "outbound", "no-answer", "no-answer")
        assert value(metrics, "aispinner_rtp_jitter_seconds_count") == 0
        failures = "aispinner_call_failures_total"
        assert value(metrics, failures, direction="outbound", cause="no-answer") == 1

    def test_agent_lanes_queue_depth_and_drops(self) -> None:
        metrics = WorkerMetrics(process=False)
        lane = FakeLane(max_ms=100)
        metrics.lane_opened(lane)
        for _ in range(3):
            lane.queue.push(bytes(320))  # 40 ms each: the first is dropped for the third
        assert value(metrics, "aispinner_agent_audio_sockets") == 1
        assert value(metrics, "aispinner_agent_audio_queued_seconds") == pytest.approx(0.08)
        assert value(metrics, "aispinner_agent_audio_dropped_frames_total") == 1
        assert value(metrics, "aispinner_agent_audio_dropped_seconds_total") == pytest.approx(0.04)
        metrics.lane_closed(lane)
        metrics.lane_closed(lane)  # idempotent
        assert value(metrics, "aispinner_agent_audio_sockets") == 0
        assert value(metrics, "aispinner_agent_audio_queued_seconds") == 0
        assert value(metrics, "aispinner_agent_audio_dropped_frames_total") == 1
        assert value(metrics, "aispinner_agent_audio_dropped_seconds_total") == pytest.approx(0.04)

    async def test_outbox_backlog_in_memory_and_on_disk(self, tmp_path: Path) -> None:
        """A writer whose database is away spools what it could not write; the scrape shows
        the spool and that the database is down, and nothing once the writer is closed."""

        def unreachable() -> Any:
            raise OSError("connection refused")

        metrics = WorkerMetrics(process=False)
        spool = Spool(tmp_path / "spool.jsonl", max_events=100)
        writer = OutboxWriter(unreachable, spool, "w1", metrics=metrics)
        assert "aispinner_outbox_pending_events" not in families(metrics)
        for n in range(3):
            writer.deliver(ev.CallStatusEvent(call_id=f"c{n}", status="ringing", sip_status=180))
        assert writer.pending == 3
        writer.start()
        assert value(metrics, "aispinner_outbox_pending_events") == 3
        assert value(metrics, "aispinner_outbox_database_up") == 1
        for _ in range(100):
            if len(spool) == 3:
                break
            await asyncio.sleep(0.01)
        assert value(metrics, "aispinner_outbox_pending_events") == 0
        assert value(metrics, "aispinner_event_spool_events") == 3
        assert value(metrics, "aispinner_outbox_database_up") == 0
        assert value(metrics, "aispinner_outbox_written_events_total") == 0
        await writer.close(within_s=0.05)
        assert "aispinner_event_spool_events" not in families(metrics)


class ScriptedDriver:
    """An ``AgentDriver`` that waits to be told it is done (or fails at once)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.done = asyncio.Event()

    @property
    def failure(self) -> str | None:
        return "scripted" if self.fail else None

    async def run(self) -> None:
        if self.fail:
            raise RuntimeError("the driver broke")
        await self.done.wait()

    def on_status(self, change: StatusChange) -> None:
        return None

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        return None

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        return None

    def counters(self) -> AgentCounters:
        return AgentCounters()

    async def close(self) -> None:
        return None


class TestCallSessionFigures:
    """A ``CallSession`` on a fake leg counts itself: setup, active while it runs, its leg's
    packets and the recorder's frames read live, then its hangup or failure by cause."""

    async def test_answered_call_counted_live_then_by_its_hangup(self, tmp_path: Path) -> None:
        metrics = WorkerMetrics(process=False)
        route = RouteSettings(match="*", agent_url="ws://x", record=True, trunk="t")
        h = make_harness(tmp_path, route=route)
        h.session.metrics = metrics
        run = asyncio.ensure_future(h.session.run(ScriptedDriver()))
        await h.clock.settle()
        await h.run_ticks(50)
        assert value(metrics, "aispinner_call_setups_total", direction="inbound") == 1
        assert value(metrics, "aispinner_calls_active") == 1
        assert value(metrics, "aispinner_rtp_received_packets_total") == 50  # the fake leg's
        assert value(metrics, "aispinner_recorder_frames_total") == 50
        assert value(metrics, "aispinner_recorder_encode_seconds_total") > 0
        h.leg.end(LegEnd("remote-bye"))
        result = await asyncio.wait_for(run, 2)
        assert result.status == "completed"
        assert value(metrics, "aispinner_calls_active") == 0
        hangups = "aispinner_call_hangups_total"
        assert value(metrics, hangups, direction="inbound", cause="remote-bye") == 1
        assert value(metrics, "aispinner_rtp_received_packets_total") == 50
        assert value(metrics, "aispinner_recorder_frames_total") == 50

    async def test_unanswered_call_counted_as_a_failure(self, tmp_path: Path) -> None:
        metrics = WorkerMetrics(process=False)
        h = make_harness(tmp_path, answered=False)
        h.session.metrics = metrics
        result = await asyncio.wait_for(h.session.run(ScriptedDriver(fail=True)), 2)
        assert (result.status, result.cause) == ("no-answer", "agent-failed")
        failures = "aispinner_call_failures_total"
        assert value(metrics, failures, direction="inbound", cause="agent-failed") == 1
        assert value(metrics, "aispinner_calls_active") == 0


class TestPacer:
    async def test_each_tick_is_timed_and_a_stall_counts_skipped_ticks(self) -> None:
        metrics = WorkerMetrics(process=False)
        pacer = MediaPacer(asyncio.get_running_loop(), max_catch_up=3, metrics=metrics)
        ticks: list[float] = []

        def tick(now: float) -> None:
            ticks.append(now)
            if len(ticks) == 3:
                time.sleep(0.2)  # a stalled loop: 10 ticks late

        pacer.add("call", tick)
        try:
            for _ in range(200):
                if len(ticks) >= 6:
                    break
                await asyncio.sleep(0.01)
        finally:
            pacer.close()
        count = value(metrics, "aispinner_media_tick_duration_seconds_count")
        assert count >= 6
        assert value(metrics, "aispinner_media_tick_duration_seconds_sum") >= 0.2
        slow = value(metrics, "aispinner_media_tick_duration_seconds_bucket", le="0.1")
        assert slow == count - 1  # every tick but the stalled one took under 0.1 s
        assert value(metrics, "aispinner_media_ticks_skipped_total") == pacer.skipped >= 5


class TestMerge:
    def test_each_process_labelled_each_family_once(self) -> None:
        one, two = WorkerMetrics(process=False), WorkerMetrics(process=False)
        one.call_setups.labels("inbound").inc(2)
        two.call_setups.labels("inbound").inc(5)
        two.tick_duration.observe(0.003)
        text = merge_expositions({"0": one.render(), "1": two.render().decode()}).decode()
        assert text.count("# TYPE aispinner_call_setups_total counter") == 1
        merged = {f.name: f for f in text_string_to_metric_families(text)}
        setups = {
            (s.labels["process"], s.labels["direction"]): s.value
            for s in merged["aispinner_call_setups"].samples
        }
        assert setups == {
            ("0", "inbound"): 2,
            ("0", "outbound"): 0,
            ("1", "inbound"): 5,
            ("1", "outbound"): 0,
        }
        ticks = merged["aispinner_media_tick_duration_seconds"]
        assert ticks.type == "histogram"
        counts = {s.labels["process"]: s.value for s in ticks.samples if s.name.endswith("_count")}
        assert counts == {"0": 0, "1": 1}


class TestReadme:
    def test_the_readme_lists_every_metric(self) -> None:
        """Every family the worker exposes (with an outbox writer, so its families too) is
        named in the README's Metrics section, and nothing there is stale."""
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"^\| `(aispinner_[a-z_]+)`", section, re.MULTILINE))
        metrics = WorkerMetrics(process=False)
        metrics.track_event_backlog(_IdleWriter())
        exposed = set()
        for family in families(metrics).values():
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
        assert listed == exposed


class _SpoolSize:
    dropped = 0

    def __len__(self) -> int:
        return 0


class _IdleWriter:
    spool = _SpoolSize()
    events_written = 0
    database_ok = True
    pending = 0
