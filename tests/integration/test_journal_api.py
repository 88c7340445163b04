"""The telephony REST endpoints (shared/seeds/telephony-api.txt) of a running worker on a real
PostgreSQL: the journal's shape, totals and filters, delta pagination, the JWT and workspace
checks, one call's detail and events, the recording with HTTP Range, placing a call (through a
SIP trunk, and the error mapping with a fake ``place_call``), the settings, the ``token`` and
``call`` commands, and schemathesis over the whole OpenAPI schema (no request gets a 500)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import lameenc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.harness import running_worker
from tests.integration.test_store import call_events
from tests.sipp import free_port
from worker.api.app import create_app
from worker.api.auth import TokenVerifier
from worker.api.context import ApiContext
from worker.api.hub import Hub
from worker.app import Worker
from worker.cli import main as cli_main
from worker.config import load_settings
from worker.errors import ConfigError, LocalError, RemoteError
from worker.legs import CallFailedError, LegEnd

SECRET = "journal-api-test-secret-of-a-decent-length"
WAIT = 10.0
ECHO = [{"match": "*", "action": "echo"}]
JOURNAL_KEYS = {"total", "total_duration_sec", "max_id", "calls", "campaigns"}
CALL_KEYS = {
    "id",
    "call_id",
    "status",
    "subscriber_phone",
    "duration_sec",
    "summary",
    "transcript",
    "created_at",
    "conversation_id",
    "has_audio",
    "parent_call_id",
    "node_id",
    "direction",
}
CAMPAIGN_KEYS = {
    "call_id",
    "name",
    "status",
    "numbers_count",
    "child_count",
    "success_count",
    "failed_count",
    "total_duration_sec",
}


def token(uid: str = "u1", workspaces: list[int] | None = None, **claims: Any) -> str:
    body: dict[str, Any] = {
        "uid": uid,
        "workspaces": [1] if workspaces is None else workspaces,
        "exp": time.time() + 600,
    }
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


def auth(tok: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok or token()}"}


def api_port(worker: Worker) -> int:
    assert worker.backend is not None
    assert worker.backend.api is not None
    return worker.backend.api.port


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    database_url: str,
    trunks: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[Worker, httpx.AsyncClient]]:
    """A worker with the store and the API, and an httpx client of its API (no token set)."""
    async with (
        running_worker(
            tmp_path / "data", ECHO, trunks, database_url=database_url, jwt_secret=SECRET
        ) as worker,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port(worker)}", timeout=WAIT) as client,
    ):
        yield worker, client


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def add_call(
    conn: Any,
    call_id: str,
    *,
    workspace: int = 1,
    node: str | None = "pbx",
    status: str = "completed",
    duration: int = 10,
    created: str = "2026-05-04T10:00:00+00:00",
    parent: str | None = None,
    recording: str | None = None,
    direction: str = "inbound",
) -> int:
    """A journal row written directly (every column under the test's control); its id."""
    turns = [{"role": "agent", "message": "Hello!", "time_in_call_secs": 0}]
    value = await conn.fetchval(
        "INSERT INTO calls (call_id, workspace_id, node_id, direction, status, subscriber_phone,"
        " duration_sec, summary, transcript, created_at, parent_call_id, recording_path,"
        " has_audio, conversation_id)"
        " VALUES ($1, $2, $3, $4, $5, '+15551234567', $6, 'a summary', $7::jsonb, $8, $9, $10,"
        " $10::text IS NOT NULL, 'conv_' || $1) RETURNING id",
        call_id,
        workspace,
        node,
        direction,
        status,
        duration,
        json.dumps(turns),
        datetime.fromisoformat(created),
        parent,
        recording,
    )
    return int(value)


async def flushed(worker: Worker) -> None:
    assert worker.backend is not None
    assert worker.backend.writer is not None
    assert await worker.backend.writer.flush(WAIT)


async def get_json(
    client: httpx.AsyncClient, url: str, expect: int = 200, **params: Any
) -> dict[str, Any]:
    response = await client.get(url, params=params, headers=auth())
    assert response.status_code == expect, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def eventually_json(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """The body of the first 200 for ``url`` (an event on its way to the journal)."""
    deadline = time.monotonic() + WAIT
    while True:
        response = await client.get(url, headers=auth())
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            body = response.json()
            assert isinstance(body, dict)
            return body
        await asyncio.sleep(0.05)


def call_ids(journal: dict[str, Any]) -> list[str]:
    return [c["call_id"] for c in journal["calls"]]


class TestJournalShape:
    async def test_seed_shape_totals_and_campaigns(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (_, client), database(database_url) as db:
            await db.execute(
                "INSERT INTO campaigns (call_id, workspace_id, name, status, numbers_count)"
                " VALUES ('camp_1', 1, 'VIP outreach', 'completed', 50)"
            )
            await add_call(db, "a", duration=5, parent="camp_1")
            await add_call(db, "b", duration=7, status="failed", parent="camp_1")
            await add_call(db, "c", duration=11, status="busy", parent="camp_1", node="other")
            await add_call(db, "theirs", workspace=2, duration=100)
            body = await get_json(client, "/telephony/journal", workspace_id=1, limit=1)
        assert set(body) == JOURNAL_KEYS
        assert (body["total"], body["total_duration_sec"]) == (3, 23)  # all matches, not the page
        assert call_ids(body) == ["c"]  # newest first
        call = body["calls"][0]
        assert set(call) == CALL_KEYS
        assert body["max_id"] == call["id"]
        assert call["created_at"] == "2026-05-04T10:00:00Z"
        assert call["transcript"] == [
            {"role": "agent", "message": "Hello!", "time_in_call_secs": 0}
        ]
        assert (call["direction"], call["node_id"], call["has_audio"]) == (
            "inbound",
            "other",
            False,
        )
        assert body["campaigns"] == [
            {
                "call_id": "camp_1",
                "name": "VIP outreach",
                "status": "completed",
                "numbers_count": 50,
                "child_count": 3,
                "success_count": 1,
                "failed_count": 2,
                "total_duration_sec": 23,
            }
        ]
        assert set(body["campaigns"][0]) == CAMPAIGN_KEYS

    async def test_written_by_published_events(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (worker, client):
            for event in call_events("ev1"):
                worker.bus.publish(event)
            await flushed(worker)
            body = await get_json(client, "/telephony/journal")  # the token's only workspace
        assert body["total"] == 1
        call = body["calls"][0]
        assert (call["call_id"], call["status"], call["duration_sec"]) == ("ev1", "completed", 3)
        assert [t["message"] for t in call["transcript"]] == ["Hello!", "Hi."]
        assert call["created_at"].endswith("Z")
        assert body["campaigns"] == []

    async def test_empty_journal(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (_, client):
            body = await get_json(client, "/telephony/journal", workspace_id=1)
        assert body == {
            "total": 0,
            "total_duration_sec": 0,
            "max_id": 0,
            "calls": [],
            "campaigns": [],
        }


class TestJournalFilters:
    @pytest.fixture
    async def client(self, tmp_path: Path, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
        async with serving(tmp_path, database_url) as (_, client), database(database_url) as db:
            await add_call(db, "d1", created="2026-05-01T23:59:59+00:00", node="pbx")
            await add_call(db, "d2", created="2026-05-02T00:00:00+00:00", node="agent")
            await add_call(db, "d3", created="2026-05-02T12:00:00+00:00", status="failed")
            await add_call(db, "d4", created="2026-05-03T08:00:00+00:00", status="no-answer")
            yield client

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"node_id": "agent"}, ["d2"]),
            ({"node_id": "pbx"}, ["d4", "d3", "d1"]),
            ({"date_from": "2026-05-02"}, ["d4", "d3", "d2"]),
            ({"date_to": "2026-05-02"}, ["d3", "d2", "d1"]),  # a date: the whole day
            ({"date_from": "2026-05-02", "date_to": "2026-05-02"}, ["d3", "d2"]),
            ({"date_from": "2026-05-02T12:00:00Z"}, ["d4", "d3"]),
            ({"date_to": "2026-05-02T12:00:00"}, ["d3", "d2", "d1"]),  # naive: UTC
            ({"date_to": "2026-05-02T13:00:00+02:00"}, ["d2", "d1"]),
            ({"status": "failed,no-answer"}, ["d4", "d3"]),
            ({"status": " completed , "}, ["d2", "d1"]),
            ({"limit": 2}, ["d4", "d3"]),
        ],
    )
    async def test_filter(
        self, client: httpx.AsyncClient, params: dict[str, Any], expected: list[str]
    ) -> None:
        body = await get_json(client, "/telephony/journal", workspace_id=1, **params)
        assert call_ids(body) == expected
        if "limit" not in params:
            assert body["total"] == len(expected)
            assert body["total_duration_sec"] == 10 * len(expected)
        else:
            assert body["total"] == 4

    async def test_since_id_narrows_the_page_not_the_totals(
        self, client: httpx.AsyncClient
    ) -> None:
        everything = await get_json(client, "/telephony/journal", workspace_id=1)
        ids = sorted(c["id"] for c in everything["calls"])
        newer = await get_json(client, "/telephony/journal", workspace_id=1, since_id=ids[1])
        assert call_ids(newer) == ["d4", "d3"]
        assert (newer["total"], newer["max_id"]) == (4, ids[-1])

    async def test_per_node_delta_pagination(
        self, client: httpx.AsyncClient, database_url: str
    ) -> None:
        first = await get_json(client, "/telephony/journal/pbx", workspace_id=1)
        assert call_ids(first) == ["d4", "d3", "d1"]
        again = await get_json(
            client, "/telephony/journal/pbx", workspace_id=1, since_id=first["max_id"]
        )
        assert (again["calls"], again["max_id"]) == ([], first["max_id"])
        async with database(database_url) as db:
            await add_call(db, "d5", node="pbx")
            await add_call(db, "d6", node="agent")
        delta = await get_json(
            client, "/telephony/journal/pbx", workspace_id=1, since_id=first["max_id"]
        )
        assert call_ids(delta) == ["d5"]
        assert delta["max_id"] == delta["calls"][0]["id"]

    @pytest.mark.parametrize(
        ("params", "named"),
        [
            ({"date_from": "yesterday"}, "date_from"),
            ({"date_to": "2026-13-01"}, "date_to"),
            ({"date_to": "0001-01-01T00:00:00+14:00"}, "date_to"),
            ({"status": "completed,done"}, "'done'"),
            ({"limit": 0}, "limit"),
            ({"limit": 1001}, "limit"),
            ({"since_id": -1}, "since_id"),
            ({"workspace_id": 0}, "workspace_id"),
            ({"workspace_id": "one"}, "workspace_id"),
        ],
    )
    async def test_bad_filter_is_422_with_detail(
        self, client: httpx.AsyncClient, params: dict[str, Any], named: str
    ) -> None:
        body = await get_json(client, "/telephony/journal", 422, **{"workspace_id": 1, **params})
        assert named in body["detail"]
        assert set(body) == {"detail"}


class TestAuthorisation:
    async def test_workspace_required_when_the_caller_has_several(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with serving(tmp_path, database_url) as (_, client):
            response = await client.get(
                "/telephony/journal", headers=auth(token(workspaces=[1, 2]))
            )
            operator = await client.get(
                "/telephony/journal", headers=auth(token(workspaces=[], role="operator"))
            )
        assert (response.status_code, response.json()) == (
            422,
            {"detail": "workspace_id is required"},
        )
        assert operator.status_code == 422

    async def test_non_member_403_and_token_checks(self, tmp_path: Path, database_url: str) -> None:
        other = jwt.encode({"uid": "u", "workspaces": [1], "exp": time.time() + 60}, "x" * 40)
        async with serving(tmp_path, database_url) as (_, client):
            forbidden = await client.get("/telephony/journal/pbx?workspace_id=2", headers=auth())
            missing = await client.get("/telephony/journal?workspace_id=1")
            bad = await client.get("/telephony/journal?workspace_id=1", headers=auth(other))
            query = await client.get(f"/telephony/journal?workspace_id=1&token={token()}")
            operator = await client.get(
                "/telephony/journal?workspace_id=9", headers=auth(token(role="operator"))
            )
        assert (forbidden.status_code, forbidden.json()) == (
            403,
            {"detail": "not a member of workspace 2"},
        )
        assert missing.status_code == 401
        assert "token is required" in missing.json()["detail"]
        assert bad.status_code == 401
        assert query.status_code == 200
        assert operator.status_code == 200


class TestCallDetailAndEvents:
    async def test_detail_of_a_published_call(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (worker, client):
            for event in call_events("det1"):
                worker.bus.publish(event)
            await flushed(worker)
            detail = await get_json(client, "/telephony/journal/call/det1")
        assert set(detail) >= CALL_KEYS
        assert detail["call_id"] == "det1"
        assert [t["role"] for t in detail["transcript"]] == ["agent", "user"]
        assert detail["sip_status"] == 200
        assert detail["answered_at"].endswith("Z")
        assert detail["ended_at"].endswith("Z")
        assert (detail["from_number"], detail["to_number"], detail["route"]) == (
            "+1555",
            "100",
            "*",
        )
        assert detail["has_audio"] is True  # the journal says so ...
        assert (detail["audio_available"], detail["audio_url"]) == (False, None)  # ... no file

    async def test_unknown_and_foreign_calls_are_404(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with serving(tmp_path, database_url) as (_, client), database(database_url) as db:
            await add_call(db, "foreign", workspace=2)
            answers = [
                await client.get(url, headers=auth())
                for url in (
                    "/telephony/journal/call/nope",
                    "/telephony/journal/call/foreign",
                    "/telephony/calls/nope/events",
                    "/telephony/calls/foreign/events",
                    "/telephony/calls/nope/audio",
                    "/telephony/calls/foreign/audio",
                )
            ]
            theirs = await client.get(
                "/telephony/journal/call/foreign", headers=auth(token(workspaces=[2]))
            )
        assert [(a.status_code, a.json()) for a in answers] == [
            (404, {"detail": "call not found"})
        ] * len(answers)
        assert theirs.status_code == 200

    async def test_events_in_order_with_ids_and_after_id(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with serving(tmp_path, database_url) as (worker, client):
            for event in call_events("evs"):
                worker.bus.publish(event)
            await flushed(worker)
            body = await get_json(client, "/telephony/calls/evs/events")
            events = body["events"]
            later = await get_json(
                client, "/telephony/calls/evs/events", after_id=events[3]["id"], limit=2
            )
        assert body["call_id"] == "evs"
        assert [e["type"] for e in events] == [e.type for e in call_events("evs")]
        ids = [e["id"] for e in events]
        assert ids == sorted(ids)
        assert events[3]["digit"] == "5"
        assert events[0]["from"] == "+1555"
        assert all(e["created_at"].endswith("Z") for e in events)
        assert [e["id"] for e in later["events"]] == ids[4:6]


def small_mp3() -> bytes:
    """One second of real MP3 (8 kHz mono silence)."""
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(32)
    encoder.set_in_sample_rate(8000)
    encoder.set_channels(1)
    encoder.set_quality(7)
    return bytes(encoder.encode(b"\x00\x00" * 8000) + encoder.flush())


class TestAudio:
    @pytest.fixture
    async def served(
        self, tmp_path: Path, database_url: str
    ) -> AsyncIterator[tuple[httpx.AsyncClient, bytes]]:
        mp3 = small_mp3()
        async with (
            serving(tmp_path, database_url) as (worker, client),
            database(database_url) as db,
        ):
            data_dir = worker.settings.data_dir
            recordings = data_dir / "recordings"
            recordings.mkdir(exist_ok=True)
            (recordings / "rec.mp3").write_bytes(mp3)
            (recordings / "empty.mp3").write_bytes(b"")
            outside = tmp_path / "outside.mp3"
            outside.write_bytes(mp3)
            (recordings / "link.mp3").symlink_to(outside)
            await add_call(db, "rec", recording=str(recordings / "rec.mp3"))
            await add_call(db, "empty", recording=str(recordings / "empty.mp3"))
            await add_call(db, "outside", recording=str(outside))
            await add_call(db, "dotdot", recording=str(recordings / ".." / "api-secret"))
            await add_call(db, "secret", recording=str(data_dir / "api-secret"))
            await add_call(db, "link", recording=str(recordings / "link.mp3"))
            await add_call(db, "gone", recording=str(recordings / "gone.mp3"))
            await add_call(db, "none")
            yield client, mp3

    async def test_whole_file_with_the_token_in_the_query(
        self, served: tuple[httpx.AsyncClient, bytes]
    ) -> None:
        client, mp3 = served
        response = await client.get(f"/telephony/calls/rec/audio?token={token()}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["content-length"] == str(len(mp3))
        assert response.content == mp3
        assert mp3[:3] == b"ID3" or mp3[0] == 0xFF  # a real MP3

    @pytest.mark.parametrize(
        ("header", "first", "last"),
        [
            ("bytes=0-99", 0, 99),
            ("bytes=100-", 100, None),
            ("bytes=-50", -50, None),
            ("bytes=10-10", 10, 10),
            ("bytes=20-99999999", 20, None),  # clamped to the end
            ("bytes=-99999999", 0, None),  # a suffix longer than the file: all of it
            ("BYTES=5-9", 5, 9),
        ],
    )
    async def test_one_range_is_206(
        self, served: tuple[httpx.AsyncClient, bytes], header: str, first: int, last: int | None
    ) -> None:
        client, mp3 = served
        response = await client.get(
            "/telephony/calls/rec/audio", headers={**auth(), "Range": header}
        )
        size = len(mp3)
        start = first % size
        end = size - 1 if last is None else last
        assert response.status_code == 206
        assert response.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert response.headers["content-length"] == str(end - start + 1)
        assert response.headers["accept-ranges"] == "bytes"
        assert response.headers["content-type"] == "audio/mpeg"
        assert response.content == mp3[start : end + 1]

    @pytest.mark.parametrize("header", ["bytes=99999-", "bytes=-0", "bytes=99999-100000"])
    async def test_unsatisfiable_is_416(
        self, served: tuple[httpx.AsyncClient, bytes], header: str
    ) -> None:
        client, mp3 = served
        response = await client.get(
            "/telephony/calls/rec/audio", headers={**auth(), "Range": header}
        )
        assert response.status_code == 416
        assert response.headers["content-range"] == f"bytes */{len(mp3)}"
        assert "not satisfiable" in response.json()["detail"]

    async def test_any_range_of_an_empty_file_is_416(
        self, served: tuple[httpx.AsyncClient, bytes]
    ) -> None:
        client, _ = served
        ranged = await client.get(
            "/telephony/calls/empty/audio", headers={**auth(), "Range": "bytes=0-"}
        )
        whole = await client.get("/telephony/calls/empty/audio", headers=auth())
        assert (ranged.status_code, ranged.headers["content-range"]) == (416, "bytes */0")
        assert (whole.status_code, whole.content) == (200, b"")

    @pytest.mark.parametrize(
        "header", ["bytes=abc", "items=0-5", "bytes=0-1,5-9", "bytes=9-2", "bytes=-", "bytes=1-2-3"]
    )
    async def test_ignored_ranges_give_the_whole_file(
        self, served: tuple[httpx.AsyncClient, bytes], header: str
    ) -> None:
        client, mp3 = served
        response = await client.get(
            "/telephony/calls/rec/audio", headers={**auth(), "Range": header}
        )
        assert response.status_code == 200
        assert response.content == mp3

    @pytest.mark.parametrize("call_id", ["outside", "dotdot", "secret", "link", "gone", "none"])
    async def test_nothing_outside_the_recordings_and_no_missing_file(
        self, served: tuple[httpx.AsyncClient, bytes], call_id: str
    ) -> None:
        client, _ = served
        response = await client.get(f"/telephony/calls/{call_id}/audio", headers=auth())
        assert (response.status_code, response.json()) == (
            404,
            {"detail": "no recording for this call"},
        )

    async def test_detail_names_the_audio(self, served: tuple[httpx.AsyncClient, bytes]) -> None:
        client, _ = served
        rec = await get_json(client, "/telephony/journal/call/rec")
        outside = await get_json(client, "/telephony/journal/call/outside")
        assert (rec["audio_available"], rec["audio_url"]) == (True, "/telephony/calls/rec/audio")
        assert (outside["has_audio"], outside["audio_available"]) == (True, False)


class TestPlaceCall:
    async def test_through_a_sip_trunk(self, tmp_path: Path, database_url: str) -> None:
        trunks = {"nowhere": {"host": "127.0.0.1", "port": free_port()}}
        async with serving(tmp_path, database_url, trunks) as (worker, client):
            body = {"number": "+15550001111", "trunk": "nowhere", "route": "*"}
            response = await client.post("/telephony/calls", json=body, headers=auth())
            assert response.status_code == 201, response.text
            placed = response.json()
            assert placed["status"] == "queued"
            call_id = placed["call_id"]
            assert call_id in worker.sessions or any(r.call_sid == call_id for r in worker.results)
            detail = await eventually_json(client, f"/telephony/journal/call/{call_id}")
        assert (detail["direction"], detail["subscriber_phone"]) == ("outbound", "+15550001111")

    @pytest.mark.parametrize(
        ("body", "status", "detail"),
        [
            ({"number": "+1555", "trunk": "missing", "route": "*"}, 422, "no trunk named"),
            ({"number": "+1555", "trunk": "nowhere", "route": "nope"}, 422, "no route"),
            ({"number": "+1555", "trunk": "nowhere"}, 422, "no agent route"),
            ({"number": "555-1234", "trunk": "nowhere"}, 422, "number"),
            ({"number": "+" + "1" * 32, "trunk": "nowhere"}, 422, "number"),
            ({"number": "+1555", "trunk": "a b"}, 422, "trunk"),
            ({"number": "+1555", "trunk": "t", "caller_id": "x\r\nVia: evil"}, 422, "caller_id"),
            ({"number": "+1555", "trunk": "t", "extra": 1}, 422, "extra"),
            ({"number": "+1555", "trunk": "t", "route": "*", "workspace_id": 2}, 403, "member"),
        ],
    )
    async def test_refusals(
        self, tmp_path: Path, database_url: str, body: dict[str, Any], status: int, detail: str
    ) -> None:
        trunks = {"nowhere": {"host": "127.0.0.1", "port": free_port()}}
        async with serving(tmp_path, database_url, trunks) as (_, client):
            response = await client.post("/telephony/calls", json=body, headers=auth())
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"]

    async def test_no_token_is_401(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (_, client):
            response = await client.post("/telephony/calls", json={"number": "1", "trunk": "t"})
        assert response.status_code == 401


PlaceCall = Callable[[str, str, str | None, str | None], Awaitable[str]]


def failing(exc: Exception) -> PlaceCall:
    async def place(number: str, trunk: str, route: str | None, caller_id: str | None) -> str:
        raise exc

    return place


async def recorded(number: str, trunk: str, route: str | None, caller_id: str | None) -> str:
    return f"call-{number}-{trunk}-{route}-{caller_id}"


class TestOversizedAndMalformedRequests:
    """Every bad request gets a 4xx with ``{"detail": ...}``: a body over
    ``api.max_request_bytes`` (said up front, or streamed chunked with no length), JSON that
    does not parse, a body of the wrong shape; and the worker serves the next request."""

    async def test_bodies_over_the_limit_are_413(self, tmp_path: Path, database_url: str) -> None:
        async with serving(tmp_path, database_url) as (worker, client):
            limit = worker.settings.api.max_request_bytes
            big = b'{"number": "+1555", "trunk": "t", "pad": "' + b"x" * limit + b'"}'
            said = await client.post(
                "/telephony/calls",
                content=big,
                headers={**auth(), "content-type": "application/json"},
            )

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(big), 64 * 1024):
                    yield big[start : start + 64 * 1024]

            streamed = await client.post(
                "/webhooks",
                content=chunks(),
                headers={**auth(), "content-type": "application/json"},
            )
            after = await client.get("/telephony/journal", headers=auth())
        expected = {"detail": f"request body over {limit} bytes"}
        assert (said.status_code, said.json()) == (413, expected)
        assert "content-length" not in streamed.request.headers  # really chunked
        assert (streamed.status_code, streamed.json()) == (413, expected)
        assert after.status_code == 200

    @pytest.mark.parametrize(
        ("path", "content", "detail"),
        [
            ("/telephony/calls", b'{"number": "+1555", "trunk":', "JSON"),
            ("/telephony/calls", b"\xff\xfe not utf-8", "JSON"),
            ("/telephony/calls", b'["+1555", "t"]', "dictionary"),
            ("/webhooks", b'{"workspace_id": 1, "url": 5}', "url"),
            ("/webhooks", b"", "body"),
        ],
    )
    async def test_malformed_bodies_are_422(
        self, tmp_path: Path, database_url: str, path: str, content: bytes, detail: str
    ) -> None:
        async with serving(tmp_path, database_url) as (_, client):
            response = await client.post(
                path, content=content, headers={**auth(), "content-type": "application/json"}
            )
        assert response.status_code == 422, response.text
        body = response.json()
        assert set(body) == {"detail"}
        assert isinstance(body["detail"], str)
        assert detail.lower() in body["detail"].lower(), body


class TestPlaceCallErrors:
    """The handler's mapping of the worker's answers, with a stand-in ``place_call``."""

    @contextlib.asynccontextmanager
    async def app_client(
        self, tmp_path: Path, database_url: str, place: PlaceCall | None
    ) -> AsyncIterator[httpx.AsyncClient]:
        settings = load_settings(
            None,
            data_dir=str(tmp_path),
            api={"jwt_secret": SECRET},
            routes=[{"match": "*", "action": "echo", "workspace_id": 3}],
        )
        pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
        context = ApiContext(
            settings=settings,
            verifier=TokenVerifier(settings.api, settings.data_dir),
            pool=pool,
            hub=Hub(pool, lambda: asyncpg.connect(database_url), 10),
            place_call=place,
        )
        transport = httpx.ASGITransport(app=create_app(context))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                yield client
        finally:
            await pool.close()

    @pytest.mark.parametrize(
        ("place", "status", "detail"),
        [
            (None, 503, "does not place calls"),
            (failing(ConfigError("no trunk named 'x'")), 422, "no trunk named 'x'"),
            (failing(RemoteError("Asterisk said no")), 502, "Asterisk said no"),
            (failing(CallFailedError(LegEnd("busy", 486))), 502, "busy"),
            (failing(LocalError("no free RTP port")), 503, "no free RTP port"),
        ],
    )
    async def test_mapping(
        self,
        tmp_path: Path,
        database_url: str,
        place: PlaceCall | None,
        status: int,
        detail: str,
    ) -> None:
        body = {"number": "+1555", "trunk": "t", "route": "*"}
        async with self.app_client(tmp_path, database_url, place) as client:
            response = await client.post(
                "/telephony/calls", json=body, headers=auth(token(workspaces=[3]))
            )
        assert response.status_code == status
        assert detail in response.json()["detail"]

    async def test_arguments_and_the_routes_workspace(
        self, tmp_path: Path, database_url: str
    ) -> None:
        body = {"number": "+1555", "trunk": "t", "route": "*", "caller_id": "100"}
        async with self.app_client(tmp_path, database_url, recorded) as client:
            member = await client.post(
                "/telephony/calls", json=body, headers=auth(token(workspaces=[3]))
            )
            outsider = await client.post("/telephony/calls", json=body, headers=auth())
            mismatch = await client.post(
                "/telephony/calls",
                json={**body, "workspace_id": 1},
                headers=auth(token(role="operator")),
            )
        assert (member.status_code, member.json()) == (
            201,
            {"call_id": "call-+1555-t-*-100", "status": "queued"},
        )
        assert (outsider.status_code, outsider.json()) == (
            403,
            {"detail": "not a member of workspace 3"},
        )
        assert mismatch.status_code == 422
        assert "in workspace 3" in mismatch.json()["detail"]


class TestSettings:
    async def test_defaults_without_secrets(
        self, tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AISPINNER_ARI__PASSWORD", "ari-password-1")
        monkeypatch.setenv("AISPINNER_ARI__URL", "http://who:url-password-2@127.0.0.1:8088/")
        trunk = {"host": "127.0.0.1", "username": "u", "password": "trunk-password-3"}
        async with serving(tmp_path, database_url, {"t1": trunk}) as (w, client):
            body = await get_json(client, "/telephony/settings")
        assert body["ingress"] == ["sip"]
        assert body["sip"]["port"] == w.settings.sip.port
        assert body["ari"]["url"] == "http://127.0.0.1:8088/"
        assert body["ari"]["app"] == "aispinner"
        assert body["ari"]["media_format"] == "slin16"
        assert body["trunks"] == ["t1"]
        text = json.dumps(body)
        assert "password" not in text
        assert w.settings.ari.password == "ari-password-1"  # the setting was there, not shown
        assert all(word not in text for word in (SECRET, "who", "-1", "-2", "-3"))


def write_config(path: Path, data_dir: Path, **api: str) -> Path:
    lines = [f'data_dir = "{data_dir}"', "[api]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in api.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class TestCli:
    def test_token(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path / "w.toml", tmp_path / "data", jwt_secret=SECRET)
        argv = ["--config", str(config), "token", "--uid", "ann", "--workspace", "3"]
        code = cli_main([*argv, "--workspace", "4", "--operator", "--hours", "2"])
        assert code == 0
        claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
        assert (claims["uid"], claims["workspaces"], claims["role"]) == ("ann", [3, 4], "operator")
        assert abs(claims["exp"] - (time.time() + 7200)) < 60

    @pytest.mark.parametrize(
        ("extra", "complaint"),
        [([], "--workspace"), (["--operator", "--hours", "0"], "--hours")],
    )
    def test_token_refusals(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], complaint: str
    ) -> None:
        config = write_config(tmp_path / "w.toml", tmp_path / "data", jwt_secret=SECRET)
        assert cli_main(["--config", str(config), "token", "--uid", "ann", *extra]) == 2
        assert complaint in capsys.readouterr().err

    def test_token_with_only_a_public_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        config = write_config(tmp_path / "w.toml", tmp_path / "data", jwt_public_key=pem.decode())
        with pytest.raises(SystemExit) as exited:
            cli_main(["--config", str(config), "token", "--uid", "ann", "--workspace", "1"])
        assert exited.value.code == 2
        assert "private key" in capsys.readouterr().err

    async def test_call_through_a_running_worker(
        self, tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path / "w.toml", tmp_path / "cli", jwt_secret=SECRET)
        trunks = {"nowhere": {"host": "127.0.0.1", "port": free_port()}}
        async with serving(tmp_path, database_url, trunks) as (worker, _):
            api = f"http://127.0.0.1:{api_port(worker)}"
            argv = ["--config", str(config), "call", "+15550002222", "--trunk", "nowhere"]
            placed = await asyncio.to_thread(cli_main, [*argv, "--route", "*", "--api", api])
            out = capsys.readouterr().out.strip()
            refused = await asyncio.to_thread(
                cli_main, [*argv[:-1], "missing", "--route", "*", "--api", api]
            )
            err = capsys.readouterr().err
        assert placed == 0
        assert out in worker.sessions or any(r.call_sid == out for r in worker.results)
        assert refused == 1
        assert "422" in err
        assert "no trunk named 'missing'" in err

    def test_call_with_nothing_listening(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path / "w.toml", tmp_path / "data", jwt_secret=SECRET)
        api = f"http://127.0.0.1:{free_port()}"
        argv = ["--config", str(config), "call", "+1555", "--trunk", "t", "--api", api]
        assert cli_main(argv) == 1
        assert "cannot reach the API" in capsys.readouterr().err


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SCHEMATHESIS_S = 60.0
"""The bound on the run (about 10 s here)."""
FUZZ_CONFIG = """
# Half the call ids schemathesis sends are calls that exist (one with a recording, one with
# events), so the audio, detail and events handlers run past their 404.
[dictionaries.calls]
values = ["fuzz", "fuzz-events"]

[parameters]
"path.call_id" = { dictionary = "calls", probability = 0.5 }
"""


class TestOpenApiFuzz:
    """schemathesis generates requests (valid and invalid) for every operation of the worker's
    ``/openapi.json`` with an operator's token and checks that none gets a 5xx."""

    async def test_no_request_gets_a_server_error(self, tmp_path: Path, database_url: str) -> None:
        async with (
            serving(tmp_path, database_url) as (worker, client),
            database(database_url) as db,
        ):
            recordings = worker.settings.data_dir / "recordings"
            recordings.mkdir(exist_ok=True)
            (recordings / "f.mp3").write_bytes(small_mp3())
            await add_call(db, "fuzz", recording=str(recordings / "f.mp3"))
            for event in call_events("fuzz-events"):
                worker.bus.publish(event)
            await flushed(worker)
            schema = (await client.get("/openapi.json")).json()
            assert "/telephony/journal" in schema["paths"]
            config = tmp_path / "schemathesis.toml"
            config.write_text(FUZZ_CONFIG, encoding="utf-8")
            args = [
                str(SCHEMATHESIS),
                f"--config-file={config}",
                "run",
                f"http://127.0.0.1:{api_port(worker)}/openapi.json",
                "--checks=not_a_server_error",
                f"--header=Authorization: Bearer {token('fuzz', [1], role='operator')}",
                "--max-examples=25",
                "--seed=20260504",
                "--workers=1",
                "--phases=examples,coverage,fuzzing",
                "--generation-database=none",
                "--request-timeout=10",
                "--exclude-path=/events/{workspace_id}/stream",  # never ends
                "--no-color",
            ]
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), SCHEMATHESIS_S)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            took = time.monotonic() - started
        report = out.decode(errors="replace")
        assert proc.returncode == 0, report[-6000:]
        operations = sum(len(ops) for ops in schema["paths"].values()) - 1  # SSE left out
        tested = re.search(r"Tested:\s+(\d+)", report)
        assert tested is not None, report[-2000:]
        assert int(tested.group(1)) == operations
        assert took < SCHEMATHESIS_S
