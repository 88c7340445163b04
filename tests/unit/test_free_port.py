"""The tests' port picker (tests/sipp.py ``free_port``): the ports one test asks for before it
binds any of them never meet, whatever their spans (a worker's metrics port once fell inside
its own RTP range, both picked by it, and the worker could not start); a large span is still
found after many small ones (scattered small spans once left no room for a 202-port RTP range:
"no free port found" in 200 tests); every port is bindable, even, and inside ``FREE_PORTS``."""

from __future__ import annotations

import random

from tests.sipp import FREE_PORTS, free_port


def _check(port: int, span: int, taken: list[range]) -> range:
    ports = range(port, port + span)
    assert port % 2 == 0
    assert ports.start >= FREE_PORTS.start
    assert ports.stop <= FREE_PORTS.stop
    assert not [r for r in taken if ports.start < r.stop and r.start < ports.stop]
    return ports


def test_spans_asked_for_together_never_overlap() -> None:
    random.seed(5)
    taken: list[range] = []
    for span in [2, 2, 200, 4, 2, 102, 2, 22, 2, 2] * 3:
        taken.append(_check(free_port(span=span), span, taken))


def test_a_large_span_is_found_after_many_small_ones() -> None:
    random.seed(6)
    for _ in range(20):
        taken: list[range] = []
        for _ in range(60):
            taken.append(_check(free_port(), 2, taken))
        taken.append(_check(free_port(span=202), 202, taken))
