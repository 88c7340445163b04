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
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.harness import running_worker
from tests.integration.test_store import call_events
from worker.api import hub
from worker.app import Worker
from worker.events import models as ev

SECRET = "hub-test-secret-of-a-decent-length"
WAIT = 10.0


def token(uid: str = "u1", workspaces: list[int] | None = None, **claims: Any) -> str:
    body: dict[str, Any] = {"uid": uid, "workspaces": workspaces or [1], "exp": time.time() + 600}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


@contextlib.asynccontextmanager
async def store_worker(
    tmp_path: Path, database_url: str, name: str = "w", **api: Any
) -> AsyncIterator[Worker]:
    async with running_worker(
        tmp_path / name,
        [{"match": "*", "action": "echo"}],
        database_url=database_url,
        jwt_secret=SECRET,
        api=api,
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
            async with websockets.connect(url) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "token" in closed.value.rcvd.reason

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


class TestSlowClient:
    """A burst larger than the hub's memory reaches a reading client whole (it is read from
    the outbox); a client that stops reading is cut off once its socket stays full (close
    1013), and resuming from the last id it saw gives every event exactly once, in order."""

    async def test_burst_beyond_memory(self, tmp_path: Path, database_url: str) -> None:
        async with (
            store_worker(tmp_path, database_url, hub_queue_events=10) as worker,
            websockets.connect(hub_url(worker)) as ws,
        ):
            await asyncio.sleep(0.3)  # subscribed
            publish(worker, _transcripts(150, 100))
            got = await receive(ws, 150)
        assert [m["call_id"] for m in got] == [f"t{n}" for n in range(150)]

    async def test_stops_reading_then_resumes(self, tmp_path: Path, database_url: str) -> None:
        events = _transcripts(600, 16_000)  # far more than the sockets' buffers hold
        async with store_worker(tmp_path, database_url) as worker:
            assert worker.backend is not None
            assert worker.backend.hub is not None
            hub_state = worker.backend.hub
            reader, writer = await _raw_hub_client(api_port(worker), hub_url(worker))
            try:
                publish(worker, events)  # and the client reads nothing
                deadline = asyncio.get_running_loop().time() + hub.SEND_TIMEOUT_S + WAIT
                while not hub_state.dropped:
                    assert asyncio.get_running_loop().time() < deadline, "never cut off"
                    await asyncio.sleep(0.2)
                seen = await _frames_until_eof(reader)  # what reached it before the cut
            finally:
                writer.close()
            assert len(seen) < len(events)
            last = seen[-1]["id"] if seen else 0
            url = hub_url(worker, last_id=last)
            async with websockets.connect(url, max_size=None) as again:
                rest = await receive(again, len(events) - len(seen))
        everything = seen + rest
        ids_seen = [m["id"] for m in everything]
        assert ids_seen == sorted(ids_seen)
        assert len(set(ids_seen)) == len(ids_seen)
        assert [m["call_id"] for m in everything] == [f"t{n}" for n in range(600)]


async def _raw_hub_client(port: int, url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that does the handshake and then stops reading (a small receive
    buffer, so the server's sends block soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    path = url.split(str(port), 1)[1]
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()
    reader._transport = transport  # type: ignore[attr-defined]
    return reader, writer


async def _frames_until_eof(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """The text frames (unmasked, from a server) until the connection ends."""
    transport = getattr(reader, "_transport", None)
    if transport is not None:
        transport.resume_reading()
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), WAIT):
            data += chunk
    out: list[dict[str, Any]] = []
    at = 0
    while at + 2 <= len(data):
        opcode, size = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if size == 126:
            size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if at + size > len(data):
            break  # cut in the middle of a frame
        if opcode == 1:
            message = json.loads(data[at : at + size])
            if message.get("type") != "ping":
                out.append(message)
        at += size
    return out


def _transcripts(count: int, size: int) -> list[ev.Event]:
    return [
        ev.CallTranscriptEvent(
            call_id=f"t{n}", workspace_id=1, role="user", text="x" * size, at_sec=float(n)
        )
        for n in range(count)
    ]


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
            async with httpx.AsyncClient(timeout=WAIT) as client:
                spec = (
                    await client.get(f"http://127.0.0.1:{api_port(worker)}/openapi.json")
                ).json()
        assert [e["event_type"] for e in events] == [e.type for e in call_events("s1")] + [
            "journal.new"
        ]
        assert all(e["event_type"] == e["type"] for e in events)
        # each data object is exactly one member of the documented union (platform seed: "a
        # discriminated union on the event_type field")
        stream = spec["paths"]["/events/{workspace_id}/stream"]["get"]["responses"]["200"]
        ref = stream["content"]["text/event-stream"]["schema"]["$ref"]
        union = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert union["discriminator"]["propertyName"] == "event_type"
        validator = jsonschema.Draft202012Validator({**spec, "$ref": ref})
        for event in events:
            validator.validate(event)
            target = union["discriminator"]["mapping"][event["event_type"]]
            jsonschema.Draft202012Validator({**spec, "$ref": target}).validate(event)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({**events[0], "event_type": "call.unknown"})


class TestObserver:
    """platform-events-sse-and-observer.txt, "Observer Events": one call's transcripts (``type``
    ``user_transcript`` / ``agent_transcript`` with their seed fields), DTMF and status."""

    async def test_one_calls_past_and_live_events_then_closed(
        self, tmp_path: Path, database_url: str
    ) -> None:
        events = call_events("o1")
        async with store_worker(tmp_path, database_url) as worker:
            publish(worker, events[:3] + call_events("other"))  # started, ringing, in-progress
            assert worker.backend is not None
            assert worker.backend.writer is not None
            assert await worker.backend.writer.flush(WAIT)
            url = f"ws://127.0.0.1:{api_port(worker)}/ws/calls/o1/observe?token={token()}"
            async with websockets.connect(url) as ws:
                past = await receive(ws, 2)
                publish(worker, events[3:])  # dtmf, agent and user transcripts, done
                live = await receive(ws, 4)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000
        assert [(m["type"], m.get("status")) for m in past] == [
            ("status", "ringing"),
            ("status", "in-progress"),
        ]
        dtmf, agent, user, done = live
        assert dtmf["type"] == "dtmf"
        assert dtmf["digit"] == "5"
        assert agent["type"] == "agent_transcript"
        assert agent["transcript"] == "Hello!"
        assert {"action", "interrupted", "streaming"} <= set(agent)
        assert user["type"] == "user_transcript"
        assert user["transcript"] == "Hi."
        assert user["speaker_role"] == "user"
        assert {"state", "speaker_id"} <= set(user)
        assert done == {"type": "status", "status": "completed", "id": done["id"]}
        ids = [m["id"] for m in past + live]
        assert ids == sorted(ids)

    async def test_unknown_call_other_workspace_and_bad_token(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with store_worker(tmp_path, database_url) as worker:
            publish(worker, call_events("o2", workspace=2))
            assert worker.backend is not None
            assert worker.backend.writer is not None
            assert await worker.backend.writer.flush(WAIT)
            base = f"ws://127.0.0.1:{api_port(worker)}/ws/calls"
            for call in ("nope", "o2"):  # a call of workspace 2 is not found for a member of 1
                with pytest.raises(InvalidStatus) as refused:
                    async with websockets.connect(f"{base}/{call}/observe?token={token()}"):
                        pass
                assert refused.value.response.status_code == 404
            other = token(workspaces=[2])
            async with websockets.connect(f"{base}/o2/observe?token={other}") as ws:
                got = await receive(ws, 6)  # a finished call: all of it, then closed
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), WAIT)
            assert [m["type"] for m in got] == [
                "status",
                "status",
                "dtmf",
                "agent_transcript",
                "user_transcript",
                "status",
            ]
            assert got[-1]["status"] == "completed"
            async with websockets.connect(f"{base}/o2/observe?token=garbage") as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), WAIT)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
