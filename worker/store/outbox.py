"""``OutboxWriter``: every event the sessions publish, written to PostgreSQL with its journal
change (``journal.write_events``), in publication order, at least once.

It is an event-bus subscriber whose ``deliver`` never drops: events wait in memory, and one task
writes them in batches (one transaction each). When PostgreSQL cannot be reached, the batch and
everything after it go to the on-disk ``Spool`` (so order is kept), and the writer tries again
after 1, 2, 4 ... ``RETRY_MAX_S`` seconds; once a write succeeds, the spool is replayed first.
Calls never wait for any of this: their audio does not depend on the database.

``written`` (optional) is told about every row written, for the local hub's fast path. While it
runs, ``metrics`` (``worker.metrics``; None: this process's) reads its backlog at scrape time:
events waiting in memory (``pending``), on disk (the spool), dropped, written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from worker.events.models import Event
from worker.metrics import WorkerMetrics, process_metrics
from worker.store.journal import Pending, Written, write_events
from worker.store.spool import Spool

log = logging.getLogger("worker.store")

BATCH = 200
RETRY_MAX_S = 30.0


class OutboxWriter:
    def __init__(
        self,
        connect: Callable[[], Any],
        spool: Spool,
        worker_id: str,
        *,
        written: Callable[[list[Written]], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """``connect``: an async context manager factory giving an asyncpg connection (a pool's
        ``acquire``)."""
        self._connect = connect
        self.spool = spool
        self.worker_id = worker_id
        self._written = written
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.events_written = 0
        self.database_ok = True
        self._metrics = metrics

    @property
    def pending(self) -> int:
        """Events in memory, not yet written (nor spooled)."""
        return len(self._queue)

    # -- the bus's subscriber --------------------------------------------------------------------
    def deliver(self, event: Event) -> None:
        self._queue.append((uuid.uuid4().hex, event))
        self._idle.clear()
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._metrics is None:
            self._metrics = process_metrics()
        self._metrics.track_event_backlog(self)
        if len(self.spool):
            self._idle.clear()
            self._wake.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self, within_s: float) -> bool:
        """Wait until everything delivered so far is written (or spooled); False if not done
        within ``within_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def close(self, within_s: float = 5.0) -> None:
        """Write what is waiting (for at most ``within_s``), spool the rest, stop."""
        if not await self.flush(within_s) and self._queue:
            self.spool.append(list(self._queue))
            self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._metrics is not None:
            self._metrics.untrack_event_backlog(self)

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = 1.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or len(self.spool):
                try:
                    await self._write_pending()
                except (TimeoutError, OSError) as exc:
                    failed = str(exc) or type(exc).__name__
                except Exception as exc:  # asyncpg's connection and server errors
                    if not _is_database_error(exc):
                        raise
                    failed = str(exc) or type(exc).__name__
                else:
                    if not self.database_ok:
                        log.info("PostgreSQL reachable again; events written")
                    self.database_ok = True
                    delay = 1.0
                    continue
                if self._queue:  # keep the order: everything after a failure waits on disk
                    self.spool.append(list(self._queue))
                    self._queue.clear()
                if self.database_ok:
                    log.error(
                        "PostgreSQL unreachable: events spooled to disk",
                        extra={"error": failed, "spooled": len(self.spool)},
                    )
                self.database_ok = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            self._idle.set()

    async def _write_pending(self) -> None:
        async with self._connect() as conn:
            if len(self.spool):
                spooled = self.spool.read()
                for start in range(0, len(spooled), BATCH):
                    self._done(
                        await write_events(conn, spooled[start : start + BATCH], self.worker_id)
                    )
                self.spool.clear()
                log.info("event spool replayed", extra={"events": len(spooled)})
            while self._queue:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
                self._done(await write_events(conn, batch, self.worker_id))
                for _ in batch:
                    self._queue.popleft()

    def _done(self, rows: list[Written]) -> None:
        self.events_written += len(rows)
        if self._written is not None:
            self._written(rows)


def _is_database_error(exc: Exception) -> bool:
    """Connection loss, a server shutting down, or no server: worth spooling and retrying."""
    import asyncpg

    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError,
    )
