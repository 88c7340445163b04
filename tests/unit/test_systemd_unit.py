"""config/aispinner-worker.service: systemd accepts it (``systemd-analyze verify``, every
directive parsed), and it fits the worker: SIGTERM reaches the front alone (it drains its
media processes itself), the stop timeout covers the drain, the real-time priority the
settings ask for is allowed to an unprivileged user, and it runs ``aispinner-worker run``."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import Settings
from worker.front.front import KILL_AFTER_S, SHUTDOWN_EXTRA_S

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "aispinner-worker.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser["Service"]


def _verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "aispinner-worker.service"
    path.write_text(text, encoding="utf-8")
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _here(text: str) -> str:
    """The unit with ExecStart on this checkout's aispinner-worker (verify wants it to exist)."""
    executable = Path(sys.executable).parent / "aispinner-worker"
    assert executable.exists(), executable
    return text.replace("/opt/aispinner/bin/aispinner-worker", str(executable))


class TestSystemdUnit:
    def test_systemd_accepts_every_directive(self, tmp_path: Path) -> None:
        done = _verify(_here(UNIT.read_text(encoding="utf-8")), tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr  # systemd warns, and goes on, on what it ignores

    @pytest.mark.parametrize(
        ("good", "bad", "complaint"),
        [
            ("KillMode=mixed", "KillMode=everything", "Failed to parse kill mode"),
            ("LimitRTPRIO=10", "LimitRTPRIO=ten", "Failed to parse resource value"),
        ],
    )
    def test_a_broken_directive_is_caught(
        self, tmp_path: Path, good: str, bad: str, complaint: str
    ) -> None:
        text = _here(UNIT.read_text(encoding="utf-8"))
        assert good in text
        done = _verify(text.replace(good, bad), tmp_path)
        assert complaint in done.stderr

    def test_sigterm_goes_to_the_front_alone(self) -> None:
        service = _service()
        assert service["KillMode"] == "mixed"
        assert service.get("KillSignal", "SIGTERM") == "SIGTERM"

    def test_the_stop_timeout_covers_the_drain(self) -> None:
        drain = Settings().drain_grace_s + SHUTDOWN_EXTRA_S + KILL_AFTER_S
        assert float(_service()["TimeoutStopSec"]) > drain

    def test_an_unprivileged_user_may_take_the_real_time_priority(self) -> None:
        service = _service()
        assert service["User"] not in ("root", "0")
        assert int(service["LimitRTPRIO"]) >= Settings().realtime_priority > 0

    def test_it_runs_the_worker(self) -> None:
        service = _service()
        assert service["ExecStart"].endswith("/aispinner-worker run")
        environment = [  # a key systemd takes many times: configparser keeps only the last
            line.partition("=")[2]
            for line in UNIT.read_text(encoding="utf-8").splitlines()
            if line.startswith("Environment=")
        ]
        assert any(e.startswith("AISPINNER_CONFIG=") for e in environment), environment
