"""``CallSession``'s core without sockets: the leg's events feed the status table, the media
tick runs in its documented order (barge-in silences the very tick that heard the caller), a
``dial`` bridge carries audio both ways, recordings exist only with media, and ``run`` ends a
call with the right status and result whatever the driver does."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from media.g711 import PCMU
from media.rtp import RtpPacket, RtpSender
from media.stream import RtpStream
from tests.fakes import FakeLeg, make_harness
from worker.config import RouteSettings
from worker.events import models as ev
from worker.legs import (
    FRAME_BYTES,
    LegAnswered,
    LegDtmf,
    LegEarlyMedia,
    LegEnd,
    LegMediaChanged,
    LegRinging,
)
from worker.pacer import MediaPacer
from worker.session.echo_driver import EchoDriver
from worker.session.pipeline import AgentSink
from worker.session.session import (
    ALIGN_CONFIRM,
    ALIGN_FIRST_TICK,
    IN_MARGIN_S,
    OUT_MARGIN_S,
    REALIGN_TICKS,
    AgentCounters,
    CallSession,
    MarkEvent,
    tick_failed,
)
from worker.session.status import CallStatus, StatusChange

SILENCE = bytes(FRAME_BYTES)


def loud(frames: int, seed: int = 3) -> list[bytes]:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * 160) / 8000
    voice = 9000 * np.sin(2 * np.pi * 220 * t) * (1 + 0.3 * rng.standard_normal(t.size))
    pcm = np.clip(voice, -30000, 30000).astype("<i2").tobytes()
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


class ScriptedDriver:
    """An ``AgentDriver`` that records what the session tells it and runs ``script``."""

    def __init__(self, script: object = None, fail: bool = False) -> None:
        self.statuses: list[str] = []
        self.digits: list[str] = []
        self.marks: list[tuple[tuple[str, ...], MarkEvent]] = []
        self.closed = 0
        self.script = script
        self.fail = fail
        self.done = asyncio.Event()

    @property
    def failure(self) -> str | None:
        return "scripted" if self.fail else None

    async def run(self) -> None:
        if self.fail:
            raise RuntimeError("the driver broke")
        await self.done.wait()

    def on_status(self, change: StatusChange) -> None:
        self.statuses.append(change.new.value)

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        self.digits.append(digit)

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        self.marks.append((tuple(names), event))

    def counters(self) -> AgentCounters:
        return AgentCounters(reconnects=2)

    async def close(self) -> None:
        self.closed += 1


class TestStatusFromLegEvents:
    """jambonz call statuses come only from the leg's events through the status table."""

    async def test_ring_early_media_answer_hangup(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, answered=False)
        driver = ScriptedDriver()
        h.session.driver = driver
        h.leg.emit(LegRinging())
        h.leg.emit(LegEarlyMedia("PCMU", True))
        h.leg.emit(LegMediaChanged("PCMA", on_hold=True))
        h.leg.emit(LegAnswered("PCMA", True))
        h.leg.emit(LegRinging())  # late: ignored by the table
        assert driver.statuses == ["ringing", "early-media", "in-progress"]
        assert h.session.sip_status == 200
        statuses = [e.status for e in h.events if isinstance(e, ev.CallStatusEvent)]
        assert statuses == ["ringing", "early-media", "in-progress"]
        assert h.session.status.ignored == 1

    async def test_dtmf_fans_out(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        driver = ScriptedDriver()
        h.session.driver = driver
        heard: list[str] = []
        with h.session.dtmf_listener(heard.append):
            h.leg.emit(LegDtmf("7", 120, "sip-info"))
        h.leg.emit(LegDtmf("8", 120, "rfc4733"))
        assert heard == ["7"]
        assert driver.digits == ["7", "8"]
        assert h.session.digits == ["7", "8"]
        dtmf = [(e.digit, e.method) for e in h.events if isinstance(e, ev.CallDtmfEvent)]
        assert dtmf == [("7", "sip-info"), ("8", "rfc4733")]


class TestTheTick:
    async def test_barge_in_silences_the_tick_that_heard_the_caller(self, tmp_path: Path) -> None:
        route = RouteSettings(match="*", agent_url="ws://x", record=False, barge_in=True)
        h = make_harness(tmp_path, route=route)
        driver = ScriptedDriver()
        h.session.driver = driver
        prompt = (b"\x00\x20" * 80) * 100  # 1 s of a constant level
        h.session.pipeline.agent_audio(prompt, 8000)
        h.session.pipeline.mark("end")
        h.leg.incoming.extend([SILENCE] * 10 + loud(30))
        interrupted_at: int | None = None
        for tick in range(40):
            h.session.tick(h.clock.now())
            if interrupted_at is None and any(
                isinstance(e, ev.CallInterruptionEvent) for e in h.events
            ):
                interrupted_at = tick
            await h.clock.advance(0.02)
        assert interrupted_at is not None
        sent = h.leg.frames_sent
        assert all(frame != SILENCE for frame in sent[:interrupted_at])
        assert sent[interrupted_at] == SILENCE  # the same tick, not the next one
        assert driver.marks == [(("end",), "cleared")]
        (event,) = [e for e in h.events if isinstance(e, ev.CallInterruptionEvent)]
        assert event.reason == "barge-in"
        assert 0 < event.cleared_ms < 1000 - 10 * 20  # what was left after 10 quiet ticks

    async def test_agent_clear_is_an_interruption(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        driver = ScriptedDriver()
        h.session.driver = driver
        h.session.pipeline.agent_audio(b"\x00\x10" * 8000, 8000)  # 1 s
        h.session.pipeline.mark("m")
        h.session.clear_agent_audio()
        (event,) = [e for e in h.events if isinstance(e, ev.CallInterruptionEvent)]
        assert (event.reason, round(event.cleared_ms)) == ("agent-clear", 1000)
        assert driver.marks == [(("m",), "cleared")]
        assert h.session.counters().agent_audio_cleared_ms == 1000

    async def test_dial_bridge_carries_audio_both_ways(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        far = FakeLeg(direction="outbound")
        far.attach(h.session)  # not used: a bridge's leg has its own observer; keep it quiet
        far.observer = None
        h.session.bridge_to(far)
        caller_frame = b"\x01\x00" * 160
        far_frame = b"\x02\x00" * 160
        h.leg.incoming.append(caller_frame)
        far.incoming.append(far_frame)
        h.session.tick(h.clock.now())
        assert far.frames_sent == [caller_frame]
        assert h.leg.frames_sent == [far_frame]  # no queueing delay through the playout
        h.session.bridge_to(None)
        h.session.tick(h.clock.now())
        assert len(far.frames_sent) == 1


class TestRecordingOnlyWithMedia:
    async def test_recording_starts_with_media(self, tmp_path: Path) -> None:
        route = RouteSettings(match="*", action="echo", record=True)
        h = make_harness(tmp_path, route=route, answered=False)
        assert not (tmp_path / "recordings").exists()
        h.leg.answer()
        path = h.session.recording_path
        assert path is not None
        h.leg.incoming.extend(loud(50))
        await h.run_ticks(50)
        h.session.driver = EchoDriver(h.session)
        await h.session._finish()
        assert h.session._recording() == str(path)
        assert path.stat().st_size > 0

    async def test_an_empty_recording_is_removed(self, tmp_path: Path) -> None:
        route = RouteSettings(match="*", action="echo", record=True)
        h = make_harness(tmp_path, route=route)
        path = h.session.recording_path
        assert path is not None
        path.write_bytes(b"")
        assert h.session._recording() is None
        assert not path.exists()


class TestRunEndsTheCall:
    async def test_remote_hangup_completes(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        driver = ScriptedDriver()
        run = asyncio.ensure_future(h.session.run(driver))
        await h.clock.advance(3.0)
        h.leg.end(LegEnd("remote-bye"))
        result = await asyncio.wait_for(run, 2)
        assert (result.status, result.cause, result.duration_sec) == ("completed", "remote-bye", 3)
        assert driver.statuses == ["completed"]
        assert driver.closed == 1
        assert result.counters.reconnects == 2
        (done,) = [e for e in h.events if isinstance(e, ev.CallDoneEvent)]
        assert done.status == "completed"
        assert done.media is not None

    async def test_driver_failure_hangs_up(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path, answered=False)
        result = await asyncio.wait_for(h.session.run(ScriptedDriver(fail=True)), 2)
        assert h.leg.hangups == ["agent-failed"]
        assert result.status == "no-answer"  # 480 to the caller
        assert result.reason == "scripted"

    async def test_driver_done_hangs_up_an_answered_call(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        driver = ScriptedDriver()
        driver.done.set()
        result = await asyncio.wait_for(h.session.run(driver), 2)
        assert h.leg.hangups == ["agent-finished"]
        assert result.status == "completed"

    @pytest.mark.parametrize(
        ("cause", "status", "expected"),
        [("busy", 486, "busy"), ("no-answer", None, "no-answer"), ("rejected", 403, "failed")],
    )
    async def test_outbound_unanswered_never_meets_the_agent(
        self, tmp_path: Path, cause: str, status: int | None, expected: str
    ) -> None:
        leg = FakeLeg(direction="outbound")
        h = make_harness(tmp_path, answered=False, leg=leg)
        driver = ScriptedDriver(fail=True)  # would fail if it ran
        run = asyncio.ensure_future(h.session.run(driver))
        await h.clock.settle()
        leg.end(LegEnd(cause, status))
        result = await asyncio.wait_for(run, 2)
        assert result.status == expected
        assert result.reason == "scripted"  # the driver's own field, though it never ran
        assert h.leg.hangups == []

    async def test_outbound_answered_runs_the_driver(self, tmp_path: Path) -> None:
        leg = FakeLeg(direction="outbound")
        h = make_harness(tmp_path, answered=False, leg=leg)
        driver = ScriptedDriver()
        run = asyncio.ensure_future(h.session.run(driver))
        await h.clock.settle()
        leg.far_end_answers()
        await h.clock.settle()
        driver.done.set()
        result = await asyncio.wait_for(run, 2)
        assert result.status == "completed"

    async def test_tasks_end_with_the_call(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        forever = h.session.spawn(asyncio.sleep(3600))

        async def broken() -> None:
            raise ValueError("a call task failed")

        h.session.spawn(broken())
        await h.clock.settle()
        h.session.driver = ScriptedDriver()
        await h.session._finish()
        assert forever.cancelled()
        assert h.session.status.status is CallStatus.IN_PROGRESS


class TestTwilioDriverEvents:
    """What a Media Streams agent sends, as the driver hands it to the session."""

    async def test_media_marks_clear_and_bad_messages(self, tmp_path: Path) -> None:
        from media.g711 import ulaw_encode
        from worker.agent import twilio as tw
        from worker.agent.connection import TwilioClosed
        from worker.session.twilio_driver import TwilioDriver

        h = make_harness(tmp_path)
        driver = TwilioDriver(h.session)
        h.session.driver = driver
        driver.on_agent_event(tw.MediaReceived(ulaw_encode(b"\x00\x10" * 800)))
        driver.on_agent_event(tw.MarkRequested("m1"))
        driver.on_agent_event(tw.MarkRequested("x" * 300))  # too long a name
        driver.on_agent_event(tw.InvalidTwilioMessage("bad json", "{"))
        assert h.session.pipeline.playout.queued_ms == 100
        driver.on_agent_event(tw.Clear())
        assert h.session.pipeline.playout.queued_ms == 0
        assert driver.counters().invalid_agent_messages == 2
        driver.on_agent_event(TwilioClosed(1000, ""))
        await asyncio.wait_for(driver._closed.wait(), 1)
        driver.on_dtmf("1", 100)  # no socket: nothing to do
        driver.on_marks(("m",), "playout")
        await driver.close()


class _Recorder(list[tuple[bytes, bytes]]):
    """Stands in for the MP3 recorder: keeps each (caller, heard) pair it is given, in order."""

    def write_frame(self, caller: bytes, heard: bytes) -> None:
        self.append((caller, heard))

    def close(self) -> None:
        pass

    @property
    def callers(self) -> list[bytes]:
        return [caller for caller, _ in self]


def recording(session: CallSession) -> _Recorder:
    """Put a ``_Recorder`` in ``session``'s pipeline and return it."""
    recorder = _Recorder()
    session.pipeline.recorder = recorder  # type: ignore[assignment]
    return recorder


class _Pacer:
    """Records what a session asks of the media pacer."""

    def __init__(self) -> None:
        self.ticks: dict[object, Callable[[float], None]] = {}
        self.after: dict[object, object] = {}
        self.aligned: list[tuple[object, float, float]] = []

    def add(self, key: object, tick: Callable[[float], None], after: object = None) -> None:
        self.ticks[key] = tick
        self.after[key] = after

    def align(self, key: object, due: float, now: float, tolerance: float = 0.0) -> bool:
        self.aligned.append((key, due, now))
        return True

    def remove(self, key: object) -> None:
        self.ticks.pop(key, None)

    off: list[bool] | None = None
    """What successive ``misaligned`` checks answer (None: always off its moment)."""

    def misaligned(self, key: object, due: float, tolerance: float = 0.0) -> bool:
        return True if not self.off else self.off.pop(0)


class TestTickHalves:
    """The tick's two halves: the caller's (``tick_in``) and the one towards the caller
    (``tick_out``), each moved to just after what it waits for."""

    async def test_halves_registered_together_and_removed_together(self, tmp_path: Path) -> None:
        pacer = _Pacer()
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        session = h.session
        assert list(pacer.ticks) == [session, (session, "out")]
        assert pacer.after[(session, "out")] is session
        h.leg.end(LegEnd("hangup", None, None))
        await h.clock.advance(0.1)
        assert pacer.ticks == {}

    async def test_caller_half_aligns_to_the_frame_due_then_only_when_off_three_checks_running(
        self, tmp_path: Path
    ) -> None:
        pacer = _Pacer()
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        tick_in = pacer.ticks[h.session]
        h.leg.due = 5000.0123
        checks = ALIGN_FIRST_TICK + ALIGN_CONFIRM * REALIGN_TICKS
        for n in range(checks + REALIGN_TICKS):
            h.leg.incoming.append(b"\x01\x00" * 160)
            tick_in(1000.0 + 0.02 * n)
        mine = [x for key, due, now in pacer.aligned if key is h.session for x in (due, now)]
        expected = [
            x
            for n in (ALIGN_FIRST_TICK, checks)
            for x in (5000.0123 + IN_MARGIN_S, 1000.0 + 0.02 * (n - 1))
        ]
        assert mine == pytest.approx(expected)
        assert h.session.tick_moves == 2

    async def test_a_half_that_is_off_its_moment_only_now_and_then_stays(
        self, tmp_path: Path
    ) -> None:
        pacer = _Pacer()
        # The first check moves it; then the moment wavers: off, off, on time, off, off, ...
        pacer.off = [True] + [True, True, False] * 5
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        tick_in = pacer.ticks[h.session]
        h.leg.due = 5000.0123
        for n in range(ALIGN_FIRST_TICK + 15 * REALIGN_TICKS):
            h.leg.incoming.append(b"\x01\x00" * 160)
            tick_in(1000.0 + 0.02 * n)
        assert [key for key, _, _ in pacer.aligned] == [h.session]

    async def test_no_caller_audio_no_alignment(self, tmp_path: Path) -> None:
        pacer = _Pacer()
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        h.leg.due = 5000.0
        for n in range(3 * ALIGN_FIRST_TICK):
            pacer.ticks[h.session](1000.0 + 0.02 * n)
        assert pacer.aligned == []

    async def test_out_half_aligns_after_a_real_time_agents_frames(self, tmp_path: Path) -> None:
        pacer = _Pacer()
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        out_key = (h.session, "out")
        tick_out = pacer.ticks[out_key]
        for n in range(ALIGN_FIRST_TICK):
            now = 1000.0 + 0.02 * n
            h.session.pipeline.agent_audio(b"\x01\x00" * 160, 8000, now - 0.0137)
            tick_out(now)
        assert pacer.aligned == []  # fewer arrivals than it judges from
        for n in range(ALIGN_FIRST_TICK, ALIGN_FIRST_TICK + REALIGN_TICKS):
            now = 1000.0 + 0.02 * n
            h.session.pipeline.agent_audio(b"\x01\x00" * 160, 8000, now - 0.0137)
            tick_out(now)
        ((key, due, _),) = pacer.aligned
        assert key == out_key
        assert math.remainder(due - (1000.0 - 0.0137 + OUT_MARGIN_S), 0.02) == pytest.approx(0.0)

    async def test_recorder_pairs_the_halves_frames_in_order(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        recorded = recording(h.session)
        first, second = b"\x01\x00" * 160, b"\x02\x00" * 160
        h.leg.incoming.extend([first, second])
        h.session.tick_in(1000.0)
        h.session.tick_out(1000.004)
        assert [caller for caller, _ in recorded] == [first]
        h.session.tick_out(1000.024)  # the caller's half moved later: it waits for it
        assert len(recorded) == 1
        h.session.tick_in(1000.028)
        h.session.tick_out(1000.044)
        assert [caller for caller, _ in recorded] == [first, second]
        assert len(h.leg.frames_sent) == 3  # the caller heard every tick all the same

    async def test_a_frame_held_back_once_puts_no_silence_into_the_agents_stream(
        self, tmp_path: Path
    ) -> None:
        h = make_harness(tmp_path)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        first, second = b"\x01\x00" * 160, b"\x02\x00" * 160
        h.leg.incoming.append(first)
        h.session.tick_in(1000.0)
        h.session.tick_in(1000.02)  # nothing due: the jitter buffer's delay grew
        h.leg.incoming.append(second)
        h.session.tick_in(1000.04)
        assert sent == [first, second]
        h.session.tick_in(1000.06)  # not once more: the caller is silent, the agent hears it
        h.session.tick_in(1000.08)
        assert sent == [first, second, bytes(320)]

    @pytest.mark.parametrize("echoes", [True, False])
    async def test_the_other_half_follows_only_an_echoing_sink(
        self, tmp_path: Path, echoes: bool
    ) -> None:
        """The echo route's audio comes back inside the caller's half: the halves move
        together. An agent's comes back over its socket: the other half waits to learn when."""
        pacer = _Pacer()
        h = make_harness(tmp_path, answered=False, pacer=pacer)
        h.leg.answer()
        h.session.pipeline.sink = AgentSink(lambda pcm: None, 8000, echoes=echoes)
        h.leg.due = 5000.0123
        for n in range(ALIGN_FIRST_TICK):
            h.leg.incoming.append(b"\x01\x00" * 160)
            h.session.tick_in(1000.0 + 0.02 * n)
        keys = [key for key, _, _ in pacer.aligned]
        assert keys == ([h.session, (h.session, "out")] if echoes else [h.session])

    async def test_a_frame_held_back_goes_with_the_next_one(self, tmp_path: Path) -> None:
        """The jitter buffer lets two frames go at once after holding one back: both reach the
        agent in that tick, and the recorder gets them in order, nothing in between."""

        class Leg(FakeLeg):
            def pull_frame(self, now: float) -> bytes | None:
                return self.incoming.popleft() if self.incoming else None  # all that is due

        leg = Leg()
        h = make_harness(tmp_path, leg=leg)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        recorded = recording(h.session)
        frames = [bytes([n, 0]) * 160 for n in range(1, 4)]
        leg.incoming.append(frames[0])
        h.session.tick(1000.0)
        h.session.tick(1000.02)  # held back
        leg.incoming.extend(frames[1:])
        h.session.tick(1000.04)  # both due now
        assert sent == frames
        h.session.tick(1000.06)
        assert recorded.callers == frames

    async def test_ticks_the_pacer_skipped_drop_their_playout(self, tmp_path: Path) -> None:
        """A stalled loop: the pacer skipped five of tick_out's ticks. The agent audio they
        would have played is dropped, so the caller does not hear the rest 100 ms late."""
        h = make_harness(tmp_path)
        playout = h.session.pipeline.playout
        playout.write(b"\x01\x00" * 160 * 10)
        h.session.tick_out(1000.0)
        h.session.tick_out(1000.02)
        assert playout.queued_ms == 160.0
        h.session.tick_out(1000.14)  # 120 ms on: five ticks skipped
        assert playout.queued_ms == 40.0
        assert playout.counters.trimmed_ms == 100.0
        h.session.tick_out(1000.178)  # a move stretched this one interval: nothing dropped
        assert playout.queued_ms == 20.0


class TestTheCallersFrameOnArrival:
    """``LegObserver.on_caller_audio``: a frame the caller's half found missing goes to the
    agent when it arrives, not 20 ms later at the next tick; frames in time still go with
    the tick."""

    async def test_a_frame_the_tick_found_missing_goes_when_it_arrives(
        self, tmp_path: Path
    ) -> None:
        h = make_harness(tmp_path)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        first, second, third = (bytes([n, 0]) * 160 for n in range(1, 4))
        h.leg.incoming.append(first)
        h.session.tick_in(1000.0)
        h.session.tick_in(1000.02)  # the caller's frame is late
        assert sent == [first]
        h.leg.arrive(second, 1000.023)
        assert sent == [first, second]  # at its arrival
        h.leg.arrive(third, 1000.0385)  # just before its tick: it waits for it
        assert sent == [first, second]
        h.session.tick_in(1000.04)
        assert sent == [first, second, third]
        h.session.tick_in(1000.06)  # the caller is late again ...
        h.session.tick_in(1000.08)  # ... and then silent: the agent hears silence
        assert sent == [first, second, third, bytes(320)]

    @pytest.mark.parametrize("tick_phase", [0.001, 0.005, 0.013, 0.019])
    async def test_thirty_ms_packets_reach_the_agent_whole_and_without_silence(
        self, tmp_path: Path, tick_phase: float
    ) -> None:
        """30 ms packets (Asterisk keeps the caller's packetisation) complete 20 ms frames at
        two moments of three: frames taken at an arrival before their tick leave a tick with
        nothing to take, which must not count as the caller gone silent."""

        class StreamLeg(FakeLeg):
            def __init__(self) -> None:
                super().__init__()
                self.stream = RtpStream(PCMU, None, jitter_min_ms=4, jitter_early=True)
                self.sender = RtpSender(0, 7)

            def pull_frame(self, now: float) -> bytes | None:
                return self.stream.pull_frame(now)

            def packet(self, payload: bytes, now: float) -> None:
                wire = self.sender.build(payload, len(payload))
                self.stream.receive(RtpPacket.parse(wire), now)
                assert self.observer is not None
                self.observer.on_caller_audio(now)

        leg = StreamLeg()
        h = make_harness(tmp_path, leg=leg)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        payloads = [
            np.random.default_rng(n).integers(0, 256, 240, np.uint8).tobytes() for n in range(20)
        ]
        events = [(0.03 * n, 0, n) for n in range(20)]
        events += [(0.02 * k + tick_phase, 1, k) for k in range(30)]
        for at, kind, n in sorted(events):
            if kind == 0:
                leg.packet(payloads[n], 1000.0 + at)
            else:
                h.session.tick_in(1000.0 + at)
        audio = b"".join(sent)
        assert b"".join(PCMU.decode(p) for p in payloads) == audio.lstrip(b"\x00")[: 20 * 480]
        assert bytes(320) not in audio[audio.index(audio.lstrip(b"\x00")[:2]) :]

    async def test_frames_arriving_just_after_their_tick_go_at_once(self, tmp_path: Path) -> None:
        """The call's tick runs 1 ms before its caller's frames arrive: each would wait 19 ms
        for the next tick. It goes at its arrival instead, and the tick that finds nothing
        knows its frame went ahead: no silence for the agent, the recording in order."""
        h = make_harness(tmp_path)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        recorded = recording(h.session)
        frames = [bytes([n, 0]) * 160 for n in range(1, 12)]
        h.leg.incoming.append(frames[0])
        h.session.tick(1000.0)
        for n, frame in enumerate(frames[1:], start=1):
            h.leg.arrive(frame, 1000.001 + 0.02 * (n - 1))
            assert sent[-1] == frame  # at its arrival
            h.session.tick(1000.0 + 0.02 * n)
        assert sent == frames
        assert recorded.callers == frames

    async def test_the_recording_keeps_the_order_of_frames_taken_on_arrival(
        self, tmp_path: Path
    ) -> None:
        h = make_harness(tmp_path)
        recorded = recording(h.session)
        frames = [bytes([n, 0]) * 160 for n in range(1, 4)]
        h.leg.incoming.append(frames[0])
        h.session.tick(1000.0)
        h.session.tick(1000.02)  # late
        h.leg.arrive(frames[1], 1000.025)
        h.leg.incoming.append(frames[2])
        h.session.tick(1000.04)
        h.session.tick(1000.06)
        assert recorded.callers == frames

    async def test_audio_before_the_media_or_after_the_end_is_not_taken(
        self, tmp_path: Path
    ) -> None:
        h = make_harness(tmp_path, answered=False)
        sent: list[bytes] = []
        h.session.pipeline.sink = AgentSink(sent.append, 8000)
        h.leg.arrive(b"\x01\x00" * 160, 1000.0)  # early packets, no media tick yet
        h.leg.answer()
        h.leg.incoming.clear()
        h.leg.incoming.append(b"\x02\x00" * 160)
        h.session.tick_in(1000.02)
        h.session.tick_in(1000.04)  # late
        h.leg.end(LegEnd("hangup", None, None))
        await h.clock.advance(0.1)
        h.leg.arrive(b"\x03\x00" * 160, 1000.15)
        assert sent == [b"\x02\x00" * 160]

    async def test_an_arrival_that_raises_hangs_the_call_up(self, tmp_path: Path) -> None:
        h = make_harness(tmp_path)
        h.leg.incoming.append(b"\x01\x00" * 160)
        h.session.tick_in(1000.0)
        h.session.tick_in(1000.02)  # late: its arrival will be taken

        def fails(now: float) -> bytes | None:
            raise RuntimeError("a bug in the caller's half")

        h.leg.pull_frame = fails  # type: ignore[method-assign]
        h.session.on_caller_audio(1000.025)
        assert h.leg.hangups == ["worker-error"]
        assert h.leg.hangup_statuses == [500]


class TestATickThatRaises:
    """A half of the tick that raises (a bug) ends its own call, cause ``worker-error``,
    instead of leaving it up without media; every other call goes on ticking."""

    async def test_the_call_hangs_up_and_the_others_tick_on(self, tmp_path: Path) -> None:
        pacer = MediaPacer(asyncio.get_running_loop(), slots=1)
        pacer.on_error = tick_failed
        broken = make_harness(tmp_path / "broken", pacer=pacer)
        healthy = make_harness(tmp_path / "healthy", pacer=pacer)
        try:

            def fails(now: float) -> bytes | None:
                raise RuntimeError("a bug in the caller's half")

            broken.leg.pull_frame = fails  # type: ignore[method-assign]
            sent_before = len(healthy.leg.frames_sent)
            await asyncio.sleep(0.2)
            assert broken.leg.hangups == ["worker-error"]
            assert broken.leg.hangup_statuses == [500]
            assert broken.session.ended
            broken_sent = len(broken.leg.frames_sent)
            await asyncio.sleep(0.1)
            assert len(broken.leg.frames_sent) == broken_sent  # both halves stopped
            assert len(healthy.leg.frames_sent) >= sent_before + 10  # 0.3 s: 15 ticks
            assert healthy.leg.hangups == []
        finally:
            pacer.close()

    async def test_the_half_towards_the_caller_is_known_by_its_key(self, tmp_path: Path) -> None:
        pacer = _Pacer()
        h = make_harness(tmp_path, pacer=pacer)
        tick_failed((h.session, "out"), RuntimeError("a bug in tick_out"))
        assert h.leg.hangups == ["worker-error"]
        assert pacer.ticks == {}

    def test_a_key_that_is_no_session_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        tick_failed("something else", RuntimeError("boom"))
        assert "media tick failed; removed" in caplog.text
