"""``JambonzDriver``: a call driven by a jambonz application over ``ws.jambonz.org``.

It opens the control socket, sends ``session:new`` (built by ``worker.agent.jambonz`` from the
leg's ``LegInfo``), and runs the verbs the app returns, one at a time, each by the handler its
type has in the table given to it (``worker.session.verbs.VERB_HANDLERS``). An ``actionHook``
may replace the rest of the queue; a ``redirect`` command replaces or extends it, cancelling the
running verb. Commands go to ``verbs.commands``. When the verbs run out, ``run`` returns and the
session hangs up, as jambonz does. The driver tells the app every status change
(``call:status``) and, while a ``listen`` runs, the caller's DTMF and the marks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.agent import jambonz as jz
from worker.agent import listen_audio as la
from worker.agent.connection import (
    AckOutcome,
    AgentConnectError,
    JambonzConnection,
    JambonzConnectionEvent,
    ListenConnection,
)
from worker.agent.jambonz import (
    AckReceived,
    AckTimedOut,
    CommandReceived,
    HangupRequired,
)
from worker.agent.verbs import Hook, Verb, hook_url
from worker.session.session import AgentCounters, CallSession, MarkEvent
from worker.session.status import CallStatus, StatusChange

VerbHandler = Callable[["JambonzDriver", Any], Awaitable[None]]
CommandHandler = Callable[["JambonzDriver", Any], None]
LOGGED_INVALID = 10
"""Invalid messages from the agent's audio sockets logged per call; the rest only counted."""


class ControlChannel(Protocol):
    """What the driver uses of ``worker.agent.connection.JambonzConnection``."""

    notify_events: bool

    async def connect(self) -> None: ...

    async def session_new(self, data: Mapping[str, Any]) -> AckOutcome: ...

    async def verb_hook(
        self,
        hook: Hook,
        call_info: Mapping[str, Any],
        results: Mapping[str, Any] | None = None,
        verb_id: str | None = None,
    ) -> AckOutcome: ...

    def call_status(
        self, call_info: Mapping[str, Any], duration: float | None = None
    ) -> object: ...

    def verb_status(self, event: str, *, verb: str, verb_id: str | None = None) -> object: ...

    def verb_error(self, error: str, *, verb: str, verb_id: str | None = None) -> object: ...

    def counters(self) -> tuple[int, int, int]:
        """(invalid messages, late acks, reconnects)."""

    async def close(self) -> None: ...


@dataclass(slots=True)
class ActiveListen:
    """The ``listen``/``stream`` running now: where DTMF and marks go."""

    connection: ListenConnection
    protocol: la.ListenAudioProtocol


class JambonzDriver:
    """See the module docstring."""

    def __init__(
        self,
        session: CallSession,
        verbs: Mapping[type[Verb], VerbHandler],
        on_command: CommandHandler,
        control: ControlChannel | None = None,
    ) -> None:
        self.session = session
        self.route = session.route
        self.log = session.log
        self._verbs = verbs
        self._on_command = on_command
        self.control: ControlChannel | None = control
        self.customer_data: dict[str, Any] = {}
        self.listen: ActiveListen | None = None
        self._queue: deque[Verb] = deque()
        self._executing = False
        self._acked = False  # session:new was acked: verbs may run
        self._verb_task: asyncio.Task[None] | None = None
        self._replaced = False
        self._failure: str | None = None
        self._ignored_frames = 0
        self._invalid_audio_messages = 0
        self._dropped_ms = 0.0

    # -- AgentDriver -----------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        return self._failure

    async def run(self) -> None:
        session = self.session
        if self.control is None:
            connection = JambonzConnection(
                self.route.agent_url or "",
                session.call_sid,
                username=self.route.username,
                password=self.route.password,
                on_event=self._control_event,
                logger=self.log,
            )
            self.control = connection
        try:
            await self.control.connect()
        except AgentConnectError as exc:
            self._refuse(f"{exc}", "agent-unreachable")
            return
        data = jz.session_new_data(
            session.leg.info,
            self.call_state(),
            has_recording=self.route.record,
            env_vars=self.route.custom_parameters,
        )
        ack = await self.control.session_new(data)
        if not isinstance(ack, AckReceived):
            why = (
                "no ack for session:new within the timeout"
                if isinstance(ack, AckTimedOut)
                else f"session:new failed: {ack.reason}"
            )
            self._refuse(why, "agent-no-ack")
            return
        session.ring()
        self._queue = deque(ack.verbs or ())
        self._acked = True
        await self.execute()

    def _refuse(self, why: str, cause: str) -> None:
        self.log.warning("agent did not take the call", extra={"why": why})
        self._failure = why
        self.session.fail_unanswered(480)
        self.session.hangup(cause, 480)

    def on_status(self, change: StatusChange) -> None:
        if self.control is None:
            return
        completed = change.new is CallStatus.COMPLETED
        duration = self.session.status.duration(self.session.clock.now()) if completed else None
        self.control.call_status(self.call_info(), duration)

    def on_dtmf(self, digit: str, duration_ms: int) -> None:
        listen = self.listen
        if listen is not None:
            text = listen.protocol.dtmf_message(digit, duration_ms)
            if text is not None:
                listen.connection.send_text(text)

    def on_marks(self, names: Sequence[str], event: MarkEvent) -> None:
        listen = self.listen
        if listen is not None:
            for name in names:
                listen.connection.send_text(listen.protocol.mark_event(name, event))

    def counters(self) -> AgentCounters:
        invalid = self._invalid_audio_messages
        late = reconnects = 0
        if self.control is not None:
            core_invalid, late, reconnects = self.control.counters()
            invalid += core_invalid
        return AgentCounters(
            ignored_agent_frames=self._ignored_frames,
            invalid_agent_messages=invalid,
            late_acks=late,
            reconnects=reconnects,
            agent_audio_dropped_ms=self._dropped_ms,
        )

    async def close(self) -> None:
        listen, self.listen = self.listen, None
        if listen is not None:
            await listen.connection.close(graceful=True)
            self.listen_done(listen)
        if self.control is not None:
            await self.control.close()

    # -- call info ---------------------------------------------------------------------------------
    def call_state(self) -> jz.CallState:
        session = self.session
        params = self.route.custom_parameters
        return jz.CallState(
            call_sid=session.call_sid,
            sip_status=session.sip_status,
            sip_reason=session.sip_reason,
            call_status=session.status.status.value,
            account_sid=params.get("account_sid", "aispinner"),
            application_sid=params.get("application_sid", self.route.match),
            customer_data=self.customer_data,
        )

    def call_info(self) -> dict[str, Any]:
        return jz.call_info(self.session.leg.info, self.call_state())

    # -- the verb queue ----------------------------------------------------------------------------
    async def execute(self) -> None:
        """Run the queued verbs in order (one executor per call; a redirect refills it)."""
        if self._executing:
            return
        self._executing = True
        try:
            await self._execute_queue()
        finally:
            self._executing = False

    async def _execute_queue(self) -> None:
        session = self.session
        while self._queue and not session.ended:
            verb = self._queue.popleft()
            self._replaced = False
            task = asyncio.get_running_loop().create_task(self._run_verb(verb))
            self._verb_task = task
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                # The call is over (or the worker stops): the verb goes with it, so a dial's
                # other leg, a listen socket or a gather does not outlive the caller.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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
                self.verb_error(str(exc), verb)
        if not session.ended:
            self.log.info("no more verbs: hanging up")

    async def _run_verb(self, verb: Verb) -> None:
        # verb:status goes out only when config.notifyEvents is on (the connection decides).
        if self.control is not None:
            self.control.verb_status("starting", verb=verb.verb, verb_id=verb.id)
        try:
            await self.dispatch(verb)
        finally:
            if self.control is not None and not self.session.ended:
                self.control.verb_status("finished", verb=verb.verb, verb_id=verb.id)

    async def dispatch(self, verb: Verb) -> None:
        """Run one verb with the handler of its type."""
        handler = self._verbs.get(type(verb))
        if handler is None:
            self.verb_error(f"verb {verb.verb} is not supported", verb)
            return
        await handler(self, verb)

    def replace_verbs(self, verbs: Sequence[Verb], queue: bool) -> None:
        if queue:
            self._queue.extend(verbs)
            return
        self._queue = deque(verbs)
        if self._verb_task is not None and not self._verb_task.done():
            self._replaced = True
            self._verb_task.cancel()
        elif not self._executing and self._acked and not self.session.ended:
            self.session.spawn(self.execute())

    # -- what verb handlers use --------------------------------------------------------------------
    async def hook(self, hook: Hook | None, results: dict[str, Any], verb: Verb) -> bool:
        """Send an actionHook; True when its ack brought verbs that replace the rest."""
        if hook is None or self.control is None or self.session.ended:
            return False
        ack = await self.control.verb_hook(
            hook_url(hook), self.call_info(), results, verb_id=verb.id
        )
        if isinstance(ack, AckReceived) and ack.verbs:
            self._queue = deque(ack.verbs)
            return True
        return False

    def verb_error(self, error: str, verb: Verb) -> None:
        self.log.info("verb refused", extra={"verb": verb.verb, "why": error})
        if self.control is not None:
            self.control.verb_error(error, verb=verb.verb, verb_id=verb.id)

    def command_error(self, command: str, error: str) -> None:
        self.log.info("command refused", extra={"command": command, "why": error})
        if self.control is not None:
            self.control.verb_error(error, verb=command)

    def apply_config(self, data: Mapping[str, Any]) -> None:
        if "notifyEvents" in data and self.control is not None:
            self.control.notify_events = bool(data["notifyEvents"])

    def invalid_from_agent(self, why: str) -> None:
        """Something the agent sent on an audio socket was unusable: counted, the first few
        logged (an agent stuck in a loop must not flood the log)."""
        self._invalid_audio_messages += 1
        if self._invalid_audio_messages <= LOGGED_INVALID:
            self.log.info("invalid message from agent", extra={"why": why})

    def listen_done(self, listen: ActiveListen) -> None:
        """A listen ended: keep its counters."""
        self._ignored_frames += listen.protocol.ignored_binary_frames
        self._dropped_ms += listen.connection.dropped_ms

    # -- the control socket's events ---------------------------------------------------------------
    def _control_event(self, event: JambonzConnectionEvent) -> None:
        if isinstance(event, CommandReceived):
            self._on_command(self, event.command)
        elif isinstance(event, HangupRequired):
            self.log.warning("agent connection lost for good", extra={"why": event.reason})
            self.session.hangup("agent-lost", 480)
