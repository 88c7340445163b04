"""The realtime hub: committed events from the outbox to the API's clients, in id order per
workspace, once per id, resumable by id.

``Hub`` listens to PostgreSQL's ``outbox`` notifications (each carries a workspace id; every
worker writing to the database sends them, so a client of any worker gets the events of calls
on all of them) and reads the new rows of that workspace after the last id it has read (ids of
one workspace commit in increasing order: ``worker.store.journal``). It also reads every
second, in case a notification was lost with its connection. It keeps the newest
``api.hub_queue_events`` events of each workspace in memory; each client pulls what follows the
last id it got, from memory or, when it is further behind, from the outbox, so bursts and slow
readers cost no more memory. A client that stops reading (its socket full for
``SEND_TIMEOUT_S``) is cut off (WebSocket close 1013) and resumes with the last id it saw.

Endpoints:

- ``GET /ws/events/{workspace_id}?token=<JWT>[&last_id=N][&subscribe=telephony,...]``: the
  seed's hub. Auto-subscribed to
  the workspace's journal and lifecycle events (``journal.new``, ``call.done``,
  ``call.transcript``, ``batch.status``, ``campaign.*``); ``{"action": "subscribe", "channel":
  "telephony"}`` (every node) or ``"calls:<node_id>"`` adds the call-level events (state
  transitions, DTMF, voicemail, interruption), answered ``{"type": "subscribed", ...}``. Server
  ``{"type": "ping"}`` every ``api.hub_ping_interval_s``; a client's ``ping`` gets ``pong``. A
  message naming another ``uid`` is refused and the socket closed (1008). Every event carries
  its outbox ``id``.
- ``GET /events/{workspace_id}/stream``: the same events as server-sent events with an
  ``event_type`` field, ``id:`` lines and ``Last-Event-ID`` resume.
- ``GET /ws/calls/{call_id}/observe?token=``: one call's ``user_transcript``,
  ``agent_transcript``, ``dtmf`` and ``status`` (the platform seed's observer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from worker.api.auth import AuthError, ForbiddenError, Principal, bearer_or_query_token

log = logging.getLogger("worker.api.hub")

WORKSPACE_TYPES = frozenset(
    {
        "journal.new",
        "call.done",
        "call.transcript",
        "batch.status",
        "campaign.started",
        "campaign.stopped",
    }
)
"""What a hub client gets without subscribing to anything more."""
CALL_TYPES = frozenset(
    {
        "call.started",
        "call.status",
        "call.dtmf",
        "call.voicemail_detected",
        "call.interruption",
    }
)
"""The lower-level telephony events: after ``subscribe`` to ``telephony`` or ``calls:<node>``."""
POLL_S = 1.0
SEND_TIMEOUT_S = 5.0
"""A client whose socket takes no more data for this long (it stopped reading and its
buffers are full) is dropped; it resumes by id."""
READ_LIMIT = 500
CLOSE_TOO_SLOW = 1013
CLOSE_POLICY = 1008


@dataclass(eq=False)
class Message:
    """One outbox row as the clients see it."""

    id: int
    workspace_id: int
    type: str
    call_id: str | None
    node_id: str | None
    payload: dict[str, Any]

    _text: str | None = None

    def wire(self) -> dict[str, Any]:
        return {**self.payload, "id": self.id}

    def text(self) -> str:
        """The wire form as JSON, made once however many clients get it."""
        if self._text is None:
            self._text = json.dumps(self.wire())
        return self._text


@dataclass(eq=False)
class Client:
    """One subscriber: its workspace, what it wants, and how far it has read (``last_id``:
    every event of the workspace up to it has been given to it, or skipped as unwanted)."""

    workspace_id: int
    wants: Callable[[Message], bool]
    last_id: int = 0


@dataclass(eq=False)
class _Workspace:
    """What the hub holds for a workspace with clients: the newest events read (``recent``,
    bounded), the id after which ``recent`` is complete (``floor``), the last id read
    (``cursor``), and an event to wake its clients."""

    limit: int
    cursor: int = 0
    floor: int = 0
    recent: deque[Message] = field(default_factory=deque)
    clients: set[Client] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, messages: list[Message]) -> None:
        for message in messages:
            if len(self.recent) >= self.limit:
                self.floor = self.recent.popleft().id
            self.recent.append(message)
        self.cursor = messages[-1].id
        self.changed.set()
        self.changed = asyncio.Event()  # the next wait is for what comes after these


class Hub:
    """See the module docstring. Clients pull: ``next_batch`` gives a client what follows its
    ``last_id``, from memory when the hub still holds it, else from the database, so a burst
    or a slow client never costs more memory than ``queue_limit`` events per workspace."""

    def __init__(self, pool: Any, dsn_connect: Callable[[], Any], queue_limit: int) -> None:
        """``pool``: asyncpg pool for reads; ``dsn_connect``: opens the dedicated LISTEN
        connection; ``queue_limit``: events kept in memory per workspace."""
        self._pool = pool
        self._connect = dsn_connect
        self.queue_limit = queue_limit
        self._workspaces: dict[int, _Workspace] = {}
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: Any = None
        self.delivered = 0
        self.dropped = 0
        """Clients cut off because they stopped reading."""

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_listener()

    # -- clients ---------------------------------------------------------------------------------
    async def subscribe(
        self, workspace_id: int, wants: Callable[[Message], bool], after_id: int | None
    ) -> Client:
        """A new client of ``workspace_id``, reading from after ``after_id`` (stored events
        first), or from now on when None."""
        state = self._workspaces.get(workspace_id)
        if state is None:
            start = await self._max_id(workspace_id)
            state = self._workspaces.get(workspace_id)  # another client may have come meanwhile
            if state is None:
                state = _Workspace(self.queue_limit, cursor=start, floor=start)
                self._workspaces[workspace_id] = state
        client = Client(workspace_id, wants, state.cursor if after_id is None else after_id)
        state.clients.add(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        state = self._workspaces.get(client.workspace_id)
        if state is not None:
            state.clients.discard(client)
            if not state.clients:
                del self._workspaces[client.workspace_id]

    async def next_batch(self, client: Client, within_s: float) -> list[Message]:
        """What follows the client's ``last_id`` and it wants (possibly empty after
        ``within_s`` with nothing new); advances ``last_id``."""
        state = self._workspaces[client.workspace_id]
        if client.last_id >= state.cursor:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.changed.wait(), within_s)
            if client.last_id >= state.cursor:
                return []
        if client.last_id >= state.floor:
            fresh = [m for m in state.recent if m.id > client.last_id][:READ_LIMIT]
        else:  # further behind than memory: the database
            fresh = await self._read(client.workspace_id, client.last_id, state.cursor)
        if not fresh:
            return []
        client.last_id = fresh[-1].id
        wanted = [m for m in fresh if client.wants(m)]
        self.delivered += len(wanted)
        return wanted

    def notify(self, workspace_id: int) -> None:
        """New rows were committed in ``workspace_id`` (a NOTIFY, or this worker's writer)."""
        if workspace_id in self._workspaces:
            self._dirty.add(workspace_id)
            self._wake.set()

    async def events_of(self, call_id: str, after_id: int = 0) -> list[Message]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, workspace_id, type, call_id, payload FROM outbox"
                " WHERE call_id = $1 AND id > $2 ORDER BY id",
                call_id,
                after_id,
            )
        return [_message(row) for row in rows]

    # -- the reader ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if self._listener is None:
                await self._listen()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            due = set(self._workspaces) if not self._dirty else set(self._dirty)
            self._dirty.clear()
            for workspace_id in sorted(due):
                try:
                    await self._catch_up(workspace_id)
                except Exception as exc:  # the database went away: retried on the next round
                    log.warning("hub read failed", extra={"error": str(exc)})
                    await self._drop_listener()
                    await asyncio.sleep(POLL_S)
                    break

    async def _catch_up(self, workspace_id: int) -> None:
        while True:
            state = self._workspaces.get(workspace_id)
            if state is None:
                return
            messages = await self._read(workspace_id, state.cursor, None)
            if not messages:
                return
            state.add(messages)
            if len(messages) < READ_LIMIT:
                return

    async def _read(self, workspace_id: int, after: int, upto: int | None) -> list[Message]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, workspace_id, type, call_id, payload FROM outbox"
                " WHERE workspace_id = $1 AND id > $2 AND ($3::bigint IS NULL OR id <= $3)"
                " ORDER BY id LIMIT $4",
                workspace_id,
                after,
                upto,
                READ_LIMIT,
            )
        return [_message(row) for row in rows]

    async def _max_id(self, workspace_id: int) -> int:
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT COALESCE(max(id), 0) FROM outbox WHERE workspace_id = $1", workspace_id
            )
        return int(value)

    async def _listen(self) -> None:
        try:
            conn = await self._connect()
            await conn.add_listener("outbox", self._on_notify)
        except Exception as exc:
            log.debug("hub cannot LISTEN yet", extra={"error": str(exc)})
            return
        self._listener = conn
        self._dirty.update(self._workspaces)  # whatever came while not listening

    async def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload.isdigit():
            self.notify(int(payload))


def _message(row: Any) -> Message:
    payload = row["payload"]
    if isinstance(payload, str):
        payload = json.loads(payload)
    return Message(
        int(row["id"]),
        int(row["workspace_id"]),
        str(row["type"]),
        row["call_id"],
        payload.get("node_id") if isinstance(payload, dict) else None,
        payload,
    )


# -- endpoints ------------------------------------------------------------------------------------

router = APIRouter()


class _Subscriptions:
    """What one hub WebSocket client asked for."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self.telephony = False

    def wants(self, message: Message) -> bool:
        if message.type in WORKSPACE_TYPES:
            return True
        if message.type not in CALL_TYPES:
            return True  # future workspace-level types
        return self.telephony or (message.node_id is not None and message.node_id in self.nodes)

    def add(self, channel: str) -> bool:
        if channel == "telephony":
            self.telephony = True
            return True
        if channel.startswith("calls:") and len(channel) > len("calls:"):
            self.nodes.add(channel[len("calls:") :])
            return True
        return False


def _ws_principal(websocket: WebSocket, token: str | None) -> Principal:
    ctx = websocket.app.state.context
    header = websocket.headers.get("authorization", "")
    value = header[7:].strip() if header.lower().startswith("bearer ") else token
    principal: Principal = ctx.verifier.verify(value)
    return principal


@router.websocket("/ws/events/{workspace_id}")
async def events_socket(
    websocket: WebSocket,
    workspace_id: int,
    token: str | None = None,
    last_id: int | None = None,
    subscribe: str | None = None,
) -> None:
    """The workspace's realtime events (see the module docstring). ``subscribe`` (a comma
    list of channels) subscribes at connect, so a resume (``last_id``) includes them."""
    try:
        who = _ws_principal(websocket, token)
        who.check(workspace_id)
    except AuthError as exc:
        await _close_unauthenticated(websocket, exc)
        return
    except ForbiddenError as exc:
        # A refused handshake: HTTP 403 (the seed: non-members get a 403).
        await websocket.send_denial_response(_json_response({"detail": str(exc)}, 403))
        return
    hub: Hub = websocket.app.state.context.hub
    ping_s = websocket.app.state.context.settings.api.hub_ping_interval_s
    await websocket.accept()
    subs = _Subscriptions()
    for channel in (subscribe or "").split(","):
        if channel and not subs.add(channel):
            await websocket.close(code=CLOSE_POLICY, reason=f"unknown channel {channel!r}")
            return
    client = await hub.subscribe(workspace_id, subs.wants, last_id)
    reader = asyncio.get_running_loop().create_task(_read_client(websocket, who, subs, hub, client))
    try:
        await _pump(websocket, hub, client, ping_s, reader)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        hub.unsubscribe(client)


async def _pump(
    websocket: WebSocket, hub: Hub, client: Client, ping_s: float, reader: asyncio.Task[None]
) -> None:
    loop = asyncio.get_running_loop()
    next_ping = loop.time() + ping_s
    while not reader.done():
        batch = await hub.next_batch(client, min(1.0, max(0.0, next_ping - loop.time())))
        for message in batch:
            if not await _send(websocket, message.text()):
                hub.dropped += 1
                log.info("hub client not reading; dropped", extra={"last_id": client.last_id})
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        websocket.close(code=CLOSE_TOO_SLOW, reason="not reading: resume by id"),
                        1.0,
                    )
                return
        if loop.time() >= next_ping:
            if not await _send(websocket, '{"type":"ping"}'):
                return
            next_ping = loop.time() + ping_s


async def _send(websocket: WebSocket, text: str) -> bool:
    """Send, unless the client has stopped reading (its socket full for ``SEND_TIMEOUT_S``)."""
    try:
        await asyncio.wait_for(websocket.send_text(text), SEND_TIMEOUT_S)
    except TimeoutError:
        return False
    return True


async def _read_client(
    websocket: WebSocket, who: Principal, subs: _Subscriptions, hub: Hub, client: Client
) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            text = await websocket.receive_text()
            try:
                message = json.loads(text)
            except ValueError:
                await websocket.send_text(json.dumps({"type": "error", "detail": "not JSON"}))
                continue
            if not isinstance(message, dict):
                await websocket.send_text(json.dumps({"type": "error", "detail": "not an object"}))
                continue
            claimed = message.get("uid", message.get("user_id"))
            if claimed is not None and str(claimed) != who.uid:
                await websocket.send_text(
                    json.dumps({"type": "error", "detail": "messages may not claim another user"})
                )
                await websocket.close(code=CLOSE_POLICY, reason="another user's uid")
                return
            if message.get("type") == "ping":
                await websocket.send_text('{"type":"pong"}')
            elif message.get("type") == "pong":
                continue
            elif message.get("action") == "subscribe" and isinstance(message.get("channel"), str):
                channel = message["channel"]
                if subs.add(channel):
                    await websocket.send_text(
                        json.dumps({"type": "subscribed", "channel": channel})
                    )
                else:
                    await websocket.send_text(
                        json.dumps({"type": "error", "detail": f"unknown channel {channel!r}"})
                    )
            else:
                await websocket.send_text(
                    json.dumps({"type": "error", "detail": "unknown message"})
                )


STREAM_EVENT = "StreamEvent"
"""The OpenAPI name of one SSE ``data:`` object: the event union, discriminated on
``event_type`` (``app.py`` adds the schemas; see ``stream_event_schemas``)."""


def stream_event_schemas() -> dict[str, Any]:
    """OpenAPI component schemas of every event as the SSE stream sends it (the event's fields,
    its outbox ``id`` and ``event_type``, equal to ``type``) and ``StreamEvent``, their union
    discriminated on ``event_type`` (the platform seed's typed SDK union)."""
    from pydantic import TypeAdapter

    from worker.events.models import Event

    ref = "#/components/schemas/{model}"
    schema = TypeAdapter(Event).json_schema(ref_template=ref, mode="serialization")
    schemas: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    for name, model in schema.get("$defs", {}).items():
        kind = model.get("properties", {}).get("type", {}).get("const")
        if kind is None:
            schemas[name] = model  # a nested model
            continue
        model["properties"]["id"] = {"type": "integer", "description": "the outbox id"}
        model["properties"]["event_type"] = {"type": "string", "const": kind, "enum": [kind]}
        model["required"] = sorted({*model.get("required", []), "id", "event_type", "type"})
        schemas[name] = model
        mapping[kind] = ref.format(model=name)
    schemas[STREAM_EVENT] = {
        "oneOf": [{"$ref": target} for target in mapping.values()],
        "discriminator": {"propertyName": "event_type", "mapping": mapping},
    }
    return schemas


@router.get(
    "/events/{workspace_id}/stream",
    tags=["events"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "``id:``, ``event:`` and ``data:`` lines; each ``data`` is a"
            " StreamEvent",
            "content": {
                "text/event-stream": {"schema": {"$ref": f"#/components/schemas/{STREAM_EVENT}"}}
            },
        }
    },
)
async def events_stream(
    request: Request,
    workspace_id: int,
    token: str | None = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """The workspace's events as server-sent events (``event_type`` names each one; resume
    with ``Last-Event-ID``)."""
    ctx = request.app.state.context
    who: Principal = ctx.verifier.verify(bearer_or_query_token(request, token))
    who.check(workspace_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else None
    hub: Hub = ctx.hub
    client = await hub.subscribe(workspace_id, lambda m: True, after)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                batch = await hub.next_batch(client, 15.0)
                if not batch:
                    yield b": keep-alive\n\n"
                for message in batch:
                    data = json.dumps({**message.wire(), "event_type": message.type})
                    yield f"id: {message.id}\nevent: {message.type}\ndata: {data}\n\n".encode()
        finally:
            hub.unsubscribe(client)

    return StreamingResponse(stream(), media_type="text/event-stream")


OBSERVER_TYPES = {"call.transcript", "call.dtmf", "call.status", "call.done"}


def observer_message(message: Message) -> dict[str, Any] | None:
    """A call event as the observer socket shows it (platform seed's shapes)."""
    p = message.payload
    if message.type == "call.transcript":
        kind = "user_transcript" if p.get("role") == "user" else "agent_transcript"
        out: dict[str, Any] = {"type": kind, "transcript": p.get("text", "")}
        if kind == "user_transcript":
            out.update(state="final", speaker_id=None, speaker_role="user")
        else:
            out.update(action="speak", interrupted=False, streaming=False)
        return {**out, "id": message.id, "time_in_call_secs": p.get("at_sec")}
    if message.type == "call.dtmf":
        return {"type": "dtmf", "digit": p.get("digit"), "id": message.id}
    if message.type in ("call.status", "call.done"):
        return {"type": "status", "status": p.get("status"), "id": message.id}
    return None


@router.websocket("/ws/calls/{call_id}/observe")
async def observe_call(websocket: WebSocket, call_id: str, token: str | None = None) -> None:
    """One call's transcripts, DTMF and status as they happen (from its first event)."""
    ctx = websocket.app.state.context
    try:
        who = _ws_principal(websocket, token)
    except AuthError as exc:
        await _close_unauthenticated(websocket, exc)
        return
    async with ctx.pool.acquire() as conn:
        workspace = await conn.fetchval(
            "SELECT workspace_id FROM calls WHERE call_id = $1", call_id
        )
    if workspace is None or not who.may_see(int(workspace)):
        await websocket.send_denial_response(_json_response({"detail": "call not found"}, 404))
        return
    await websocket.accept()
    hub: Hub = ctx.hub
    client = await hub.subscribe(
        int(workspace), lambda m: m.call_id == call_id and m.type in OBSERVER_TYPES, None
    )
    try:
        for past in await hub.events_of(call_id):  # what happened before we subscribed
            shown = observer_message(past) if past.id <= client.last_id else None
            if shown is not None:
                await websocket.send_text(json.dumps(shown))
            if shown is not None and past.type == "call.done":  # over before we came
                await websocket.close(code=1000)
                return
        while True:
            batch = await hub.next_batch(client, ctx.settings.api.hub_ping_interval_s)
            if not batch and not await _send(websocket, '{"type":"ping"}'):
                return
            for message in batch:
                shown = observer_message(message)
                if shown is not None and not await _send(websocket, json.dumps(shown)):
                    return
                if message.type == "call.done":
                    await websocket.close(code=1000)
                    return
    except WebSocketDisconnect:
        return
    finally:
        hub.unsubscribe(client)


async def _close_unauthenticated(websocket: WebSocket, exc: AuthError) -> None:
    """The seed: "invalid or expired tokens close the socket immediately". Accepted and closed
    at once with 1008 and the reason, so a browser's ``onclose`` can read why (a refused
    handshake would show only 1006)."""
    await websocket.accept()
    await websocket.close(code=CLOSE_POLICY, reason=str(exc)[:120])


def _json_response(body: dict[str, Any], status: int) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)
