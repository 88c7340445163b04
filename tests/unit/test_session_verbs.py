"""``CallSession`` verb execution without sockets: a fake leg, synthesizer and fetcher, and the
media pipeline driven by hand (``next_out`` is what the RTP clock would call every 20 ms)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from worker.agent.verbs import parse_verb
from worker.config import RouteSettings
from worker.session.session import CallSession, SessionServices
from worker.sip.call import CallState

FRAME = 160  # bytes: 20 ms at 8 kHz, 16-bit


class FakeLeg:
    """What ``CallSession`` uses of a ``SipCall``."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.log = logging.getLogger("test.session")
        self.state = CallState.ANSWERED
        self.direction = "inbound"
        self.from_user = "alice"
        self.to_user = "100"
        self.caller_name = ""
        self.call_id = "cid"
        self.remote = ("127.0.0.1", 5060)
        self.ua = SimpleNamespace(port=5060)
        self.invite = None
        self.answered: asyncio.Future[None] = loop.create_future()
        self.answered.set_result(None)
        self.ended: asyncio.Future[Any] = loop.create_future()
        self.hangups: list[str] = []
        self.dtmf_sent: list[tuple[str, int, float]] = []
        self.on_dtmf: Any = None
        self.audio_source: Any = None
        self.on_tick_done: Any = None
        self.on_state: Any = None
        self.on_audio: Any = None

    @property
    def is_ended(self) -> bool:
        return self.state is CallState.ENDED

    async def answer(self) -> None:
        self.state = CallState.ANSWERED

    async def ring(self, early_media: bool = False) -> None:
        self.state = CallState.RINGING

    async def hangup(
        self, cause: str = "local-hangup", status: int = 480, reason: Any = None
    ) -> None:
        self.hangups.append(cause)
        self.state = CallState.ENDED

    def send_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        self.dtmf_sent.append((digit, duration_ms, asyncio.get_running_loop().time()))
        return True


class FakeFetcher:
    def __init__(self, frames: int = 2) -> None:
        self.fetches = 0
        self.frames = frames

    async def fetch(self, url: str, rate: int) -> bytes:
        self.fetches += 1
        return b"\x10\x00" * (FRAME // 2) * self.frames


class FakeSynth:
    def __init__(self) -> None:
        self.calls = 0

    async def synthesize(self, text: str, **kw: Any) -> bytes:
        self.calls += 1
        return b"\x10\x00" * (FRAME // 2) * 2


def make_session(
    tmp_path: Path, place_call: Any = None
) -> tuple[CallSession, FakeLeg, FakeFetcher, FakeSynth]:
    leg = FakeLeg()
    fetcher = FakeFetcher()
    synth = FakeSynth()
    settings = SimpleNamespace(data_dir=tmp_path, sip=SimpleNamespace(host="127.0.0.1"))
    services = SessionServices(
        settings=settings,  # type: ignore[arg-type]
        synthesizer=synth,
        fetcher=fetcher,  # type: ignore[arg-type]
        publish=lambda event: None,
        place_call=place_call,
    )
    route = RouteSettings(match="*", agent_url="ws://x", record=False, trunk="t")
    session = CallSession(leg, route, services)  # type: ignore[arg-type]
    return session, leg, fetcher, synth


async def pump(session: CallSession, frames: int) -> None:
    """Run the media clock for ``frames`` ticks, letting the verbs react between ticks."""
    for i in range(frames):
        session.pipeline.next_out(float(i))
        for _ in range(5):
            await asyncio.sleep(0)


class TestPlayLoop:
    async def test_interrupted_play_forever_stops(self, tmp_path: Path) -> None:
        """A ``play`` looping forever that is cleared (barge-in, killAudio) ends; it does not
        start the next round."""
        session, _leg, fetcher, _ = make_session(tmp_path)
        verb = parse_verb({"verb": "play", "url": "http://x/a.wav", "loop": "forever"})
        task = asyncio.ensure_future(session._dispatch(verb))
        await pump(session, 5)  # a couple of rounds play out
        assert fetcher.fetches >= 2
        session.pipeline.clear()  # what barge-in does
        await pump(session, 3)
        try:
            assert task.done(), "play kept looping after it was interrupted"
        finally:
            task.cancel()

    async def test_loop_zero_means_forever(self, tmp_path: Path) -> None:
        """jambonz ``loop: 0`` repeats forever (verbs.py documents it for play)."""
        session, _leg, fetcher, synth = make_session(tmp_path)
        play = asyncio.ensure_future(
            session._dispatch(parse_verb({"verb": "play", "url": "http://x/a.wav", "loop": 0}))
        )
        await pump(session, 12)
        try:
            assert not play.done()
            assert fetcher.fetches >= 4
        finally:
            play.cancel()
        say = asyncio.ensure_future(
            session._dispatch(parse_verb({"say": {"text": "hi", "loop": 0}}))
        )
        await pump(session, 12)
        try:
            assert not say.done()
            assert synth.calls >= 4
        finally:
            say.cancel()


class FakeOtherLeg(FakeLeg):
    def __init__(self) -> None:
        super().__init__()
        self.state = CallState.RINGING
        self.answered = asyncio.get_running_loop().create_future()


class TestDialWhenTheCallerHangsUp:
    async def _run(self, tmp_path: Path, answer_first: bool) -> FakeOtherLeg:
        other = FakeOtherLeg()
        placed = asyncio.Event()

        async def place_call(*args: Any, **kw: Any) -> FakeOtherLeg:
            placed.set()
            return other

        session, leg, _, _ = make_session(tmp_path, place_call)
        session._queue.extend(
            [parse_verb({"verb": "dial", "target": [{"type": "phone", "number": "200"}]})]
        )
        session._acked = True
        driver = asyncio.ensure_future(session._execute())  # what _drive runs
        await asyncio.wait_for(placed.wait(), 2)
        if answer_first:
            other.state = CallState.ANSWERED
            other.answered.set_result(None)
        for _ in range(10):
            await asyncio.sleep(0)
        # The caller hangs up: CallSession._run cancels the driver, then finishes the call.
        leg.state = CallState.ENDED
        driver.cancel()
        await asyncio.gather(driver, return_exceptions=True)
        await session._finish()
        for _ in range(10):
            await asyncio.sleep(0)
        return other

    async def test_ringing_leg_is_cancelled(self, tmp_path: Path) -> None:
        other = await self._run(tmp_path, answer_first=False)
        assert other.hangups, "the dialled leg kept ringing after the caller hung up"

    async def test_bridged_leg_is_hung_up(self, tmp_path: Path) -> None:
        other = await self._run(tmp_path, answer_first=True)
        assert other.hangups, "the dialled leg stayed up after the caller hung up"


class FakeControl:
    """The jambonz control socket as the session uses it: hooks are acked empty at once."""

    def __init__(self) -> None:
        self.hooks: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[str] = []
        self.notify_events = False

    async def verb_hook(
        self, hook: str, info: dict[str, Any], results: dict[str, Any], verb_id: Any = None
    ) -> Any:
        self.hooks.append((hook, results))
        return None

    def verb_error(self, error: str, **kw: Any) -> None:
        self.errors.append(error)

    def verb_status(self, *a: Any, **kw: Any) -> None:
        pass

    def call_status(self, *a: Any, **kw: Any) -> None:
        pass


class TestGather:
    async def test_min_digits_met_then_timeout_is_dtmf_detected(self, tmp_path: Path) -> None:
        """``minDigits`` met when the inter-digit timer fires: the digits are the result
        (``dtmfDetected``), as without ``minDigits``; fewer than ``minDigits`` is a timeout."""
        for pressed, reason in (("12", "dtmfDetected"), ("1", "timeout")):
            session, _leg, _, _ = make_session(tmp_path)
            control = FakeControl()
            session.control = control  # type: ignore[assignment]
            verb = parse_verb(
                {
                    "verb": "gather",
                    "actionHook": "/g",
                    "minDigits": 2,
                    "maxDigits": 4,
                    "timeout": 0.2,
                }
            )
            task = asyncio.ensure_future(session._dispatch(verb))
            await asyncio.sleep(0.01)
            for digit in pressed:
                session._on_dtmf(digit, 100, "rfc4733")
            await asyncio.wait_for(task, 2)
            assert control.hooks == [("/g", {"digits": pressed, "reason": reason})]

    async def test_cancelled_during_prompt_leaves_no_task(self, tmp_path: Path) -> None:
        """A gather killed (redirect) while its prompt plays leaves no task behind waiting for
        a digit that will never come."""
        session, _leg, _, _ = make_session(tmp_path)
        verb = parse_verb({"verb": "gather", "say": {"text": "press a key"}, "timeout": 5})
        before = asyncio.all_tasks()
        task = asyncio.ensure_future(session._dispatch(verb))
        await pump(session, 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert asyncio.all_tasks() - before == set()


class TestJambonzCallStatusCommand:
    """``call:status`` ``no-answer`` rejects only an unanswered call (jambonz _onCommand)."""

    async def test_no_answer_on_an_answered_call_is_refused(self, tmp_path: Path) -> None:
        from worker.agent.jambonz import CallStatusCommand

        session, leg, _, _ = make_session(tmp_path)
        errors: list[tuple[str, str]] = []
        session.control = SimpleNamespace(  # type: ignore[assignment]
            verb_error=lambda error, verb: errors.append((verb, error))
        )
        session._command(CallStatusCommand(call_status="no-answer"))
        await asyncio.sleep(0)
        assert leg.hangups == []
        assert errors == [("call:status", "no-answer applies only to an unanswered call")]

    async def test_no_answer_rejects_a_ringing_call(self, tmp_path: Path) -> None:
        from worker.agent.jambonz import CallStatusCommand

        session, leg, _, _ = make_session(tmp_path)
        leg.state = CallState.RINGING
        session._command(CallStatusCommand(call_status="no-answer"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert leg.hangups == ["agent-hangup"]


class TestDtmfVerbPacing:
    async def test_long_digit_is_capped_and_paced_by_what_was_sent(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        session, leg, _, _ = make_session(tmp_path)
        slept: list[float] = []
        real_sleep = asyncio.sleep

        async def fake_sleep(seconds: float) -> None:
            slept.append(seconds)
            await real_sleep(0)

        monkeypatch.setattr(asyncio, "sleep", fake_sleep)
        await session._send_dtmf("1", 20000)
        assert [(d, ms) for d, ms, _ in leg.dtmf_sent] == [("1", 8000)]
        assert slept == [8.1]
