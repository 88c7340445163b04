"""Webhooks: the Standard Webhooks signature (standardwebhooks.com) and ``WebhookDispatcher``,
which sends the ``webhook_deliveries`` rows the journal writes with each event (one per endpoint
whose filter takes it, in the event's transaction) and records what became of each.

What the dispatcher guarantees:

- **At least once.** A delivery row exists as soon as its event is committed, and stays
  ``pending`` until a receiver answered 2xx (``delivered``) or its retry window ran out
  (``dead``). A worker that dies with a delivery in flight leaves a claim that expires after
  ``webhook_timeout_s + LEASE_MARGIN_S`` (at once when a worker of the same ``worker_id``
  starts again); the delivery is then sent again. Receivers dedupe on ``webhook-id``
  (``msg_<delivery id>``), the same on every attempt and replay of a delivery.
- **One sender at a time.** A delivery is claimed before it is sent, by one
  ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``: however many dispatchers
  share the database, a delivery is in flight at most once (sent twice only after a claim
  expired, or when the receiver's 2xx was lost).
- **Per endpoint, in event order while nothing fails.** A delivery is claimed only if no earlier
  event's delivery to the same endpoint is pending and either due or in flight, so each endpoint
  gets one request at a time, in outbox-id order. A delivery that failed and waits for its
  retry does not hold the endpoint's later events back: those may overtake it.

Retries: after the n-th failed attempt (non-2xx, timeout, connection error) the next one is due
``min(webhook_max_backoff_s, base_backoff_s * 2**(n-1))`` later; a failure more than
``webhook_retry_window_s`` after the delivery's first failure makes it ``dead`` (the API's replay
puts it back). ``attempts`` counts every attempt, the successful one included.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
import typing
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from worker import __version__
from worker.config import EventSettings
from worker.events import models as ev
from worker.log import LogThrottle
from worker.signing import signed_headers

log = logging.getLogger("worker.webhooks")

EVENT_TYPES: tuple[str, ...] = tuple(
    str(model.model_fields["type"].default)
    for model in typing.get_args(typing.get_args(ev.Event)[0])
)
"""Every event type a webhook may ask for, in the models' order."""

LEASE_MARGIN_S = 30.0
"""A claim outlives the request's timeout by this much before another worker may take it."""
LOG_EVERY_S = 60.0
"""One log line per (kind of failure, endpoint) per this long; the rest are counted."""
ERROR_TEXT_MAX = 300


def webhook_body(event_id: int, payload: dict[str, Any]) -> bytes:
    """The request body: the event's wire form with its outbox ``id``."""
    return json.dumps({**payload, "id": event_id}, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- the dispatcher


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this worker holds the claim of, with what sending it needs."""

    id: int
    endpoint_id: int
    event_id: int
    attempts: int
    url: str
    secret: str
    body: bytes

    @property
    def message_id(self) -> str:
        return f"msg_{self.id}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result. ``kind``: ``ok``, ``status`` (answered, not 2xx), ``timeout``,
    ``connect`` (no connection, or it broke), ``error`` (a bad URL or secret)."""

    kind: str
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


_CLAIM = """
UPDATE webhook_deliveries d
SET claimed_by = $1, claimed_until = now() + make_interval(secs => $3)
FROM webhook_endpoints w, outbox o
WHERE d.id IN (
    SELECT c.id FROM webhook_deliveries c
    WHERE c.status = 'pending' AND c.next_attempt_at <= now()
      AND (c.claimed_until IS NULL OR c.claimed_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM webhook_deliveries e
          WHERE e.endpoint_id = c.endpoint_id AND e.event_id < c.event_id
            AND e.status = 'pending'
            AND (e.next_attempt_at <= now() OR e.claimed_until >= now()))
    ORDER BY c.event_id
    FOR UPDATE SKIP LOCKED
    LIMIT $2)
  AND w.id = d.endpoint_id AND o.id = d.event_id
RETURNING d.id, d.endpoint_id, d.event_id, d.attempts, w.url, w.secret, o.payload
"""

_DELIVERED = """
UPDATE webhook_deliveries
SET status = 'delivered', attempts = attempts + 1, last_status = $3, last_error = NULL,
    delivered_at = now(), claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND status = 'pending'
"""

_FAILED = """
UPDATE webhook_deliveries
SET attempts = attempts + 1, last_status = $3, last_error = $4,
    first_failed_at = COALESCE(first_failed_at, now()),
    status = CASE WHEN now() - COALESCE(first_failed_at, now()) > make_interval(secs => $5)
                  THEN 'dead' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => LEAST($6, $7 * power(2, LEAST(attempts, 40)))),
    claimed_by = NULL, claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND status = 'pending'
RETURNING status, EXTRACT(EPOCH FROM next_attempt_at - now())::float8 AS wait_s
"""

_RELEASE = """
UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL
WHERE claimed_by = $1 AND status = 'pending' AND claimed_until IS NOT NULL
"""


class WebhookDispatcher:
    """Sends due deliveries: claims them (at most ``max_in_flight`` at once), POSTs each signed,
    records the outcome. Woken by ``notify()`` (new rows were written), by a delivery finishing,
    by the earliest retry it scheduled, and every ``poll_s`` (rows other workers wrote, replays).

    ``worker_id`` names this worker's claims and must be unique among the workers sharing the
    database: the claims it holds are released when it starts and when it closes."""

    def __init__(
        self,
        pool: Any,
        settings: EventSettings,
        worker_id: str,
        http_client: httpx.AsyncClient | None = None,
        *,
        base_backoff_s: float = 1.0,
        poll_s: float = 1.0,
        max_in_flight: int = 16,
    ) -> None:
        if base_backoff_s <= 0 or poll_s <= 0 or max_in_flight < 1:
            raise ValueError("base_backoff_s and poll_s must be > 0, max_in_flight >= 1")
        self._pool = pool
        self.worker_id = worker_id
        self.timeout_s = settings.webhook_timeout_s
        self.retry_window_s = settings.webhook_retry_window_s
        self.max_backoff_s = settings.webhook_max_backoff_s
        self.base_backoff_s = base_backoff_s
        self.poll_s = poll_s
        self.max_in_flight = max_in_flight
        self._client = http_client
        self._own_client = http_client is None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._retries_due: list[float] = []
        """Loop times at which a delivery this dispatcher failed is due again (a heap)."""
        self._throttle = LogThrottle(lines=1, interval_s=LOG_EVERY_S)
        self.delivered = 0
        self.failed = 0
        self.dead = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the dispatcher is running already")
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=self.max_in_flight),
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    def notify(self) -> None:
        """New deliveries may be due (rows were written, a delivery was replayed)."""
        self._wake.set()

    async def close(self, within_s: float = 5.0) -> None:
        """Stop claiming; let the deliveries in flight finish for at most ``within_s``, cancel
        the rest and release their claims (they are sent again, by whoever claims them next)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=within_s)
            for pending in late:
                pending.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if task is not None:
            await self._release()  # the cancelled ones, and a claim cut short by the cancel
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- claiming --------------------------------------------------------------------------------
    async def claim(self, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` due deliveries (see the module docstring for which), oldest
        event first."""
        lease_s = self.timeout_s + LEASE_MARGIN_S
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, self.worker_id, limit, lease_s)
        claimed = [
            Claimed(
                id=int(row["id"]),
                endpoint_id=int(row["endpoint_id"]),
                event_id=int(row["event_id"]),
                attempts=int(row["attempts"]),
                url=str(row["url"]),
                secret=str(row["secret"]),
                body=webhook_body(int(row["event_id"]), _payload(row["payload"])),
            )
            for row in rows
        ]
        claimed.sort(key=lambda c: c.event_id)
        return claimed

    async def _release(self) -> None:
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(_RELEASE, self.worker_id)
        except Exception as exc:
            log.warning(
                "webhook claims not released; they expire on their own",
                extra={"error": str(exc) or type(exc).__name__},
            )

    # -- the loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._release()  # what this worker held before a restart is due again at once
        while True:
            self._wake.clear()
            free = self.max_in_flight - len(self._in_flight)
            if free > 0:
                try:
                    batch = await self.claim(free)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._log_failure("database", None, str(exc) or type(exc).__name__)
                    batch = []
                for item in batch:
                    task = loop.create_task(self._deliver(item), name=f"webhook-{item.id}")
                    self._in_flight.add(task)
                    task.add_done_callback(self._finished)
            now = loop.time()
            while self._retries_due and self._retries_due[0] <= now:
                heapq.heappop(self._retries_due)
            timeout = self.poll_s
            if self._retries_due:
                timeout = min(timeout, self._retries_due[0] - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()

    async def _deliver(self, item: Claimed) -> None:
        try:
            outcome = await self.send(item)
            await self._record(item, outcome)
        except Exception as exc:  # the claim expires and the delivery is sent again
            self._log_failure("database", item.endpoint_id, _describe(exc), item)

    async def send(self, item: Claimed) -> Outcome:
        """POST the delivery once, signed now; a 2xx within ``webhook_timeout_s`` is ``ok``."""
        client = self._client
        assert client is not None, "start() first"
        timestamp = int(time.time())
        try:
            headers = signed_headers(item.secret, item.message_id, timestamp, item.body)
        except ValueError as exc:
            return Outcome("error", error=f"bad secret: {exc}")
        headers["content-type"] = "application/json"
        headers["user-agent"] = f"aispinner-worker/{__version__}"
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                client.stream(
                    "POST", item.url, content=item.body, headers=headers, timeout=self.timeout_s
                ) as response,
            ):
                if 200 <= response.status_code < 300:
                    return Outcome("ok", response.status_code)
                detail = await _start_of(response)
                return Outcome(
                    "status",
                    response.status_code,
                    f"HTTP {response.status_code}" + (f": {detail}" if detail else ""),
                )
        except (TimeoutError, httpx.TimeoutException):
            return Outcome("timeout", error=f"no answer within {self.timeout_s:g} s")
        except httpx.TransportError as exc:
            return Outcome("connect", error=_describe(exc))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            return Outcome("error", error=_describe(exc))

    async def _record(self, item: Claimed, outcome: Outcome) -> None:
        async with self._pool.acquire() as conn:
            if outcome.ok:
                await conn.execute(_DELIVERED, item.id, self.worker_id, outcome.status)
                self.delivered += 1
                return
            row = await conn.fetchrow(
                _FAILED,
                item.id,
                self.worker_id,
                outcome.status,
                (outcome.error or "")[:ERROR_TEXT_MAX],
                self.retry_window_s,
                self.max_backoff_s,
                self.base_backoff_s,
            )
        self.failed += 1
        self._log_failure(outcome.kind, item.endpoint_id, outcome.error or "", item)
        if row is None:
            return  # claim lost (expired and taken, or the endpoint deleted)
        if row["status"] == "dead":
            self.dead += 1
            self._log_failure("dead", item.endpoint_id, outcome.error or "", item)
            return
        due = asyncio.get_running_loop().time() + max(0.0, float(row["wait_s"]))
        heapq.heappush(self._retries_due, due)
        self._wake.set()

    def _log_failure(
        self, kind: str, endpoint_id: int | None, error: str, item: Claimed | None = None
    ) -> None:
        held_back = self._throttle.allow(f"{kind}:{endpoint_id}", time.monotonic())
        if held_back is None:
            return
        extra: dict[str, Any] = {"kind": kind, "error": error, "held_back": held_back}
        if item is not None:
            extra.update(
                endpoint_id=item.endpoint_id,
                delivery_id=item.id,
                event_id=item.event_id,
                attempt=item.attempts + 1,
                url=_redacted(item.url),
            )
        message = {
            "database": "webhook dispatcher: database error; deliveries wait",
            "dead": "webhook delivery dead: retry window over (replay it through the API)",
            "timeout": "webhook delivery failed: the receiver did not answer in time",
            "connect": "webhook delivery failed: no connection to the receiver",
            "status": "webhook delivery failed: the receiver answered with an error",
        }.get(kind, "webhook delivery failed")
        log.warning(message, extra=extra)


def _payload(value: Any) -> dict[str, Any]:
    data = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(data, dict):
        raise ValueError("an outbox payload is a JSON object")
    return data


async def _start_of(response: httpx.Response, limit: int = 200) -> str:
    """The first ``limit`` characters of an error response's body, on one line."""
    data = b""
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) >= limit:
                break
    return " ".join(data[:limit].decode("utf-8", "replace").split())


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _redacted(url: str) -> str:
    """The URL without credentials, query or fragment (they may hold tokens), for the logs."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
