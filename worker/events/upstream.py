"""The upstream push: every event in the outbox, sent on to the API's hub (``events.hub_url``)
in HTTP batches, at least once, in id order per workspace, resuming from the last id the hub
acknowledged.

One batch is ``POST hub_url`` with ``{"worker_id", "workspace_id", "events": [... each with its
"id"]}``, signed the Standard Webhooks way with ``events.hub_secret`` (``webhook-id``:
``<workspace>-<first id>-<last id>``, the same on a retry; ``webhook-timestamp``;
``webhook-signature``). A 2xx moves the workspace's cursor (``upstream_cursors``) past the
batch; anything else (or no answer) is retried after 1, 2, 4 ... 60 seconds. Workers sharing a
database push each workspace from one of them at a time (a PostgreSQL advisory lock per
workspace, held while pushing), so the hub sees each batch once unless a push's answer is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import httpx

from worker.signing import secret_key, signed_headers

log = logging.getLogger("worker.events.upstream")

BATCH = 500
POLL_S = 1.0
RETRY_MAX_S = 60.0
LOCK_CLASS = 0x75707374  # "upst": with the workspace id, the advisory lock of its push


class UpstreamPusher:
    def __init__(
        self,
        pool: Any,
        url: str,
        secret: str,
        worker_id: str,
        *,
        timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"events.hub_url must be http:// or https://, not {url!r}")
        secret_key(secret)  # a whsec_ secret, or ValueError now rather than at the first push
        self._pool = pool
        self.url = url
        self._secret = secret
        self.worker_id = worker_id
        self._http = http or httpx.AsyncClient(timeout=timeout_s)
        self._own_http = http is None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pushed = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_http:
            await self._http.aclose()

    async def _run(self) -> None:
        delay = 1.0
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            try:
                await self.push_pending()
            except Exception as exc:  # the hub or the database is away: try again later
                self.failures += 1
                if not failing:
                    log.warning("upstream push failing; retrying", extra={"error": str(exc)})
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if failing:
                log.info("upstream push working again")
            failing = False
            delay = 1.0

    async def push_pending(self) -> int:
        """Push every workspace's events after its cursor (those no other worker is pushing
        right now); returns how many were pushed. Raises on the first failed batch."""
        total = 0
        async with self._pool.acquire() as conn:
            workspaces = [r["workspace_id"] for r in await conn.fetch(
                "SELECT workspace_id FROM event_heads ORDER BY workspace_id"
            )]  # fmt: skip
            for workspace in workspaces:
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, workspace
                ):
                    continue  # another worker is pushing it
                try:
                    total += await self._push_workspace(conn, workspace)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, workspace)
        return total

    async def _push_workspace(self, conn: Any, workspace: int) -> int:
        pushed = 0
        while True:
            after = await conn.fetchval(
                "SELECT COALESCE((SELECT last_event_id FROM upstream_cursors"
                " WHERE workspace_id = $1), 0)",
                workspace,
            )
            rows = await conn.fetch(
                "SELECT id, payload FROM outbox WHERE workspace_id = $1 AND id > $2"
                " ORDER BY id LIMIT $3",
                workspace,
                after,
                BATCH,
            )
            if not rows:
                return pushed
            events = [{**_payload(row["payload"]), "id": row["id"]} for row in rows]
            first, last = rows[0]["id"], rows[-1]["id"]
            await self._post(workspace, events, f"{workspace}-{first}-{last}")
            await conn.execute(
                "INSERT INTO upstream_cursors (workspace_id, last_event_id) VALUES ($1, $2)"
                " ON CONFLICT (workspace_id) DO UPDATE SET last_event_id = EXCLUDED.last_event_id,"
                " updated_at = now()",
                workspace,
                last,
            )
            pushed += len(rows)
            self.pushed += len(rows)
            if len(rows) < BATCH:
                return pushed

    async def _post(self, workspace: int, events: list[dict[str, Any]], batch_id: str) -> None:
        body = json.dumps(
            {"worker_id": self.worker_id, "workspace_id": workspace, "events": events},
            separators=(",", ":"),
        ).encode()
        headers = {
            "content-type": "application/json",
            **signed_headers(self._secret, batch_id, int(time.time()), body),
        }
        response = await self._http.post(self.url, content=body, headers=headers)
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"the hub answered {response.status_code} to batch {batch_id}")


def _payload(value: Any) -> dict[str, Any]:
    data = json.loads(value) if isinstance(value, str) else value
    return dict(data)
