"""scripts/bench_floor.py runs, and its figures add up: each part is a positive CPU cost per
call per 20 ms, the floor is their sum, and its share of a core is the floor over 20 ms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PARTS = ("rtp_sendto_us", "rtp_recvfrom_us", "agent_send_us", "agent_receive_us", "mp3_encode_us")


def test_the_floor_is_the_sum_of_its_parts(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_floor.py"), "--operations", "2000",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert all(figures[part] > 0 for part in PARTS), figures
    assert abs(figures["floor_us"] - sum(figures[part] for part in PARTS)) < 0.01
    assert figures["floor_percent_of_core"] == round(figures["floor_us"] / 200, 4)
    assert "floor" in done.stdout


def test_too_few_operations_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_floor.py"), "--operations", "10"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--operations must be at least 100" in done.stderr
