"""Shared pytest fixtures: paths to SIPp's bundled captures and tool availability."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SIPP_SHARE = Path("/usr/share/sip-tester")


@pytest.fixture(scope="session")
def sipp_share() -> Path:
    if not (SIPP_SHARE / "g711a.pcap").exists():
        pytest.fail("SIPp's pcaps are missing: run `make test` (it installs sip-tester)")
    return SIPP_SHARE


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        pytest.fail("ffmpeg is missing: run `make test` (it installs ffmpeg)")
    return path
