"""``aispinner-worker loadtest``, the smoke load CI runs so the harness keeps working: 10 calls
(4 probe phones, 6 SIPp callers with RFC 4733 digits) for 10 s against a worker the tool starts
with 2 media processes, bridged to the echo agent over jambonz ``listen`` at 16 kHz. The JSON
has every call successful and sane figures, the plots are PNG files, the report is written, and
nothing the tool started is left running. And the README documents the command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.privileges import may_realtime
from worker.loadtest.report import PLOTS

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _bindable(port: int, kind: int) -> bool:
    """Nothing holds the port: with SO_REUSEADDR, as a server binds, so the closed connections
    in TIME_WAIT do not count (a socket still listening does)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def smoke(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("loadtest")
    command = [
        sys.executable, "-m", "worker.cli", "loadtest",
        "--calls", "10", "--rate", "5", "--hold", "10", "--processes", "2", "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    return done, out


@pytest.mark.sipp
@pytest.mark.timeout(180)
class TestSmokeLoad:
    def test_every_call_succeeds(
        self, smoke: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        done, out = smoke
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = _results(out)
        calls = results["calls"]
        assert (calls["planned"], calls["successful"], calls["failed"]) == (10, 10, 0)
        assert calls["peak_concurrent"] == 10
        assert results["hold_window"] is not None
        assert results["setup_ms"]["count"] == 10
        assert 0 < results["setup_ms"]["p99"] < 2000
        assert "[    1 s] calls" in done.stdout  # progress lines

    def test_the_worker_is_measured(
        self, smoke: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        res = _results(smoke[1])["resources"]
        assert res["measured"]
        assert res["cpu_hold_percent"] > 0
        assert 0 < res["cpu_per_call_percent"] < 100
        assert res["pss_idle_kb"] > 10_000  # three Python processes
        assert res["pss_hold_kb"] > 10_000
        run = _results(smoke[1])["run"]
        assert run["worker_started"]
        assert run["processes"] == 2
        assert len(run["pids"]["worker"]) >= 3, "the front and both media processes"
        # the front and the media processes at the default realtime_priority when the runner
        # may grant it (the worker starts no other process with store = false)
        scheduling = run["scheduling"]
        assert scheduling == {"SCHED_RR 10" if may_realtime(10) else "SCHED_OTHER": 3}
        (name,) = scheduling
        assert run["worker"] == (
            f"started by the tool, 2 media processes (recording; scheduling: 3 × {name})"
        )

    def test_latency_jitter_and_loss_are_sane(
        self, smoke: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        results = _results(smoke[1])
        latency = results["latency_ms"]
        assert latency["window"] == "hold"
        for way in ("caller_to_agent", "agent_to_caller", "round_trip"):
            figures = latency[way]
            assert figures["count"] >= 4 * 10, way  # 4 probes, a marker every 0.5 s
            assert 0 < figures["p50"] <= figures["p99"] < 1000, way
        assert latency["round_trip"]["p50"] == pytest.approx(
            latency["caller_to_agent"]["p50"] + latency["agent_to_caller"]["p50"], abs=25
        )
        jitter = results["pacing_jitter_ms"]
        assert jitter["count"] > 4 * 400
        assert 0 <= jitter["p50"] <= jitter["p99"] < 60
        loss = results["loss"]
        for way in (
            "caller_to_worker",
            "caller_to_worker_probes",
            "worker_to_caller",
            "worker_to_caller_probes",
        ):
            assert loss[way]["packets"] > 0, way
            assert loss[way]["percent"] < 1.0, way
        dtmf = results["dtmf"]
        assert dtmf["sent"] == 6 * 3
        assert dtmf["received_by_worker"] == dtmf["sent"]
        assert dtmf["received_by_agent"] == dtmf["sent"]

    def test_plots_and_report(self, smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
        out = smoke[1]
        for name in PLOTS.values():
            data = (out / name).read_bytes()
            assert data.startswith(PNG), name
            assert len(data) > 5000, name
        report = (out / "report.md").read_text()
        assert "| calls: planned / successful / failed | 10 / 10 / 0 |" in report
        assert "round trip p50 / p99" in report
        for name in PLOTS.values():
            assert f"({name})" in report

    def test_nothing_is_left_running(
        self, smoke: tuple[subprocess.CompletedProcess[str], Path]
    ) -> None:
        out = smoke[1]
        run = _results(out)["run"]
        pids = [pid for group in run["pids"].values() for pid in group]
        assert {"agent", "worker", "probe", "sipp"} <= set(run["pids"])
        assert [pid for pid in pids if _alive(pid)] == []
        config = (out / "worker.toml").read_text()
        sip_port = int(config.split("[sip]", 1)[1].split("port = ", 1)[1].split()[0])
        assert _bindable(sip_port, socket.SOCK_DGRAM)
        agent_port = int(config.split("ws://127.0.0.1:", 1)[1].split("/", 1)[0])
        assert _bindable(agent_port, socket.SOCK_STREAM)


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return results


def test_readme_documents_the_load_test() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Load test", 1)[1].split("\n## ", 1)[0]
    for text in (
        "aispinner-worker loadtest",
        "make loadtest",
        "LOADTEST_ARGS",
        "--target",
        "--calls",
        "--rate",
        "--hold",
        "--processes",
        "--no-record",
        "--protocol",
        "results.json",
        "report.md",
        *PLOTS.values(),
    ):
        assert text in section, text
    makefile = (ROOT / "Makefile").read_text()
    assert "loadtest:" in makefile
    assert "LOADTEST_ARGS" in makefile


def test_cpu_breakdown_under_a_small_load(tmp_path: Path) -> None:
    """scripts/cpu_breakdown.py starts the load test, samples the worker with perf once every
    call is up, and writes shares that add up to the measured cost; the load test's results are
    kept with ``--out`` and nothing it started is left running."""
    out, figures_path = tmp_path / "load", tmp_path / "breakdown.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cpu_breakdown.py"), "--calls", "6", "--rate", "6",
         "--hold", "7", "--seconds", "1", "--processes", "1", "--out", str(out),
         "--json", str(figures_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    assert figures["loadtest_calls"]["successful"] == 6
    assert figures["worker_cpu_percent"] > 0
    groups = [p for p in figures["parts"] if p["part"] in _TOP_PARTS]
    assert len(groups) == len(_TOP_PARTS)
    assert abs(sum(p["us"] for p in groups) - figures["us_per_call_per_20ms"]) < 0.1
    assert next(p for p in groups if p["part"] == "Python interpreter")["percent"] > 10
    run = _results(out)["run"]
    pids = [pid for group in run["pids"].values() for pid in group]
    assert pids
    assert [pid for pid in pids if _alive(pid)] == []


_TOP_PARTS = {
    "kernel",
    "MP3 encoder (LAME)",
    "numpy",
    "Python interpreter",
    "uvloop",
    "C library",
    "other",
}
