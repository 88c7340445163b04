"""Agents that misbehave, end to end: no ack, a late ack, an unreachable or silent agent, invalid
messages and verbs, audio where none is allowed, audio much faster than real time, and a control
socket that drops. Each test runs a healthy call at the same time and checks that it is not
touched. Class names follow the jambonz rule (PROTOCOLS.md §1.2, §1.5, §1.8, §1.9, §2.5) they
cover.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    AgentPeer,
    ScriptedAgent,
    agent_call,
    agent_route,
    assert_sipp_ok,
    caller,
    final_statuses,
    running_worker,
    tone,
    wait_result,
    wait_results,
)
from tests.sipp import Sipp, SippResult, free_port
from worker.app import Worker
from worker.session.session import SessionResult

pytestmark = [pytest.mark.sipp]

HEALTHY = "+15550009999"


async def _healthy_call(agent: ScriptedAgent, path: str = "/healthy") -> dict[str, Any]:
    """The well-behaved agent: answer, pause 2.5 s, redirect to a hook, which hangs up."""
    ctl = await agent.accept(path)
    new = await ctl.next_type("session:new")
    await ctl.ack(
        new,
        [
            {"verb": "answer"},
            {"verb": "pause", "length": 2.5},
            {"verb": "redirect", "actionHook": "/bye"},
        ],
    )
    hook = await ctl.next_type("verb:hook")
    await ctl.ack(hook, [{"verb": "hangup"}])
    await ctl.wait_closed()
    assert not [m for m in ctl.texts() if m["type"] == "jambonz:error"]
    return new


async def _check_healthy(worker: Worker, sipp: SippResult, new: dict[str, Any]) -> None:
    assert_sipp_ok(sipp)
    done = await wait_result(worker, new["call_sid"])
    assert done.status == "completed", done
    assert done.cause == "agent-hangup"
    assert done.duration_sec in (2, 3)


@contextlib.asynccontextmanager
async def _silent_server(closed: asyncio.Event | None = None) -> AsyncIterator[int]:
    """A TCP server that accepts and never answers (a hung agent); yields its port. ``closed``
    is set when a client closes its connection."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
        if closed is not None:
            closed.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def _callers(
    tmp_path: Path, worker: Worker, plan: dict[str, tuple[str, str]]
) -> AsyncIterator[dict[str, Sipp]]:
    """One running SIPp caller per name: (scenario, number); all killed on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(caller(tmp_path / name, worker, scenario, number))
            for name, (scenario, number) in plan.items()
        }


async def _results(sipps: dict[str, Sipp]) -> dict[str, SippResult]:
    return {name: await sipp.wait() for name, sipp in sipps.items()}


class TestJambonzAckWithinFiveSeconds:
    """§1.3/§1.9: ``session:new`` must be acked within 5 s or the call fails (480, as
    middleware.js sends); a late ack is discarded and the hook it was for has failed."""

    async def test_no_ack_and_late_ack(self, tmp_path: Path) -> None:
        async with ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000001", agent.url("/never-acks")),
                agent_route("+1555000002", agent.url("/late-ack")),
                agent_route(HEALTHY, agent.url("/healthy")),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "never": ("uac_rejected", "+1555000001"),
                    "late": ("uac_wait_bye", "+1555000002"),
                    "healthy": ("uac_wait_bye", HEALTHY),
                }
                async with _callers(tmp_path, worker, plan) as sipps:
                    loop = asyncio.get_running_loop()

                    async def never_acks() -> tuple[dict[str, Any], AgentPeer, str, float]:
                        ctl = await agent.accept("/never-acks")
                        new = await ctl.next_type("session:new")
                        status = await ctl.next_type("call:status", within=7)
                        await ctl.wait_closed()
                        data = status["data"]
                        return new, ctl, f"{data['call_status']} {data['sip_status']}", loop.time()

                    async def late_ack() -> tuple[dict[str, Any], dict[str, Any], AgentPeer]:
                        ctl = await agent.accept("/late-ack")
                        new = await ctl.next_type("session:new")
                        await ctl.ack(
                            new,
                            [
                                {"verb": "answer"},
                                {"verb": "redirect", "actionHook": "/slow"},
                                {"verb": "tag", "data": {"after": "timeout"}},
                                {"verb": "redirect", "actionHook": "/after"},
                            ],
                        )
                        slow = await ctl.next_type("verb:hook")
                        assert slow["hook"] == "/slow"
                        after = await ctl.next_type("verb:hook", within=7)
                        # Too late: the worker gave up on /slow 5 s after sending it.
                        await ctl.ack(slow, [{"verb": "say", "text": "too late"}])
                        await asyncio.sleep(0.3)
                        await ctl.ack(after, [{"verb": "hangup"}])
                        await ctl.wait_closed()
                        return new, after, ctl

                    started = loop.time()
                    (
                        (new1, ctl1, status1, closed1),
                        (new2, after, ctl2),
                        new3,
                    ) = await asyncio.gather(never_acks(), late_ack(), _healthy_call(agent))
                    results = await _results(sipps)
                await _check_healthy(worker, results["healthy"], new3)
                done1 = await wait_result(worker, new1["call_sid"])
                done2 = await wait_result(worker, new2["call_sid"])

        assert_sipp_ok(results["never"])
        assert final_statuses(results["never"]) == [480]
        assert status1 == "failed 480"
        assert 5.0 <= closed1 - started <= 6.5
        assert done1.status == "failed"
        assert done1.cause == "agent-no-ack"
        assert ctl1.close_code == 1000

        assert_sipp_ok(results["late"])
        assert after["hook"] == "/after"
        assert after["data"]["customerData"] == {"after": "timeout"}
        # The late ack was dropped without an error and did not run its verbs.
        assert not [m for m in ctl2.texts() if m["type"] == "jambonz:error"]
        assert done2.transcript == []
        assert done2.status == "completed"
        assert done2.counters.late_acks == 1


class TestAgentUnreachable:
    """§1.8 (1): the first connect is retried as the URL fragment allows, then the call fails
    with 480 and a cause that says why; a hung agent is given up after the open timeout."""

    async def test_refused_and_hung_agents(self, tmp_path: Path) -> None:
        refused_port = free_port()
        async with _silent_server() as hung_port, ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000003", f"ws://127.0.0.1:{refused_port}/app#rc=1"),
                agent_route("+1555000004", f"ws://127.0.0.1:{hung_port}/app#rc=0"),
                agent_route(HEALTHY, agent.url("/healthy")),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "refused": ("uac_rejected", "+1555000003"),
                    "hung": ("uac_rejected", "+1555000004"),
                    "healthy": ("uac_wait_bye", HEALTHY),
                }
                async with _callers(tmp_path, worker, plan) as sipps:
                    new = await _healthy_call(agent)
                    results = await _results(sipps)
                await _check_healthy(worker, results["healthy"], new)
                done = await _results_except(worker, new["call_sid"], 2)

        for name in ("refused", "hung"):
            assert_sipp_ok(results[name])
            assert final_statuses(results[name]) == [480]
        by_reason = {r.reason or "": r for r in done}
        refused = next(r for reason, r in by_reason.items() if "refused" in reason)
        hung = next(r for reason, r in by_reason.items() if "handshake" in reason)
        assert refused.status == hung.status == "failed"
        assert refused.cause == hung.cause == "agent-unreachable"


async def _results_except(worker: Worker, call_sid: str, count: int) -> list[SessionResult]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        others = [r for r in worker.results if r.call_sid != call_sid]
        if len(others) >= count:
            return others
        assert loop.time() < deadline, f"only {len(others)} of {count} calls finished"
        await asyncio.sleep(0.05)


class TestJambonzInvalidMessage:
    """§1.2: invalid JSON, a missing or unknown ``type``, a binary frame, an unknown command, a
    ``redirect`` with an unknown verb or a verb with a bad field: each is answered with
    ``jambonz:error`` ``InvalidMessage`` and the call carries on."""

    async def test_garbage_mid_call(self, tmp_path: Path) -> None:
        garbage: list[str | bytes | dict[str, Any]] = [
            "{not json",
            {"msgid": "x1", "data": []},
            {"type": "bogus", "msgid": "x2"},
            b"\x00\x01binary",
            {"type": "command", "command": "teleport", "data": {"to": "mars"}},
            {"type": "command", "command": "redirect", "data": [{"verb": "dance"}]},
            {"type": "command", "command": "redirect", "data": [{"verb": "pause", "length": "5"}]},
            {"type": "ack", "msgid": "never-sent-by-the-worker"},
        ]
        async with ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000005", agent.url("/garbage")),
                agent_route(HEALTHY, agent.url("/healthy")),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "garbage": ("uac_wait_bye", "+1555000005"),
                    "healthy": ("uac_wait_bye", HEALTHY),
                }

                async def garbage_agent() -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
                    ctl = await agent.accept("/garbage")
                    new = await ctl.next_type("session:new")
                    await ctl.ack(
                        new,
                        [
                            {"verb": "answer"},
                            {"verb": "pause", "length": 1.5},
                            {"verb": "redirect", "actionHook": "/still-alive"},
                            {"verb": "pause", "length": 0.2},
                            {"verb": "redirect", "actionHook": "/final"},
                        ],
                    )
                    errors = []
                    for message in garbage:
                        await ctl.send(message)
                        if message != garbage[-1]:  # an unknown ack is dropped silently
                            errors.append(await ctl.next_type("jambonz:error"))
                    hook = await ctl.next_type("verb:hook")
                    # Verbs that cannot run in a hook's ack: an error, the hook has failed, and
                    # the call goes on with the verbs it had.
                    await ctl.ack(hook, [{"verb": "say", "text": "hi", "loop": "twice"}])
                    errors.append(await ctl.next_type("jambonz:error"))
                    final = await ctl.next_type("verb:hook")
                    await ctl.ack(final, [{"verb": "hangup"}])
                    await ctl.wait_closed()
                    return new, errors, final

                async with _callers(tmp_path, worker, plan) as sipps:
                    (new, errors, hook), healthy = await asyncio.gather(
                        garbage_agent(), _healthy_call(agent)
                    )
                    results = await _results(sipps)
                await _check_healthy(worker, results["healthy"], healthy)
                done = await wait_result(worker, new["call_sid"])

        assert_sipp_ok(results["garbage"])
        assert len(errors) == len(garbage)
        for error in errors:
            assert error["data"]["msg"] == "InvalidMessage"
            assert error["data"]["details"]
        assert errors[0]["data"]["content"] == "{not json"
        details = [e["data"]["details"] for e in errors]
        assert "invalid JSON" in details[0]
        assert "type property not supplied" in details[1]
        assert "bogus" in details[2]
        assert "binary" in details[3]
        assert "teleport" in details[4]
        assert "dance" in details[5]
        assert "length" in details[6]
        assert "loop" in details[7]
        assert hook["hook"] == "/final"
        assert done.status == "completed"
        assert done.transcript == []
        assert done.counters.invalid_agent_messages == len(garbage)


class TestJambonzInvalidVerbsInAck:
    """§1.5: an ack whose verbs cannot run (unknown verb, a bad field) is answered with
    ``jambonz:error`` and, for ``session:new``, fails the call with 480 as jambonz does."""

    async def test_unknown_verb_and_bad_field(self, tmp_path: Path) -> None:
        bad: dict[str, list[dict[str, Any]]] = {
            "+1555000006": [{"verb": "answer"}, {"verb": "moonwalk"}],
            "+1555000007": [{"verb": "say", "text": 42}],
        }
        async with ScriptedAgent() as agent:
            routes = [agent_route(n, agent.url(f"/bad{n}")) for n in bad]
            routes.append(agent_route(HEALTHY, agent.url("/healthy")))
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {n: ("uac_rejected", n) for n in bad}
                plan["healthy"] = ("uac_wait_bye", HEALTHY)

                async def bad_agent(number: str) -> tuple[dict[str, Any], dict[str, Any]]:
                    ctl = await agent.accept(f"/bad{number}")
                    new = await ctl.next_type("session:new")
                    await ctl.ack(new, bad[number])
                    error = await ctl.next_type("jambonz:error")
                    await ctl.wait_closed()
                    return new, error

                async with _callers(tmp_path, worker, plan) as sipps:
                    outcome, healthy = await asyncio.gather(
                        asyncio.gather(*(bad_agent(n) for n in bad)), _healthy_call(agent)
                    )
                    results = await _results(sipps)
                await _check_healthy(worker, results["healthy"], healthy)
                dones = [await wait_result(worker, new["call_sid"]) for new, _ in outcome]

        for number, (_, error) in zip(bad, outcome, strict=True):
            assert_sipp_ok(results[number])
            assert final_statuses(results[number]) == [480]
            assert error["data"]["msg"] == "InvalidMessage"
        assert "moonwalk" in outcome[0][1]["data"]["details"]
        assert "text" in outcome[1][1]["data"]["details"]
        assert [d.status for d in dones] == ["failed", "failed"]


class TestListenBinaryWhenNotStreaming:
    """§2.5: binary frames from the app while ``bidirectionalAudio.streaming`` is off are
    discarded and counted; the call and the listen carry on."""

    async def test_binary_ignored_and_counted(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", "+1555000008") as call:
            ctl, new, agent = call.ctl, call.new, call.agent
            verb = {"verb": "listen", "url": agent.url("/l"), "actionHook": "/done"}
            await ctl.ack(new, [verb])
            listen = await agent.accept("/l")
            await listen.recv()
            for _ in range(25):
                await listen.send(tone(440, 0.02))
            await listen.send({"type": "mark", "data": {"name": "after"}})
            mark = await listen.next(lambda m: m.get("type") == "mark")
            await listen.send({"type": "disconnect"})
            hook = await ctl.next_type("verb:hook")
            await ctl.ack(hook, [{"verb": "hangup"}])
            _, done = await call.finish()
        assert mark["data"] == {"name": "after", "event": "playout"}
        assert done.counters.ignored_agent_frames == 25
        assert done.counters.playout.written_ms == 0


class TestPlayoutBound:
    """README: agent audio sent faster than real time is held to a 10 s bound; the oldest
    excess is dropped and counted instead of growing latency."""

    async def test_thirty_seconds_in_a_burst(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", "+1555000009") as call:
            ctl, new, worker, agent = call.ctl, call.new, call.worker, call.agent
            verb = {
                "verb": "listen",
                "url": agent.url("/l"),
                "bidirectionalAudio": {"streaming": True},
            }
            await ctl.ack(new, [verb])
            listen = await agent.accept("/l")
            await listen.recv()
            burst = tone(500, 30.0)
            for offset in range(0, len(burst), 3200):  # 200 ms per frame, 150 frames
                await listen.send(burst[offset : offset + 3200])
            await listen.send({"type": "mark", "data": {"name": "end"}})
            await asyncio.sleep(0.5)
            session = worker.sessions[new["call_sid"]]
            queued = session.pipeline.playout.queued_ms
            await listen.send({"type": "killAudio"})
            cleared = await listen.next(lambda m: m.get("type") == "mark")
            await listen.close()
            _, done = await call.finish()
        assert 9400 <= queued <= 10000, queued
        assert cleared["data"] == {"name": "end", "event": "cleared"}
        playout = done.counters.playout
        assert playout.written_ms == pytest.approx(30000, abs=1)
        assert playout.dropped_ms == pytest.approx(20000, abs=100)
        assert playout.cleared_ms == pytest.approx(queued, abs=100)


class TestJambonzSessionReconnect:
    """§1.8: the app closing with any code but 1000 makes the worker reconnect after 0.5 s and
    send ``session:reconnect`` with the original ``session:new`` data first, holding every other
    message until it is acked; the call carries on. Closing with 1000 ends the conversation: no
    reconnect, later messages dropped, the call runs its remaining verbs and ends."""

    async def test_1011_reconnects_and_1000_does_not(self, tmp_path: Path) -> None:
        async with ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000010", agent.url("/drops")),
                agent_route("+1555000011", agent.url("/ends")),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "drops": ("uac_wait_bye", "+1555000010"),
                    "ends": ("uac_wait_bye", "+1555000011"),
                }
                loop = asyncio.get_running_loop()

                async def drops() -> tuple[Any, ...]:
                    ctl = await agent.accept("/drops")
                    new = await ctl.next_type("session:new")
                    await ctl.ack(
                        new,
                        [
                            {"verb": "pause", "length": 0.3},
                            {"verb": "answer"},
                            {"verb": "pause", "length": 1.0},
                            {"verb": "redirect", "actionHook": "/next"},
                        ],
                    )
                    await ctl.next(lambda m: m.get("data", {}).get("call_status") == "ringing")
                    await ctl.close(1011, "agent restarting")
                    closed = loop.time()
                    again = await agent.accept("/drops", within=3)
                    reopened = loop.time()
                    first = (await again.recv()).json
                    await asyncio.sleep(0.4)  # answered meanwhile: its call:status is held
                    held = len(again.frames)
                    await again.ack(first)
                    status = await again.next_type("call:status")
                    hook = await again.next_type("verb:hook")
                    await again.ack(hook, [{"verb": "hangup"}])
                    await again.wait_closed()
                    return new, first, held, status, hook, reopened - closed, again

                async def ends() -> tuple[dict[str, Any], AgentPeer]:
                    ctl = await agent.accept("/ends")
                    new = await ctl.next_type("session:new")
                    await ctl.ack(
                        new,
                        [
                            {"verb": "answer"},
                            {"verb": "pause", "length": 1.0},
                            {"verb": "redirect", "actionHook": "/next"},
                            {"verb": "pause", "length": 0.5},
                        ],
                    )
                    await ctl.close(1000)
                    return new, ctl

                async with _callers(tmp_path, worker, plan) as sipps:
                    (
                        (new, first, held, status, hook, gap, again),
                        (new2, _ctl2),
                    ) = await asyncio.gather(drops(), ends())
                    results = await _results(sipps)
                done = await wait_result(worker, new["call_sid"])
                done2 = await wait_result(worker, new2["call_sid"])

        assert_sipp_ok(results["drops"])
        assert first["type"] == "session:reconnect"
        assert first["call_sid"] == new["call_sid"]
        assert first["data"] == new["data"]  # the original session:new data, not just the sid
        assert first["msgid"] != new["msgid"]
        assert 0.45 <= gap <= 1.0, gap
        assert held == 1  # nothing but session:reconnect before its ack
        assert status["data"]["call_status"] == "in-progress"  # held, then sent
        assert hook["hook"] == "/next"
        assert done.status == "completed"

        assert done.counters.reconnects == 1
        completed = [m for m in again.texts() if m.get("type") == "call:status"][-1]
        assert completed["data"]["call_status"] == "completed"

        assert_sipp_ok(results["ends"])
        assert agent.connections["/ends"] == 1
        assert done2.status == "completed"
        assert done2.duration_sec in (1, 2)

        assert done2.counters.reconnects == 0

    async def test_drop_before_the_ack_and_an_unacked_reconnect(self, tmp_path: Path) -> None:
        """§1.8 (5): a drop before ``session:new`` was acked moves that ack to
        ``session:reconnect`` (its verbs start the call); (4): a ``session:reconnect`` that is
        not acked within 5 s hangs the call up."""
        async with ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000012", agent.url("/early")),
                agent_route("+1555000013", agent.url("/gone")),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "early": ("uac_wait_bye", "+1555000012"),
                    "gone": ("uac_wait_bye", "+1555000013"),
                }

                async def early() -> tuple[dict[str, Any], dict[str, Any]]:
                    ctl = await agent.accept("/early")
                    new = await ctl.next_type("session:new")
                    await ctl.close(1011)
                    again = await agent.accept("/early", within=3)
                    first = (await again.recv()).json
                    await again.ack(first, [{"verb": "answer"}, {"verb": "pause", "length": 0.3}])
                    await again.wait_closed()
                    return new, first

                async def gone() -> tuple[dict[str, Any], AgentPeer]:
                    ctl = await agent.accept("/gone")
                    new = await ctl.next_type("session:new")
                    await ctl.ack(new, [{"verb": "answer"}, {"verb": "pause", "length": 20}])
                    await ctl.next(lambda m: m.get("data", {}).get("call_status") == "in-progress")
                    await ctl.close(1011)
                    again = await agent.accept("/gone", within=3)
                    await again.next_type("session:reconnect")
                    await again.wait_closed(within=8)  # never acked: the worker gives up
                    return new, again

                async with _callers(tmp_path, worker, plan) as sipps:
                    (new1, first), (new2, again) = await asyncio.gather(early(), gone())
                    results = await _results(sipps)
                done1 = await wait_result(worker, new1["call_sid"])
                done2 = await wait_result(worker, new2["call_sid"])

        assert_sipp_ok(results["early"])
        assert first["type"] == "session:reconnect"
        assert first["data"] == new1["data"]
        assert done1.status == "completed"
        assert done1.cause == "agent-finished"
        assert_sipp_ok(results["gone"])
        assert done2.status == "completed"
        assert done2.cause == "agent-lost"
        assert done2.duration_sec == 5
        assert len(again.texts()) == 1  # nothing but the session:reconnect


class TestWorkerShutdownMidCall:
    """Closing the worker during a call hangs the call up and closes every agent socket (control
    and audio) cleanly: nothing outlives it."""

    async def test_close_with_a_live_listen(self, tmp_path: Path) -> None:
        async with agent_call(tmp_path, "uac_wait_bye", "+1555000014") as call:
            ctl, worker = call.ctl, call.worker
            verb = {"verb": "listen", "url": call.agent.url("/l"), "actionHook": "/done"}
            await ctl.ack(call.new, [verb])
            listen = await call.agent.accept("/l")
            await listen.recv()
            await asyncio.sleep(0.3)
            await worker.close()
            assert await ctl.wait_closed(3) == 1000
            assert await listen.wait_closed(3) == 1000
            result = await call.sipp.wait()
            assert worker.sessions == {}
        assert_sipp_ok(result)
        assert listen.binary()[-1].data == b""  # the graceful end of audio
        assert [m["data"]["call_status"] for m in ctl.texts() if m["type"] == "call:status"][
            -1
        ] == "completed"
        assert not [m for m in ctl.texts() if m["type"] == "verb:hook"]


class TestCallerGivesUpWhileTheAgentConnects:
    """A caller that hangs up (CANCEL) while the worker still waits for the agent: the INVITE
    gets 487, the call ends as no-answer, the agent is told (jambonz ``call:status``) and its
    connection is closed, even when the WebSocket handshake itself was still pending (Twilio)."""

    async def test_cancel_before_ack_and_during_handshake(self, tmp_path: Path) -> None:
        closed = asyncio.Event()
        async with _silent_server(closed) as hung_port, ScriptedAgent() as agent:
            routes = [
                agent_route("+1555000015", agent.url("/slow")),
                agent_route("+1555000016", f"ws://127.0.0.1:{hung_port}/tw", protocol="twilio"),
            ]
            async with running_worker(tmp_path / "data", routes) as worker:
                plan = {
                    "jambonz": ("uac_cancel_after_100", "+1555000015"),
                    "twilio": ("uac_cancel_after_180", "+1555000016"),
                }
                async with _callers(tmp_path, worker, plan) as sipps:
                    ctl = await agent.accept("/slow")
                    new = await ctl.next_type("session:new")
                    status = await ctl.next_type("call:status")
                    assert await ctl.wait_closed() == 1000
                    results = await _results(sipps)
                    await asyncio.wait_for(closed.wait(), 3)
                done = await wait_results(worker, 2)
        for result in results.values():
            assert_sipp_ok(result)
        assert status["data"]["call_status"] == "no-answer"
        assert (status["data"]["sip_status"], status["data"]["sip_reason"]) == (
            487,
            "Request Terminated",
        )
        assert status["data"]["call_sid"] == new["call_sid"]
        assert [d.status for d in done] == ["no-answer", "no-answer"]
        assert {d.cause for d in done} == {"cancelled"}
