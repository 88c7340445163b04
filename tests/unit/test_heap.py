"""worker/heap.py: glibc's mmap threshold fixed for the recorders' large blocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from worker import heap

# Each encoder's growth of the resident set, after the heap has churned the way a worker's
# does (encoders made and dropped as calls come and go, other large blocks freed): run in a
# fresh interpreter so the two cases start alike.
ENCODERS_SCRIPT = textwrap.dedent(
    """
    import random, sys
    import lameenc
    from worker import heap
    if sys.argv[1] == "tuned":
        assert heap.tune()
    random.seed(7)
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    pcm = bytes(random.randrange(256) for _ in range(6400))
    def encoder():
        e = lameenc.Encoder()
        e.set_bit_rate(32); e.set_in_sample_rate(8000); e.set_out_sample_rate(8000)
        e.set_channels(2); e.set_quality(7)
        e.encode(pcm)
        return e
    live = [encoder() for _ in range(30)]
    junk = [bytearray(random.randrange(1000, 300000)) for _ in range(100)]
    for _ in range(10):
        for i in random.sample(range(30), 15):
            live[i] = encoder()
        for _ in range(30):
            junk[random.randrange(100)] = bytearray(random.randrange(1000, 300000))
    before = rss()
    more = [encoder() for _ in range(100)]
    for e in more:
        for _ in range(10):
            e.encode(pcm)
    print((rss() - before) / len(more))
    """
)


def _resident_per_encoder(case: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", ENCODERS_SCRIPT, case],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    return float(out.stdout.strip())


def test_tune_keeps_a_recorders_encoder_small() -> None:
    untuned = _resident_per_encoder("default")
    tuned = _resident_per_encoder("tuned")
    assert untuned > 200_000, untuned  # what the tuning is for: calloc clearing reused heap
    assert tuned < 0.7 * untuned, (tuned, untuned)


def test_tune_leaves_an_operators_own_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert heap.tune() is False
