"""The telephony REST endpoints of the seed (``shared/seeds/telephony-api.txt``): the call journal
(every node or one node, with delta pagination by id), one call's detail, its events and its MP3
recording (with HTTP Range), placing an outbound call, and the worker's ARI/SIP defaults.

Rules:

1. Every endpoint needs a JWT (``worker.api.auth``: ``Authorization: Bearer`` or ``?token=``).
2. The journal reads one workspace: ``workspace_id``, or the caller's only workspace when the
   query leaves it out (422 when the caller has several, or none). A non-member gets 403.
3. One call (detail, events, audio) is looked up by its ``call_id``; a call the caller may not
   see is 404 ``call not found``, like an unknown one (its existence is not leaked).
4. ``total``, ``total_duration_sec`` and ``max_id`` describe every row the filters match; the
   page (``limit``, newest first) and ``since_id`` (only rows with a larger id) narrow ``calls``
   alone, so a delta poll that finds nothing new keeps its ``max_id``.
5. A recording is served only from ``data_dir/recordings`` (its real path, links resolved):
   anything else in ``data_dir`` (the API secret, the database) or beyond it is 404.
6. Errors are ``{"detail": "..."}`` (``worker.api.app``).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from worker.api.auth import Principal
from worker.api.deps import Caller, Context
from worker.config import Settings
from worker.errors import ConfigError, RemoteError, WorkerError

MAX_BIGINT = 2**63 - 1
"""PostgreSQL's ``bigint``: ids and workspace ids beyond it cannot match anything."""
STATUSES = frozenset(
    {
        "trying",
        "ringing",
        "early-media",
        "in-progress",
        "completed",
        "failed",
        "busy",
        "no-answer",
    }
)
"""The journal's call statuses (jambonz's)."""
FAILED_STATUSES = ("failed", "busy", "no-answer")
"""A campaign's child that ended in one of these counts as failed; ``completed`` as a success."""
CHUNK_BYTES = 64 * 1024
NO_NUL = r"^[^\x00]*$"
"""PostgreSQL text cannot hold NUL: such a value is refused (422) before any query."""
DIALABLE = r"^[A-Za-z0-9+*#._-]{1,64}$"
"""Trunk names and caller ids: what a SIP user part and an Asterisk dial string accept."""
NUMBER = r"^(\+[0-9]{1,31}|[0-9]{1,32})$"


# -- response models ------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error of the API."""

    detail: str


class TranscriptTurn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = ""
    message: str = ""
    time_in_call_secs: float | None = None


class JournalCall(BaseModel):
    """One call in the journal (the seed's ``calls`` entry, plus ``node_id`` and ``direction``)."""

    id: int
    call_id: str
    status: str
    subscriber_phone: str | None
    duration_sec: int
    summary: str | None
    transcript: list[TranscriptTurn]
    created_at: datetime = Field(description="ISO 8601, UTC (``Z``)")
    conversation_id: str | None
    has_audio: bool
    parent_call_id: str | None
    node_id: str | None
    direction: Literal["inbound", "outbound"]


class CampaignSummary(BaseModel):
    """A campaign that is the parent of a call on the page, with figures over all its calls."""

    call_id: str
    name: str | None
    status: str
    numbers_count: int
    child_count: int
    success_count: int = Field(description="children that ended ``completed``")
    failed_count: int = Field(description="children that ended failed, busy or no-answer")
    total_duration_sec: int


class Journal(BaseModel):
    total: int = Field(description="rows matching the filters (since_id and limit aside)")
    total_duration_sec: int = Field(description="their summed duration")
    max_id: int = Field(description="the largest id among them; 0 when none")
    calls: list[JournalCall] = Field(description="newest first: at most limit, id > since_id")
    campaigns: list[CampaignSummary]


class CallDetail(JournalCall):
    """One call with everything the journal keeps of it."""

    workspace_id: int
    from_number: str | None
    to_number: str | None
    route: str | None
    worker_id: str | None
    answered_at: datetime | None
    ended_at: datetime | None
    hangup_cause: str | None
    sip_status: int | None
    media: dict[str, Any] | None = Field(description="the call's RTP figures (``call.done``)")
    audio_available: bool = Field(description="the recording is on this worker's disk")
    audio_url: str | None = Field(description="where to fetch it (add ``?token=``)")


class CallEvent(BaseModel):
    """One event as published (its fields vary with ``type``), with its outbox id and time."""

    model_config = ConfigDict(extra="allow")

    id: int
    type: str
    created_at: datetime


class CallEvents(BaseModel):
    call_id: str
    events: list[CallEvent]


class PlaceCallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: str = Field(pattern=NUMBER, examples=["+15551234567"], description="E.164 or digits")
    trunk: str = Field(pattern=DIALABLE, description="a SIP trunk of the worker, or Asterisk's")
    route: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=NO_NUL,
        description="the match of the route whose agent takes the call; null: the first agent",
    )
    caller_id: str | None = Field(None, pattern=DIALABLE, description="the From user")
    workspace_id: int | None = Field(
        None, ge=1, le=MAX_BIGINT, description="default: the route's workspace"
    )


class CallPlaced(BaseModel):
    call_id: str
    status: Literal["queued"] = "queued"


class SipDefaults(BaseModel):
    host: str
    port: int
    public_host: str | None
    transports: list[str]


class AriDefaults(BaseModel):
    url: str = Field(description="Asterisk's HTTP server, without credentials")
    app: str
    media_format: str
    media_host: str | None
    asterisk_sip_host: str
    asterisk_sip_port: int


class TelephonySettings(BaseModel):
    """The worker's defaults for Custom Voice mode (never a password or a secret)."""

    ingress: list[str]
    sip: SipDefaults
    ari: AriDefaults
    trunks: list[str] = Field(description="the worker's SIP trunks")
    ari_trunks: list[str] = Field(description="the trunks it keeps in Asterisk")


# -- the journal's filters ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalFilter:
    workspace_id: int
    date_from: datetime | None
    date_to: datetime | None
    statuses: list[str] | None
    limit: int
    since_id: int


def _bad(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def resolve_workspace(caller: Principal, workspace_id: int | None) -> int:
    """The workspace asked for, or the caller's only one; 403 for a non-member."""
    if workspace_id is None:
        if len(caller.workspaces) != 1:
            raise _bad("workspace_id is required")
        (workspace_id,) = caller.workspaces
    caller.check(workspace_id)
    return workspace_id


def parse_bound(name: str, value: str | None, *, end: bool) -> datetime | None:
    """An ISO 8601 date (the whole day: from its start, or up to its end) or date-time (UTC
    when it names no offset); 422 otherwise."""
    if not value:
        return None
    try:
        try:
            day = date.fromisoformat(value)
        except ValueError:
            moment = datetime.fromisoformat(value)
        else:
            moment = datetime.combine(day, time.max if end else time.min)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _bad(f"{name}: not an ISO 8601 date or date-time: {value!r}") from None


def parse_statuses(value: str | None) -> list[str] | None:
    """A comma-separated list of journal statuses; 422 names the unknown ones."""
    if not value:
        return None
    wanted = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown:
        raise _bad(f"status: unknown {', '.join(map(repr, unknown))}; one of {sorted(STATUSES)}")
    return wanted or None


def journal_filter(
    caller: Caller,
    workspace_id: Annotated[
        int | None, Query(ge=1, le=MAX_BIGINT, description="default: the caller's only one")
    ] = None,
    date_from: Annotated[
        str | None, Query(max_length=64, description="ISO 8601 date or date-time, inclusive")
    ] = None,
    date_to: Annotated[
        str | None,
        Query(max_length=64, description="ISO 8601 date (the whole day) or date-time, inclusive"),
    ] = None,
    status: Annotated[
        str | None,
        Query(max_length=200, description=f"comma-separated, of {', '.join(sorted(STATUSES))}"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    since_id: Annotated[
        int, Query(ge=0, le=MAX_BIGINT, description="only calls with a larger id")
    ] = 0,
) -> JournalFilter:
    return JournalFilter(
        workspace_id=resolve_workspace(caller, workspace_id),
        date_from=parse_bound("date_from", date_from, end=False),
        date_to=parse_bound("date_to", date_to, end=True),
        statuses=parse_statuses(status),
        limit=limit,
        since_id=since_id,
    )


Filters = Annotated[JournalFilter, Depends(journal_filter)]
NodeQuery = Annotated[str | None, Query(max_length=200, pattern=NO_NUL)]
NodePath = Annotated[str, PathParam(min_length=1, max_length=200, pattern=NO_NUL)]
CallIdPath = Annotated[str, PathParam(min_length=1, max_length=200, pattern=NO_NUL)]


# -- the journal's queries ------------------------------------------------------------------------

_MATCHING = (
    " FROM calls WHERE workspace_id = $1 AND ($2::text IS NULL OR node_id = $2)"
    " AND ($3::timestamptz IS NULL OR created_at >= $3)"
    " AND ($4::timestamptz IS NULL OR created_at <= $4)"
    " AND ($5::text[] IS NULL OR status = ANY ($5))"
)
_CALL_COLUMNS = (
    "id, call_id, status, subscriber_phone, duration_sec, summary, transcript, created_at,"
    " conversation_id, has_audio, parent_call_id, node_id, direction"
)
_CAMPAIGNS = (
    "SELECT p.call_id, p.name, p.status, p.numbers_count, count(c.id) AS child_count,"
    " count(c.id) FILTER (WHERE c.status = 'completed') AS success_count,"
    " count(c.id) FILTER (WHERE c.status = ANY ($3)) AS failed_count,"
    " COALESCE(sum(c.duration_sec), 0) AS total_duration_sec"
    " FROM campaigns p LEFT JOIN calls c"
    " ON c.parent_call_id = p.call_id AND c.workspace_id = p.workspace_id"
    " WHERE p.workspace_id = $1 AND p.call_id = ANY ($2)"
    " GROUP BY p.id ORDER BY p.id DESC"
)


def _json_value(value: Any) -> Any:
    """A jsonb column (asyncpg hands it over as text)."""
    return json.loads(value) if isinstance(value, str) else value


def _call_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    fields = dict(row)
    fields["transcript"] = _json_value(fields.get("transcript")) or []
    if "media" in fields:
        fields["media"] = _json_value(fields["media"])
    return fields


async def read_journal(pool: Any, where: JournalFilter, node_id: str | None) -> Journal:
    """Totals, the page and its campaigns, from one snapshot."""
    args = (where.workspace_id, node_id, where.date_from, where.date_to, where.statuses)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        totals = await conn.fetchrow(
            "SELECT count(*) AS total, COALESCE(sum(duration_sec), 0) AS duration,"
            f" COALESCE(max(id), 0) AS max_id {_MATCHING}",
            *args,
        )
        rows = await conn.fetch(
            f"SELECT {_CALL_COLUMNS} {_MATCHING} AND id > $6 ORDER BY id DESC LIMIT $7",
            *args,
            where.since_id,
            where.limit,
        )
        parents = sorted({r["parent_call_id"] for r in rows if r["parent_call_id"]})
        campaigns = (
            await conn.fetch(_CAMPAIGNS, where.workspace_id, parents, list(FAILED_STATUSES))
            if parents
            else []
        )
    return Journal(
        total=totals["total"],
        total_duration_sec=totals["duration"],
        max_id=totals["max_id"],
        calls=[JournalCall(**_call_fields(r)) for r in rows],
        campaigns=[CampaignSummary(**dict(r)) for r in campaigns],
    )


async def visible_call(pool: Any, caller: Principal, call_id: str) -> Mapping[str, Any]:
    """The call's journal row; 404 when there is none or the caller may not see it."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM calls WHERE call_id = $1", call_id)
    if row is None or not caller.may_see(int(row["workspace_id"])):
        raise HTTPException(status_code=404, detail="call not found")
    result: Mapping[str, Any] = row
    return result


# -- recordings and ranges ------------------------------------------------------------------------


class RangeNotSatisfiableError(Exception):
    """The Range header asks for bytes the file does not have (416)."""


_BYTES_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as ``(first, last)`` inclusive and clamped to the file, or
    None for the whole file: no header, another unit, several ranges or a malformed one are
    ignored (RFC 9110 §14.2 lets a server ignore Range). Raises ``RangeNotSatisfiableError``
    when the range starts past the end (or asks for the last 0 bytes, or the file is empty)."""
    if header is None:
        return None
    match = _BYTES_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiableError
    return start, min(int(last), size - 1) if last else size - 1


def locate_recording(settings: Settings, recording_path: str | None) -> tuple[Path, int] | None:
    """The recording's real path and size, when it is a regular file inside
    ``data_dir/recordings``; None otherwise. (Blocking: run it in a thread.)"""
    if not recording_path:
        return None
    try:
        root = (settings.data_dir / "recordings").resolve()
        path = Path(recording_path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path, path.stat().st_size
    except (OSError, RuntimeError, ValueError):  # unreadable, a link loop, a NUL byte
        return None


async def _file_chunks(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as file:
        await file.seek(start)
        while length > 0:
            chunk = await file.read(min(CHUNK_BYTES, length))
            if not chunk:
                return  # the file shrank: the client sees a short body
            length -= len(chunk)
            yield chunk


def audio_response(path: Path, size: int, range_header: str | None) -> Response:
    """200 with the whole file, 206 with one range, or 416."""
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private"}
    try:
        wanted = parse_range(range_header, size)
    except RangeNotSatisfiableError:
        return JSONResponse(
            {"detail": f"range not satisfiable: {range_header} of {size} bytes"},
            status_code=416,
            headers={**headers, "Content-Range": f"bytes */{size}"},
        )
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1
    headers["Content-Length"] = str(length)
    return StreamingResponse(
        _file_chunks(path, start, length),
        status_code=status,
        media_type="audio/mpeg",
        headers=headers,
    )


# -- placing a call -------------------------------------------------------------------------------


def route_workspace(settings: Settings, match: str | None) -> int | None:
    """The workspace of the route ``Worker.call_out`` picks (the one whose ``match`` is
    ``match``; None: the first agent route), or None when there is no such route."""
    for route in settings.routes:
        if (match is None and route.action == "agent") or route.match == match:
            return route.workspace_id
    return None


def call_workspace(caller: Principal, settings: Settings, body: PlaceCallRequest) -> int:
    """The workspace the call will be journaled in; the caller must be a member (403), and
    a workspace given must be the route's (422)."""
    of_route = route_workspace(settings, body.route)
    workspace = body.workspace_id or of_route or 1
    caller.check(workspace)
    if of_route is not None and of_route != workspace:
        raise _bad(f"route {body.route or '(first agent route)'!r} is in workspace {of_route}")
    return workspace


# -- endpoints ------------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no token, or a bad one"},
    422: {"model": ErrorBody, "description": "invalid parameters"},
}
_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "not a member of the workspace"}
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "unknown call, or another workspace's"}
}

router = APIRouter(tags=["telephony"], responses=_ERRORS)


@router.get("/telephony/journal", response_model=Journal, responses=_FORBIDDEN)
async def journal(ctx: Context, where: Filters, node_id: NodeQuery = None) -> Journal:
    """The workspace's calls across its nodes (the seed's all-nodes journal)."""
    return await read_journal(ctx.pool, where, node_id or None)


@router.get("/telephony/journal/call/{call_id}", response_model=CallDetail, responses=_NOT_FOUND)
async def call_detail(ctx: Context, caller: Caller, call_id: CallIdPath) -> CallDetail:
    """One call with its full transcript, summary, times, cause, media figures and recording."""
    row = _call_fields(await visible_call(ctx.pool, caller, call_id))
    found = await anyio.to_thread.run_sync(locate_recording, ctx.settings, row["recording_path"])
    url = f"/telephony/calls/{quote(call_id, safe='')}/audio" if found else None
    return CallDetail(**row, audio_available=found is not None, audio_url=url)


@router.get("/telephony/journal/{node_id}", response_model=Journal, responses=_FORBIDDEN)
async def node_journal(ctx: Context, where: Filters, node_id: NodePath) -> Journal:
    """The calls of one PBX / phone number / agent node; ``since_id`` for a delta refresh."""
    return await read_journal(ctx.pool, where, node_id)


@router.get(
    "/telephony/calls/{call_id}/audio",
    response_class=Response,
    responses={
        **_NOT_FOUND,
        200: {"content": {"audio/mpeg": {}}, "description": "the whole MP3"},
        206: {"content": {"audio/mpeg": {}}, "description": "one byte range of it"},
        416: {"model": ErrorBody, "description": "the range starts past the end"},
    },
)
async def call_audio(
    ctx: Context,
    caller: Caller,
    call_id: CallIdPath,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
) -> Response:
    """The call's MP3 recording; ``?token=`` so that an ``<audio>`` element can play it. One
    ``bytes=`` range (``a-b``, ``a-``, ``-n``) is honoured with 206."""
    row = await visible_call(ctx.pool, caller, call_id)
    found = await anyio.to_thread.run_sync(locate_recording, ctx.settings, row["recording_path"])
    if found is None:
        raise HTTPException(status_code=404, detail="no recording for this call")
    return audio_response(*found, range_header)


@router.get("/telephony/calls/{call_id}/events", response_model=CallEvents, responses=_NOT_FOUND)
async def call_events(
    ctx: Context,
    caller: Caller,
    call_id: CallIdPath,
    after_id: Annotated[int, Query(ge=0, le=MAX_BIGINT, description="only later events")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> CallEvents:
    """The call's events in order (status changes, DTMF, transcript turns, the end)."""
    row = await visible_call(ctx.pool, caller, call_id)
    async with ctx.pool.acquire() as conn:
        events = await conn.fetch(
            "SELECT id, payload, created_at FROM call_events"
            " WHERE call_id = $1 AND workspace_id = $2 AND id > $3 ORDER BY id LIMIT $4",
            call_id,
            row["workspace_id"],
            after_id,
            limit,
        )
    return CallEvents(
        call_id=call_id,
        events=[
            CallEvent(**{**_json_value(e["payload"]), "id": e["id"], "created_at": e["created_at"]})
            for e in events
        ],
    )


@router.post(
    "/telephony/calls",
    status_code=201,
    response_model=CallPlaced,
    responses={
        **_FORBIDDEN,
        502: {"model": ErrorBody, "description": "the carrier or Asterisk refused the call"},
        503: {"model": ErrorBody, "description": "this worker cannot place calls now"},
    },
)
async def place_call(ctx: Context, caller: Caller, body: PlaceCallRequest) -> CallPlaced:
    """Place an outbound call: it is bridged to the route's agent once answered."""
    call_workspace(caller, ctx.settings, body)
    if ctx.place_call is None:
        raise HTTPException(status_code=503, detail="this worker does not place calls")
    try:
        call_id = await ctx.place_call(body.number, body.trunk, body.route, body.caller_id)
    except ConfigError as exc:
        raise _bad(str(exc)) from exc
    except RemoteError as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from exc
    except WorkerError as exc:
        raise HTTPException(status_code=503, detail=f"cannot place the call: {exc}") from exc
    return CallPlaced(call_id=call_id)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@router.get("/telephony/settings", response_model=TelephonySettings)
async def telephony_settings(ctx: Context, caller: Caller) -> TelephonySettings:
    """ARI / SIP defaults for Custom Voice mode."""
    s = ctx.settings
    return TelephonySettings(
        ingress=list(s.ingress),
        sip=SipDefaults(
            host=s.sip.host,
            port=s.sip.port,
            public_host=s.sip.public_host,
            transports=list(s.sip.transports),
        ),
        ari=AriDefaults(
            url=_without_credentials(s.ari.url),
            app=s.ari.app,
            media_format=s.ari.media_format,
            media_host=s.ari.media_host,
            asterisk_sip_host=s.ari.asterisk_sip_host,
            asterisk_sip_port=s.ari.asterisk_sip_port,
        ),
        trunks=sorted(s.trunks),
        ari_trunks=sorted(s.ari.trunks),
    )
