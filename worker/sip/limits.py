"""Per-source admission control for new SIP requests: token buckets keyed by source address.

Sans-I/O (``now`` passed in) and bounded: at most ``max_sources`` buckets are kept; the least
recently used is forgotten first, so a flood of spoofed sources cannot grow memory.

``check`` has three answers: ``ok`` (a token was taken), ``refuse`` (over the rate: answer 503
once, statelessly) and ``drop`` (so far over the rate that even a 503 is not worth sending).
Refusals have a bucket of their own, of the same rate and burst: a flood gets at most ``rate``
answers a second beyond what it was allowed, and everything else is dropped unanswered.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

Verdict = Literal["ok", "refuse", "drop"]


class TokenBuckets:
    def __init__(self, rate: float, burst: int, max_sources: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self.refused = 0
        self.dropped = 0

    def check(self, key: str, now: float) -> Verdict:
        """Take one token for ``key``: ``ok``, ``refuse`` (counted) or ``drop`` (counted)."""
        tokens, refusals, last = self._buckets.pop(key, (self.burst, self.burst, now))
        refill = (now - last) * self.rate
        tokens = min(self.burst, tokens + refill)
        refusals = min(self.burst, refusals + refill)
        verdict: Verdict
        if tokens >= 1.0:
            tokens -= 1.0
            verdict = "ok"
        elif refusals >= 1.0:
            refusals -= 1.0
            self.refused += 1
            verdict = "refuse"
        else:
            self.dropped += 1
            verdict = "drop"
        self._buckets[key] = (tokens, refusals, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return verdict

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key``; False (counted) when its bucket is empty."""
        return self.check(key, now) == "ok"

    def retry_after(self, key: str) -> int:
        """Whole seconds until ``key`` has a token again (at least 1)."""
        tokens = self._buckets.get(key, (self.burst, self.burst, 0.0))[0]
        return max(1, int((1.0 - tokens) / self.rate + 0.999))
