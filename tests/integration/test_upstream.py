"""The upstream push (``events.hub_url``) on a real PostgreSQL to a real HTTP receiver: every
event in signed batches (verified with the ``standardwebhooks`` library), in id order per
workspace; a hub answering 500 gets the same batch again (same ``webhook-id``) and nothing is
skipped; a restarted pusher resumes after the last acknowledged id; two pushers on one database
never push the same workspace at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.e2e.harness import running_worker
from tests.integration.test_store import call_events
from worker.events.upstream import UpstreamPusher
from worker.signing import generate_secret
from worker.store.journal import write_events

SECRET = generate_secret()


class Hub:
    """The API's hub, as far as the push sees it: records batches, can fail on demand."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.fail_next = 0
        self.verifier = Webhook(SECRET)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.verifier.verify(body, dict(request.headers))  # raises on a bad signature
        self.ids.append(request.headers["webhook-id"])
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500)
        self.batches.append(json.loads(body))
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def hub_server() -> AsyncIterator[tuple[Hub, str]]:
    hub = Hub()
    app = web.Application()
    app.router.add_post("/ingest", hub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield hub, f"http://127.0.0.1:{port}/ingest"
    finally:
        await runner.cleanup()


async def write_calls(url: str, calls: list[tuple[str, int]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for call, workspace in calls:
            events = call_events(call, workspace)
            await write_events(conn, [(f"{call}-{i}", e) for i, e in enumerate(events)], "w")
    finally:
        await conn.close()


def pushed_ids(hub: Hub, workspace: int) -> list[int]:
    return [e["id"] for b in hub.batches if b["workspace_id"] == workspace for e in b["events"]]


class TestUpstreamPush:
    async def test_a_worker_with_hub_url_pushes_what_its_calls_publish(
        self, database_url: str, tmp_path: Path
    ) -> None:
        async with hub_server() as (hub, url):
            events = {"hub_url": url, "hub_secret": SECRET}
            async with running_worker(
                tmp_path, [], database_url=database_url, events=events
            ) as worker:
                assert worker.backend is not None
                assert worker.backend.upstream is not None
                for event in call_events("c1", 3):
                    worker.bus.publish(event)
                for _ in range(100):
                    if len(pushed_ids(hub, 3)) == 8:
                        break
                    await asyncio.sleep(0.05)
        ids = pushed_ids(hub, 3)
        assert len(ids) == len(set(ids)) == 8
        assert ids == sorted(ids)
        pushed = [e for b in hub.batches for e in b["events"]]
        types = [e["type"] for e in pushed]
        assert [t for t in types if t != "journal.new"] == [e.type for e in call_events("c1", 3)]
        assert types.count("journal.new") == 1  # the journal row the done event wrote

    async def test_signed_batches_in_order(self, database_url: str) -> None:
        await write_calls(database_url, [("a", 1), ("b", 2), ("c", 1)])
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        async with hub_server() as (hub, url):
            pusher = UpstreamPusher(pool, url, SECRET, "w1")
            try:
                assert await pusher.push_pending() == 24
            finally:
                await pusher.close()
        await pool.close()
        for workspace, calls in ((1, ["a", "c"]), (2, ["b"])):
            ids = pushed_ids(hub, workspace)
            assert ids == sorted(ids)
            assert len(ids) == 8 * len(calls)
        assert all(b["worker_id"] == "w1" for b in hub.batches)

    async def test_failure_retries_the_same_batch_then_resumes(self, database_url: str) -> None:
        await write_calls(database_url, [("a", 1)])
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        async with hub_server() as (hub, url):
            hub.fail_next = 2
            pusher = UpstreamPusher(pool, url, SECRET, "w1")
            pusher.start()
            try:
                for _ in range(100):
                    if pusher.pushed == 8:  # acknowledged and the cursor moved past it
                        break
                    await asyncio.sleep(0.1)
            finally:
                await pusher.close()
            assert len(set(hub.ids)) == 1  # the same webhook-id on every attempt
            assert len(hub.ids) == 3
            await write_calls(database_url, [("b", 1)])
            again = UpstreamPusher(pool, url, SECRET, "w2")  # a restarted worker
            try:
                assert await again.push_pending() == 8  # only what follows the acked id
            finally:
                await again.close()
        await pool.close()
        ids = pushed_ids(hub, 1)
        assert ids == sorted(ids)
        assert len(ids) == len(set(ids)) == 16

    async def test_two_pushers_never_push_a_workspace_twice(self, database_url: str) -> None:
        await write_calls(database_url, [(f"c{n}", 1 + n % 3) for n in range(30)])
        pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=2) for _ in "ab"]
        async with hub_server() as (hub, url):
            pushers = [UpstreamPusher(p, url, SECRET, f"w{i}") for i, p in enumerate(pools)]
            try:
                counts = await asyncio.gather(*(p.push_pending() for p in pushers))
                counts += await asyncio.gather(*(p.push_pending() for p in pushers))
            finally:
                for p in pushers:
                    await p.close()
        for pool in pools:
            await pool.close()
        assert sum(counts) == 240
        for workspace in (1, 2, 3):
            ids = pushed_ids(hub, workspace)
            assert len(ids) == len(set(ids)) == 80
            assert ids == sorted(ids)
