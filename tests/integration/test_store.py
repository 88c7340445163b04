"""The journal and the outbox on a real PostgreSQL: migrations under concurrent starts, each
event's journal change and outbox row in one transaction, ids in commit order per workspace
with several writers, a retried batch changing nothing, and events spooled to disk while the
server is down, replayed in order once it is back (none lost, none twice)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.pg import TestPostgres
from worker.events import models as ev
from worker.store.journal import write_events
from worker.store.outbox import OutboxWriter
from worker.store.schema import migrate, migrations
from worker.store.spool import Spool


def call_events(call_id: str, workspace: int = 1, node: str | None = "pbx") -> list[ev.Event]:
    """One call's life as a session publishes it."""
    ids: dict[str, Any] = {"call_id": call_id, "workspace_id": workspace, "node_id": node}
    return [
        ev.CallStartedEvent(**ids, direction="inbound", from_="+1555", to="100", route="*"),
        ev.CallStatusEvent(**ids, status="ringing", sip_status=180),
        ev.CallStatusEvent(**ids, status="in-progress", sip_status=200),
        ev.CallDtmfEvent(**ids, digit="5", duration_ms=100, method="rfc4733"),
        ev.CallTranscriptEvent(**ids, role="agent", text="Hello!", at_sec=0.0),
        ev.CallTranscriptEvent(**ids, role="user", text="Hi.", at_sec=1.2),
        ev.CallDoneEvent(**ids, status="completed", duration_sec=3, recording_path="/r.mp3"),
    ]


@contextlib.asynccontextmanager
async def pool(url: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


class TestTheTestServer:
    def test_close_removes_its_temporary_folder(self) -> None:
        """pgserver deletes only the data folder; 130 empty ``aispinner-pg-*`` folders were
        found in /tmp after a day of runs before ``close`` removed its own."""
        server = TestPostgres()
        assert server.folder.is_dir()
        server.close()
        assert not server.folder.exists()


class TestMigrations:
    async def test_numbered_and_applied_once_under_concurrent_starts(
        self, postgres: TestPostgres
    ) -> None:
        admin = await asyncpg.connect(postgres.url("postgres"))
        await admin.execute("CREATE DATABASE migrate_race")
        await admin.close()
        url = postgres.url("migrate_race")
        conns = [await asyncpg.connect(url) for _ in range(4)]
        try:
            applied = await asyncio.gather(*(migrate(c) for c in conns))
            versions = sorted(v for result in applied for v in result)
            assert versions == [v for v, _, _ in migrations()]  # each once, by one of them
            rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
            assert [r["version"] for r in rows] == versions
        finally:
            for c in conns:
                await c.close()


class TestJournalAndOutboxInOneTransaction:
    async def test_a_call_written(self, database_url: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            events = [(f"u{i}", e) for i, e in enumerate(call_events("c1"))]
            written = await write_events(conn, events, "w1")
            types = [w.type for w in written]
            assert types == [e.type for _, e in events] + ["journal.new"]
            assert [w.id for w in written] == sorted(w.id for w in written)
            call = await conn.fetchrow("SELECT * FROM calls WHERE call_id = 'c1'")
            assert call["status"] == "completed"
            assert call["duration_sec"] == 3
            assert call["has_audio"] is True
            assert call["answered_at"] is not None
            assert call["ended_at"] is not None
            assert call["worker_id"] == "w1"
            assert call["node_id"] == "pbx"
            assert call["subscriber_phone"] == "+1555"
            assert json.loads(call["transcript"]) == [
                {"role": "agent", "message": "Hello!", "time_in_call_secs": 0.0},
                {"role": "user", "message": "Hi.", "time_in_call_secs": 1.2},
            ]
            journal = written[-1].payload
            assert journal["entries"][0]["id"] == call["id"]
            assert journal["entries"][0]["status"] == "completed"
            # The same batch again (a retry after an unknown outcome): nothing changes.
            assert await write_events(conn, events, "w1") == []
            assert await conn.fetchval("SELECT count(*) FROM outbox") == len(written)
            assert len(json.loads(await conn.fetchval("SELECT transcript FROM calls"))) == 2
        finally:
            await conn.close()

    async def test_a_failing_event_rolls_back_its_batch(self, database_url: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            good = ("ok", call_events("c2")[0])

            async def then_fail() -> None:
                async with conn.transaction():
                    await write_events(conn, [good], "w1")
                    await conn.execute("SELECT 1/0")

            with pytest.raises(asyncpg.PostgresError):
                await then_fail()
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
            assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        finally:
            await conn.close()


class TestIdsInCommitOrderPerWorkspace:
    """Several writers at once: within a workspace, a later commit always has a larger id, so a
    reader keeping the last id seen never skips one."""

    async def test_concurrent_writers(self, database_url: str) -> None:
        async with pool(database_url) as p:
            listener = await asyncpg.connect(database_url)
            seen: dict[int, list[int]] = {1: [], 2: []}
            reading = asyncio.Lock()

            async def read(workspace: int) -> None:
                async with reading:
                    last = seen[workspace][-1] if seen[workspace] else 0
                    rows = await listener.fetch(
                        "SELECT id FROM outbox WHERE workspace_id = $1 AND id > $2 ORDER BY id",
                        workspace,
                        last,
                    )
                seen[workspace].extend(row["id"] for row in rows)

            async def writer(n: int) -> None:
                for i in range(40):
                    workspace = 1 + (i % 2)
                    async with p.acquire() as conn:
                        await write_events(
                            conn, [(f"w{n}-{i}", call_events(f"c{n}-{i}", workspace)[0])], "w"
                        )
                    await read(workspace)

            await asyncio.gather(*(writer(n) for n in range(4)))
            for workspace in (1, 2):
                await read(workspace)
                every = await listener.fetch(
                    "SELECT id FROM outbox WHERE workspace_id = $1 ORDER BY id", workspace
                )
                # Read incrementally, "after the last id seen", while others committed: none
                # was skipped, none seen twice.
                assert seen[workspace] == [row["id"] for row in every]
                assert len(every) == 80
            await listener.close()


def _ok(writer: OutboxWriter) -> bool:
    return writer.database_ok


class TestSpoolWhileTheDatabaseIsDown:
    """PostgreSQL stopped mid-call and started again: every event of the call is written, in
    order, once; meanwhile they waited in the on-disk spool."""

    async def test_stop_and_restart(
        self, postgres: TestPostgres, database_url: str, tmp_path: Path
    ) -> None:
        spool = Spool(tmp_path / "spool.jsonl", max_events=1000)
        async with pool(database_url) as p:
            writer = OutboxWriter(p.acquire, spool, "w1")
            writer.start()
            events = call_events("c9")
            try:
                for event in events[:3]:
                    writer.deliver(event)
                assert await writer.flush(10)
                await postgres.stop()
                try:
                    for event in events[3:]:
                        writer.deliver(event)
                    await asyncio.sleep(0.5)
                    assert not _ok(writer)
                    assert len(spool) == len(events) - 3  # on disk, in order
                finally:
                    await postgres.start()
                for _ in range(100):
                    if _ok(writer) and not len(spool):
                        break
                    await asyncio.sleep(0.2)
                assert await writer.flush(10)
            finally:
                await writer.close()
            async with p.acquire() as conn:
                rows = await conn.fetch("SELECT type FROM outbox WHERE call_id = 'c9' ORDER BY id")
            assert [r["type"] for r in rows] == [e.type for e in events]
            assert not spool.path.exists()

    async def test_spool_survives_a_restart_and_is_bounded(self, tmp_path: Path) -> None:
        path = tmp_path / "spool.jsonl"
        first = Spool(path, max_events=5)
        pending = [(f"u{i}", e) for i, e in enumerate(call_events("c3"))]
        assert first.append(pending) == 5
        assert first.dropped == 2
        again = Spool(path, max_events=5)  # a restarted worker
        assert len(again) == 5
        assert again.read() == pending[:5]
        path.write_text(path.read_text() + "not json\n")
        assert len(Spool(path, max_events=10).read()) == 5  # the bad line skipped, logged
