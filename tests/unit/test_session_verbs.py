"""``CallSession`` with the jambonz driver, without sockets: a typed fake leg, synthesizer,
fetcher and control channel, and a manual clock; the media clock is ``Harness.run_ticks``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.fakes import FakeLeg, make_harness
from worker.agent.jambonz import CallStatusCommand
from worker.agent.verbs import parse_verb
from worker.legs import LegDtmf, LegEnd
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
