"""The journal change each event makes, and its outbox row, in one transaction.

``write_events(conn, events)`` applies a batch of ``(uid, event)`` in order inside one
transaction: it first locks
the ``event_heads`` row of every workspace involved (in id order, so two writers cannot
deadlock), then for each event updates ``calls`` as the event says and inserts the event into
``outbox``, and finally ``NOTIFY outbox, '<workspace_id>'`` once per workspace (delivered at
commit). Because each workspace's row stays locked until the commit, a workspace's outbox ids
are committed in increasing order, whatever the number of workers writing.

What each event does to ``calls``: ``call.started`` inserts the call (status ``trying``);
``call.status`` sets the status (and the answer time, and the SIP status); ``call.transcript``
appends a turn (``role``, ``message``, ``time_in_call_secs``, as the seed's journal shows it);
``call.done`` sets the final status, duration, recording, cause, media figures and end time, and
adds a ``journal.new`` event with the finished entry. DTMF, interruption and voicemail events go
to the outbox only.

Each outbox row also gets a ``webhook_deliveries`` row per enabled webhook endpoint of its
workspace whose type filter takes it (``worker.events.webhooks`` sends them).

Each event carries a ``uid`` given when it was published; its outbox row is inserted first and
an event whose uid is already there is skipped whole (journal change included), so writing a
batch again after a failure whose outcome is unknown (or replaying the spool) changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.events import models as ev


@dataclass(frozen=True, slots=True)
class Written:
    """One outbox row as written: its id, workspace and the wire form of its event."""

    id: int
    workspace_id: int
    type: str
    payload: dict[str, Any]


Pending = tuple[str, ev.Event]
"""An event waiting to be written, with its uid."""


async def write_events(conn: Any, events: Sequence[Pending], worker_id: str) -> list[Written]:
    """Apply ``events`` (in order) in one transaction; see the module docstring."""
    workspaces = sorted({_workspace(event) for _, event in events})
    written: list[Written] = []
    async with conn.transaction():
        for workspace in workspaces:
            await conn.execute(
                "INSERT INTO event_heads (workspace_id) VALUES ($1) ON CONFLICT (workspace_id)"
                " DO UPDATE SET workspace_id = EXCLUDED.workspace_id",
                workspace,
            )
        for uid, event in events:
            first = await _outbox(conn, uid, event)
            if first is None:
                continue  # written before
            written.append(first)
            written.extend(await _apply(conn, uid, event, worker_id))
        for workspace in workspaces:
            await conn.execute("SELECT pg_notify('outbox', $1)", str(workspace))
    return written


def _workspace(event: ev.Event) -> int:
    return 1 if isinstance(event, ev.JournalNewEvent) else event.workspace_id


async def _apply(conn: Any, uid: str, event: ev.Event, worker_id: str) -> list[Written]:
    """The journal change; returns the further outbox rows it adds (``journal.new``)."""
    out: list[Written] = []
    if isinstance(event, ev.CallStartedEvent):
        await conn.execute(
            "INSERT INTO calls (call_id, workspace_id, node_id, worker_id, direction, status,"
            " subscriber_phone, from_number, to_number, route, created_at)"
            " VALUES ($1, $2, $3, $4, $5, 'trying', $6, $7, $8, $9, $10)"
            " ON CONFLICT (call_id) DO NOTHING",
            event.call_id,
            event.workspace_id,
            event.node_id,
            worker_id,
            event.direction,
            event.from_ if event.direction == "inbound" else event.to,
            event.from_,
            event.to,
            event.route,
            event.started_at,
        )
    elif isinstance(event, ev.CallStatusEvent):
        await conn.execute(
            "UPDATE calls SET status = $2, sip_status = COALESCE($3, sip_status),"
            " answered_at = CASE WHEN $2 = 'in-progress' AND answered_at IS NULL THEN $4"
            " ELSE answered_at END WHERE call_id = $1",
            event.call_id,
            event.status,
            event.sip_status,
            event.at,
        )
    elif isinstance(event, ev.CallTranscriptEvent):
        turn = {"role": event.role, "message": event.text, "time_in_call_secs": event.at_sec}
        await conn.execute(
            "UPDATE calls SET transcript = transcript || $2::jsonb WHERE call_id = $1",
            event.call_id,
            json.dumps([turn]),
        )
    elif isinstance(event, ev.CallDoneEvent):
        row = await conn.fetchrow(
            "UPDATE calls SET status = $2, duration_sec = $3, recording_path = $4::text,"
            " has_audio = $4::text IS NOT NULL, hangup_cause = $5, media = $6::jsonb,"
            " ended_at = clock_timestamp() WHERE call_id = $1"
            " RETURNING id, call_id, node_id, status, subscriber_phone, duration_sec, created_at",
            event.call_id,
            event.status,
            event.duration_sec,
            event.recording_path,
            event.cause,
            None if event.media is None else json.dumps(event.media.to_dict()),
        )
        if row is not None:
            entry = ev.JournalEntry(**dict(row))
            journal = ev.JournalNewEvent(entries=(entry,))
            added = await _outbox(conn, f"{uid}:journal", journal, event.workspace_id)
            if added is not None:
                out.append(added)
    return out


async def _outbox(
    conn: Any, uid: str, event: ev.Event, workspace: int | None = None
) -> Written | None:
    """Insert the event's outbox row; None if its uid is there already."""
    payload = event.to_dict()
    call_id = None
    if not isinstance(event, ev.JournalNewEvent):
        workspace, call_id = event.workspace_id, event.call_id
    assert workspace is not None
    event_id = await conn.fetchval(
        "INSERT INTO outbox (event_uid, workspace_id, call_id, type, payload)"
        " VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (event_uid) DO NOTHING RETURNING id",
        uid,
        workspace,
        call_id,
        event.type,
        json.dumps(payload),
    )
    if event_id is None:
        return None
    # One delivery per webhook endpoint that wants it, in the same transaction: a crash after
    # the commit still delivers it.
    await conn.execute(
        "INSERT INTO webhook_deliveries (endpoint_id, event_id)"
        " SELECT id, $2 FROM webhook_endpoints WHERE workspace_id = $1 AND enabled"
        " AND (cardinality(event_types) = 0 OR $3 = ANY (event_types))",
        workspace,
        event_id,
        event.type,
    )
    return Written(int(event_id), workspace, event.type, payload)
