"""Per-source rate limiting of new SIP requests (token buckets, virtual clock)."""

from __future__ import annotations

from worker.sip.limits import TokenBuckets


class TestTokenBuckets:
    def test_burst_then_refill(self) -> None:
        buckets = TokenBuckets(rate=10, burst=3)
        assert [buckets.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
        assert buckets.refused == 1
        assert buckets.retry_after("a") == 1
        assert buckets.allow("a", 0.1) is True  # one token back after 100 ms at 10/s
        assert buckets.allow("a", 0.1) is False

    def test_sources_are_independent(self) -> None:
        buckets = TokenBuckets(rate=1, burst=1)
        assert buckets.allow("a", 0.0)
        assert not buckets.allow("a", 0.0)
        assert buckets.allow("b", 0.0)

    def test_memory_is_bounded(self) -> None:
        buckets = TokenBuckets(rate=1, burst=1, max_sources=100)
        for i in range(1000):
            buckets.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
        assert len(buckets._buckets) == 100

    def test_far_over_the_rate_is_dropped_unanswered(self) -> None:
        """Issue 11 #8: past its refusals a flooding source gets nothing at all, and it
        recovers at the rate."""
        buckets = TokenBuckets(rate=10, burst=3)
        verdicts = [buckets.check("a", 0.0) for _ in range(10)]
        assert verdicts == ["ok"] * 3 + ["refuse"] * 3 + ["drop"] * 4
        assert (buckets.refused, buckets.dropped) == (3, 4)
        assert buckets.check("a", 0.1) == "ok"
        assert buckets.check("a", 0.1) == "refuse"
        assert buckets.check("a", 0.1) == "drop"
