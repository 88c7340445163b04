"""Shared pytest fixtures: paths to SIPp's bundled captures, tool availability, and a real
PostgreSQL (``postgres``: one server per session; ``database_url``: a fresh database per test)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import TestPostgres

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[TestPostgres]:
    """One real PostgreSQL for the session (started on first use)."""
    server = TestPostgres()
    server.start_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def database_url(postgres: TestPostgres) -> str:
    """A fresh database with the worker's schema."""
    return await postgres.database()
