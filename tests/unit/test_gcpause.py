"""worker/gcpause.py: every collection timed by generation through gc.callbacks, and the
start-up settle (a full collection, everything alive frozen, a higher young threshold)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker import gcpause
from worker.gcpause import GcPauses


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class TestPauses:
    def test_each_collection_is_counted_and_timed_by_generation(self) -> None:
        recorder = GcPauses().install()
        try:
            gc.collect(0)
            gc.collect(0)
            gc.collect(2)
        finally:
            recorder.remove()
        young, _, full = recorder.generations
        assert young.collections >= 2
        assert full.collections >= 1
        assert full.seconds > 0
        assert 0 < full.longest_s <= full.seconds
        gc.collect(2)  # removed: no longer counted
        assert recorder.generations[2].collections == full.collections

    def test_install_twice_records_once(self) -> None:
        recorder = GcPauses()
        recorder.install().install()
        try:
            assert gc.callbacks.count(recorder) == 1
        finally:
            recorder.remove()
        assert recorder not in gc.callbacks


class TestSettle:
    def test_freezes_what_is_alive_and_raises_the_young_threshold(self, restored_gc: None) -> None:
        kept = [{"alive": n} for n in range(1000)]
        frozen = gcpause.settle(threshold=12_345)
        assert frozen >= 1000
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold()[0] == 12_345
        assert gcpause.pauses() in gc.callbacks
        assert len(kept) == 1000

    def test_the_metrics_show_the_pauses(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        from worker.metrics import WorkerMetrics

        gcpause.pauses()
        gc.collect(2)
        text = WorkerMetrics(process=False).render().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        full = [s for s in families["aispinner_gc_collections"].samples
                if s.labels == {"generation": "2"}]  # fmt: skip
        assert full[0].value >= 1
        longest = families["aispinner_gc_longest_pause_seconds"].samples
        assert {s.labels["generation"] for s in longest} == {"0", "1", "2"}
