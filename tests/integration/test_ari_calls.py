"""Calls through Asterisk (the ARI test double, which behaves as the recordings of Asterisk
22.10.1 do) into the worker's Stasis application and on to an agent: PROTOCOLS.md §4-5.

Inbound calls carry audio both ways over a real ExternalMedia RTP socket in slin16 and ulaw,
and DTMF both ways; every way a call ends maps to its status; originates through Asterisk end as
recorded (answered, busy, no answer, unreachable); ``dial`` joins its far leg inside Asterisk;
trunks are pushed in dependency order; the events socket drops and resyncs; Asterisk can be down
when the worker starts; bad credentials stop the start; bad events, failing REST calls,
vanishing channels and foreign RTP end at most the one call concerned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from media.rtp import RtpSender
from tests.ari_double import AriDouble
from tests.ari_double.errors import AriError as DoubleAriError
from tests.e2e.harness import (
    WAIT,
    ScriptedAgent,
    agent_route,
    best_match,
    pattern,
    samples,
    wait_result,
)
from tests.sipp import free_port
from worker import cli
from worker.app import StartError, Worker
from worker.ari.client import AriClient, AriError
from worker.ari.leg import AriLeg
from worker.ari.trunks import ConfigObject, TrunkPushError, _refused_attribute
from worker.config import load_settings
from worker.errors import RemoteError
from worker.front.front import Front, FrontError
from worker.session.session import SessionResult

USER, PASSWORD = "aispinner", "secret"
CALLED = "4155550100"
CALLER = "14155559876"


@contextlib.asynccontextmanager
async def ari_worker(
    data_dir: Path,
    asterisk_url: str,
    routes: list[dict[str, Any]],
    *,
    media_format: str = "slin16",
    ingress: tuple[str, ...] = ("ari",),
    wait_connected: bool = True,
    **ari: Any,
) -> AsyncIterator[Worker]:
    """A worker taking calls from the Asterisk at ``asterisk_url``, closed on the way out."""
    rtp_low = free_port(span=202)
    settings = load_settings(
        None,
        data_dir=str(data_dir),
        store=False,
        ingress=list(ingress),
        sip={"port": free_port()},
        rtp={"port_min": rtp_low, "port_max": rtp_low + 200},
        ari={
            "url": asterisk_url,
            "username": USER,
            "password": PASSWORD,
            "media_format": media_format,
            "reconnect_max_s": 1.0,
            **ari,
        },
        routes=routes,
    )
    worker = Worker(settings)
    await worker.start()
    try:
        if wait_connected:
            await connected(worker)
        yield worker
    finally:
        await worker.close()


@contextlib.asynccontextmanager
async def through_asterisk(
    data_dir: Path,
    routes: list[dict[str, Any]],
    *,
    double: dict[str, Any] | None = None,
    **worker: Any,
) -> AsyncIterator[tuple[AriDouble, Worker]]:
    """Asterisk (the double) and a worker taking its calls."""
    async with (
        AriDouble(username=USER, password=PASSWORD, **(double or {})) as asterisk,
        ari_worker(data_dir, asterisk.url, routes, **worker) as running,
    ):
        yield asterisk, running


async def connected(worker: Worker, within: float = WAIT) -> None:
    assert worker.stasis is not None
    await asyncio.wait_for(worker.stasis.connected.wait(), within)


async def until(check: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Wait (bounded) until ``check()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


async def answered(worker: Worker) -> AriLeg:
    """The one call, once the worker has it answered and bridged."""
    await until(
        lambda: (
            worker.stasis is not None
            and any(leg.phase.value == "answered" for leg in worker.stasis.legs)
        ),
        "the worker answers",
    )
    return live_leg(worker)


def live_leg(worker: Worker) -> AriLeg:
    assert worker.stasis is not None
    legs = [leg for leg in worker.stasis.legs if not leg.ended]
    assert len(legs) == 1, legs
    return legs[0]


def nothing_left(asterisk: AriDouble) -> bool:
    """No bridge and no ExternalMedia channel left in Asterisk."""
    media = [c for c in asterisk.channels.values() if c.name.startswith("UnicastRTP/")]
    return not asterisk.bridges and not media


def requests_of(asterisk: AriDouble, method: str, suffix: str) -> list[Any]:
    return [r for r in asterisk.requests if r.method == method and r.path.endswith(suffix)]


ECHO = [{"match": "*", "action": "echo", "record": False}]


# --------------------------------------------------------------------------- inbound, media


@pytest.mark.parametrize("media_format", ["slin16", "ulaw"])
class TestInboundCallAudioBothWays:
    """§4.1-4.2: StasisStart(inbound) → session → agent; the caller's audio reaches the agent and
    the agent's the caller, through a real ExternalMedia RTP socket; DTMF both ways; the
    caller's BYE completes the call and leaves nothing behind in Asterisk."""

    async def test_agent_call(self, tmp_path: Path, media_format: str) -> None:
        async with (
            AriDouble(username=USER, password=PASSWORD) as asterisk,
            ScriptedAgent() as agent,
        ):
            routes = [agent_route("*", agent.url("/app"))]
            async with ari_worker(
                tmp_path, asterisk.url, routes, media_format=media_format
            ) as worker:
                phone = await asterisk.call_in(CALLED, caller=CALLER)
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
                assert new["data"]["from"] == CALLER
                assert new["data"]["to"] == CALLED
                assert new["data"]["direction"] == "inbound"
                verbs: list[dict[str, Any]] = [
                    {"verb": "answer"},
                    {"verb": "dtmf", "dtmf": "5", "duration": 160},
                    {
                        "verb": "listen",
                        "url": agent.url("/listen"),
                        "sampleRate": 8000,
                        "passDtmf": True,
                        "bidirectionalAudio": {
                            "enabled": True,
                            "streaming": True,
                            "sampleRate": 8000,
                        },
                    },
                ]
                await ctl.ack(new, verbs)
                listen = await agent.accept("/listen")
                await listen.recv()  # metadata
                back = pattern(1.5)
                for offset in range(0, len(back), 320):
                    await listen.send(back[offset : offset + 320])
                spoken = pattern(2.0, seed=11)
                await phone.send_audio(spoken)
                phone.press("1")
                await until(
                    lambda: any(t.get("event") == "dtmf" for t in listen.texts()),
                    "the agent hears the caller's key",
                )
                await phone.hang_up()
                result = await wait_result(worker, new["call_sid"])
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")

        assert result.status == "completed"
        assert result.digits == "1"
        assert phone.dtmf_sent == ["5"]
        heard_by_agent = samples(
            b"".join(f.data for f in listen.binary() if isinstance(f.data, bytes))
        )
        match = best_match(heard_by_agent, samples(spoken)[4000:12000])
        assert match.score > 0.9, match  # the caller's words, whatever the format
        match = best_match(samples(bytes(phone.heard)), samples(back)[2000:10000])
        assert match.score > 0.9, match  # the agent's words reached the caller
        media_posts = requests_of(asterisk, "POST", "/externalMedia")
        assert len(media_posts) == 1
        assert media_posts[0].query["format"] == media_format
        assert media_posts[0].status == 200


class TestRingingAndEarlyMedia:
    """``ring`` is ``POST /channels/{id}/ring``; a ``say`` with ``earlyMedia`` is ``progress``
    plus the bridge, so the caller hears it unanswered (a 183 on Asterisk's side)."""

    async def test_early_media_say(self, tmp_path: Path) -> None:
        async with (
            AriDouble(username=USER, password=PASSWORD) as asterisk,
            ScriptedAgent() as agent,
            ari_worker(tmp_path, asterisk.url, [agent_route("*", agent.url("/app"))]) as worker,
        ):
            phone = await asterisk.call_in(CALLED)
            ctl = await agent.accept("/app")
            new = await ctl.next_type("session:new")
            say = {"verb": "say", "text": "one moment please", "earlyMedia": True}
            await ctl.ack(new, [say, {"verb": "sip:decline", "status": 486}])
            result = await wait_result(worker, new["call_sid"])
            await asyncio.wait_for(phone.ended.wait(), WAIT)
            await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert [r.status for r in requests_of(asterisk, "POST", "/ring")] == [204]
        assert phone.progress
        assert not phone.answered
        assert np.sqrt(np.mean(samples(bytes(phone.heard)) ** 2)) > 300  # the speech
        assert phone.hangup_reason == "busy"
        assert result.status == "busy"
        posts = [r.path.rsplit("/", 1)[-1] for r in asterisk.requests if r.method == "POST"]
        assert posts.index("ring") < posts.index("progress") < posts.index("addChannel")
        assert "answer" not in posts


class TestEchoRouteThroughAsterisk:
    """The built-in echo over ARI: what the caller says comes back (a session without agent)."""

    async def test_echo(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            spoken = pattern(1.5, seed=3)
            await phone.send_audio(spoken)
            await asyncio.sleep(0.3)
            await phone.hang_up()
            result = (await _results(worker, 1))[0]
        assert result.status == "completed"
        match = best_match(samples(bytes(phone.heard)), samples(spoken)[2000:8000])
        assert match.score > 0.9, match


class TestDraining:
    """SIGTERM's drain (``Worker.stop_taking_calls``): a call that enters the application is
    hung up with ``congestion`` (Asterisk gives its caller 503) and gets no session; the call
    already up goes on to its end."""

    async def test_a_new_call_is_refused_and_the_live_one_goes_on(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            live = await asterisk.call_in("echo")
            await answered(worker)
            worker.stop_taking_calls()
            late = await asterisk.call_in("echo")
            await asyncio.wait_for(late.ended.wait(), WAIT)
            assert not live.ended.is_set()
            spoken = pattern(1.0, seed=5)
            await live.send_audio(spoken)
            await asyncio.sleep(0.3)
            await live.hang_up()
            result = (await _results(worker, 1))[0]
            assert worker.stasis is not None
            refused = worker.stasis.counters.refused
        assert late.hangup_reason == "congestion"
        assert not late.answered
        assert refused == 1
        assert result.status == "completed"
        match = best_match(samples(bytes(live.heard)), samples(spoken)[2000:6000])
        assert match.score > 0.9, match


async def _results(worker: Worker, count: int) -> list[SessionResult]:
    await until(lambda: len(worker.results) >= count, f"{count} calls finished")
    return list(worker.results)


# --------------------------------------------------------------------------- hangups


class TestHangupCauses:
    """ChannelHangupRequest/StasisEnd/ChannelDestroyed as recorded → call status; the worker's
    own hangup → DELETE with a reason Asterisk accepts; cleanup on every way out."""

    async def test_app_hangup_is_delete_reason_normal(self, tmp_path: Path) -> None:
        async with (
            AriDouble(username=USER, password=PASSWORD) as asterisk,
            ScriptedAgent() as agent,
        ):
            routes = [agent_route("*", agent.url("/app"))]
            async with ari_worker(tmp_path, asterisk.url, routes) as worker:
                phone = await asterisk.call_in(CALLED)
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
                await ctl.ack(
                    new, [{"verb": "answer"}, {"verb": "pause", "length": 0.3}, {"verb": "hangup"}]
                )
                result = await wait_result(worker, new["call_sid"])
                await asyncio.wait_for(phone.ended.wait(), WAIT)
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert result.status == "completed"
        assert phone.answered
        assert phone.hangup_reason == "normal"

    async def test_caller_gone_before_answer_is_no_answer(self, tmp_path: Path) -> None:
        async with (
            AriDouble(username=USER, password=PASSWORD) as asterisk,
            ScriptedAgent() as agent,
        ):
            routes = [agent_route("*", agent.url("/app"))]
            async with ari_worker(tmp_path, asterisk.url, routes) as worker:
                phone = await asterisk.call_in(CALLED)
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
                await phone.hang_up()  # before the agent answers
                result = await wait_result(worker, new["call_sid"])
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert result.status in ("no-answer", "failed")
        assert not phone.answered

    async def test_no_route_is_unallocated(self, tmp_path: Path) -> None:
        routes = [{"match": "999", "action": "echo"}]
        async with through_asterisk(tmp_path, routes) as (asterisk, _worker):
            phone = await asterisk.call_in(CALLED)
            await asyncio.wait_for(phone.ended.wait(), WAIT)
            await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert phone.hangup_reason == "unallocated"
        assert not phone.answered

    async def test_reject_route_is_rejected(self, tmp_path: Path) -> None:
        routes = [{"match": "*", "action": "reject"}]
        async with through_asterisk(tmp_path, routes) as (asterisk, _worker):
            phone = await asterisk.call_in(CALLED)
            await asyncio.wait_for(phone.ended.wait(), WAIT)
        assert phone.hangup_reason == "rejected"


# --------------------------------------------------------------------------- outbound


class TestOriginateThroughAsterisk:
    """POST /channels (PJSIP/<number>@<endpoint>, appArgs outbound,<id>) and the recorded
    outcomes: answered (then media both ways), busy 17/486, no answer 19/480, unreachable."""

    async def test_answered(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            asterisk.on_dial("4155550123", "answer")
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                route = worker.settings.routes[0]
                call = asyncio.create_task(
                    worker.originate("sippuas", "4155550123", route, from_user="+15550001111")
                )
                await until(
                    lambda: (
                        worker.stasis is not None
                        and any(leg.phase.value == "answered" for leg in worker.stasis.legs)
                    ),
                    "the callee answers",
                )
                leg = live_leg(worker)
                callee = asterisk.phone(leg.channel_id)
                spoken = pattern(1.2, seed=5)
                await callee.send_audio(spoken)
                await asyncio.sleep(0.3)
                await callee.hang_up()
                result = await asyncio.wait_for(call, WAIT)
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert result.status == "completed"
        originate = requests_of(asterisk, "POST", "/channels")[0]
        assert originate.query["endpoint"] == "PJSIP/4155550123@sippuas"
        assert originate.query["appArgs"] == f"outbound,{leg.channel_id}"
        assert originate.query["callerId"] == "+15550001111"
        match = best_match(samples(bytes(callee.heard)), samples(spoken)[2000:7000])
        assert match.score > 0.9, match  # the echo route's audio went back through Asterisk

    @pytest.mark.parametrize(
        ("outcome", "status"),
        [("busy", "busy"), ("noanswer", "no-answer"), ("unreachable", "no-answer")],
    )
    async def test_not_answered(self, tmp_path: Path, outcome: str, status: str) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            asterisk.on_dial("4155550123", outcome)  # type: ignore[arg-type]
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                route = worker.settings.routes[0]
                result = await asyncio.wait_for(
                    worker.originate("sippuas", "4155550123", route, ring_timeout_s=1.0), WAIT
                )
                await until(
                    lambda: nothing_left(asterisk), "prepared bridge and ExternalMedia gone"
                )
        assert result.status == status
        assert result.duration_sec == 0

    async def test_unknown_endpoint_is_a_clear_error(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            route = worker.settings.routes[0]
            with pytest.raises(AriError, match="Allocation failed") as caught:
                await worker.originate("nosuchtrunk", "4155550123", route)
            assert caught.value.status == 500
            await until(lambda: nothing_left(asterisk), "prepared bridge and ExternalMedia gone")
            stasis = worker.stasis
            assert stasis is not None
            await until(lambda: not stasis.legs, "the leg is released")


class TestDialInsideAsterisk:
    """The jambonz ``dial`` verb on an Asterisk call: the far leg is originated and joined to the
    call's bridge in Asterisk (its audio never passes through the worker); the actionHook gets
    the outcome as for a SIP dial."""

    async def test_dial_joins_the_bridge(self, tmp_path: Path) -> None:
        async with (
            AriDouble(username=USER, password=PASSWORD) as asterisk,
            ScriptedAgent() as agent,
        ):
            asterisk.on_dial("4155550199", "answer")
            routes = [agent_route("*", agent.url("/app"), trunk="sippuas")]
            async with ari_worker(tmp_path, asterisk.url, routes) as worker:
                phone = await asterisk.call_in(CALLED)
                ctl = await agent.accept("/app")
                new = await ctl.next_type("session:new")
                dial = {
                    "verb": "dial",
                    "target": [{"type": "phone", "number": "4155550199"}],
                    "actionHook": "/dial-done",
                    "timeout": 5,
                }
                await ctl.ack(new, [dial, {"verb": "hangup"}])
                await until(
                    lambda: any(len(b.members) == 3 for b in asterisk.bridges.values()),
                    "caller, ExternalMedia and callee in one bridge",
                )
                far_id = next(
                    r.query["channelId"] for r in requests_of(asterisk, "POST", "/channels")
                )
                callee = asterisk.phone(far_id)
                spoken = pattern(1.0, seed=9)
                await phone.send_audio(spoken)
                await callee.hang_up()
                hook = await ctl.next_type("verb:hook")
                await ctl.ack(hook, [{"verb": "hangup"}])
                result = await wait_result(worker, new["call_sid"])
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia gone")
        assert hook["data"]["dial_call_status"] == "completed"
        assert result.status == "completed"
        match = best_match(samples(bytes(callee.heard)), samples(spoken)[2000:6000])
        assert match.score > 0.9, match  # the caller's audio reached the callee in Asterisk
        posts = requests_of(asterisk, "POST", "/externalMedia")
        assert len(posts) == 1  # only the caller's: the far leg has none of its own


# --------------------------------------------------------------------------- trunk push


class TestRuntimeTrunkPush:
    """§5.1: auth → aor → endpoint → identify (→ registration) with PUT, at every connect; a
    refusal is reported with the attribute Asterisk refused; the others still go."""

    async def test_push_order_and_dialable(self, tmp_path: Path) -> None:
        trunks = {
            "carrier": {"host": "127.0.0.1", "port": 15180, "username": "acct", "password": "pw"},
        }
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            asterisk.on_dial("4155550123", "answer")
            async with ari_worker(tmp_path, asterisk.url, ECHO, trunks=trunks) as worker:
                await until(
                    lambda: len(requests_of(asterisk, "PUT", "/identify/carrier")) == 1,
                    "the trunk is pushed",
                )
                puts = [
                    r.path.split("/dynamic/")[1] for r in asterisk.requests if r.method == "PUT"
                ]
                assert puts == [
                    "res_pjsip/auth/carrier-auth",
                    "res_pjsip/aor/carrier",
                    "res_pjsip/endpoint/carrier",
                    "res_pjsip/identify/carrier",
                ]
                assert all(r.status == 200 for r in asterisk.requests if r.method == "PUT")
                route = worker.settings.routes[0]
                call = asyncio.create_task(worker.originate("carrier", "4155550123", route))
                await until(
                    lambda: (
                        worker.stasis is not None
                        and any(leg.phase.value == "answered" for leg in worker.stasis.legs)
                    ),
                    "a call through the pushed trunk is answered",
                )
                await asterisk.phone(live_leg(worker).channel_id).hang_up()
                assert (await asyncio.wait_for(call, WAIT)).status == "completed"

    async def test_refused_without_memory_wizard(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        trunks = {"a": {"host": "127.0.0.1"}, "b": {"host": "127.0.0.2"}}
        async with through_asterisk(
            tmp_path, ECHO, trunks=trunks, double={"sorcery_memory": False}
        ) as (asterisk, _worker):
            await until(
                lambda: len(requests_of(asterisk, "PUT", "/aor/b")) == 1,
                "both trunks tried",
            )
            await until(lambda: len(_refusals(caplog)) == 2, "both refusals logged")
        first, second = _refusals(caplog)
        assert "trunk 'a': auth" not in first  # no auth without a username: the aor comes first
        assert "trunk 'a': aor 'a'" in first
        assert "Cannot create sorcery objects of type 'aor'" in first
        assert "trunk 'b'" in second
        assert [r.status for r in asterisk.requests if r.method == "PUT"] == [403, 403]

    async def test_the_refused_attribute_is_named(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            client = AriClient(asterisk.url, USER, PASSWORD)
            try:
                obj = ConfigObject(
                    "res_pjsip", "endpoint", "t9", (("context", "x"), ("no_such_option", "1"))
                )
                assert await _refused_attribute(client, obj) == "no_such_option"
                with pytest.raises(AriError) as caught:  # the probe left nothing behind
                    await client.config_get("res_pjsip", "endpoint", "t9")
                assert caught.value.status == 404
                error = TrunkPushError(
                    "t", obj, AriError("PUT", "/x", 400, "failed"), "no_such_option"
                )
                assert "attribute no_such_option='1'" in str(error)
            finally:
                await client.aclose()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        str(getattr(r, "error", ""))
        for r in caplog.records
        if r.getMessage() == "Asterisk refused a trunk"
    ]


# --------------------------------------------------------------------------- the events socket


class TestEventsConnection:
    """ws_reconnect / ws_gap_caller_hangup: the call keeps its audio while the socket is down;
    after the reconnect, a resync ends the calls whose channel went away meanwhile."""

    async def test_drop_keeps_the_call_and_reconnects(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            await answered(worker)
            stasis = worker.stasis
            assert stasis is not None
            await asterisk.drop_websockets()
            await until(lambda: not stasis.connected.is_set(), "the drop is seen")
            before = len(phone.heard)
            await phone.send_audio(pattern(0.6, seed=2))
            await asyncio.sleep(0.2)
            assert len(phone.heard) > before  # audio flowed with no events socket
            await connected(worker)
            assert stasis.counters.connects == 2
            assert not live_leg(worker).ended  # still in the application: kept
            await phone.hang_up()
            result = (await _results(worker, 1))[0]
        assert result.status == "completed"

    async def test_hangup_during_the_gap_is_found_by_the_resync(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            await answered(worker)
            await asterisk.drop_websockets()
            await phone.hang_up()  # its events are lost
            result = (await _results(worker, 1))[0]
            await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia deleted")
        assert result.status == "completed"


class TestAsteriskDownAtStart:
    """SIP keeps working; the worker connects when Asterisk comes up, and takes its calls."""

    async def test_connects_later(self, tmp_path: Path) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        async with ari_worker(
            tmp_path, url, ECHO, ingress=("sip", "ari"), wait_connected=False
        ) as worker:
            assert worker.ua is not None  # SIP is up
            assert worker.stasis is not None
            assert not worker.stasis.connected.is_set()
            await asyncio.sleep(1.2)  # a retry or two against nothing
            async with AriDouble(username=USER, password=PASSWORD, port=port) as asterisk:
                await connected(worker, within=5.0)
                phone = await asterisk.call_in("echo")
                await answered(worker)
                await phone.hang_up()
                result = (await _results(worker, 1))[0]
        assert result.status == "completed"

    async def test_wrong_credentials_stop_the_start(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password="other") as asterisk:
            with pytest.raises(StartError, match=r"ari\.username / ari\.password"):
                async with ari_worker(tmp_path, asterisk.url, ECHO):
                    pass

    async def test_wrong_credentials_stop_a_front_before_its_media_processes(
        self, tmp_path: Path
    ) -> None:
        """With media processes, the front holds the events connection and checks them."""
        rtp = free_port(span=40)
        async with AriDouble(username=USER, password="other") as asterisk:
            settings = load_settings(
                None,
                data_dir=str(tmp_path),
                store=False,
                processes=2,
                ingress=["sip", "ari"],
                sip={"port": free_port()},
                rtp={"port_min": rtp, "port_max": rtp + 39},
                metrics={"enabled": False},
                ari={"url": asterisk.url, "username": USER, "password": PASSWORD},
            )
            front = Front(settings)
            try:
                with pytest.raises(FrontError, match=r"ari\.username / ari\.password"):
                    await front.start()
            finally:
                await front.close()  # whatever it started, if it started
        assert all(child.process is None for child in front.children)


# --------------------------------------------------------------------------- bad input


class TestMisbehavingAsterisk:
    """Unknown and malformed events are counted and ignored; a channel that vanishes between
    two REST calls ends only its call, with nothing leaked; RTP from a foreign source is
    dropped and counted."""

    async def test_bad_events_do_not_hurt_a_live_call(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            await answered(worker)
            stasis = worker.stasis
            assert stasis is not None
            for junk in ("not json", "[1]", '{"type": 3}', '{"type": "StasisStart"}'):
                stasis.dispatch(junk)
            stasis.dispatch('{"type": "ChannelTalkingStarted", "channel": {"id": "x"}}')
            assert stasis.counters.invalid_events == 4
            assert stasis.counters.unknown_events >= 1
            spoken = pattern(0.8, seed=4)
            await phone.send_audio(spoken)
            await asyncio.sleep(0.3)
            await phone.hang_up()
            result = (await _results(worker, 1))[0]
        assert result.status == "completed"
        match = best_match(samples(bytes(phone.heard)), samples(spoken)[1000:5000])
        assert match.score > 0.9, match

    async def test_channel_vanishing_before_answer(self, tmp_path: Path) -> None:
        """The caller hangs up while the worker is creating the call's bridge: 404s, the call
        ends, the bridge and ExternalMedia channel are deleted anyway."""
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            await phone.hang_up()
            await _results(worker, 1)
            await until(lambda: nothing_left(asterisk), "nothing leaked")
            stasis = worker.stasis
            assert stasis is not None
            await until(lambda: not stasis.legs, "the leg is released")

    async def test_a_failing_request_ends_only_its_call(self, tmp_path: Path) -> None:
        """Asterisk answers 500 to one call's ExternalMedia request: that call ends (cause
        ari-error, its bridge deleted, its caller hung up); a call beside it goes on."""
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            first = await asterisk.call_in("echo")
            await answered(worker)
            asterisk.fail_next("POST", "/externalMedia")
            second = await asterisk.call_in("echo")
            await asyncio.wait_for(second.ended.wait(), WAIT)
            assert second.hangup_reason == "failure"
            stasis = worker.stasis
            assert stasis is not None
            await until(lambda: len(stasis.legs) == 1, "the failed call's leg is released")
            assert len(asterisk.bridges) == 1  # the first call's
            spoken = pattern(0.8, seed=6)
            await first.send_audio(spoken)
            await asyncio.sleep(0.3)
            await first.hang_up()
            results = await _results(worker, 2)
        assert sorted(r.status for r in results) == ["completed", "failed"]
        match = best_match(samples(bytes(first.heard)), samples(spoken)[1000:5000])
        assert match.score > 0.9, match

    async def test_foreign_rtp_is_dropped(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            await answered(worker)
            leg = live_leg(worker)
            assert leg.media is not None
            target = leg.media.local
            sender = RtpSender(0, 4242)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder:
                for _ in range(20):
                    intruder.sendto(sender.build(bytes(160), 160), ("127.0.0.1", target[1]))
                await until(
                    lambda: (
                        leg.media is not None
                        and leg.media.endpoint.endpoint_counters.foreign_source >= 20
                    ),
                    "foreign packets counted",
                )
            await phone.hang_up()
            result = (await _results(worker, 1))[0]
        assert result.status == "completed"


class TestAriTrunksCommand:
    """``aispinner-worker ari-trunks push|delete``: the operator's way to update and remove the
    trunks the worker keeps in Asterisk (dependency order both ways; a second delete is fine)."""

    def test_push_then_delete(self, tmp_path: Path) -> None:
        loop = asyncio.new_event_loop()
        asterisk = AriDouble(username=USER, password=PASSWORD)
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(asterisk.start(), loop).result(WAIT)
        config = tmp_path / "worker.toml"
        config.write_text(
            f'[ari]\nurl = "{asterisk.url}"\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
            '[ari.trunks.carrier]\nhost = "127.0.0.1"\nusername = "u"\npassword = "p"\n'
            "registration = true\n",
            encoding="utf-8",
        )
        try:
            assert cli.main(["--config", str(config), "ari-trunks", "push"]) == 0
            assert cli.main(["--config", str(config), "ari-trunks", "delete", "carrier"]) == 0
            assert cli.main(["--config", str(config), "ari-trunks", "delete"]) == 0
            assert cli.main(["--config", str(config), "ari-trunks", "push", "nosuch"]) == 2
        finally:
            asyncio.run_coroutine_threadsafe(asterisk.stop(), loop).result(WAIT)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(WAIT)
            loop.close()
        calls = [
            (r.method, r.path.split("/dynamic/")[1], r.status)
            for r in asterisk.requests
            if "/dynamic/" in r.path
        ]
        objects = [
            "res_pjsip/auth/carrier-auth",
            "res_pjsip/aor/carrier",
            "res_pjsip/endpoint/carrier",
            "res_pjsip/identify/carrier",
            "res_pjsip/registration/carrier",
        ]
        assert calls == (
            [("PUT", o, 200) for o in objects]
            + [("DELETE", o, 204) for o in reversed(objects)]
            + [("DELETE", o, 404) for o in reversed(objects)]
        )


class _OtherClient:
    """Another client of the same Stasis application (an earlier worker process, or a second
    worker configured alike): a bare events socket and REST calls."""

    def __init__(self, asterisk: AriDouble) -> None:
        self.asterisk = asterisk
        self.events: list[dict[str, Any]] = []
        self.client = AriClient(asterisk.url, USER, PASSWORD)
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._ws = await websockets.connect(
            self.client.events_url("aispinner"), additional_headers=self.client.events_headers()
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self._ws:
                self.events.append(json.loads(message))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader
        await self.client.aclose()


class TestResyncAfterAnEarlierProcess:
    """What an earlier worker process left in the application is cleaned up by the next one's
    resync: an answered caller and its ExternalMedia channel are hung up, its bridge destroyed;
    a caller still ringing is adopted and gets a session."""

    async def test_orphans_removed(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            earlier = _OtherClient(asterisk)
            await earlier.connect()
            phone = await asterisk.call_in("echo")
            client = earlier.client
            await client.answer(phone.channel_id)
            await client.create_bridge("left-bridge", "mixing,dtmf_events", "left")
            media = await client.external_media("aispinner", "127.0.0.1:9", "ulaw")
            await client.add_channels("left-bridge", [phone.channel_id, media.id])
            await earlier.close()  # the earlier process is gone; Asterisk keeps it all
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                await asyncio.wait_for(phone.ended.wait(), WAIT)
                await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia removed")
                assert worker.stasis is not None
                assert worker.stasis.counters.orphans_removed == 3
                assert not worker.results  # nothing to run a session for

    async def test_an_empty_bridge_of_a_call_that_died_in_its_set_up_is_destroyed(
        self, tmp_path: Path
    ) -> None:
        """A bridge created for a call whose process died before a channel joined it is in no
        application (Asterisk subscribes an application to a bridge when its channel joins):
        found among all bridges by the worker's naming (``<id>-bridge``, ``call-<id>``); an
        empty bridge of anyone else's stays."""
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            earlier = _OtherClient(asterisk)
            await earlier.connect()
            client = earlier.client
            await client.create_bridge("1796.7-bridge", "mixing,dtmf_events", "call-1796.7")
            await client.create_bridge("conference-bridge", "mixing", "conference")
            await earlier.close()
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                await until(lambda: "1796.7-bridge" not in asterisk.bridges, "it is destroyed")
                assert worker.stasis is not None
                assert worker.stasis.counters.orphans_removed == 1
            assert "conference-bridge" in asterisk.bridges

    async def test_ringing_caller_adopted(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            earlier = _OtherClient(asterisk)
            await earlier.connect()
            phone = await asterisk.call_in("echo")  # enters Stasis while the earlier one runs
            await earlier.close()
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                await answered(worker)
                assert worker.stasis is not None
                assert worker.stasis.counters.adopted == 1
                spoken = pattern(0.8, seed=8)
                await phone.send_audio(spoken)
                await asyncio.sleep(0.3)
                await phone.hang_up()
                result = (await _results(worker, 1))[0]
        assert result.status == "completed"
        match = best_match(samples(bytes(phone.heard)), samples(spoken)[1000:5000])
        assert match.score > 0.9, match


class TestApplicationReplaced:
    """ws_replace: a second client subscribing to the application takes it over; the worker
    says so and takes it back after the longest backoff, and the other client is the one
    replaced then."""

    async def test_taken_back(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            stasis = worker.stasis
            assert stasis is not None
            other = _OtherClient(asterisk)
            await other.connect()
            try:
                await until(lambda: not stasis.connected.is_set(), "the worker is replaced")
                await until(lambda: stasis.counters.connects == 2, "the worker takes it back")
                await until(
                    lambda: any(e["type"] == "ApplicationReplaced" for e in other.events),
                    "the other client is told",
                )
            finally:
                await other.close()
            phone = await asterisk.call_in("echo")
            await answered(worker)
            await phone.hang_up()
            await _results(worker, 1)
        assert any("took over the Stasis application" in r.getMessage() for r in caplog.records)


class TestOriginateGuards:
    """A number or trunk that could change the dial string is refused before Asterisk sees it;
    no originate while the events socket is down (its outcome could not be known)."""

    @pytest.mark.parametrize(
        ("trunk", "number"),
        [("sippuas", "123&PJSIP/999@evil"), ("sippuas", "1,2"), ("a/b", "123"), ("", "1")],
    )
    async def test_refused_dial_strings(self, tmp_path: Path, trunk: str, number: str) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            with pytest.raises(RemoteError, match="not a dialable"):
                await worker.originate(trunk, number, worker.settings.routes[0])
        assert not requests_of(asterisk, "POST", "/channels")

    async def test_no_originate_while_disconnected(self, tmp_path: Path) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        async with ari_worker(tmp_path, url, ECHO, wait_connected=False) as worker:
            with pytest.raises(AriError, match="events connection to Asterisk is down"):
                await worker.originate("sippuas", "123", worker.settings.routes[0])


class TestShutdownWithCallsUp:
    """Closing the worker hangs up its Asterisk calls and removes what it made there."""

    async def test_close_hangs_up(self, tmp_path: Path) -> None:
        async with AriDouble(username=USER, password=PASSWORD) as asterisk:
            async with ari_worker(tmp_path, asterisk.url, ECHO) as worker:
                phone = await asterisk.call_in("echo")
                await answered(worker)
            await asyncio.wait_for(phone.ended.wait(), WAIT)
            await until(lambda: nothing_left(asterisk), "bridge and ExternalMedia removed")
        assert phone.hangup_reason == "normal"


class TestMediaTakenAway:
    """Someone else deletes the call's ExternalMedia channel or destroys its bridge: the call
    cannot have audio any more, so it ends (cause media-lost) and the rest is cleaned up; a
    422 on a request whose channel is still there ends the call as an error."""

    @pytest.mark.parametrize("what", ["media", "bridge"])
    async def test_deleted_by_another_client(self, tmp_path: Path, what: str) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            phone = await asterisk.call_in("echo")
            leg = await answered(worker)
            client = AriClient(asterisk.url, USER, PASSWORD)
            try:
                if what == "media":
                    await client.hangup(leg.media_id)
                else:
                    await client.destroy_bridge(leg.bridge_id)
            finally:
                await client.aclose()
            await asyncio.wait_for(phone.ended.wait(), WAIT)
            result = (await _results(worker, 1))[0]
            await until(lambda: nothing_left(asterisk), "the rest removed")
        assert leg.end is not None
        assert leg.end.cause == "media-lost"
        assert result.status == "completed"  # it was answered; the media went away
        assert phone.hangup_reason == "normal"

    async def test_refused_join_with_the_channel_still_there(self, tmp_path: Path) -> None:
        async with through_asterisk(tmp_path, ECHO) as (asterisk, worker):
            refusal = DoubleAriError(
                422, "Unprocessable Entity", "Channel not in Stasis application"
            )
            asterisk.fail_next("POST", "/addChannel", refusal)
            phone = await asterisk.call_in("echo")
            await asyncio.wait_for(phone.ended.wait(), WAIT)
            result = (await _results(worker, 1))[0]
            await until(lambda: nothing_left(asterisk), "the rest removed")
        assert result.status == "failed"
        assert phone.hangup_reason == "failure"
        assert requests_of(asterisk, "GET", f"/channels/{phone.channel_id}")  # it looked first
