"""Webhook endpoints and their deliveries through the API: register (``POST /webhooks``), list,
delete, a delivery log per endpoint, and replay of a delivered or dead delivery. Every route
needs membership of the endpoint's workspace; an endpoint or delivery of a workspace the caller
cannot see is 404, as if it did not exist. Sending is ``worker.events.webhooks``'s.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.api.deps import Caller, Context
from worker.events.webhooks import EVENT_TYPES
from worker.signing import generate_secret, secret_key

router = APIRouter(tags=["webhooks"])

BIGINT_MAX = 2**63 - 1
URL_MAX = 2048
Id = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
DeliveryStatus = Literal["pending", "delivered", "dead"]


class WebhookCreate(BaseModel):
    """A new endpoint: where to POST, which event types (none: every type), and its secret
    (``whsec_<base64 of 24 to 64 bytes>``; None: one is generated)."""

    model_config = ConfigDict(extra="forbid")

    workspace_id: int = Field(ge=1, le=BIGINT_MAX)
    url: str = Field(max_length=URL_MAX)
    events: list[str] = Field(default_factory=list, max_length=64)
    secret: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (a bad port raises)
        except ValueError:
            raise ValueError("not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the url must be http:// or https:// with a host")
        if any(c.isspace() for c in url):
            raise ValueError("the url may not contain spaces")
        return url

    @field_validator("events")
    @classmethod
    def _known_types(cls, events: list[str]) -> list[str]:
        unknown = [e for e in events if e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event types {unknown} (known: {', '.join(EVENT_TYPES)})")
        return list(dict.fromkeys(events))

    @field_validator("secret")
    @classmethod
    def _standard_secret(cls, secret: str | None) -> str | None:
        if secret is not None:
            secret_key(secret)
        return secret


class Webhook(BaseModel):
    """A registered endpoint (its secret is only shown when it is created)."""

    id: int
    workspace_id: int
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str


class Delivery(BaseModel):
    """One event's delivery to one endpoint. ``attempts`` counts every request made, the
    successful one included; ``last_status`` is the receiver's last HTTP status (None: no
    answer); ``next_attempt_at`` matters while ``pending``."""

    id: int
    endpoint_id: int
    event_id: int
    event_type: str
    status: DeliveryStatus
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime
    first_failed_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


_ENDPOINT_COLUMNS = "id, workspace_id, url, event_types AS events, enabled, created_at"
_DELIVERY_COLUMNS = (
    "d.id, d.endpoint_id, d.event_id, o.type AS event_type, d.status, d.attempts,"
    " d.last_status, d.last_error, d.next_attempt_at, d.first_failed_at, d.delivered_at,"
    " d.created_at"
)


@router.post("/webhooks", status_code=201, response_model=WebhookCreated)
async def create_webhook(body: WebhookCreate, caller: Caller, ctx: Context) -> dict[str, Any]:
    """Register an endpoint; it gets the events written from now on. 201 with its secret
    (kept by the worker, never shown again); 403 outside the caller's workspaces; 422 for a
    URL that is not http(s), an unknown event type or a malformed secret."""
    caller.check(body.workspace_id)
    secret = body.secret or generate_secret()
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            "INSERT INTO webhook_endpoints (workspace_id, url, event_types, secret)"
            f" VALUES ($1, $2, $3, $4) RETURNING {_ENDPOINT_COLUMNS}",
            body.workspace_id,
            body.url,
            body.events,
            secret,
        )
    return {**dict(row), "secret": secret}


@router.get("/webhooks", response_model=list[Webhook])
async def list_webhooks(
    caller: Caller,
    ctx: Context,
    workspace_id: Annotated[int, Query(ge=1, le=BIGINT_MAX)],
) -> list[dict[str, Any]]:
    """The workspace's endpoints, oldest first, without their secrets; 403 for a non-member."""
    caller.check(workspace_id)
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE workspace_id = $1"
            " ORDER BY id",
            workspace_id,
        )
    return [dict(row) for row in rows]


@router.delete("/webhooks/{webhook_id}", status_code=204)
async def delete_webhook(webhook_id: Id, caller: Caller, ctx: Context) -> Response:
    """Remove an endpoint with its deliveries (pending ones are not sent); 404 if unknown."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        workspace = await conn.fetchval(
            "SELECT workspace_id FROM webhook_endpoints WHERE id = $1 FOR UPDATE", webhook_id
        )
        if workspace is None or not caller.may_see(workspace):
            raise HTTPException(404, f"no webhook {webhook_id}")
        await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", webhook_id)
    return Response(status_code=204)


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[Delivery])
async def list_deliveries(
    webhook_id: Id,
    caller: Caller,
    ctx: Context,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """The endpoint's deliveries, newest event first (``status`` filters); 404 if unknown."""
    async with ctx.pool.acquire() as conn:
        workspace = await conn.fetchval(
            "SELECT workspace_id FROM webhook_endpoints WHERE id = $1", webhook_id
        )
        if workspace is None or not caller.may_see(workspace):
            raise HTTPException(404, f"no webhook {webhook_id}")
        rows = await conn.fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d"
            " JOIN outbox o ON o.id = d.event_id"
            " WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.status = $2)"
            " ORDER BY d.event_id DESC LIMIT $3",
            webhook_id,
            status,
            limit,
        )
    return [dict(row) for row in rows]


@router.post("/webhooks/deliveries/{delivery_id}/replay", status_code=202, response_model=Delivery)
async def replay_delivery(delivery_id: Id, caller: Caller, ctx: Context) -> dict[str, Any]:
    """Send a delivered or dead delivery again, now, as a fresh delivery (attempts and retry
    window reset; same ``webhook-id``, so a receiver that dedupes sees a repeat). 202; 404 if
    unknown; 409 if it is pending already."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        found = await conn.fetchrow(
            "SELECT d.status, w.workspace_id FROM webhook_deliveries d"
            " JOIN webhook_endpoints w ON w.id = d.endpoint_id WHERE d.id = $1 FOR UPDATE OF d",
            delivery_id,
        )
        if found is None or not caller.may_see(found["workspace_id"]):
            raise HTTPException(404, f"no delivery {delivery_id}")
        if found["status"] == "pending":
            raise HTTPException(409, f"delivery {delivery_id} is pending already")
        row = await conn.fetchrow(
            "UPDATE webhook_deliveries d SET status = 'pending', attempts = 0,"
            " next_attempt_at = now(), first_failed_at = NULL, delivered_at = NULL,"
            " claimed_by = NULL, claimed_until = NULL"
            f" FROM outbox o WHERE d.id = $1 AND o.id = d.event_id RETURNING {_DELIVERY_COLUMNS}",
            delivery_id,
        )
    return dict(row)
