"""The events of real calls (SIPp to the echo route) through the outbox, the hard ways: the
worker process killed with SIGKILL after the journal write, before anyone read the events (a
restarted worker's hub delivers them); PostgreSQL stopped in the middle of a call and started
again (every event of the call arrives, in order, once); two worker processes on one database
(a hub client of one receives the calls of both, in id order, once per id)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
import websockets

from tests.e2e.harness import SCENARIOS, assert_sipp_ok, caller, running_worker
from tests.pg import TestPostgres
from tests.sipp import Sipp, free_port, port_in_use

pytestmark = [pytest.mark.sipp]

SECRET = "durable-events-test-secret-long-enough"
WAIT = 15.0
CALL_TYPES = ["call.started", "call.status", "call.done", "journal.new"]


def token() -> str:
    claims = {"uid": "tester", "workspaces": [1], "exp": time.time() + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


class WorkerProcess:
    """``aispinner-worker run`` in its own process, with the journal in ``database_url``."""

    def __init__(self, folder: Path, database_url: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.sip_port = free_port()
        self.api_port = free_port(host="127.0.0.1")
        rtp = free_port(span=102)
        self.config = folder / "worker.toml"
        self.config.write_text(
            f'data_dir = "{folder / "data"}"\n'
            f'database_url = "{database_url}"\n'
            f'worker_id = "{folder.name}"\n'
            "processes = 1\n"  # one process per worker: tests/e2e/test_processes.py has more
            '[log]\nformat = "json"\n'
            f"[sip]\nport = {self.sip_port}\n"
            f"[rtp]\nport_min = {rtp}\nport_max = {rtp + 100}\n"
            f'[api]\nport = {self.api_port}\njwt_secret = "{SECRET}"\n'
            '[[routes]]\nmatch = "*"\naction = "echo"\nrecord = false\n',
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")}
        self._log = (self.folder / "worker.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--config", str(self.config), "run"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + WAIT
        import socket

        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start: {self.log()}")
            if port_in_use(self.sip_port):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.api_port)) == 0:
                        return
            time.sleep(0.05)

    def log(self) -> str:
        return (self.folder / "worker.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)
        self._log.close()

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0 if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(WAIT)
        finally:
            self._log.close()

    def hub(self, last_id: int | None = None) -> str:
        url = f"ws://127.0.0.1:{self.api_port}/ws/events/1?token={token()}"
        return url if last_id is None else f"{url}&last_id={last_id}"


@contextlib.contextmanager
def worker_process(folder: Path, database_url: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(folder, database_url)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def talk(folder: Path, sip_port: int, duration_ms: int = 1200) -> Sipp:
    return Sipp(
        workdir=folder,
        remote=f"127.0.0.1:{sip_port}",
        args=["-sf", str(SCENARIOS / "uac_talk_bye.xml"), "-s", "echo", "-m", "1", "-l", "1",
              "-d", str(duration_ms)],
        timeout_s=30.0,
    )  # fmt: skip


async def outbox_types(database_url: str) -> list[tuple[int, str, str | None]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, type, call_id FROM outbox ORDER BY id")
    finally:
        await conn.close()
    return [(r["id"], r["type"], r["call_id"]) for r in rows]


async def until_done(database_url: str, calls: int) -> list[tuple[int, str, str | None]]:
    deadline = time.monotonic() + WAIT
    while True:
        rows = await outbox_types(database_url)
        if sum(1 for _, kind, _ in rows if kind == "journal.new") >= calls:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"{calls} calls not journaled within {WAIT} s: {rows}")
        await asyncio.sleep(0.1)


async def collect(url: str, calls: int) -> list[dict[str, Any]]:
    """Every event (call-level ones too) until ``calls`` calls have their ``journal.new``."""
    got: list[dict[str, Any]] = []
    async with websockets.connect(f"{url}&subscribe=telephony") as ws:
        while sum(1 for m in got if m["type"] == "journal.new") < calls:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            except TimeoutError:
                raise AssertionError(f"{calls} calls not seen: {got}") from None
            if message.get("type") not in ("ping", "subscribed"):
                got.append(message)
    return got


def call_of(message: dict[str, Any]) -> str:
    return str(message.get("call_id") or message["entries"][0]["call_id"])


class TestSigkillAfterTheJournalWrite:
    async def test_restarted_worker_delivers(self, tmp_path: Path, database_url: str) -> None:
        first = WorkerProcess(tmp_path / "w1", database_url)
        first.start()
        try:
            sipp = talk(tmp_path / "sipp", first.sip_port)
            async with sipp:
                assert_sipp_ok(await sipp.wait())
            written = await until_done(database_url, 1)
        finally:
            first.kill()  # no hub client ever read them
        second = WorkerProcess(tmp_path / "w1", database_url)
        second.start()
        try:
            got = await collect(second.hub(last_id=0), 1)
        finally:
            assert second.stop() == 0
        assert [(m["id"], m["type"]) for m in got] == [(i, t) for i, t, _ in written]
        assert [m["type"] for m in got if m["type"] != "call.status"] == [
            "call.started",
            "call.done",
            "journal.new",
        ]


class TestTwoWorkerProcessesOneDatabase:
    async def test_a_client_of_one_gets_both(self, tmp_path: Path, database_url: str) -> None:
        with (
            worker_process(tmp_path / "a", database_url) as a,
            worker_process(tmp_path / "b", database_url) as b,
        ):
            client = asyncio.get_running_loop().create_task(collect(a.hub(), 2))
            await asyncio.sleep(0.5)  # subscribed
            calls = [talk(tmp_path / "sa", a.sip_port), talk(tmp_path / "sb", b.sip_port)]
            async with calls[0], calls[1]:
                for sipp in calls:
                    assert_sipp_ok(await sipp.wait())
            written = await until_done(database_url, 2)
            got = await asyncio.wait_for(client, WAIT)
        ids = [m["id"] for m in got]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert ids == [i for i, _, _ in written]
        by_call: dict[str, list[str]] = {}
        for m in got:
            by_call.setdefault(call_of(m), []).append(m["type"])
        assert len(by_call) == 2
        workers = set()
        conn = await asyncpg.connect(database_url)
        try:
            for call in by_call:
                workers.add(
                    await conn.fetchval("SELECT worker_id FROM calls WHERE call_id=$1", call)
                )
        finally:
            await conn.close()
        assert workers == {"a", "b"}
        for types in by_call.values():
            assert types[0] == "call.started"
            assert types[-2:] == ["call.done", "journal.new"]


class TestDatabaseStoppedMidCall:
    """The database goes away as a call arrives and comes back while it is up: the call is
    answered and carries its audio meanwhile, its first events wait on disk, and afterwards
    every event of the call is in the outbox once, in order."""

    async def test_every_event_arrives_in_order(
        self, tmp_path: Path, postgres: TestPostgres, database_url: str
    ) -> None:
        routes = [{"match": "*", "action": "echo", "record": False}]
        async with running_worker(
            tmp_path / "data", routes, database_url=database_url, jwt_secret=SECRET
        ) as worker:
            backend = worker.backend
            assert backend is not None
            assert backend.api is not None
            assert backend.writer is not None
            await postgres.stop()
            try:
                sipp = caller(tmp_path / "sipp", worker, "uac_talk_bye", "echo", duration_ms=3000)
                async with sipp:
                    await asyncio.sleep(1.5)  # answered, talking, with no database
                    spooled = len(backend.writer.spool)
                    await postgres.start()
                    assert_sipp_ok(await sipp.wait())
            finally:
                if not port_in_use_unix(postgres):
                    await postgres.start()
            assert await backend.writer.flush(WAIT)
            written = await until_done(database_url, 1)
            url = f"ws://127.0.0.1:{backend.api.port}/ws/events/1?token={token()}&last_id=0"
            got = await collect(url, 1)
        assert spooled >= 2  # call.started and in-progress waited on disk
        types = [m["type"] for m in got]
        assert [m["id"] for m in got] == [i for i, _, _ in written]
        statuses = [m["status"] for m in got if m["type"] == "call.status"]
        assert types == ["call.started"] + ["call.status"] * len(statuses) + [
            "call.done",
            "journal.new",
        ]
        assert statuses[-2:] == ["in-progress", "completed"]
        assert len({m["id"] for m in got}) == len(got)


def port_in_use_unix(postgres: TestPostgres) -> bool:
    """Whether the server's socket answers (it is running)."""
    return (Path(postgres.socket_dir) / ".s.PGSQL.5432").exists()
