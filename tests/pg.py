"""A real PostgreSQL for the tests: the ``pgserver`` wheel's PostgreSQL 16, one server per test
session in a temporary folder, a fresh database per test (``CREATE DATABASE ... TEMPLATE``
from one migrated once, so each costs milliseconds), and ``stop``/``start`` for the tests of a
database that goes away under load.

As root, pgserver runs the server as its ``pgserver`` system user (PostgreSQL refuses root); the
stop and start here do the same.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from worker.store.schema import migrate

TEMPLATE = "aispinner_template"


class TestPostgres:
    """One server; ``database()`` gives a new migrated database's URL."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="aispinner-pg-"))
        self.pgdata = self.folder / "data"
        self._server: Any = None
        self.uri = ""
        self.socket_dir = ""
        self._template_ready = False

    def start_server(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            self._server = pgserver.get_server(self.pgdata, cleanup_mode="delete")  # type: ignore[attr-defined]
        self.uri = str(self._server.get_uri())
        self.socket_dir = parse_qs(urlsplit(self.uri).query)["host"][0]

    def close(self) -> None:
        """Stop the server and delete its folder. pgserver's cleanup has been seen to delete
        the folder and leave the postmaster running (a run interrupted with Ctrl-C), so the
        postmaster's PID is read first and the process ended by it if it outlives the cleanup.
        pgserver deletes only the data folder; the temporary folder around it goes here."""
        try:
            if self._server is None:
                return
            pid = _postmaster_pid(self.pgdata)
            try:
                self._server.cleanup()
            finally:
                self._server = None
                if pid is not None:
                    _end(pid, self.pgdata)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    async def database(self) -> str:
        """A new database with the worker's schema; its URL."""
        admin = await asyncpg.connect(self.url("postgres"))
        try:
            if not self._template_ready:
                exists = await admin.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE
                )
                if not exists:
                    await admin.execute(f"CREATE DATABASE {TEMPLATE}")
                    conn = await asyncpg.connect(self.url(TEMPLATE))
                    try:
                        await migrate(conn)
                    finally:
                        await conn.close()
                self._template_ready = True
            name = f"t_{uuid.uuid4().hex[:12]}"
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        finally:
            await admin.close()
        return self.url(name)

    # -- a database that goes away --------------------------------------------------------------
    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args],
            check=True,
            user="pgserver",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

    async def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut)."""
        await asyncio.to_thread(self._pg_ctl, "-w", "-m", "fast", "stop")

    async def start(self) -> None:
        await asyncio.to_thread(
            self._pg_ctl,
            "-w",
            "-o",
            f"-k {self.socket_dir} -h ''",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _ours(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is still this server's postmaster (not a process that reused the PID)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"postgres" in command and str(pgdata).encode() in command


def _end(pid: int, pgdata: Path, within_s: float = 5.0) -> None:
    """SIGTERM (PostgreSQL's smart shutdown), then SIGKILL if it is still there; only while
    the PID is still this server's postmaster."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _ours(pid, pgdata):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and _ours(pid, pgdata):
            time.sleep(0.05)
