"""The realtime hub (shared/seeds/realtime-events-websocket.txt) on a real PostgreSQL: events a
worker's sessions publish reach a WebSocket client through the outbox, in order, each with its
id; subscriptions; pings; JWT checks (403 for a non-member, closed socket for an expired or bad
token, a message claiming another uid refused); resume by the last id seen, exactly once; a
client of one worker gets the events of another worker on the same database; SSE with
Last-Event-ID; the per-call observer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.harness import running_worker
from tests.integration.test_store import call_events
from worker.app import Worker
from worker.events import models as ev

SECRET = "hub-test-secret-of-a-decent-length"
WAIT = 10.0


def token(uid: str = "u1", workspaces: list[int] | None = None, **claims: Any) -> str:
    body: dict[str, Any] = {"uid": uid, "workspaces": workspaces or [1], "exp": time.time() + 600}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def store_worker(tmp_path: Path, database_url: str, name: str = "w") -> AsyncIterator[Worker]:
    async with running_worker(
        tmp_path / name,
        [{"match": "*", "action": "echo"}],
        database_url=database_url,
        jwt_secret=SECRET,
    ) as worker:
        yield worker


def api_port(worker: Worker) -> int:
    assert worker.backend is not None
    assert worker.backend.api is not None
    return worker.backend.api.port


def hub_url(worker: Worker, workspace: int = 1, **query: Any) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"token": token(), **query}.items())
    return f"ws://127.0.0.1:{api_port(worker)}/ws/events/{workspace}?{params}"


def publish(worker: Worker, events: list[ev.Event]) -> None:
    for event in events:
        worker.bus.publish(event)


async def receive(ws: Any, count: int, *, skip_pings: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        try:
            message = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        except TimeoutError:
            raise AssertionError(f"{len(out)} of {count} messages within {WAIT} s: {out}") from None
        if skip_pings and message.get("type") == "ping":
            continue
        out.append(message)
    return out


class TestHubDelivery:
    async def test_workspace_events_in_order_with_ids(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with (
            store_worker(tmp_path, database_url) as worker,
            websockets.connect(hub_url(worker)) as ws,
        ):
            publish(worker, call_events("c1"))
            got = await receive(ws, 4)
        # Auto-subscribed: the journal and lifecycle events; call-level ones need a subscribe.
        assert [m["type"] for m in got] == [
            "call.transcript",
            "call.transcript",
            "call.done",
            "journal.new",
        ]
        ids = [m["id"] for m in got]
        assert ids == sorted(ids)
        assert len(set(ids)) == 4
        assert got[3]["entries"][0]["call_id"] == "c1"
        assert got[2]["node_id"] == "pbx"

    async def test_subscribe_telephony_and_ping(self, tmp_path: Path, database_url: str) -> None:
        async with (
            store_worker(tmp_path, database_url) as worker,
            websockets.connect(hub_url(worker)) as ws,
        ):
            await ws.send(json.dumps({"action": "subscribe", "channel": "calls:pbx"}))
            assert await receive(ws, 1) == [{"type": "subscribed", "channel": "calls:pbx"}]
            await ws.send(json.dumps({"type": "ping"}))
            assert await receive(ws, 1) == [{"type": "pong"}]
            publish(worker, call_events("c2"))
            got = await receive(ws, 8)
        assert [m["type"] for m in got] == [e.type for e in call_events("c2")] + ["journal.new"]

    async def test_a_message_claiming_another_uid_is_refused(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with (
            store_worker(tmp_path, database_url) as worker,
            websockets.connect(hub_url(worker)) as ws,
        ):
            await ws.send(json.dumps({"action": "subscribe", "channel": "telephony", "uid": "u2"}))
            error = await receive(ws, 1)
            assert error[0]["type"] == "error"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008


class TestHubAuthorisation:
    async def test_non_member_gets_403(self, tmp_path: Path, database_url: str) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(hub_url(worker, workspace=2)):
                    pass
        assert refused.value.response.status_code == 403

    @pytest.mark.parametrize(
        "bad",
        [
            "not-a-jwt",
            jwt.encode({"uid": "u1", "workspaces": [1], "exp": time.time() - 5}, SECRET),
            jwt.encode(
                {"uid": "u1", "workspaces": [1], "exp": time.time() + 60}, "another-secret-" * 3
            ),
            jwt.encode({"workspaces": [1], "exp": time.time() + 60}, SECRET),
        ],
    )
    async def test_bad_or_expired_token_closes_at_once(
        self, tmp_path: Path, database_url: str, bad: str
    ) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            url = f"ws://127.0.0.1:{api_port(worker)}/ws/events/1?token={bad}"
            with pytest.raises((ConnectionClosed, InvalidStatus)):
                async with websockets.connect(url) as ws:
                    await asyncio.wait_for(ws.recv(), WAIT)

    async def test_operator_sees_every_workspace(self, tmp_path: Path, database_url: str) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            operator = token(workspaces=[], role="operator")
            url = f"ws://127.0.0.1:{api_port(worker)}/ws/events/7?token={operator}"
            async with websockets.connect(url) as ws:
                publish(worker, call_events("c7", workspace=7))
                got = await receive(ws, 4)
        assert [m["type"] for m in got][-2:] == ["call.done", "journal.new"]
        assert {m.get("workspace_id", 7) for m in got} == {7}


class TestHubResume:
    async def test_missed_events_exactly_once_in_order(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            async with websockets.connect(hub_url(worker)) as ws:
                publish(worker, call_events("r1"))
                first = await receive(ws, 4)
            last = first[1]["id"]  # the client saw two, then lost its connection
            publish(worker, call_events("r2"))
            assert worker.backend is not None
            assert worker.backend.writer is not None
            assert await worker.backend.writer.flush(WAIT)
            async with websockets.connect(hub_url(worker, last_id=last)) as ws:
                publish(worker, call_events("r3"))
                again = await receive(ws, 2 + 4 + 4)
        ids = [m["id"] for m in again]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert ids[0] > last
        assert [m["id"] for m in first[2:]] == ids[:2]
        calls = [m.get("call_id") or m["entries"][0]["call_id"] for m in again]
        assert calls == ["r1"] * 2 + ["r2"] * 4 + ["r3"] * 4


class TestTwoWorkersOneDatabase:
    async def test_client_of_one_gets_the_other(self, tmp_path: Path, database_url: str) -> None:
        async with (
            store_worker(tmp_path, database_url, "a") as a,
            store_worker(tmp_path, database_url, "b") as b,
            websockets.connect(hub_url(a)) as ws,
        ):
            publish(b, call_events("from-b"))
            publish(a, call_events("from-a"))
            got = await receive(ws, 8)
        by_call: dict[str, list[str]] = {}
        for m in got:
            call = m.get("call_id") or m["entries"][0]["call_id"]
            by_call.setdefault(call, []).append(m["type"])
        expected = ["call.transcript", "call.transcript", "call.done", "journal.new"]
        assert by_call == {"from-a": expected, "from-b": expected}
        ids = [m["id"] for m in got]
        assert ids == sorted(ids)


class TestSse:
    async def test_stream_and_last_event_id(self, tmp_path: Path, database_url: str) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            publish(worker, call_events("s1"))
            assert worker.backend is not None
            assert worker.backend.writer is not None
            assert await worker.backend.writer.flush(WAIT)
            url = f"http://127.0.0.1:{api_port(worker)}/events/1/stream"
            headers = {"Authorization": f"Bearer {token()}", "Last-Event-ID": "0"}
            events: list[dict[str, Any]] = []
            async with (
                httpx.AsyncClient(timeout=WAIT) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                    if len(events) == 8:
                        break
        assert [e["event_type"] for e in events] == [e.type for e in call_events("s1")] + [
            "journal.new"
        ]
        assert all(e["event_type"] == e["type"] for e in events)
