"""The worker's durable side, built when ``store`` is on: PostgreSQL (the private one in
``data_dir/postgres``, or ``database_url``), the schema, the outbox writer subscribed to the
event bus, the hub reading the outbox, the webhook dispatcher, the upstream push (when
``events.hub_url`` is set), and the API server.

Start order: database (migrated), writer, webhook dispatcher, upstream push, hub, API; stop
order: the writer flushes (bounded) first, then the dispatcher (deliveries in flight finish,
bounded), the push, the API, the hub, the pool and the private server. A database that cannot
be reached at start is not fatal: calls go on, the writer spools events to disk and the schema
is applied when the database first answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import asyncpg

from worker.api.app import create_app
from worker.api.auth import TokenVerifier
from worker.api.context import ApiContext, PlaceCall
from worker.api.hub import Hub
from worker.api.server import ApiServer
from worker.config import Settings
from worker.events.bus import EventBus
from worker.events.upstream import UpstreamPusher
from worker.events.webhooks import WebhookDispatcher
from worker.metrics import Render
from worker.store.embedded import EmbeddedPostgres
from worker.store.journal import Written
from worker.store.outbox import OutboxWriter
from worker.store.schema import migrate
from worker.store.spool import Spool

log = logging.getLogger("worker.backend")

FLUSH_S = 5.0


class BackendError(Exception):
    """The API cannot listen (the message names the setting)."""


class Backend:
    def __init__(
        self,
        settings: Settings,
        bus: EventBus,
        worker_id: str,
        *,
        role: Literal["all", "front", "media"] = "all",
        spool_name: str = "events.jsonl",
        metrics: Render | None = None,
    ) -> None:
        """``role``: ``all`` (one worker process does everything), ``front`` (the front of
        several media processes: the private PostgreSQL, hub, API, webhooks and upstream push,
        no writer: it has no calls) or ``media`` (a media process: only the outbox writer,
        with its own spool ``data_dir/spool/<spool_name>``)."""
        self.settings = settings
        self.bus = bus
        self.worker_id = worker_id
        self.role = role
        self.spool_name = spool_name
        self.metrics = metrics
        """What ``GET /metrics`` serves; None: this process's own figures."""
        self.embedded: EmbeddedPostgres | None = None
        self.url = settings.database_url or ""
        self.pool: Any = None
        self.writer: OutboxWriter | None = None
        self.hub: Hub | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.upstream: UpstreamPusher | None = None
        self.api: ApiServer | None = None
        self.verifier = TokenVerifier(settings.api, settings.data_dir)
        self._migrated = False
        self._migrating = asyncio.Lock()

    async def start(self, place_call: PlaceCall | None = None) -> None:
        settings = self.settings
        if not self.url:
            self.embedded = EmbeddedPostgres(settings.data_dir)
            self.url = await self.embedded.start()
        self.pool = await asyncpg.create_pool(self.url, min_size=0, max_size=10)
        try:
            async with self.connection():
                pass
        except Exception as exc:
            log.error(
                "PostgreSQL not reachable at start; events wait on disk until it is",
                extra={"error": str(exc) or type(exc).__name__},
            )
        if self.role != "front":
            spool = Spool(
                settings.data_dir / "spool" / self.spool_name, settings.events.spool_max_events
            )
            self.writer = OutboxWriter(
                self.connection, spool, self.worker_id, written=self._written
            )
            self.bus.subscribe(self.writer)
            self.writer.start()
        if self.role == "media":
            return  # the front serves what the outbox holds
        self.webhooks = WebhookDispatcher(self.pool, settings.events, self.worker_id)
        self.webhooks.start()
        events = settings.events
        if events.hub_url is not None and events.hub_secret is not None:
            self.upstream = UpstreamPusher(
                self.pool, events.hub_url, events.hub_secret, self.worker_id
            )
            self.upstream.start()
        self.hub = Hub(self.pool, self._listen_connection, settings.api.hub_queue_events)
        await self.hub.start()
        if settings.api.enabled:
            context = ApiContext(
                settings=settings,
                verifier=self.verifier,
                pool=self.pool,
                hub=self.hub,
                place_call=place_call,
                worker_id=self.worker_id,
                metrics=self.metrics,
            )
            self.api = ApiServer(create_app(context), settings.api.host, settings.api.port)
            try:
                await self.api.start()
            except OSError as exc:
                self.api = None
                raise BackendError(
                    f"cannot serve the API on {settings.api.host}:{settings.api.port} ({exc}):"
                    " set api.host / api.port (AISPINNER_API__PORT) to a free address,"
                    " or api.enabled = false"
                ) from exc

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection to a migrated database."""
        async with self.pool.acquire() as conn:
            if not self._migrated:
                async with self._migrating:
                    if not self._migrated:
                        await migrate(conn)
                        self._migrated = True
            yield conn

    async def _listen_connection(self) -> Any:
        return await asyncpg.connect(self.url)

    def _written(self, rows: list[Written]) -> None:
        if self.webhooks is not None:
            self.webhooks.notify()
        if self.upstream is not None:
            self.upstream.wake()
        if self.hub is not None:
            for workspace in {row.workspace_id for row in rows}:
                self.hub.notify(workspace)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close(FLUSH_S)
        if self.webhooks is not None:
            await self.webhooks.close(FLUSH_S)
        if self.upstream is not None:
            await self.upstream.close()
        if self.api is not None:
            await self.api.close()
        if self.hub is not None:
            await self.hub.close()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), FLUSH_S)
        if self.embedded is not None:
            await self.embedded.close()
