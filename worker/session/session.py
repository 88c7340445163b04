"""``CallSession``: one call bridged to one voice agent.

It owns the leg (a ``SipCall``), the call status machine, the media pipeline and recorder, the
agent connection, and the call's events. The jambonz driver runs the agent's verbs in order
(``answer``, ``hangup``, ``pause``, ``play``, ``say``, ``gather``, ``listen``/``stream``,
``dial``, ``dtmf``, ``tag``, ``sip:decline``, ``redirect``, ``config``) and obeys its commands;
the Twilio driver streams Media Streams messages both ways. When the verbs run out, the call
is hung up, as jambonz does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from media.g711 import ulaw_decode, ulaw_encode
from media.playout import MarkReached, PlayoutBuffer, PlayoutCounters
from media.prompts import PromptDecodeError, decode_audio_file
from media.recorder import StereoMp3Recorder
from media.resample import Resampler
from media.stream import SAMPLE_RATE as RATE
from worker.agent import listen_audio as la
from worker.agent import twilio as tw
from worker.agent.connection import (
    AgentConnectError,
    JambonzConnection,
    ListenClosed,
    ListenConnection,
    TwilioClosed,
    TwilioConnection,
)
from worker.agent.jambonz import (
    AckReceived,
    AckTimedOut,
    CallStatusCommand,
    CommandReceived,
    ConfigCommand,
    DtmfCommand,
    HangupRequired,
    ListenStatusCommand,
    MuteStatusCommand,
    RedirectCommand,
    RedirectHookCommand,
    SipRequestCommand,
)
from worker.agent.verbs import (
    AnswerVerb,
    ConfigVerb,
    DialVerb,
    DtmfVerb,
    GatherVerb,
    HangupVerb,
    ListenVerb,
    PauseVerb,
    PlayVerb,
    RedirectVerb,
    SayVerb,
    SipDeclineVerb,
    TagVerb,
    Verb,
    hook_url,
)
from worker.config import RouteSettings, Settings
from worker.errors import WorkerError
from worker.events import models as ev
from worker.session.fetch import AudioFetcher, FetchError
from worker.session.pipeline import (
    AgentSink,
    BeepDetected,
    InbandDigit,
    Interruption,
    MediaPipeline,
    PipelineEvent,
)
from worker.session.status import CallStatus, CallStatusMachine, Event, StatusChange
from worker.session.tts import SynthesisError, Synthesizer
from worker.sip.call import CallFailedError, CallState, SipCall
from worker.sip.message import REASON_PHRASES

_END_CAUSE_TO_EVENT = {"busy": Event.BUSY, "no-answer": Event.NO_ANSWER, "cancelled": Event.HANGUP}


@dataclass
class SessionServices:
    """What sessions share: settings, the UA (for ``dial``), synthesizer, fetcher, event sink."""

    settings: Settings
    synthesizer: Synthesizer
    fetcher: AudioFetcher
    publish: Callable[[ev.Event], None]
    place_call: Callable[..., Any] | None = None


@dataclass(frozen=True, slots=True)
class SessionCounters:
    """What the agent did that the worker absorbed, over the whole call.

    ``playout``: the agent-audio playout buffer's totals (``dropped_ms`` is audio sent faster
    than real time beyond the bound). ``ignored_agent_frames``: binary frames on a listen
    socket whose streaming was off. ``invalid_agent_messages``: frames answered with (or, on
    the audio sockets, logged as) invalid. ``late_acks``: acks that came after their hook had
    timed out. ``reconnects``: control socket reconnect attempts. ``agent_audio_dropped_ms``:
    caller audio the agent's socket could not take in time (its bounded send queue).
    """

    playout: PlayoutCounters
    ignored_agent_frames: int = 0
    invalid_agent_messages: int = 0
    late_acks: int = 0
    reconnects: int = 0
    agent_audio_dropped_ms: float = 0.0


_NO_COUNTERS = SessionCounters(playout=PlayoutBuffer(RATE).counters)


@dataclass
class SessionResult:
    """A finished call. ``cause`` is a short token (``agent-hangup``, ``remote-bye``,
    ``agent-unreachable``, ``agent-no-ack``, ...); ``reason`` says more when there is more to
    say (the connect error, the ack outcome)."""

    call_sid: str
    status: str
    duration_sec: int
    digits: str
    recording: str | None
    cause: str | None
    transcript: list[tuple[str, str, float]] = field(default_factory=list)
    reason: str | None = None
    counters: SessionCounters = field(default_factory=lambda: _NO_COUNTERS)


class CallSession:
    def __init__(self, call: SipCall, route: RouteSettings, services: SessionServices) -> None:
        self.call = call
        self.route = route
        self.services = services
        self.call_sid = str(uuid.uuid4())
        self.log = call.log
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.status = CallStatusMachine(loop.time())
        self.digits: list[str] = []
        self.customer_data: dict[str, Any] = {}
        self.transcript: list[tuple[str, str, float]] = []
        self.recording_path: Path | None = None
        recorder = None
        if route.record:
            folder = services.settings.data_dir / "recordings"
            folder.mkdir(parents=True, exist_ok=True)
            self.recording_path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.call_sid}.mp3"
            recorder = StereoMp3Recorder(self.recording_path, RATE)
        self.pipeline = MediaPipeline(
            recorder=recorder,
            barge_in=route.barge_in,
            on_event=self._on_pipeline_event,
            on_marks=self._on_marks,
        )
        self.control: JambonzConnection | None = None
        self.listen: ListenConnection | None = None
        self.listen_protocol: la.ListenAudioProtocol | None = None
        self.twilio: TwilioConnection | None = None
        self._queue: deque[Verb] = deque()
        self._executing = False
        self._acked = False  # session:new was acked: verbs may run
        self._verb_task: asyncio.Task[None] | None = None
        self._replaced = False
        self._dtmf_waiters: list[Callable[[str], None]] = []
        self._sip_status = 100
        self._sip_reason = "Trying"
        self._failure: str | None = None  # why the agent could not take the call
        self._ignored_agent_frames = 0
        self._invalid_audio_messages = 0
        self._agent_audio_dropped_ms = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        call.on_dtmf = self._on_dtmf
        call.audio_source = self.pipeline.next_out
        call.on_tick_done = self.pipeline.after_tick
        call.on_state = self._on_leg_state

    # -- status and events ---------------------------------------------------------------------
    def _feed(self, event: Event) -> StatusChange | None:
        change = self.status.feed(event, self.loop.time())
        if change is None:
            return None
        self.log.info("call status", extra={"status": str(change.new)})
        self.services.publish(
            ev.CallStatusEvent(
                call_id=self.call_sid, status=change.new.value, sip_status=self._sip_status
            )
        )
        if self.control is not None:
            duration = self.status.duration(self.loop.time()) if change.new.terminal else None
            info = self.call_info()
            with contextlib.suppress(WorkerError):
                self.control.call_status(
                    info, duration if change.new is CallStatus.COMPLETED else None
                )
        return change

    def _set_sip_status(self, status: int, reason: str | None = None) -> None:
        self._sip_status = status
        self._sip_reason = reason or REASON_PHRASES.get(status, "")

    def _fail_unanswered(self, status: int) -> None:
        """The call cannot go on before it was answered: ``failed`` with the status the caller
        is about to get (an answered call keeps its status; its hangup completes it)."""
        if self.status.answered_at is None:
            self._set_sip_status(status)
            self._feed(Event.FAIL)

    def _on_leg_state(self, call: SipCall) -> None:
        if call.state is CallState.RINGING:
            self._set_sip_status(180)
            self._feed(Event.RING)
        elif call.state in (CallState.EARLY_MEDIA, CallState.ANSWERED):
            media = call.media
            self.pipeline.use_inband_dtmf(media is not None and media.telephone_event_pt is None)
            early = call.state is CallState.EARLY_MEDIA
            self._set_sip_status(183 if early else 200)
            self._feed(Event.EARLY_MEDIA if early else Event.ANSWER)

    def call_info(self) -> dict[str, Any]:
        """jambonz CallInfo (snake_case), as in ``call:status`` and ``verb:hook``."""
        call = self.call
        info: dict[str, Any] = {
            "call_sid": self.call_sid,
            "direction": call.direction,
            "from": call.from_user,
            "to": call.to_user,
            "call_id": call.call_id,
            "sbc_callid": call.call_id,
            "sip_status": self._sip_status,
            "sip_reason": self._sip_reason,
            "call_status": self.status.status.value,
            "caller_id": call.from_user,
            "account_sid": self.route.custom_parameters.get("account_sid", "aispinner"),
            "application_sid": self.route.custom_parameters.get(
                "application_sid", self.route.match
            ),
            "trace_id": self.call_sid.replace("-", ""),
            "fs_sip_address": f"{self.services.settings.sip.host}:{call.ua.port}",
            "originating_sip_ip": call.remote[0],
        }
        if self.customer_data:
            info["customerData"] = self.customer_data
        return info

    def session_new_data(self) -> dict[str, Any]:
        info = self.call_info()
        info.pop("fs_sip_address")
        info["caller_name"] = self.call.caller_name
        info["local_sip_address"] = f"{self.services.settings.sip.host}:{self.call.ua.port}"
        info["has_recording"] = self.recording_path is not None
        info["service_provider_sid"] = "aispinner"
        invite = self.call.invite
        if invite is not None:
            headers: dict[str, str] = {}
            for name, value in invite.headers.items():
                headers.setdefault(name.lower() if name in _LOWER else name, value)
            info["sip"] = {
                "headers": headers,
                "raw": invite.serialize().decode("utf-8", "replace"),
                "body": invite.body.decode("utf-8", "replace"),
                "method": invite.method,
                "version": "2.0",
                "uri": str(invite.uri),
                "payload": [
                    {
                        "type": invite.content_type or "",
                        "content": invite.body.decode("utf-8", "replace"),
                    }
                ]
                if invite.body
                else [],
            }
        info["defaults"] = {
            "synthesizer": {"vendor": "espeak-ng", "language": "en-US", "voice": "en-us"},
            "recognizer": {"vendor": "none", "language": "en-US"},
        }
        info["env_vars"] = dict(self.route.custom_parameters)
        return info

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> SessionResult:
        """Drive the call from arrival to the end; returns its summary."""
        self.services.publish(
            ev.CallStartedEvent(
                call_id=self.call_sid,
                direction=self.call.direction,
                from_=self.call.from_user,
                to=self.call.to_user,
                route=self.route.match,
            )
        )
        try:
            return await self._run()
        finally:
            # Also when the worker shuts down and cancels us: no socket or task outlives the call.
            await self._finish()
            if self.control is not None:
                await self.control.close()

    async def _run(self) -> SessionResult:
        ended = asyncio.ensure_future(self.call.ended)
        driver = asyncio.ensure_future(self._drive())
        try:
            waiting: set[asyncio.Future[Any]] = {ended, driver}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if driver.done() and not driver.cancelled() and driver.exception() is not None:
                self.log.error("agent driver failed", exc_info=driver.exception())
            if not self.call.is_ended:
                await self.call.hangup(
                    "agent-finished" if self.status.answered_at else "agent-failed", 480
                )
            end = await ended
        finally:
            if not driver.done():
                driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver
            await self._finish()
        if self.status.status is CallStatus.IN_PROGRESS:
            self._feed(Event.HANGUP)
        elif not self.status.status.terminal:
            if end.sip_status is not None:  # the final response the caller got (487, ...)
                self._set_sip_status(end.sip_status, end.sip_reason)
            self._feed(_END_CAUSE_TO_EVENT.get(end.cause, _event_for_status(end.sip_status)))
        duration = self.status.duration(self.loop.time())
        result = SessionResult(
            call_sid=self.call_sid,
            status=self.status.status.value,
            duration_sec=duration,
            digits="".join(self.digits),
            recording=str(self.recording_path) if self.recording_path else None,
            cause=end.cause,
            transcript=list(self.transcript),
            reason=self._failure,
            counters=self.counters(),
        )
        self.services.publish(
            ev.CallDoneEvent(
                call_id=self.call_sid,
                status=result.status,
                duration_sec=duration,
                recording_path=result.recording,
                cause=end.cause,
            )
        )
        return result

    def counters(self) -> SessionCounters:
        """The call's counters so far (see :class:`SessionCounters`)."""
        invalid = self._invalid_audio_messages
        late = reconnects = 0
        if self.control is not None:
            core = self.control.control
            invalid += core.invalid_messages
            late, reconnects = core.late_acks, core.reconnects
        return SessionCounters(
            playout=self.pipeline.playout.counters,
            ignored_agent_frames=self._ignored_agent_frames,
            invalid_agent_messages=invalid,
            late_acks=late,
            reconnects=reconnects,
            agent_audio_dropped_ms=self._agent_audio_dropped_ms,
        )

    async def _drive(self) -> None:
        if self.call.direction == "outbound":
            # An originated call meets its agent once answered (jambonz sends session:new for
            # REST-originated calls after the answer).
            try:
                await self.call.answered
            except CallFailedError:
                return
        if self.route.protocol == "twilio":
            await self._run_twilio()
        else:
            await self._run_jambonz()

    async def _finish(self) -> None:
        """Stop the call's tasks and close its audio sockets and recording (idempotent)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.listen is not None:
            with contextlib.suppress(Exception):
                await self.listen.close(graceful=True)
        if self.twilio is not None:
            with contextlib.suppress(Exception):
                await self.twilio.close()
        self.pipeline.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- DTMF, marks, pipeline events -----------------------------------------------------------
    def _on_dtmf(self, digit: str, duration_ms: int, method: str) -> None:
        self.digits.append(digit)
        self.services.publish(
            ev.CallDtmfEvent(
                call_id=self.call_sid, digit=digit, duration_ms=duration_ms, method=method
            )
        )
        for waiter in list(self._dtmf_waiters):
            waiter(digit)
        if self.listen is not None and self.listen_protocol is not None:
            text = self.listen_protocol.dtmf_message(digit, duration_ms)
            if text is not None:
                self.listen.send_text(text)
        if self.twilio is not None:
            self.twilio.send_dtmf(digit)

    def _on_pipeline_event(self, event: PipelineEvent) -> None:
        if isinstance(event, Interruption):
            self.services.publish(ev.CallInterruptionEvent(call_id=self.call_sid))
            self._report_cleared(event.cleared_marks)
        elif isinstance(event, BeepDetected):
            self.services.publish(
                ev.CallVoicemailDetectedEvent(call_id=self.call_sid, beep_hz=event.frequency)
            )
        elif isinstance(event, InbandDigit):
            self._on_dtmf(event.digit, 100, "inband")

    def _on_marks(self, reached: list[MarkReached]) -> None:
        self._report_marks([mark.name for mark in reached], "playout")

    def _report_cleared(self, names: tuple[str, ...] | list[str]) -> None:
        self._report_marks(names, "cleared")

    def _report_marks(
        self, names: tuple[str, ...] | list[str], event: Literal["playout", "cleared"]
    ) -> None:
        """Marks back to the agent: jambonz says which; Twilio echoes the mark either way."""
        for name in names:
            if self.listen is not None and self.listen_protocol is not None:
                self.listen.send_text(self.listen_protocol.mark_event(name, event))
            elif self.twilio is not None:
                self.twilio.send_mark(name)

    def _transcribe(self, role: str, text: str) -> None:
        """One transcript turn: kept for the call's result and published as an event."""
        at = self._in_call()
        self.transcript.append((role, text, at))
        self.services.publish(
            ev.CallTranscriptEvent(call_id=self.call_sid, role=role, text=text, at_sec=at)
        )

    # ==========================================================================================
    # jambonz
    async def _run_jambonz(self) -> None:
        url = self.route.agent_url
        assert url is not None
        self.control = JambonzConnection(
            url,
            self.call_sid,
            username=self.route.username,
            password=self.route.password,
            on_event=self._on_control_event,
            logger=self.log,
        )
        try:
            await self.control.connect()
        except AgentConnectError as exc:
            self.log.warning("agent unreachable", extra={"why": str(exc)})
            self._failure = str(exc)
            self._fail_unanswered(480)
            await self.call.hangup("agent-unreachable", 480)
            return
        ack = await self.control.session_new(self.session_new_data())
        if not isinstance(ack, AckReceived):
            self._failure = (
                "no ack for session:new within the timeout"
                if isinstance(ack, AckTimedOut)
                else f"session:new failed: {ack.reason}"
            )
            self.log.warning("agent did not ack session:new", extra={"why": self._failure})
            self._fail_unanswered(480)
            await self.call.hangup("agent-no-ack", 480)
            return
        if self.call.state is CallState.INCOMING:
            await self.call.ring()
        self._queue = deque(ack.verbs or ())
        self._acked = True
        await self._execute()

    async def _execute(self) -> None:
        if self._executing:  # one executor per call; a redirect refills its queue
            return
        self._executing = True
        try:
            await self._execute_queue()
        finally:
            self._executing = False

    async def _execute_queue(self) -> None:
        while self._queue and not self.call.is_ended:
            verb = self._queue.popleft()
            self._replaced = False
            task = self.loop.create_task(self._run_verb(verb))
            self._verb_task = task
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                # The call is over (or the worker stops): the verb goes with it, so a dial's
                # other leg, a listen socket or a gather does not outlive the caller.
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise
            finally:
                self._verb_task = None
            if task.cancelled():
                if self._replaced:
                    continue
                return
            exc = task.exception()
            if exc is not None:
                self.log.error("verb failed", extra={"verb": verb.verb}, exc_info=exc)
                self._verb_error(str(exc), verb)
        if not self.call.is_ended:
            self.log.info("no more verbs: hanging up")

    def _replace_verbs(self, verbs: list[Verb] | tuple[Verb, ...], queue: bool) -> None:
        if queue:
            self._queue.extend(verbs)
            return
        self._queue = deque(verbs)
        if self._verb_task is not None and not self._verb_task.done():
            self._replaced = True
            self._verb_task.cancel()
        elif not self._executing and self._acked and not self.call.is_ended:
            self._spawn(self._execute())

    def _verb_error(self, error: str, verb: Verb) -> None:
        if self.control is not None:
            with contextlib.suppress(WorkerError):
                self.control.verb_error(error, verb=verb.verb, verb_id=verb.id)

    async def _hook(self, hook: Any, results: dict[str, Any], verb: Verb) -> bool:
        """Send an actionHook; True when its ack brought verbs that replace the rest."""
        if hook is None or self.control is None or self.call.is_ended:
            return False
        ack = await self.control.verb_hook(
            hook_url(hook), self.call_info(), results, verb_id=verb.id
        )
        if isinstance(ack, AckReceived) and ack.verbs:
            self._queue = deque(ack.verbs)
            return True
        return False

    async def _run_verb(self, verb: Verb) -> None:
        # verb:status goes out only when config.notifyEvents is on (the connection decides).
        if self.control is not None:
            self.control.verb_status("starting", verb=verb.verb, verb_id=verb.id)
        try:
            await self._dispatch(verb)
        finally:
            if self.control is not None and not self.call.is_ended:
                self.control.verb_status("finished", verb=verb.verb, verb_id=verb.id)

    async def _dispatch(self, verb: Verb) -> None:
        if isinstance(verb, AnswerVerb):
            await self._ensure_answered()
        elif isinstance(verb, HangupVerb):
            await self.call.hangup("agent-hangup", 480)
        elif isinstance(verb, PauseVerb):
            await asyncio.sleep(verb.length)
        elif isinstance(verb, SayVerb):
            await self._say(verb)
        elif isinstance(verb, PlayVerb):
            await self._play(verb)
        elif isinstance(verb, GatherVerb):
            await self._gather(verb)
        elif isinstance(verb, ListenVerb):
            await self._listen(verb)
        elif isinstance(verb, DialVerb):
            await self._dial(verb)
        elif isinstance(verb, DtmfVerb):
            await self._send_dtmf(verb.dtmf, verb.duration)
        elif isinstance(verb, TagVerb):
            self.customer_data = dict(verb.data)
        elif isinstance(verb, SipDeclineVerb):
            await self._decline(verb)
        elif isinstance(verb, RedirectVerb):
            await self._hook(verb.action_hook, {}, verb)
        elif isinstance(verb, ConfigVerb):
            self._apply_config(verb.to_wire())

    async def _ensure_answered(self) -> None:
        if self.call.state not in (CallState.ANSWERED, CallState.ENDED):
            await self.call.answer()

    async def _ensure_media(self, early_media: bool) -> None:
        """An audio path for a say/play/listen: the answer, or with ``earlyMedia`` on an
        unanswered inbound call, a 183 Session Progress with our SDP (the call stays unanswered)."""
        if not early_media:
            await self._ensure_answered()
        elif self.call.direction == "inbound" and self.call.state in (
            CallState.INCOMING,
            CallState.RINGING,
        ):
            await self.call.ring(early_media=True)

    def _apply_config(self, data: dict[str, Any]) -> None:
        if "notifyEvents" in data and self.control is not None:
            self.control.notify_events = bool(data["notifyEvents"])

    # -- prompts -------------------------------------------------------------------------------
    async def _play_pcm(self, pcm: bytes) -> bool:
        done: asyncio.Future[bool] = self.loop.create_future()

        def finished(completed: bool) -> None:
            if not done.done():
                done.set_result(completed)

        self.pipeline.play(pcm, finished)
        try:
            return await done
        except asyncio.CancelledError:
            self.pipeline.clear()
            raise

    async def _say(self, verb: SayVerb) -> None:
        await self._ensure_media(verb.early_media)
        synth = verb.synthesizer
        language = synth.language if synth else None
        voice = synth.voice if synth and isinstance(synth.voice, str) else None
        for _ in range(_loops(verb.loop)):
            for text in verb.texts:
                try:
                    pcm = await self.services.synthesizer.synthesize(
                        text, language=language, voice=voice, sample_rate=RATE
                    )
                except SynthesisError as exc:
                    self._verb_error(str(exc), verb)
                    return
                if not await self._play_pcm(pcm):
                    return
                self._transcribe("agent", text)

    async def _play(self, verb: PlayVerb) -> None:
        await self._ensure_media(verb.early_media)
        started = self.loop.time()
        completed = True
        for _ in range(_loops(verb.loop)):
            if not completed:  # interrupted (barge-in, killAudio): no next round
                break
            for url in verb.urls:
                try:
                    pcm = await self.services.fetcher.fetch(url, RATE)
                except FetchError as exc:
                    self._verb_error(str(exc), verb)
                    await self._hook(
                        verb.action_hook, {"reason": "playFailed", "error": str(exc)}, verb
                    )
                    return
                if not await self._play_pcm(pcm):
                    completed = False
                    break
        elapsed = self.loop.time() - started
        await self._hook(
            verb.action_hook,
            {
                "reason": "playCompleted" if completed else "playInterrupted",
                "playback_seconds": int(elapsed),
                "playback_milliseconds": int(elapsed * 1000),
            },
            verb,
        )

    # -- gather --------------------------------------------------------------------------------
    async def _gather(self, verb: GatherVerb) -> None:
        if "speech" in verb.input:
            self._verb_error("speech input needs a recognizer; none is configured", verb)
            if "digits" not in verb.input:
                await self._hook(
                    verb.action_hook, {"reason": "error", "error": "no recognizer"}, verb
                )
                return
        await self._ensure_answered()
        digits: list[str] = []
        got: asyncio.Queue[str] = asyncio.Queue()
        self._dtmf_waiters.append(got.put_nowait)
        prompt_task: asyncio.Task[None] | None = None
        first: asyncio.Task[str] | None = None
        try:
            prompt = verb.say or verb.play
            if prompt is not None:
                prompt_task = self.loop.create_task(
                    self._say(prompt) if isinstance(prompt, SayVerb) else self._play(prompt)
                )
            max_digits = verb.num_digits or verb.max_digits or 99
            finish = verb.finish_on_key
            timeout = 5.0 if verb.timeout is None else verb.timeout
            inter = verb.inter_digit_timeout or timeout
            reason = "timeout"
            if prompt_task is not None:
                first = self.loop.create_task(got.get())
                await asyncio.wait({prompt_task, first}, return_when=asyncio.FIRST_COMPLETED)
                if first.done():
                    prompt_task.cancel()  # DTMF barge-in
                    pending = first.result()
                else:
                    first.cancel()
                    pending = None
            else:
                pending = None
            while True:
                if pending is None:
                    try:
                        pending = await asyncio.wait_for(got.get(), inter if digits else timeout)
                    except TimeoutError:
                        break
                digit, pending = pending, None
                if finish and digit == finish:
                    reason = "dtmfDetected"
                    break
                digits.append(digit)
                if len(digits) >= max_digits:
                    reason = "dtmfDetected"
                    break
            # Enough digits when the timer fired: they are the result (numDigits needs all).
            needed = verb.num_digits or verb.min_digits or 1
            if reason == "timeout" and digits and len(digits) >= needed:
                reason = "dtmfDetected"
        finally:
            if first is not None and not first.done():
                first.cancel()
            if got.put_nowait in self._dtmf_waiters:
                self._dtmf_waiters.remove(got.put_nowait)
            if prompt_task is not None and not prompt_task.done():
                prompt_task.cancel()
        await self._hook(verb.action_hook, {"digits": "".join(digits), "reason": reason}, verb)

    # -- listen / stream -----------------------------------------------------------------------
    async def _listen(self, verb: ListenVerb) -> None:
        await self._ensure_media(verb.early_media)
        protocol = la.ListenAudioProtocol.from_verb(verb)
        info = self.call_info()
        metadata = protocol.metadata_message(info, verb.metadata)
        done = asyncio.Event()
        result: dict[str, Any] = {}
        return_rate = verb.return_sample_rate

        def on_event(event: Any) -> None:
            if isinstance(event, la.AudioReceived):
                self.pipeline.agent_audio(event.audio, return_rate)
            elif isinstance(event, la.PlayAudio):
                self._spawn(self._play_audio(event, protocol))
            elif isinstance(event, la.KillAudio):
                self._report_cleared(self.pipeline.clear())
            elif isinstance(event, la.Mark):
                try:
                    self.pipeline.mark(event.name)
                except ValueError as exc:
                    self.log.info("bad mark", extra={"why": str(exc)})
            elif isinstance(event, la.ClearMarks):
                self.pipeline.playout.forget_marks()
            elif isinstance(event, la.Disconnect):
                result["reason"] = "disconnect"
                done.set()
            elif isinstance(event, la.Transcription):
                self._transcribe(event.role or "agent", event.text)
            elif isinstance(event, ListenClosed):
                result.setdefault("reason", "socket-closed")
                done.set()
            elif isinstance(event, la.InvalidAudioMessage):
                self._invalid_from_agent(event.reason)

        auth = verb.ws_auth
        connection = ListenConnection(
            verb.url,
            protocol,
            metadata,
            username=auth.username if auth else None,
            password=auth.password if auth else None,
            on_event=on_event,
            logger=self.log,
        )
        try:
            await connection.connect()
        except AgentConnectError as exc:
            self._verb_error(str(exc), verb)
            await self._hook(
                verb.action_hook, {"reason": "connect-failed", "error": str(exc)}, verb
            )
            return
        self.listen, self.listen_protocol = connection, protocol
        combine = protocol.audio_frame if protocol.mix_type != "mono" else None
        self.pipeline.sink = AgentSink(connection.send_audio, protocol.sample_rate, combine)
        started = self.loop.time()
        digits: list[str] = []
        finish = set(verb.finish_on_key or "")

        def on_digit(digit: str) -> None:
            if digit in finish:
                digits.append(digit)
                result["reason"] = "finishOnKey"
                done.set()

        self._dtmf_waiters.append(on_digit)
        try:
            try:
                await asyncio.wait_for(done.wait(), verb.max_length)
            except TimeoutError:
                result["reason"] = "maxLength"
        finally:
            self._dtmf_waiters.remove(on_digit)
            self.pipeline.sink = None
            self.listen = None
            await connection.close(graceful=True)
            self._ignored_agent_frames += protocol.ignored_binary_frames
            self._agent_audio_dropped_ms += connection.dropped_ms
        results = {"digits": "".join(digits), "dialCallDuration": int(self.loop.time() - started)}
        await self._hook(verb.action_hook, results, verb)

    async def _play_audio(self, event: la.PlayAudio, protocol: la.ListenAudioProtocol) -> None:
        try:
            if event.content_type == "raw":
                pcm = event.audio
                rate = event.sample_rate or 16000
                if rate != RATE:
                    r = Resampler(rate, RATE)
                    pcm = r.process(pcm) + r.flush()
            else:
                pcm = await asyncio.to_thread(decode_audio_file, event.audio, RATE)
        except PromptDecodeError as exc:
            self.log.info("playAudio undecodable", extra={"why": str(exc)})
            return
        if not event.queue_play:
            self.pipeline.clear()
        await self._play_pcm(pcm)
        if self.listen is not None:
            self.listen.send_text(protocol.play_done(event.play_id, {}))

    # -- dial, dtmf, decline -------------------------------------------------------------------
    async def _dial(self, verb: DialVerb) -> None:
        place = self.services.place_call
        target = verb.target[0]
        trunk = target.trunk or self.route.trunk
        if place is None or trunk is None or target.number is None:
            self._verb_error(
                "dial needs a phone target and a trunk (route.trunk or target.trunk)", verb
            )
            await self._hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
            return
        if not verb.answer_on_bridge:
            await self._ensure_answered()
        started = self.loop.time()
        try:
            other: SipCall = await place(
                trunk,
                target.number,
                from_user=verb.caller_id or self.call.from_user,
                ring_timeout_s=float(verb.timeout or 60),
            )
        except WorkerError as exc:
            self._verb_error(str(exc), verb)
            await self._hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
            return
        try:
            await other.answered
        except CallFailedError as exc:
            status = {"busy": "busy", "no-answer": "no-answer"}.get(exc.end.cause, "failed")
            await self._hook(
                verb.action_hook,
                {"dial_call_status": status, "dial_sip_status": exc.end.sip_status or 0},
                verb,
            )
            return
        except asyncio.CancelledError:
            await other.hangup("cancelled")
            raise
        await self._ensure_answered()
        answered = self.loop.time()
        # Bridge: the dialled party's audio plays to the caller; the caller's goes to them.
        to_other: deque[bytes] = deque(maxlen=10)
        other.audio_source = lambda now: to_other.popleft() if to_other else None
        other.on_audio = lambda frame, now: self.pipeline.agent_audio(frame, RATE)
        previous_sink = self.pipeline.sink
        self.pipeline.sink = AgentSink(to_other.append, RATE)
        try:
            limit = float(verb.time_limit) if verb.time_limit else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(other.ended), limit)
        finally:
            self.pipeline.sink = previous_sink
            if not other.is_ended:
                await other.hangup("bridge-ended")
        await self._hook(
            verb.action_hook,
            {
                "dial_call_status": "completed",
                "dial_sip_status": 200,
                "dial_call_duration": int(self.loop.time() - answered),
                "duration": int(self.loop.time() - started),
            },
            verb,
        )

    async def _send_dtmf(self, digits: str, duration_ms: int) -> None:
        for digit in digits:
            if digit in ("w", "W"):
                await asyncio.sleep(0.5)
                continue
            duration = min(duration_ms, 8000)  # one RFC 4733 event holds at most ~8 s
            self.call.send_dtmf(digit, duration)
            await asyncio.sleep(duration / 1000 + 0.1)

    async def _decline(self, verb: SipDeclineVerb) -> None:
        if self.call.state is CallState.ANSWERED:
            self._verb_error("sip:decline on an answered call", verb)
            return
        self._set_sip_status(verb.status, verb.reason)
        self._feed(_event_for_status(verb.status))
        await self.call.hangup("declined", verb.status, verb.reason)

    # -- commands ------------------------------------------------------------------------------
    def _on_control_event(self, event: Any) -> None:
        if isinstance(event, CommandReceived):
            self._command(event.command)
        elif isinstance(event, HangupRequired):
            self.log.warning("agent connection lost for good", extra={"why": event.reason})
            self._spawn(self.call.hangup("agent-lost", 480))

    def _command(self, command: Any) -> None:
        if isinstance(command, RedirectCommand):
            self._replace_verbs(command.verbs, command.queue_command)
        elif isinstance(command, RedirectHookCommand):
            self._command_error("redirect", "redirect to a new application URL is not supported")
        elif isinstance(command, CallStatusCommand):
            # jambonz: "completed" hangs up; "no-answer" rejects an unanswered call (503 inbound,
            # CANCEL outbound) and means nothing once the call is answered.
            if command.call_status == "no-answer" and self.call.state is CallState.ANSWERED:
                self._command_error("call:status", "no-answer applies only to an unanswered call")
            else:
                status = 503 if command.call_status == "no-answer" else 480
                self._spawn(self.call.hangup("agent-hangup", status))
        elif isinstance(command, ListenStatusCommand):
            if self.pipeline.sink is not None:
                self.pipeline.sink.paused = command.status == "pause"
        elif isinstance(command, MuteStatusCommand):
            self.pipeline.muted = command.mute
        elif isinstance(command, DtmfCommand):
            self.call.send_dtmf(command.digit, command.duration)
        elif isinstance(command, SipRequestCommand):
            sent = self.call.send_request(
                command.method, command.content_type, command.content, command.headers
            )
            if not sent:
                self._command_error("sip:request", "no SIP dialog to send the request in")
        elif isinstance(command, ConfigCommand):
            self._apply_config(command.config.to_wire())

    def _command_error(self, command: str, error: str) -> None:
        self.log.info("command refused", extra={"command": command, "why": error})
        if self.control is not None:
            with contextlib.suppress(WorkerError):
                self.control.verb_error(error, verb=command)

    # ==========================================================================================
    # Twilio Media Streams
    async def _run_twilio(self) -> None:
        """Connect the Media Stream first (while the caller hears ringing), then answer: an
        agent that cannot be reached fails the call with 480 instead of answering it and
        hanging up at once."""
        url = self.route.agent_url
        assert url is not None
        stream = tw.TwilioStream(
            stream_sid="MZ" + uuid.uuid4().hex,
            call_sid="CA" + self.call_sid.replace("-", ""),
            account_sid=self.route.custom_parameters.get("account_sid", "AC" + "0" * 32),
            custom_parameters=dict(self.route.custom_parameters),
        )
        closed = asyncio.Event()

        def on_event(event: Any) -> None:
            if isinstance(event, tw.MediaReceived):
                self.pipeline.agent_audio(ulaw_decode(event.ulaw), RATE)
            elif isinstance(event, tw.MarkRequested):
                try:
                    self.pipeline.mark(event.name)
                except ValueError as exc:
                    self._invalid_from_agent(str(exc))
            elif isinstance(event, tw.Clear):
                self._report_cleared(self.pipeline.clear())
            elif isinstance(event, tw.InvalidTwilioMessage):
                self._invalid_from_agent(event.reason)
            elif isinstance(event, TwilioClosed):
                closed.set()

        connection = TwilioConnection(url, stream, on_event=on_event, logger=self.log)
        if self.call.state is CallState.INCOMING:
            await self.call.ring()
        try:
            await connection.connect()
        except AgentConnectError as exc:
            self.log.warning("agent unreachable", extra={"why": str(exc)})
            self._failure = str(exc)
            self._fail_unanswered(480)
            await self.call.hangup("agent-unreachable", 480)
            return
        self.twilio = connection
        self.pipeline.sink = AgentSink(lambda pcm: connection.send_media(ulaw_encode(pcm)), RATE)
        try:
            await self._ensure_answered()
            await closed.wait()  # the agent ends the stream by closing the socket
        finally:
            self.pipeline.sink = None
            self._agent_audio_dropped_ms += connection.dropped_ms

    def _invalid_from_agent(self, why: str) -> None:
        """Something the agent sent on an audio socket was unusable: counted, the first few
        logged (an agent stuck in a loop must not flood the log)."""
        self._invalid_audio_messages += 1
        if self._invalid_audio_messages <= _LOGGED_INVALID:
            self.log.info("invalid message from agent", extra={"why": why})

    def _in_call(self) -> float:
        answered = self.status.answered_at
        return round(self.loop.time() - answered, 2) if answered is not None else 0.0


_LOGGED_INVALID = 10
_LOWER = frozenset(
    {
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Via",
        "Contact",
        "Content-Type",
        "Content-Length",
        "Max-Forwards",
        "User-Agent",
        "Allow",
        "Supported",
    }
)


def _loops(loop: int | str) -> int:
    """How many rounds a ``say``/``play`` runs: ``0`` and ``"forever"`` mean forever (jambonz),
    bounded here at 1000 rounds."""
    if loop == "forever" or int(loop) <= 0:
        return 1000
    return int(loop)


def _event_for_status(status: int | None) -> Event:
    if status in (486, 600):
        return Event.BUSY
    if status in (408, 480, 487):
        return Event.NO_ANSWER
    return Event.FAIL


__all__ = ["CallSession", "SessionResult", "SessionServices"]
