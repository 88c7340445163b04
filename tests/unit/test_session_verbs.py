"""``CallSession`` with the jambonz driver, without sockets: a typed fake leg, synthesizer,
fetcher and control channel, and a manual clock; the media clock is ``Harness.run_ticks``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeControl, FakeLeg, make_harness
from worker.agent.jambonz import (
    AckTimedOut,
    CallStatusCommand,
    ConfigCommand,
    DtmfCommand,
    ListenStatusCommand,
    MuteStatusCommand,
    RedirectCommand,
    RedirectHookCommand,
    SipRequestCommand,
)
from worker.agent.verbs import ConfigVerb, Verb, parse_verb
from worker.config import RouteSettings
from worker.errors import ConfigError
from worker.legs import Leg, LegDtmf, LegEnd
from worker.session.fetch import FetchError
from worker.session.pipeline import AgentSink
from worker.session.session import CallSession
from worker.session.tts import SynthesisError
from worker.session.verbs import handle_command
from worker.session.verbs.calls import send_digits


class TestPlayLoop:
    async def test_interrupted_play_forever_stops(self, tmp_path: Path) -> None:
        """A ``play`` looping forever that is cleared (barge-in, killAudio) ends; it does not
        start the next round."""
        h = make_harness(tmp_path)
        verb = parse_verb({"verb": "play", "url": "http://x/a.wav", "loop": "forever"})
        task = asyncio.ensure_future(h.driver.dispatch(verb))
        await h.run_ticks(5)  # a couple of rounds play out
        assert h.fetcher.fetches >= 2
        h.session.pipeline.clear()  # what barge-in does
        await h.run_ticks(3)
        try:
            assert task.done(), "play kept looping after it was interrupted"
        finally:
            task.cancel()

    async def test_loop_zero_means_forever(self, tmp_path: Path) -> None:
        """jambonz ``loop: 0`` repeats forever (verbs.py documents it for play)."""
        h = make_harness(tmp_path)
        play = asyncio.ensure_future(
            h.driver.dispatch(parse_verb({"verb": "play", "url": "http://x/a.wav", "loop": 0}))
        )
        await h.run_ticks(12)
        try:
            assert not play.done()
            assert h.fetcher.fetches >= 4
        finally:
            play.cancel()
        say = asyncio.ensure_future(
            h.driver.dispatch(parse_verb({"say": {"text": "hi", "loop": 0}}))
        )
        await h.run_ticks(12)
        try:
            assert not say.done()
            assert h.synth.calls >= 4
        finally:
            say.cancel()


class TestDialWhenTheCallerHangsUp:
    async def _run(self, tmp_path: Path, answer_first: bool) -> FakeLeg:
        other = FakeLeg(direction="outbound")
        placed = asyncio.Event()

        async def place_call(*args: Any, **kw: Any) -> FakeLeg:
            placed.set()
            return other

        h = make_harness(tmp_path, place_call=place_call)
        h.driver.replace_verbs(
            [parse_verb({"verb": "dial", "target": [{"type": "phone", "number": "200"}]})],
            queue=True,
        )
        driver = asyncio.ensure_future(h.driver.execute())  # what run() runs after the ack
        await asyncio.wait_for(placed.wait(), 2)
        if answer_first:
            other.far_end_answers()
        await h.clock.settle()
        # The caller hangs up: CallSession._run cancels the driver, then finishes the call.
        h.leg.end(LegEnd("remote-bye"))
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        await h.session._finish()
        await h.clock.settle()
        return other

    async def test_ringing_leg_is_cancelled(self, tmp_path: Path) -> None:
        other = await self._run(tmp_path, answer_first=False)
        assert other.hangups, "the dialled leg kept ringing after the caller hung up"

    async def test_bridged_leg_is_hung_up(self, tmp_path: Path) -> None:
        other = await self._run(tmp_path, answer_first=True)
        assert other.hangups, "the dialled leg stayed up after the caller hung up"


class TestGather:
    async def test_min_digits_met_then_timeout_is_dtmf_detected(self, tmp_path: Path) -> None:
        """``minDigits`` met when the inter-digit timer fires: the digits are the result
        (``dtmfDetected``), as without ``minDigits``; fewer than ``minDigits`` is a timeout."""
        for pressed, reason in (("12", "dtmfDetected"), ("1", "timeout")):
            h = make_harness(tmp_path)
            verb = parse_verb(
                {
                    "verb": "gather",
                    "actionHook": "/g",
                    "minDigits": 2,
                    "maxDigits": 4,
                    "timeout": 0.2,
                }
            )
            task = asyncio.ensure_future(h.driver.dispatch(verb))
            await h.clock.advance(0.01)
            for digit in pressed:
                h.leg.emit(LegDtmf(digit, 100, "rfc4733"))
            await h.clock.advance(0.3)
            assert task.done()
            assert h.control.hooks == [("/g", {"digits": pressed, "reason": reason})]

    async def test_cancelled_during_prompt_leaves_no_task(self, tmp_path: Path) -> None:
        """A gather killed (redirect) while its prompt plays leaves no task behind waiting for
        a digit that will never come."""
        h = make_harness(tmp_path)
        verb = parse_verb({"verb": "gather", "say": {"text": "press a key"}, "timeout": 5})
        before = asyncio.all_tasks()
        task = asyncio.ensure_future(h.driver.dispatch(verb))
        await h.run_ticks(1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.clock.settle(5)
        assert asyncio.all_tasks() - before == set()


class TestJambonzCallStatusCommand:
    """``call:status`` ``no-answer`` rejects only an unanswered call (jambonz _onCommand)."""

    async def test_no_answer_on_an_answered_call_is_refused(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        handle_command(h.driver, CallStatusCommand(call_status="no-answer"))
        await h.clock.settle()
        assert h.leg.hangups == []
        assert h.control.errors == [("call:status", "no-answer applies only to an unanswered call")]

    async def test_no_answer_rejects_a_ringing_call(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, answered=False)
        h.leg.ring()
        handle_command(h.driver, CallStatusCommand(call_status="no-answer"))
        await h.clock.settle()
        assert h.leg.hangups == ["agent-hangup"]
        assert h.leg.hangup_statuses == [503]


class TestDtmfVerbPacing:
    async def test_long_digit_is_capped_and_paced_by_what_was_sent(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        task = asyncio.ensure_future(send_digits(h.driver, "1", 20000))
        await h.clock.advance(8.05)
        assert not task.done()  # 8 s of digit, then 100 ms of gap
        await h.clock.advance(0.1)
        assert task.done()
        assert [(d, ms) for d, ms, _ in h.leg.dtmf_sent] == [("1", 8000)]


def bridge_of(session: CallSession) -> Leg | None:
    return session.bridge


def verbs(*items: dict[str, Any]) -> tuple[Verb, ...]:
    return tuple(parse_verb(item) for item in items)


class TestJambonzSessionNewAndTheVerbQueue:
    """§1.4-1.6: session:new from the leg's info, the acked verbs run in order, an actionHook's
    ack replaces the rest, a verb that raises becomes jambonz:error, and when the verbs run out
    the driver returns (the session hangs up)."""

    async def test_run_in_order_then_done(self, tmp_path: Path) -> None:
        control = FakeControl(
            verbs({"verb": "pause", "length": 1}, {"verb": "tag", "data": {"k": "v"}})
        )
        h = make_harness(tmp_path, answered=False, control=control)
        run = asyncio.ensure_future(h.driver.run())
        await h.clock.advance(0.5)
        assert h.leg.rang == [False]  # 180 once the app took the call
        assert not run.done()
        await h.clock.advance(0.6)
        assert run.done()
        assert h.driver.customer_data == {"k": "v"}
        data = control.session_new_data
        assert data is not None
        assert (data["call_sid"], data["from"], data["call_status"]) == (
            h.session.call_sid,
            "alice",
            "trying",
        )
        assert [e for e, _ in control.verb_events] == ["starting", "finished"] * 2
        assert h.driver.call_info()["customerData"] == {"k": "v"}
        assert h.driver.counters().reconnects == 3

    async def test_hook_ack_replaces_the_rest(self, tmp_path: Path) -> None:
        control = FakeControl(
            verbs(
                {"verb": "redirect", "actionHook": "/next"},
                {"verb": "tag", "data": {"never": True}},
            )
        )
        control.hook_verbs.append(verbs({"verb": "tag", "data": {"from": "hook"}}))
        h = make_harness(tmp_path, control=control)
        await asyncio.wait_for(h.driver.run(), 2)
        assert control.hooks == [("/next", {})]
        assert h.driver.customer_data == {"from": "hook"}

    async def test_a_verb_that_raises_is_reported(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, control=FakeControl(verbs({"verb": "play", "url": "x"})))

        async def broken(url: str, rate: int) -> bytes:
            raise RuntimeError("disk on fire")

        h.fetcher.fetch = broken  # type: ignore[method-assign]
        await asyncio.wait_for(h.driver.run(), 2)
        assert h.control.errors == [("play", "disk on fire")]

    @pytest.mark.parametrize("refused", [True, False])
    async def test_agent_that_does_not_take_the_call(self, tmp_path: Path, refused: bool) -> None:
        ack = AckTimedOut(msgid="s", for_type="session:new", request_msgid="s")
        control = FakeControl(refuse=refused, ack=ack)
        h = make_harness(tmp_path, answered=False, control=control)
        await asyncio.wait_for(h.driver.run(), 2)
        assert h.leg.hangups == ["agent-unreachable" if refused else "agent-no-ack"]
        assert h.session.status.status.value == "failed"
        assert h.driver.failure is not None

    async def test_redirect_command_replaces_the_running_verb(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, control=FakeControl(verbs({"verb": "pause", "length": 60})))
        run = asyncio.ensure_future(h.driver.run())
        await h.clock.advance(1)
        handle_command(
            h.driver,
            RedirectCommand(verbs=verbs({"verb": "tag", "data": {"a": 1}}), queue_command=False),
        )
        await h.clock.advance(0.1)
        assert run.done()
        assert h.driver.customer_data == {"a": 1}


class TestJambonzCommands:
    async def test_each_command(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        pipeline = h.session.pipeline
        handle_command(
            h.driver,
            RedirectHookCommand(
                call_hook="https://example.invalid/app",
                child_call_hook=None,
                parent_call=None,
                child_call=None,
            ),
        )
        handle_command(h.driver, MuteStatusCommand(mute=True))
        assert pipeline.muted
        handle_command(
            h.driver, ListenStatusCommand(kind="listen", status="pause")
        )  # no listen: nothing
        pipeline.sink = AgentSink(lambda pcm: None, 8000)
        handle_command(h.driver, ListenStatusCommand(kind="listen", status="pause"))
        assert pipeline.sink.paused
        handle_command(h.driver, DtmfCommand(digit="56", duration=250))
        await h.clock.advance(1.0)
        assert [(d, ms) for d, ms, _ in h.leg.dtmf_sent] == [("5", 250), ("6", 250)]
        handle_command(
            h.driver, SipRequestCommand(method="INFO", content_type="t/p", content="x", headers={})
        )
        assert h.leg.requests == [("INFO", "t/p", "x")]
        handle_command(h.driver, ConfigCommand(config=ConfigVerb(notify_events=True)))
        assert h.control.notify_events
        h.leg.end(LegEnd("remote-bye"))
        handle_command(
            h.driver, SipRequestCommand(method="INFO", content_type=None, content=None, headers={})
        )
        assert [verb for verb, _ in h.control.errors] == ["redirect", "sip:request"]


class TestDialVerb:
    async def test_no_trunk_is_an_error(self, tmp_path: Path) -> None:
        route = RouteSettings(match="*", agent_url="ws://x", record=False)
        h = make_harness(tmp_path, route=route)
        verb = parse_verb(
            {"verb": "dial", "target": [{"type": "phone", "number": "2"}], "actionHook": "/d"}
        )
        await h.driver.dispatch(verb)
        assert h.control.hooks == [("/d", {"dial_call_status": "failed"})]
        assert h.control.errors

    async def test_placing_fails(self, tmp_path: Path) -> None:
        async def place(*args: Any, **kw: Any) -> FakeLeg:
            raise ConfigError("no trunk named 't'")

        h = make_harness(tmp_path, place_call=place)
        verb = parse_verb(
            {"verb": "dial", "target": [{"type": "phone", "number": "2"}], "actionHook": "/d"}
        )
        await h.driver.dispatch(verb)
        assert h.control.hooks == [("/d", {"dial_call_status": "failed"})]

    @pytest.mark.parametrize(
        ("cause", "status", "reported"), [("busy", 486, "busy"), ("x", 503, "failed")]
    )
    async def test_far_end_refuses(
        self, tmp_path: Path, cause: str, status: int, reported: str
    ) -> None:
        other = FakeLeg(direction="outbound")

        async def place(*args: Any, **kw: Any) -> FakeLeg:
            return other

        h = make_harness(tmp_path, place_call=place)
        verb = parse_verb(
            {"verb": "dial", "target": [{"type": "phone", "number": "2"}], "actionHook": "/d"}
        )
        task = asyncio.ensure_future(h.driver.dispatch(verb))
        await h.clock.settle()
        other.end(LegEnd(cause, status))
        await asyncio.wait_for(task, 2)
        assert h.control.hooks == [
            ("/d", {"dial_call_status": reported, "dial_sip_status": status})
        ]

    async def test_answered_until_the_time_limit(self, tmp_path: Path) -> None:
        other = FakeLeg(direction="outbound")

        async def place(*args: Any, **kw: Any) -> FakeLeg:
            return other

        h = make_harness(tmp_path, place_call=place)
        verb = parse_verb(
            {
                "verb": "dial",
                "target": [{"type": "phone", "number": "2"}],
                "timeLimit": 2,
                "actionHook": "/d",
            }
        )
        task = asyncio.ensure_future(h.driver.dispatch(verb))
        await h.clock.settle()
        assert bridge_of(h.session) is None  # no media from the far end yet
        other.far_end_answers()
        await h.clock.settle()
        assert bridge_of(h.session) is other
        await h.clock.advance(2.5)
        assert task.done()
        assert other.hangups == ["bridge-ended"]
        assert bridge_of(h.session) is None
        (hook,) = h.control.hooks
        assert hook[1]["dial_call_status"] == "completed"
        assert hook[1]["dial_call_duration"] == 2


class TestPromptAndGatherErrors:
    async def test_say_synthesis_error(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)

        async def broken(text: str, **kw: Any) -> bytes:
            raise SynthesisError("no voice")

        h.synth.synthesize = broken  # type: ignore[method-assign]
        await h.driver.dispatch(parse_verb({"verb": "say", "text": "hi"}))
        assert h.control.errors == [("say", "no voice")]

    async def test_play_fetch_error(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)

        async def missing(url: str, rate: int) -> bytes:
            raise FetchError("404 for http://x/a.wav")

        h.fetcher.fetch = missing  # type: ignore[method-assign]
        await h.driver.dispatch(
            parse_verb({"verb": "play", "url": "http://x/a.wav", "actionHook": "/p"})
        )
        assert h.control.hooks == [
            ("/p", {"reason": "playFailed", "error": "404 for http://x/a.wav"})
        ]

    async def test_gather_speech_only_is_refused(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        await h.driver.dispatch(
            parse_verb({"verb": "gather", "input": ["speech"], "actionHook": "/g"})
        )
        assert h.control.hooks == [("/g", {"reason": "error", "error": "no recognizer"})]

    async def test_gather_digits_finish_key_and_prompt_barge_in(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        verb = parse_verb(
            {"verb": "gather", "say": {"text": "go"}, "finishOnKey": "#", "actionHook": "/g"}
        )
        task = asyncio.ensure_future(h.driver.dispatch(verb))
        await h.run_ticks(1)
        for digit in "12#":
            h.leg.emit(LegDtmf(digit, 100, "rfc4733"))
        await h.clock.settle()
        assert task.done()
        assert h.control.hooks == [("/g", {"digits": "12", "reason": "dtmfDetected"})]


class TestCallVerbs:
    async def test_decline_before_and_after_the_answer(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        await h.driver.dispatch(parse_verb({"verb": "sip:decline", "status": 486}))
        assert h.control.errors == [("sip:decline", "sip:decline on an answered call")]
        h2 = make_harness(tmp_path, answered=False)
        await h2.driver.dispatch(
            parse_verb({"verb": "sip:decline", "status": 486, "reason": "Busy"})
        )
        assert h2.leg.hangup_statuses == [486]
        assert (h2.session.status.status.value, h2.session.sip_status) == ("busy", 486)

    async def test_dtmf_pause_character(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        task = asyncio.ensure_future(send_digits(h.driver, "1w2", 100))
        await h.clock.advance(0.25)
        assert [d for d, _, _ in h.leg.dtmf_sent] == ["1"]
        await h.clock.advance(0.5)
        assert [d for d, _, _ in h.leg.dtmf_sent] == ["1", "2"]
        await h.clock.advance(0.3)
        assert task.done()

    async def test_answer_and_hangup(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, answered=False)
        await h.driver.dispatch(parse_verb({"verb": "answer"}))
        assert h.session.answered
        await h.driver.dispatch(parse_verb({"verb": "hangup"}))
        assert h.leg.hangups == ["agent-hangup"]


class TestDialParallelTargets:
    """Issue 11 #10: every target is dialled at once; the first to answer wins, the rest are
    cancelled; with every target failing, a busy one is reported."""

    def dial_two(self) -> tuple[list[FakeLeg], Any]:
        legs = [FakeLeg(direction="outbound"), FakeLeg(direction="outbound")]
        placed = iter(legs)

        async def place(*args: Any, **kw: Any) -> FakeLeg:
            return next(placed)

        return legs, place

    def verb(self) -> Verb:
        return parse_verb(
            {
                "verb": "dial",
                "target": [
                    {"type": "phone", "number": "201"},
                    {"type": "phone", "number": "202"},
                ],
                "timeLimit": 1,
                "actionHook": "/d",
            }
        )

    async def test_first_answer_wins(self, tmp_path: Path) -> None:
        (first, second), place = self.dial_two()
        h = make_harness(tmp_path, place_call=place)
        task = asyncio.ensure_future(h.driver.dispatch(self.verb()))
        await h.clock.settle()
        second.far_end_answers()
        await h.clock.settle()
        assert bridge_of(h.session) is second
        assert first.hangups == ["cancelled"]
        await h.clock.advance(1.5)
        assert task.done()
        assert h.control.hooks[0][1]["dial_call_status"] == "completed"
        assert second.hangups == ["bridge-ended"]

    async def test_all_fail(self, tmp_path: Path) -> None:
        (first, second), place = self.dial_two()
        h = make_harness(tmp_path, place_call=place)
        task = asyncio.ensure_future(h.driver.dispatch(self.verb()))
        await h.clock.settle()
        first.end(LegEnd("rejected", 503))
        await h.clock.settle()
        assert not task.done()
        second.end(LegEnd("busy", 486))
        await asyncio.wait_for(task, 2)
        assert h.control.hooks == [("/d", {"dial_call_status": "busy", "dial_sip_status": 486})]
