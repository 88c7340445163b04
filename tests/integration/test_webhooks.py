"""Signed webhooks on a real PostgreSQL to a real HTTP receiver on 127.0.0.1 (aiohttp): an
endpoint registered through the API gets a call's events signed (checked with the reference
``standardwebhooks`` library), in order, each once; retries with backoff after 5xx and after a
receiver that hangs; the dead letter once the retry window is over, and replay; type filters;
two dispatchers on one database sending each delivery exactly once; events written while no
dispatcher ran (a killed worker) sent by the next one; the API's refusals."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.e2e.harness import running_worker
from tests.integration.test_store import call_events
from worker.app import Worker
from worker.backend import Backend
from worker.config import EventSettings
from worker.events import models as ev
from worker.events.webhooks import WebhookDispatcher

SECRET = "webhook-test-secret-of-a-decent-length"
WAIT = 10.0
FAST = {"base_backoff_s": 0.05, "poll_s": 0.05}
"""Dispatcher timings that keep the tests short."""


def token(workspaces: list[int] | None = None, **claims: Any) -> str:
    body: dict[str, Any] = {"uid": "u1", "workspaces": workspaces or [1], "exp": time.time() + 600}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


# --------------------------------------------------------------------------- the receiver


@dataclass(eq=False)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered_at: float | None = None

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


@dataclass(eq=False)
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request. ``script[path]`` is consumed
    one answer per request (a status, or ``"hang"``: no answer until the server closes);
    afterwards every request gets ``default[path]`` (200 unless set) after ``delay_s``."""

    script: dict[str, list[int | str]] = field(default_factory=dict)
    default: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        body = await request.read()
        received = Received(request.path, dict(request.headers), body, loop.time())
        self.requests.append(received)
        self._arrived.set()
        script = self.script.get(request.path)
        answer: int | str = script.pop(0) if script else self.default.get(request.path, 200)
        if answer == "hang":
            await self._release.wait()
            return web.Response(status=200)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        assert isinstance(answer, int)
        received.answered_at = loop.time()
        return web.Response(status=answer, text=f"answer {answer}")

    async def wait(self, path: str, count: int, within: float = WAIT) -> list[Received]:
        """The first ``count`` requests to ``path`` (fails with what came if fewer arrive)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.at(path)) < count:
            left = deadline - loop.time()
            if left <= 0:
                got = [r.json.get("type") for r in self.at(path)]
                raise AssertionError(f"{path}: {len(got)} of {count} requests: {got}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return self.at(path)[:count]


# --------------------------------------------------------------------------- the worker


@dataclass(eq=False)
class Env:
    worker: Worker
    api: httpx.AsyncClient
    receiver: Receiver
    database_url: str

    @property
    def backend(self) -> Backend:
        assert self.worker.backend is not None
        return self.worker.backend

    async def register(self, path: str, events: list[str] | None = None, **body: Any) -> Any:
        response = await self.api.post(
            "/webhooks",
            json={"workspace_id": 1, "url": self.receiver.url(path), "events": events or []} | body,
        )
        assert response.status_code == 201, response.text
        return response.json()

    async def publish(self, events: list[ev.Event]) -> None:
        for event in events:
            self.worker.bus.publish(event)
        assert self.backend.writer is not None
        assert await self.backend.writer.flush(WAIT)

    async def use_dispatcher(
        self, worker_id: str | None = None, **options: Any
    ) -> WebhookDispatcher:
        """Replace the worker's dispatcher by one with these settings and timings."""
        await self.stop_dispatcher()
        settings = {k: options.pop(k) for k in list(options) if k.startswith("webhook_")}
        dispatcher = WebhookDispatcher(
            self.backend.pool,
            EventSettings(**settings),
            worker_id or self.worker.worker_id,
            **(FAST | options),
        )
        dispatcher.start()
        self.backend.webhooks = dispatcher
        return dispatcher

    async def stop_dispatcher(self) -> None:
        """No dispatcher in this worker (as if it had been killed): deliveries wait."""
        if self.backend.webhooks is not None:
            await self.backend.webhooks.close()
            self.backend.webhooks = None

    async def deliveries(
        self, endpoint_id: int, status: str | None = None, headers: dict[str, str] | None = None
    ) -> list[Any]:
        query = {"status": status} if status else {}
        response = await self.api.get(
            f"/webhooks/{endpoint_id}/deliveries", params=query, headers=headers
        )
        assert response.status_code == 200, response.text
        return sorted(response.json(), key=lambda d: d["event_id"])

    async def wait_deliveries(
        self,
        endpoint_id: int,
        done: Callable[[list[Any]], bool],
        within: float = WAIT,
        what: str = "",
        headers: dict[str, str] | None = None,
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            rows = await self.deliveries(endpoint_id, headers=headers)
            if rows and done(rows):
                return rows
            if loop.time() > deadline:
                raise AssertionError(f"not {what or 'done'} within {within} s: {rows}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def env(tmp_path: Path, database_url: str) -> AsyncIterator[Env]:
    async with (
        Receiver() as receiver,
        running_worker(
            tmp_path / "w",
            [{"match": "*", "action": "echo"}],
            database_url=database_url,
            jwt_secret=SECRET,
        ) as worker,
    ):
        assert worker.backend is not None
        assert worker.backend.api is not None
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{worker.backend.api.port}",
            headers={"authorization": f"Bearer {token()}"},
            timeout=WAIT,
        ) as api:
            yield Env(worker, api, receiver, database_url)


def verified(received: list[Received], secret: str) -> list[dict[str, Any]]:
    """Each request's body, checked against its Standard Webhooks signature."""
    out = []
    for request in received:
        assert request.headers["Content-Type"] == "application/json"
        body = Webhook(secret).verify(request.body, request.headers)
        assert isinstance(body, dict)
        out.append(body)
    return out


def one_at_a_time(received: list[Received]) -> None:
    """Each request came after the one before it was answered."""
    for before, after in itertools.pairwise(received):
        assert before.answered_at is not None
        assert after.at >= before.answered_at, "two requests in flight to one endpoint"


def all_delivered(rows: list[Any]) -> bool:
    return all(row["status"] == "delivered" for row in rows)


# --------------------------------------------------------------------------- tests


class TestDelivery:
    async def test_a_calls_events_arrive_signed_in_order_each_once(self, env: Env) -> None:
        env.receiver.delay_s = 0.02  # requests in flight together would overlap
        hook = await env.register("/all")
        assert hook["secret"].startswith("whsec_")
        await env.publish(call_events("c1"))
        types = [e.type for e in call_events("c1")] + ["journal.new"]
        got = verified(await env.receiver.wait("/all", len(types)), hook["secret"])
        assert [body["type"] for body in got] == types
        async with env.backend.pool.acquire() as conn:
            outbox = await conn.fetch("SELECT id, type, payload FROM outbox ORDER BY id")
        assert [body["id"] for body in got] == [row["id"] for row in outbox]
        assert got[0] == {**json.loads(outbox[0]["payload"]), "id": outbox[0]["id"]}
        assert got[-1]["entries"][0]["call_id"] == "c1"
        rows = await env.wait_deliveries(hook["id"], all_delivered, what="delivered")
        received = env.receiver.at("/all")
        one_at_a_time(received)
        assert [r.headers["webhook-id"] for r in received] == [f"msg_{d['id']}" for d in rows]
        assert all(row["attempts"] == 1 and row["last_status"] == 200 for row in rows)
        assert all(row["delivered_at"] is not None for row in rows)
        await asyncio.sleep(0.3)  # nothing more comes
        assert len(env.receiver.at("/all")) == len(types)

    async def test_event_type_filters(self, env: Env) -> None:
        ends = await env.register("/ends", ["call.done", "journal.new"])
        keys = await env.register("/keys", ["call.dtmf"])
        await env.publish(call_events("c1") + call_events("c2"))
        got = verified(await env.receiver.wait("/ends", 4), ends["secret"])
        assert [(b["type"], b.get("call_id")) for b in got] == [
            ("call.done", "c1"),
            ("journal.new", None),
            ("call.done", "c2"),
            ("journal.new", None),
        ]
        got = verified(await env.receiver.wait("/keys", 2), keys["secret"])
        assert [(b["type"], b["digit"]) for b in got] == [("call.dtmf", "5")] * 2
        assert len(await env.deliveries(ends["id"])) == 4  # no rows for the other types
        assert len(await env.deliveries(keys["id"])) == 2

    async def test_a_given_secret_signs(self, env: Env) -> None:
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        hook = await env.register("/mine", ["call.started"], secret=secret)
        assert hook["secret"] == secret
        await env.publish(call_events("c1"))
        assert verified(await env.receiver.wait("/mine", 1), secret)[0]["call_id"] == "c1"


class TestRetries:
    async def test_500_twice_then_200_is_delivered_after_backoff(self, env: Env) -> None:
        await env.use_dispatcher(base_backoff_s=0.2)
        env.receiver.script["/flaky"] = [500, 500, 200]
        hook = await env.register("/flaky", ["call.done"])
        await env.publish(call_events("c1"))
        tries = await env.receiver.wait("/flaky", 3)
        bodies = verified(tries, hook["secret"])
        assert len({r.headers["webhook-id"] for r in tries}) == 1  # one delivery, retried
        assert {b["id"] for b in bodies} == {bodies[0]["id"]}
        gaps = [b.at - a.at for a, b in itertools.pairwise(tries)]
        assert gaps[0] >= 0.2 * 0.9  # base, then twice the base
        assert gaps[1] >= 0.4 * 0.9
        rows = await env.wait_deliveries(hook["id"], all_delivered, what="delivered")
        assert len(rows) == 1
        assert rows[0]["attempts"] == 3
        assert rows[0]["last_status"] == 200
        assert rows[0]["last_error"] is None
        assert rows[0]["first_failed_at"] is not None
        await asyncio.sleep(0.3)
        assert len(env.receiver.at("/flaky")) == 3

    async def test_a_hanging_receiver_is_a_failure(self, env: Env) -> None:
        dispatcher = await env.use_dispatcher(webhook_timeout_s=0.3, base_backoff_s=0.6)
        env.receiver.script["/slow"] = ["hang", 200]
        hook = await env.register("/slow", ["call.started"])
        await env.publish(call_events("c1"))
        first = await env.wait_deliveries(
            hook["id"], lambda rows: rows[0]["attempts"] == 1, what="one attempt"
        )
        assert first[0]["status"] == "pending"
        assert first[0]["last_status"] is None
        assert first[0]["last_error"] == "no answer within 0.3 s"
        rows = await env.wait_deliveries(hook["id"], all_delivered, what="delivered")
        assert rows[0]["attempts"] == 2
        assert len(env.receiver.at("/slow")) == 2
        assert (dispatcher.failed, dispatcher.delivered) == (1, 1)

    async def test_an_unreachable_receiver_is_a_failure(self, env: Env) -> None:
        await env.use_dispatcher(base_backoff_s=5.0)
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{probe.getsockname()[1]}/closed"
        response = await env.api.post(
            "/webhooks", json={"workspace_id": 1, "url": closed, "events": ["call.done"]}
        )
        assert response.status_code == 201
        hook = response.json()
        await env.publish(call_events("c1"))
        rows = await env.wait_deliveries(
            hook["id"], lambda rows: rows[0]["attempts"] == 1, what="one attempt"
        )
        assert rows[0]["status"] == "pending"
        assert rows[0]["last_status"] is None
        assert "ConnectError" in rows[0]["last_error"]

    async def test_past_the_retry_window_it_is_dead_and_replay_delivers_it(self, env: Env) -> None:
        dispatcher = await env.use_dispatcher(webhook_retry_window_s=0.3, webhook_max_backoff_s=0.1)
        env.receiver.default["/down"] = 503
        hook = await env.register("/down", ["call.done"])
        await env.publish(call_events("c1"))
        rows = await env.wait_deliveries(
            hook["id"], lambda rows: rows[0]["status"] == "dead", what="dead"
        )
        dead = rows[0]
        assert dead["attempts"] >= 3
        assert dead["attempts"] == len(env.receiver.at("/down"))
        assert dead["last_status"] == 503
        assert dead["last_error"] == "HTTP 503: answer 503"
        assert dead["delivered_at"] is None
        assert dispatcher.dead == 1
        assert await env.deliveries(hook["id"], "dead") == rows
        assert await env.deliveries(hook["id"], "pending") == []
        await asyncio.sleep(0.3)
        assert len(env.receiver.at("/down")) == dead["attempts"]  # no more tries

        env.receiver.default["/down"] = 200
        replayed = await env.api.post(f"/webhooks/deliveries/{dead['id']}/replay")
        assert replayed.status_code == 202, replayed.text
        assert replayed.json()["status"] == "pending"
        assert replayed.json()["attempts"] == 0
        rows = await env.wait_deliveries(hook["id"], all_delivered, what="replayed")
        assert rows[0]["attempts"] == 1
        assert rows[0]["last_status"] == 200
        last = env.receiver.at("/down")[-1]
        assert verified([last], hook["secret"])[0]["type"] == "call.done"
        assert last.headers["webhook-id"] == f"msg_{dead['id']}"

    async def test_a_delivered_delivery_can_be_replayed(self, env: Env) -> None:
        hook = await env.register("/again", ["call.started"])
        await env.publish(call_events("c1"))
        first = await env.receiver.wait("/again", 1)
        rows = await env.wait_deliveries(hook["id"], all_delivered)
        response = await env.api.post(f"/webhooks/deliveries/{rows[0]['id']}/replay")
        assert response.status_code == 202
        both = await env.receiver.wait("/again", 2)
        assert both[1].body == first[0].body
        assert both[1].headers["webhook-id"] == first[0].headers["webhook-id"]
        verified(both, hook["secret"])


class TestOrderAndConcurrency:
    async def test_later_events_wait_while_an_earlier_one_is_in_flight(self, env: Env) -> None:
        await env.stop_dispatcher()
        hooks = [await env.register(f"/h{i}") for i in range(20)]
        await env.publish(call_events("c1")[:1])
        first, second = (
            WebhookDispatcher(env.backend.pool, EventSettings(), worker_id)
            for worker_id in ("a", "b")
        )
        # Twenty concurrent claims from two workers: every head claimed, each by one of them.
        batches = await asyncio.gather(
            *(dispatcher.claim(3) for dispatcher in (first, second) for _ in range(10))
        )
        claimed = [item.id for batch in batches for item in batch]
        assert len(claimed) == len(set(claimed)) == 20
        assert {item.endpoint_id for batch in batches for item in batch} == {h["id"] for h in hooks}
        # Their endpoints' next events are held back while the first ones are in flight.
        await env.publish(call_events("c1")[1:2])
        assert await first.claim(100) == []
        assert await second.claim(100) == []
        async with env.backend.pool.acquire() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET claimed_until = NULL WHERE claimed_by = 'a'"
            )
        # A's claims ran out: its deliveries are due again, and still ahead of the next events.
        again = await second.claim(100)
        by_a = [item.id for batch in batches[:10] for item in batch]
        assert sorted(item.id for item in again) == sorted(by_a)

    async def test_two_dispatchers_send_each_delivery_exactly_once_in_order(self, env: Env) -> None:
        await env.stop_dispatcher()
        env.receiver.delay_s = 0.01
        hooks = [await env.register(f"/e{i}") for i in range(4)]
        calls = [f"c{i}" for i in range(3)]
        await env.publish([event for call in calls for event in call_events(call)])
        per_endpoint = 8 * len(calls)
        pools = [await asyncpg.create_pool(env.database_url, min_size=1, max_size=4)]
        pools.append(await asyncpg.create_pool(env.database_url, min_size=1, max_size=4))
        # One delivery per endpoint is in flight at a time, so with 4 endpoints and B holding
        # at most 3, A always finds one to claim: both take part (with 4 or more, B could hold
        # every endpoint and leave A nothing, which is correct but tests less).
        dispatchers = [
            WebhookDispatcher(pool, EventSettings(), name, max_in_flight=n, poll_s=0.02)
            for pool, name, n in zip(pools, ("worker-a", "worker-b"), (2, 3), strict=True)
        ]
        try:
            for dispatcher in dispatchers:
                dispatcher.start()
            for i, hook in enumerate(hooks):
                received = await env.receiver.wait(f"/e{i}", per_endpoint, within=15)
                ids = [body["id"] for body in verified(received, hook["secret"])]
                assert ids == sorted(ids), f"/e{i} out of order"
                one_at_a_time(received)
            await asyncio.sleep(0.3)  # a duplicate would have come by now
        finally:
            for dispatcher in dispatchers:
                await dispatcher.close()
            for pool in pools:
                await pool.close()
        sent = Counter((r.path, r.headers["webhook-id"]) for r in env.receiver.requests)
        assert len(sent) == 4 * per_endpoint
        assert set(sent.values()) == {1}
        assert sum(d.delivered for d in dispatchers) == 4 * per_endpoint
        async with env.backend.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT claimed_by, count(*) FROM webhook_deliveries"
                " WHERE status = 'delivered' GROUP BY 1"
            )
        share = {row["claimed_by"]: row["count"] for row in rows}
        assert set(share) == {"worker-a", "worker-b"}, share  # both took part
        assert sum(share.values()) == 4 * per_endpoint


class TestRestart:
    async def test_events_written_while_no_dispatcher_ran_are_sent_by_the_next(
        self, env: Env
    ) -> None:
        hook = await env.register("/later")
        await env.stop_dispatcher()  # killed: the journal is written, nothing is sent
        await env.publish(call_events("c1"))
        await asyncio.sleep(0.3)
        assert env.receiver.requests == []
        rows = await env.deliveries(hook["id"])
        assert [row["status"] for row in rows] == ["pending"] * 8
        # It was killed while sending the first one: the claim is still there.
        async with env.backend.pool.acquire() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET claimed_by = $1,"
                " claimed_until = now() + interval '1 hour' WHERE id = $2",
                env.worker.worker_id,
                rows[0]["id"],
            )
        await env.use_dispatcher()  # the worker again: its own old claims go at start
        got = verified(await env.receiver.wait("/later", 8), hook["secret"])
        assert [body["id"] for body in got] == [row["event_id"] for row in rows]
        await env.wait_deliveries(hook["id"], all_delivered)

    async def test_close_lets_deliveries_in_flight_finish(self, env: Env) -> None:
        env.receiver.delay_s = 0.3
        hook = await env.register("/closing", ["call.started"])
        await env.publish(call_events("c1"))
        await env.receiver.wait("/closing", 1)
        await env.stop_dispatcher()
        rows = await env.deliveries(hook["id"])
        assert rows[0]["status"] == "delivered"


class TestApi:
    async def test_register_list_delete(self, env: Env) -> None:
        hook = await env.register("/x", ["call.done", "call.done", "journal.new"])
        assert hook["events"] == ["call.done", "journal.new"]
        assert hook["enabled"] is True
        assert hook["workspace_id"] == 1
        assert set(hook) == {
            "id",
            "workspace_id",
            "url",
            "events",
            "secret",
            "enabled",
            "created_at",
        }
        listed = (await env.api.get("/webhooks", params={"workspace_id": 1})).json()
        assert [h["id"] for h in listed] == [hook["id"]]
        assert "secret" not in listed[0]
        assert listed[0]["url"] == env.receiver.url("/x")
        deleted = await env.api.delete(f"/webhooks/{hook['id']}")
        assert deleted.status_code == 204
        assert (await env.api.get("/webhooks", params={"workspace_id": 1})).json() == []
        again = await env.api.delete(f"/webhooks/{hook['id']}")
        assert again.status_code == 404
        assert again.json() == {"detail": f"no webhook {hook['id']}"}
        await env.publish(call_events("c1"))
        await asyncio.sleep(0.2)
        assert env.receiver.requests == []

    @pytest.mark.parametrize(
        ("body", "detail"),
        [
            ({"url": "ftp://example.com/h"}, "http:// or https://"),
            ({"url": "example.com/h"}, "http:// or https://"),
            ({"url": "http:///nohost"}, "http:// or https://"),
            ({"url": "http://example.com:99999/"}, "not a URL"),
            ({"url": "https://example.com/" + "a" * 2100}, "url"),
            ({"events": ["call.ended"]}, "unknown event types ['call.ended']"),
            ({"secret": "not-a-whsec"}, "starts with"),
            ({"secret": "whsec_c2hvcnQ="}, "24 to 64 bytes"),
            ({"workspace_id": 0}, "workspace_id"),
            ({"enabled": False}, "enabled"),
        ],
    )
    async def test_422(self, env: Env, body: dict[str, Any], detail: str) -> None:
        request = {"workspace_id": 1, "url": "https://example.com/h", "events": []} | body
        response = await env.api.post("/webhooks", json=request)
        assert response.status_code == 422, response.text
        assert detail in response.json()["detail"]

    async def test_403_for_a_non_member_and_401_without_a_token(self, env: Env) -> None:
        body = {"workspace_id": 2, "url": "https://example.com/h"}
        response = await env.api.post("/webhooks", json=body)
        assert response.status_code == 403
        assert response.json() == {"detail": "not a member of workspace 2"}
        listed = await env.api.get("/webhooks", params={"workspace_id": 2})
        assert listed.status_code == 403
        anonymous = await env.api.post("/webhooks", json=body, headers={"authorization": ""})
        assert anonymous.status_code == 401
        assert (await env.api.get("/webhooks")).status_code == 422  # workspace_id required

    async def test_another_workspaces_webhook_is_404(self, env: Env) -> None:
        other = {"authorization": f"Bearer {token([2])}"}
        response = await env.api.post(
            "/webhooks",
            json={"workspace_id": 2, "url": env.receiver.url("/two")},
            headers=other,
        )
        assert response.status_code == 201
        hook = response.json()
        await env.publish(call_events("c9", workspace=2))
        rows = await env.wait_deliveries(hook["id"], all_delivered, headers=other)
        assert len(env.receiver.at("/two")) == 8
        for path in (f"/webhooks/{hook['id']}", f"/webhooks/{hook['id']}/deliveries"):
            method = "DELETE" if path.endswith(str(hook["id"])) else "GET"
            response = await env.api.request(method, path)
            assert response.status_code == 404, path
        replay = await env.api.post(f"/webhooks/deliveries/{rows[0]['id']}/replay")
        assert replay.status_code == 404
        operator = {"authorization": f"Bearer {token([], role='operator')}"}
        seen = await env.api.get(f"/webhooks/{hook['id']}/deliveries", headers=operator)
        assert seen.status_code == 200
        assert len(seen.json()) == 8

    async def test_unknown_ids_404_pending_replay_409_bad_status_422(self, env: Env) -> None:
        assert (await env.api.get("/webhooks/999/deliveries")).status_code == 404
        assert (await env.api.delete("/webhooks/999")).status_code == 404
        assert (await env.api.post("/webhooks/deliveries/999/replay")).status_code == 404
        assert (await env.api.delete("/webhooks/0")).status_code == 422
        assert (await env.api.delete("/webhooks/abc")).status_code == 422
        await env.stop_dispatcher()
        hook = await env.register("/held", ["call.started"])
        await env.publish(call_events("c1"))
        rows = await env.deliveries(hook["id"])
        assert rows[0]["status"] == "pending"
        response = await env.api.post(f"/webhooks/deliveries/{rows[0]['id']}/replay")
        assert response.status_code == 409
        assert response.json() == {"detail": f"delivery {rows[0]['id']} is pending already"}
        bad = await env.api.get(f"/webhooks/{hook['id']}/deliveries", params={"status": "lost"})
        assert bad.status_code == 422
