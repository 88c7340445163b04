"""The tests' port picker (tests/sipp.py ``free_port``): the ports one test asks for before it
binds any of them never meet, whatever their spans (a worker's metrics port once fell inside
its own RTP range, both picked by it, and the worker could not start), and every port handed
out is bindable, even, and inside ``FREE_PORTS``."""

from __future__ import annotations

import random

from tests.sipp import FREE_PORTS, HANDED_OUT_PORTS, free_port


def test_spans_asked_for_together_never_overlap() -> None:
    random.seed(5)
    spans = [2, 2, 200, 4, 2, 102, 2, 22, 2, 2] * 3
    taken: list[range] = []
    for span in spans:
        port = free_port(span=span)
        ports = range(port, port + span)
        assert port % 2 == 0
        assert ports.start >= FREE_PORTS.start
        assert ports.stop <= FREE_PORTS.stop
        assert not [r for r in taken if ports.start < r.stop and r.start < ports.stop]
        taken.append(ports)
    assert sum(len(r) for r in taken) <= HANDED_OUT_PORTS  # all still remembered here
