"""The jambonz WebSocket control protocol (``ws.jambonz.org``), sans-I/O, with the worker in
jambonz's place: :class:`JambonzControl` builds the messages a feature server sends, tracks their
acks against a virtual clock, parses what the app sends back, and decides when to reconnect.

Rules (jambonz-feature-server ``lib/utils/ws-requestor.js``, see PROTOCOLS.md §1):

1. Every outgoing message is ``{"type", "msgid", "call_sid", "hook"?, "data"}``; ``data`` keys are
   snake_cased except inside ``customerData``, ``sip``, ``env_vars`` and ``args``.
2. ``session:new``, ``session:reconnect``, ``session:redirect``, ``session:adulting``,
   ``verb:hook``, ``dial:confirm`` and ``queue:status`` wait for an ``ack`` with the same msgid,
   5 s by default. Notifications (``call:status``, ``verb:status``, ``jambonz:error``, ``llm:*``,
   ``tts:*``) do not.
3. An ack to an unknown msgid is discarded silently; so is a late ack (its hook already failed).
4. Anything else the app sends that is not a valid ``ack`` or ``command`` (bad JSON, no ``type``,
   unknown ``type``, unknown command, bad field types, a binary frame) is answered with
   ``jambonz:error`` ``{"msg": "InvalidMessage", "details", "content"}``. ``receive`` never raises.
5. The app closing with 1000 is graceful: no reconnect, and every later message is discarded.
   Any other close reconnects after 0.5, 1, 2, 4, 6, 8 ... s (jambonz doubles up to 2 s, then adds
   2 s), at most ``max_reconnects`` times per call.
6. On the new socket ``session:reconnect`` (carrying the original ``session:new`` data) goes
   first and every other message is held until it is acked. If that ack times out the call must
   hang up.
7. Acks pending when the socket drops fail, except the ``session:new`` one: it moves to the
   ``session:reconnect`` msgid, and the ack of the reconnect is reported as the ack of session:new.
8. (For the jambonz SDK, which acks "the most recent hook".) While one ack-awaiting message is in
   flight, further ack-awaiting messages are held (``serialize_hooks``); notifications are not.

Where we differ from jambonz on purpose: a binary frame is an invalid message (jambonz's check
is broken and would parse it as JSON); acks whose verbs do not parse fail the hook (``AckFailed``)
and are answered with ``jambonz:error``; lists in call info stay lists when snake-casing (jambonz
turns arrays into index-keyed objects); the ack timer of a message held during a reconnect starts
when it is sent, and a ``session:new`` ack carried over to ``session:reconnect`` gets a fresh one.

Outgoing text never comes back from the builders for sending: every message goes through one outbox
that the adapter drains with :meth:`JambonzControl.messages_to_send` after each call. The builders
return an :class:`OutgoingMessage` describing what was built (for correlating acks and for logs).
"""

from __future__ import annotations

import base64
import enum
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from worker.agent.verbs import (
    DTMF_DIGITS,
    ConfigVerb,
    Hook,
    Verb,
    VerbError,
    WebhookSpec,
    hook_url,
    parse_verb,
    parse_verbs,
)
from worker.errors import LocalError
from worker.legs import LegInfo

__all__ = [
    "ACK_TIMEOUT",
    "CALL_STATUSES",
    "SNAKE_CASE_EXCLUDES",
    "SUBPROTOCOL",
    "AckDiscarded",
    "AckFailed",
    "AckReceived",
    "AckTimedOut",
    "CallStatusCommand",
    "Command",
    "CommandReceived",
    "ConfigCommand",
    "ControlEvent",
    "ControlState",
    "DtmfCommand",
    "HangupRequired",
    "InvalidMessage",
    "JambonzControl",
    "ListenStatusCommand",
    "MuteStatusCommand",
    "OutgoingMessage",
    "ReconnectDecision",
    "RedirectCommand",
    "RedirectHookCommand",
    "SipRequestCommand",
    "backoff_delays",
    "camel_case_keys",
    "snake_case_key",
    "snake_case_keys",
    "to_camel_case",
]

SUBPROTOCOL = "ws.jambonz.org"
ACK_TIMEOUT = 5.0
"""Seconds the app has to ack (``JAMBONES_WS_API_MSG_RESPONSE_TIMEOUT`` default)."""

NORMAL_CLOSURE = 1000

TYPES_WANTING_ACK = frozenset(
    {
        "session:new",
        "session:reconnect",
        "session:redirect",
        "session:adulting",
        "verb:hook",
        "dial:confirm",
        "queue:status",
    }
)
NOTIFICATION_TYPES = frozenset(
    {
        "call:status",
        "verb:status",
        "jambonz:error",
        "llm:event",
        "llm:tool-call",
        "tts:streaming-event",
        "tts:tokens-result",
    }
)
TYPES_WITH_HOOK = frozenset(
    {"verb:hook", "dial:confirm", "session:redirect", "llm:event", "llm:tool-call"}
)
SNAKE_CASE_EXCLUDES = ("customerData", "sip", "env_vars", "args")
"""Keys whose subtrees jambonz passes through unchanged when snake-casing."""

CALL_STATUSES = frozenset(
    {
        "trying",
        "ringing",
        "early-media",
        "in-progress",
        "queued",
        "failed",
        "busy",
        "no-answer",
        "completed",
    }
)

# Commands jambonz knows (call-session.js::_onCommand) that this worker does not carry out.
_UNSUPPORTED_COMMANDS = frozenset(
    {
        "dial",
        "dub",
        "whisper",
        "record",
        "conf:mute-status",
        "conf:hold-status",
        "conf:participant-action",
        "transcribe:status",
        "media:path",
        "boostAudioSignal",
        "llm:tool-output",
        "llm:update",
        "tts:tokens",
        "tts:flush",
        "tts:clear",
    }
)
_COMMANDS_WITHOUT_DATA = frozenset({"llm:tool-output", "tts:flush", "tts:clear"})
_SIP_REQUEST_METHODS = frozenset({"INFO", "NOTIFY", "MESSAGE", "OPTIONS"})
_CONTENT_ECHO_LIMIT = 4096
_EXPIRED_MEMORY = 256
_DEFAULT_DTMF_DURATION_MS = 250


# --------------------------------------------------------------------------- key case helpers

_HAS_SPACE = re.compile(r"\s")
_HAS_SEPARATOR = re.compile(r"(_|-|\.|:)")
_HAS_CAMEL = re.compile(r"([a-z][A-Z]|[A-Z][a-z])")
_SEPARATOR_SPLITTER = re.compile(r"[\W_]+(.|$)", re.ASCII)
_CAMEL_SPLITTER = re.compile(r"(.)([A-Z]+)")


def _unseparate(text: str) -> str:
    return _SEPARATOR_SPLITTER.sub(lambda m: " " + m.group(1) if m.group(1) else "", text)


def _to_no_case(text: str) -> str:
    if _HAS_SPACE.search(text):
        return text.lower()
    if _HAS_SEPARATOR.search(text):
        return (_unseparate(text) or text).lower()
    if _HAS_CAMEL.search(text):
        return _CAMEL_SPLITTER.sub(
            lambda m: m.group(1) + " " + " ".join(m.group(2).lower()), text
        ).lower()
    return text.lower()


def snake_case_key(key: str) -> str:
    """One key the way jambonz's ``to-snake-case`` does it: ``callSid`` -> ``call_sid``,
    ``sbcCallid`` -> ``sbc_callid``, ``X-CID`` -> ``x_cid``, ``call_sid`` unchanged."""
    return _HAS_SPACE.sub("_", _unseparate(_to_no_case(key)).strip())


def snake_case_keys(value: Any, excludes: Iterable[str] = SNAKE_CASE_EXCLUDES) -> Any:
    """Snake-case every mapping key, recursively, leaving the subtrees under ``excludes`` as they
    are (jambonz ``snakecase-keys.js``). Lists are walked, not turned into objects."""
    skip = frozenset(excludes)

    def walk(item: Any) -> Any:
        if isinstance(item, Mapping):
            return {
                (key if key in skip else snake_case_key(str(key))): (
                    sub if key in skip else walk(sub)
                )
                for key, sub in item.items()
            }
        if isinstance(item, list | tuple):
            return [walk(sub) for sub in item]
        return item

    return walk(value)


def to_camel_case(key: str) -> str:
    """``call_sid`` -> ``callSid``; keys without underscores are returned unchanged."""
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def camel_case_keys(call_info: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys of call info in camelCase, as jambonz's ``CallInfo.toJSON()`` has them (the
    listen metadata frame uses this form). Nested values (``customerData``, ``headers``) are left
    as they are."""
    return {to_camel_case(str(key)): value for key, value in call_info.items()}


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class RedirectCommand:
    """``redirect`` with a verb array: replace the app (``queue_command`` false) or append to it."""

    verbs: tuple[Verb, ...]
    queue_command: bool


@dataclass(frozen=True, slots=True)
class RedirectHookCommand:
    """``redirect`` with an object: fetch a new app from ``call_hook`` (or redirect the legs)."""

    call_hook: Hook | None
    child_call_hook: Hook | None
    parent_call: tuple[Verb, ...] | None
    child_call: tuple[Verb, ...] | None


@dataclass(frozen=True, slots=True)
class CallStatusCommand:
    """``call:status``: ``completed`` hangs up; ``no-answer`` rejects/cancels an unanswered call."""

    call_status: Literal["completed", "no-answer"]


@dataclass(frozen=True, slots=True)
class MuteStatusCommand:
    """``mute:status``: mute (true) or unmute (false) the caller."""

    mute: bool


@dataclass(frozen=True, slots=True)
class ListenStatusCommand:
    """``listen:status`` / ``stream:status``: pause or resume the audio fork."""

    kind: Literal["listen", "stream"]
    status: Literal["pause", "resume"]


@dataclass(frozen=True, slots=True)
class DtmfCommand:
    """``dtmf``: send ``digit`` (one or more DTMF keys) of ``duration`` ms each."""

    digit: str
    duration: int


@dataclass(frozen=True, slots=True)
class SipRequestCommand:
    """``sip:request``: send an in-dialog INFO/NOTIFY/MESSAGE/OPTIONS."""

    method: str
    content_type: str | None
    content: str | None
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ConfigCommand:
    """``config``: apply a ``config`` verb's settings now."""

    config: ConfigVerb


Command: TypeAlias = (
    RedirectCommand
    | RedirectHookCommand
    | CallStatusCommand
    | MuteStatusCommand
    | ListenStatusCommand
    | DtmfCommand
    | SipRequestCommand
    | ConfigCommand
)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The app acked ``request_msgid`` (a message of type ``for_type``).

    ``msgid`` is the msgid on the wire; it differs from ``request_msgid`` only when a pending
    ``session:new`` ack was carried over to ``session:reconnect``. ``verbs`` is ``None`` when the
    ack had no verb array (jambonz ignores non-array ack data), else the parsed verbs (maybe
    empty).
    """

    msgid: str
    for_type: str
    verbs: tuple[Verb, ...] | None
    request_msgid: str


@dataclass(frozen=True, slots=True)
class AckTimedOut:
    """No ack within the deadline: the hook (``request_msgid``, type ``for_type``) failed."""

    msgid: str
    for_type: str
    request_msgid: str


@dataclass(frozen=True, slots=True)
class AckFailed:
    """An ack-awaiting message failed for another reason: socket lost, closed, or unusable verbs."""

    msgid: str
    for_type: str
    request_msgid: str
    reason: str


@dataclass(frozen=True, slots=True)
class AckDiscarded:
    """An ack nobody waits for was dropped: ``unknown`` msgid, or ``late`` (after its deadline)."""

    msgid: str
    reason: Literal["unknown", "late"]


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """The app sent a command. ``call_sid`` is the leg it targets when the app named one."""

    command: Command
    msgid: str | None
    call_sid: str | None


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """The app sent something we cannot accept; a ``jambonz:error`` answer is in the outbox."""

    details: str
    content: str


@dataclass(frozen=True, slots=True)
class HangupRequired:
    """The agent is gone for good (the session:reconnect was not acked): end the call."""

    reason: str


ControlEvent: TypeAlias = (
    AckReceived
    | AckTimedOut
    | AckFailed
    | AckDiscarded
    | CommandReceived
    | InvalidMessage
    | HangupRequired
)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """What a builder made. ``queued``: held (reconnecting, or another hook awaits its ack);
    ``discarded``: dropped because the socket was closed gracefully or the session failed."""

    type: str
    msgid: str
    text: str
    queued: bool = False
    discarded: bool = False


@dataclass(frozen=True, slots=True)
class ReconnectDecision:
    """What to do after the socket closed or a (re)connect attempt failed.

    ``reconnect``: open a new socket ``delay`` seconds from now (at ``reconnect_at``), then call
    :meth:`JambonzControl.connection_made`. ``attempt`` counts reconnect attempts (1-based).
    ``hangup``: the agent is unreachable for good; end the call. ``failed``: hooks that failed.
    """

    reconnect: bool
    delay: float | None
    reconnect_at: float | None
    attempt: int
    hangup: bool
    reason: str
    failed: tuple[AckFailed, ...] = ()


class ControlState(enum.Enum):
    """Where the control connection is."""

    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    AWAITING_RECONNECT_ACK = "awaiting-reconnect-ack"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(slots=True)
class _Message:
    type: str
    msgid: str
    text: str
    request_msgid: str
    for_type: str

    @property
    def wants_ack(self) -> bool:
        return self.type in TYPES_WANTING_ACK


@dataclass(slots=True)
class _Pending:
    message: _Message
    deadline: float


class _InvalidMessageError(Exception):
    """Internal: an app message is invalid; ``details`` goes into the jambonz:error."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


def _short_msgid() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")


def _js_truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str):
        return value != ""
    return True


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def backoff_delays() -> Iterator[float]:
    """jambonz's reconnect backoff: 0.5, 1, 2 s, then +2 s per try (rule 5)."""
    delay = 0.5
    while True:
        yield delay
        delay = delay * 2 if delay < 2 else delay + 2


# --------------------------------------------------------------------------- the protocol


class JambonzControl:
    """One call's ``ws.jambonz.org`` control connection, without the socket.

    Typical adapter loop: ``connection_made(now)``, ``send_session_new(...)``, then after every
    call send ``messages_to_send()``; feed each received frame to ``receive(data, now)``; call
    ``handle_timeout(now)`` at ``next_timeout()``; on close call ``on_close(code, now)`` and follow
    the :class:`ReconnectDecision`.
    """

    def __init__(
        self,
        call_sid: str,
        *,
        ack_timeout: float = ACK_TIMEOUT,
        max_reconnects: int = 5,
        serialize_hooks: bool = True,
        msgid_factory: Callable[[], str] = _short_msgid,
    ) -> None:
        if ack_timeout <= 0:
            raise LocalError("ack_timeout must be positive")
        if max_reconnects < 0:
            raise LocalError("max_reconnects must not be negative")
        self.call_sid = call_sid
        self.ack_timeout = ack_timeout
        self.max_reconnects = max_reconnects
        self.serialize_hooks = serialize_hooks
        self.notify_events = False
        """Send ``verb:status`` only while this is true (from a ``config`` verb's notifyEvents)."""
        self._new_msgid = msgid_factory
        self._state = ControlState.CONNECTING
        self._outbox: list[_Message] = []
        self._held: deque[_Message] = deque()
        self._pending: dict[str, _Pending] = {}
        self._expired: dict[str, None] = {}
        self._session_data: dict[str, Any] | None = None
        self._transfer: _Message | None = None
        self._reconnects = 0
        self._backoff = backoff_delays()
        self.late_acks = 0
        self.unknown_acks = 0
        self.invalid_messages = 0
        self.discarded_messages = 0

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def reconnects(self) -> int:
        """Reconnect attempts made so far in this call."""
        return self._reconnects

    @property
    def pending_ack_deadline(self) -> float | None:
        """The earliest ack deadline, or ``None`` when nothing awaits an ack."""
        return min((p.deadline for p in self._pending.values()), default=None)

    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` must next run (same as :attr:`pending_ack_deadline`)."""
        return self.pending_ack_deadline

    def awaiting_ack(self) -> list[str]:
        """Request msgids whose ack is outstanding."""
        return [p.message.request_msgid for p in self._pending.values()]

    # ------------------------------------------------------------------ outgoing

    def messages_to_send(self) -> list[str]:
        """Texts to send now, in order; the outbox is emptied."""
        texts = [m.text for m in self._outbox]
        self._outbox.clear()
        return texts

    def send_session_new(self, data: Mapping[str, Any], now: float) -> OutgoingMessage:
        """``session:new`` with the call info; remembered for ``session:reconnect``."""
        self._session_data = snake_case_keys(dict(data))
        return self._submit(self._build("session:new", self._session_data, None), now)

    def send_verb_hook(
        self,
        hook: Hook,
        call_info: Mapping[str, Any],
        results: Mapping[str, Any] | None,
        now: float,
        *,
        verb_id: str | None = None,
    ) -> OutgoingMessage:
        """``verb:hook`` for a verb's actionHook/eventHook: ``hook`` exactly as the app wrote it,
        ``data`` = call info merged with the verb's results (``digits``, ``speech``, ...), plus
        ``verb_id`` when the verb had an ``id``."""
        data: dict[str, Any] = {**call_info, **(results or {})}
        if verb_id is not None:
            data["verb_id"] = verb_id
        message = self._build("verb:hook", snake_case_keys(data), hook_url(hook))
        return self._submit(message, now)

    def send_call_status(
        self,
        call_info: Mapping[str, Any],
        now: float,
        *,
        duration: float | None = None,
    ) -> OutgoingMessage:
        """``call:status`` (no ack). ``call_info`` must carry ``call_status``; ``duration``
        (seconds) is required with ``completed`` and refused otherwise."""
        data = snake_case_keys(dict(call_info))
        status = data.get("call_status")
        if status not in CALL_STATUSES:
            raise LocalError(f"call:status needs a call_status among {sorted(CALL_STATUSES)}")
        data.pop("duration", None)
        if status == "completed":
            if duration is None:
                raise LocalError("call:status completed needs duration")
            data["duration"] = duration
        elif duration is not None:
            raise LocalError("call:status carries duration only when completed")
        return self._submit(self._build("call:status", data, None), now)

    def send_verb_status(
        self,
        event: str,
        now: float,
        *,
        verb: str,
        verb_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> OutgoingMessage | None:
        """``verb:status`` if ``notify_events`` is on, else ``None``.

        ``starting``/``finished`` carry ``{event, id, name}`` (call-session.js); per-verb events
        such as ``start-playback`` carry ``{...extra, event, verb, id}`` (task.js
        ``notifyStatus``).
        """
        if not self.notify_events:
            return None
        data: dict[str, Any]
        if event in ("starting", "finished"):
            data = {"event": event, "id": verb_id, "name": verb}
        else:
            data = {**(extra or {}), "event": event, "verb": verb, "id": verb_id}
        data = {k: v for k, v in data.items() if v is not None}
        return self._submit(self._build("verb:status", snake_case_keys(data), None), now)

    def send_verb_error(
        self,
        error: str,
        now: float,
        *,
        verb: str,
        verb_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> OutgoingMessage:
        """``jambonz:error`` for a failed verb: ``{...extra, error, verb, id}``."""
        data = {**(extra or {}), "error": error, "verb": verb}
        if verb_id is not None:
            data["id"] = verb_id
        return self._submit(self._build("jambonz:error", snake_case_keys(data), None), now)

    def send(
        self,
        type: str,
        data: Mapping[str, Any],
        now: float,
        *,
        hook: Hook | None = None,
    ) -> OutgoingMessage:
        """Any other jambonz->app message (``session:redirect``, ``dial:confirm``, ``llm:event``,
        ``tts:tokens-result``, ...). Ack tracking follows the type."""
        if type not in TYPES_WANTING_ACK and type not in NOTIFICATION_TYPES:
            raise LocalError(f"unknown jambonz message type {type!r}")
        if type in ("session:new", "session:reconnect"):
            raise LocalError(f"{type} has its own method")
        if (type in TYPES_WITH_HOOK) != (hook is not None):
            raise LocalError(f"{type} {'needs' if type in TYPES_WITH_HOOK else 'has no'} hook")
        url = hook_url(hook) if hook is not None else None
        return self._submit(self._build(type, snake_case_keys(dict(data)), url), now)

    def _build(self, type: str, data: Mapping[str, Any], hook: str | None) -> _Message:
        msgid = self._new_msgid()
        obj: dict[str, Any] = {"type": type, "msgid": msgid, "call_sid": self.call_sid}
        if hook is not None:
            obj["hook"] = hook
        obj["data"] = data
        return _Message(type, msgid, _dumps(obj), msgid, type)

    def _submit(self, message: _Message, now: float) -> OutgoingMessage:
        if self._state in (ControlState.CLOSED, ControlState.FAILED):
            self.discarded_messages += 1
            return OutgoingMessage(message.type, message.msgid, message.text, discarded=True)
        self._held.append(message)
        self._release(now)
        queued = any(m is message for m in self._held)
        return OutgoingMessage(message.type, message.msgid, message.text, queued=queued)

    def _release(self, now: float) -> None:
        """Move held messages to the outbox as far as the rules allow."""
        if self._state is not ControlState.OPEN:
            return
        hook_in_flight = self.serialize_hooks and bool(self._pending)
        still: deque[_Message] = deque()
        for message in self._held:
            if message.wants_ack:
                if hook_in_flight:
                    still.append(message)
                    continue
                hook_in_flight = self.serialize_hooks
            self._emit(message, now)
        self._held = still

    def _emit(self, message: _Message, now: float) -> None:
        self._outbox.append(message)
        if message.wants_ack:
            self._pending[message.msgid] = _Pending(message, now + self.ack_timeout)

    # ------------------------------------------------------------------ connection lifecycle

    def connection_made(self, now: float) -> None:
        """The socket is open. After a drop this queues ``session:reconnect`` first."""
        if self._state is ControlState.CONNECTING:
            self._state = ControlState.OPEN
            self._release(now)
            return
        if self._state is not ControlState.RECONNECTING:
            raise LocalError(f"connection_made in state {self._state.value}")
        message = self._build("session:reconnect", self._session_data or {}, None)
        if self._transfer is not None:
            # The pending session:new ack now belongs to the session:reconnect msgid.
            message.request_msgid = self._transfer.request_msgid
            message.for_type = "session:new"
        self._state = ControlState.AWAITING_RECONNECT_ACK
        self._emit(message, now)

    def on_close(self, code: int, now: float) -> ReconnectDecision:
        """The socket closed with ``code`` (from the app, or dropped)."""
        if self._state in (ControlState.CLOSED, ControlState.FAILED):
            return ReconnectDecision(False, None, None, self._reconnects, False, "already closed")
        if self._state in (ControlState.CONNECTING, ControlState.RECONNECTING):
            return self.on_connect_failed(now)
        if code == NORMAL_CLOSURE:
            failed = self._fail_everything("socket closed gracefully by the app")
            self._state = ControlState.CLOSED
            return ReconnectDecision(False, None, None, self._reconnects, False, "graceful", failed)
        failed = self._drop_connection()
        return self._schedule(now, failed, f"closed with code {code}")

    def on_connect_failed(self, now: float) -> ReconnectDecision:
        """A connect (or reconnect) attempt failed before the socket opened."""
        if self._state is ControlState.CONNECTING:
            failed = self._fail_everything("could not connect to the app")
            self._state = ControlState.FAILED
            return ReconnectDecision(False, None, None, 0, True, "initial connect failed", failed)
        if self._state is not ControlState.RECONNECTING:
            raise LocalError(f"on_connect_failed in state {self._state.value}")
        return self._schedule(now, (), "reconnect attempt failed")

    def close(self) -> list[AckFailed]:
        """We are closing the socket ourselves (the call ended): stop, failing what still waits."""
        if self._state in (ControlState.CLOSED, ControlState.FAILED):
            return []
        failed = self._fail_everything("the worker closed the connection")
        self._state = ControlState.CLOSED
        return list(failed)

    def _schedule(self, now: float, failed: Iterable[AckFailed], why: str) -> ReconnectDecision:
        failed = tuple(failed)
        if self._reconnects >= self.max_reconnects:
            failed += self._fail_everything("the app could not be reached again")
            self._state = ControlState.FAILED
            return ReconnectDecision(
                False, None, None, self._reconnects, True, f"{why}; reconnects exhausted", failed
            )
        self._state = ControlState.RECONNECTING
        self._reconnects += 1
        delay = next(self._backoff)
        return ReconnectDecision(True, delay, now + delay, self._reconnects, False, why, failed)

    def _drop_connection(self) -> tuple[AckFailed, ...]:
        """The socket is gone: unsent messages go back to the hold, sent ones fail (rule 7)."""
        unsent = [m for m in self._outbox if m.type != "session:reconnect"]
        self._outbox.clear()
        for message in unsent:
            self._pending.pop(message.msgid, None)
        failed: list[AckFailed] = []
        for pending in self._pending.values():
            message = pending.message
            if message.for_type == "session:new":
                self._transfer = message
            elif message.type != "session:reconnect":
                failed.append(
                    AckFailed(message.msgid, message.for_type, message.request_msgid, "socket lost")
                )
        self._pending.clear()
        for message in unsent:
            if message.type == "session:new":
                self._transfer = message
        self._held.extendleft(reversed([m for m in unsent if m.type != "session:new"]))
        return tuple(failed)

    def _fail_everything(self, reason: str) -> tuple[AckFailed, ...]:
        waiting = [p.message for p in self._pending.values()]  # includes every emitted one
        waiting += [m for m in self._held if m.wants_ack]
        if self._transfer is not None and all(
            m.request_msgid != self._transfer.request_msgid for m in waiting
        ):
            waiting.append(self._transfer)
        self._pending.clear()
        self._outbox.clear()
        self._held.clear()
        self._transfer = None
        failed = {
            m.request_msgid: AckFailed(m.msgid, m.for_type, m.request_msgid, reason)
            for m in waiting
            if m.for_type != "session:reconnect"
        }
        return tuple(failed.values())

    # ------------------------------------------------------------------ timers

    def handle_timeout(self, now: float) -> list[ControlEvent]:
        """Fail every ack whose deadline is ``<= now``."""
        events: list[ControlEvent] = []
        for msgid, pending in list(self._pending.items()):
            if pending.deadline > now:
                continue
            del self._pending[msgid]
            self._remember_expired(msgid)
            message = pending.message
            events.append(AckTimedOut(msgid, message.for_type, message.request_msgid))
            if message.type == "session:reconnect":
                self._transfer = None
                events.extend(self._fail_everything("session:reconnect was not acknowledged"))
                self._state = ControlState.FAILED
                events.append(HangupRequired("session:reconnect was not acknowledged"))
                return events
        self._release(now)
        return events

    def _remember_expired(self, msgid: str) -> None:
        self._expired[msgid] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            del self._expired[next(iter(self._expired))]

    # ------------------------------------------------------------------ incoming

    def receive(self, data: str | bytes, now: float) -> list[ControlEvent]:
        """Parse one frame from the app. Never raises; invalid input yields :class:`InvalidMessage`
        and a ``jambonz:error`` in the outbox."""
        if self._state in (ControlState.CLOSED, ControlState.FAILED):
            self.discarded_messages += 1
            return []
        if isinstance(data, bytes | bytearray | memoryview):
            content = bytes(data).decode("utf-8", errors="replace")
            return self._invalid("binary frames are not part of ws.jambonz.org", content, now)
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return self._invalid(f"invalid JSON: {exc}", data, now)
        try:
            if not isinstance(obj, dict):
                raise _InvalidMessageError("type property not supplied")
            kind = obj.get("type")
            if not _js_truthy(kind):
                raise _InvalidMessageError("type property not supplied")
            if kind == "ack":
                return self._receive_ack(obj, data, now)
            if kind == "command":
                return [self._receive_command(obj)]
            raise _InvalidMessageError(f"invalid type property: {kind}")
        except _InvalidMessageError as exc:
            return self._invalid(exc.details, data, now)

    def message_too_big(self, details: str, now: float) -> None:
        """The app sent a frame over the size limit and its socket was closed (1009): tell it
        why with ``jambonz:error`` once the session is back (the reconnect rule applies)."""
        self.invalid_messages += 1
        data = {"msg": "InvalidMessage", "details": f"message too big: {details}", "content": ""}
        self._submit(self._build("jambonz:error", data, None), now)

    def _invalid(self, details: str, content: str, now: float) -> list[ControlEvent]:
        self.invalid_messages += 1
        content = content[:_CONTENT_ECHO_LIMIT].encode("utf-8", "replace").decode("utf-8")
        data = {"msg": "InvalidMessage", "details": details, "content": content}
        self._submit(self._build("jambonz:error", data, None), now)
        return [InvalidMessage(details, content)]

    def _receive_ack(self, obj: dict[str, Any], text: str, now: float) -> list[ControlEvent]:
        msgid = obj.get("msgid")
        if not _js_truthy(msgid):
            raise _InvalidMessageError("msgid not supplied")
        if not isinstance(msgid, str):
            raise _InvalidMessageError("msgid must be a string")
        pending = self._pending.pop(msgid, None)
        if pending is None:
            if msgid in self._expired:
                self.late_acks += 1
                return [AckDiscarded(msgid, "late")]
            self.unknown_acks += 1
            return [AckDiscarded(msgid, "unknown")]
        message = pending.message
        events: list[ControlEvent] = []
        verbs: tuple[Verb, ...] | None = None
        raw = obj.get("data")
        if isinstance(raw, list):
            try:
                verbs = tuple(parse_verbs(raw))
            except VerbError as exc:
                events.extend(self._invalid(str(exc), text, now))
                events.append(AckFailed(msgid, message.for_type, message.request_msgid, str(exc)))
        if not events:
            events.append(AckReceived(msgid, message.for_type, verbs, message.request_msgid))
        if message.type == "session:reconnect":
            self._transfer = None
            self._state = ControlState.OPEN
        self._release(now)
        return events

    def _receive_command(self, obj: dict[str, Any]) -> CommandReceived:
        command = obj.get("command")
        if not _js_truthy(command):
            raise _InvalidMessageError("command property not supplied")
        if not isinstance(command, str):
            raise _InvalidMessageError("command must be a string")
        data = obj.get("data")
        if not _js_truthy(data) and command not in _COMMANDS_WITHOUT_DATA:
            raise _InvalidMessageError("data property not supplied")
        queue_command = obj.get("queueCommand", False)
        if not isinstance(queue_command, bool):
            raise _InvalidMessageError("queueCommand must be a boolean")
        msgid = obj.get("msgid")
        if msgid is not None and not isinstance(msgid, str):
            raise _InvalidMessageError("msgid must be a string")
        target = obj.get("callSid")
        if target is not None and not isinstance(target, str):
            raise _InvalidMessageError("callSid must be a string")
        return CommandReceived(_parse_command(command, data, queue_command), msgid, target)


# --------------------------------------------------------------------------- command parsing


def _verb_array(value: Any, what: str) -> tuple[Verb, ...]:
    try:
        return tuple(parse_verbs(value))
    except VerbError as exc:
        raise _InvalidMessageError(f"{what}: {exc}") from None


def _optional_hook(data: Mapping[str, Any], key: str) -> Hook | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        try:
            return WebhookSpec.model_validate(value)
        except ValueError as exc:
            raise _InvalidMessageError(f"redirect: {key} is not a valid hook: {exc}") from None
    raise _InvalidMessageError(f"redirect: {key} must be a URL string or a hook object")


def _status_value(command: str, data: Any, key: str, allowed: tuple[str, ...]) -> str:
    """``"pause"`` or ``{key: "pause"}`` -> ``"pause"`` (both shapes are in use)."""
    value = data.get(key) if isinstance(data, dict) else data
    if value not in allowed:
        raise _InvalidMessageError(f"{command}: {key} must be one of {', '.join(allowed)}")
    assert isinstance(value, str)
    return value


def _parse_redirect(data: Any, queue_command: bool) -> Command:
    if isinstance(data, list):
        return RedirectCommand(_verb_array(data, "redirect"), queue_command)
    if not isinstance(data, dict):
        raise _InvalidMessageError("redirect: data must be a verb array or an object")
    parent = data.get("parent_call")
    child = data.get("child_call")
    result = RedirectHookCommand(
        call_hook=_optional_hook(data, "call_hook"),
        child_call_hook=_optional_hook(data, "child_call_hook"),
        parent_call=None if parent is None else _verb_array(parent, "redirect parent_call"),
        child_call=None if child is None else _verb_array(child, "redirect child_call"),
    )
    if (
        result.call_hook is None
        and result.child_call_hook is None
        and result.parent_call is None
        and result.child_call is None
    ):
        raise _InvalidMessageError(
            "redirect: needs call_hook, child_call_hook, parent_call or child_call"
        )
    return result


def _parse_dtmf(data: Any) -> DtmfCommand:
    if not isinstance(data, dict):
        raise _InvalidMessageError("dtmf: data must be an object")
    nested = data.get("dtmf")
    body: dict[str, Any] = nested if isinstance(nested, dict) else data
    digit = body.get("digit")
    if not isinstance(digit, str) or not digit or any(c not in DTMF_DIGITS for c in digit):
        raise _InvalidMessageError("dtmf: digit must be a string of DTMF keys (0-9, *, #, A-D)")
    duration = body.get("duration", _DEFAULT_DTMF_DURATION_MS)
    if isinstance(duration, float) and duration.is_integer():
        duration = int(duration)
    if not isinstance(duration, int) or isinstance(duration, bool) or duration <= 0:
        raise _InvalidMessageError("dtmf: duration must be a positive number of milliseconds")
    return DtmfCommand(digit.upper(), duration)


def _parse_sip_request(data: Any) -> SipRequestCommand:
    if not isinstance(data, dict):
        raise _InvalidMessageError("sip:request: data must be an object")
    nested = data.get("sip_request")
    body: dict[str, Any] = nested if isinstance(nested, dict) else data
    method = body.get("method")
    if not isinstance(method, str) or method.upper() not in _SIP_REQUEST_METHODS:
        allowed = ", ".join(sorted(_SIP_REQUEST_METHODS))
        raise _InvalidMessageError(f"sip:request: method must be one of {allowed}")
    content_type = body.get("content_type")
    content = body.get("content")
    headers = body.get("headers", {})
    if content_type is not None and not isinstance(content_type, str):
        raise _InvalidMessageError("sip:request: content_type must be a string")
    if content is not None and not isinstance(content, str):
        raise _InvalidMessageError("sip:request: content must be a string")
    if content is not None and content_type is None:
        raise _InvalidMessageError("sip:request: content needs content_type")
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise _InvalidMessageError("sip:request: headers must be an object of strings")
    return SipRequestCommand(method.upper(), content_type, content, dict(headers))


def _parse_config(data: Any) -> ConfigCommand:
    if not isinstance(data, dict):
        raise _InvalidMessageError("config: data must be an object")
    try:
        verb = parse_verb({**data, "verb": "config"})
    except VerbError as exc:
        raise _InvalidMessageError(str(exc)) from None
    assert isinstance(verb, ConfigVerb)
    return ConfigCommand(verb)


def _parse_command(command: str, data: Any, queue_command: bool) -> Command:
    if command == "redirect":
        return _parse_redirect(data, queue_command)
    if command == "call:status":
        status = _status_value(command, data, "call_status", ("completed", "no-answer"))
        return CallStatusCommand("completed" if status == "completed" else "no-answer")
    if command == "mute:status":
        return MuteStatusCommand(
            _status_value(command, data, "mute_status", ("mute", "unmute")) == "mute"
        )
    if command in ("listen:status", "stream:status"):
        kind: Literal["listen", "stream"] = "listen" if command == "listen:status" else "stream"
        key = f"{kind}_status"
        if isinstance(data, dict) and key not in data:
            key = "stream_status" if kind == "listen" else "listen_status"
        status = _status_value(command, data, key, ("pause", "resume"))
        return ListenStatusCommand(kind, "pause" if status == "pause" else "resume")
    if command == "dtmf":
        return _parse_dtmf(data)
    if command == "sip:request":
        return _parse_sip_request(data)
    if command == "config":
        return _parse_config(data)
    if command in _UNSUPPORTED_COMMANDS:
        raise _InvalidMessageError(f"unsupported command: {command}")
    raise _InvalidMessageError(f"invalid command: {command}")


# --------------------------------------------------------------------------------------------
# Call info: what the feature server says about a call (PROTOCOLS.md §1.4), built from the leg

_LOWERCASED_HEADERS = frozenset(
    name.lower()
    for name in [
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
    ]
)


@dataclass(frozen=True, slots=True)
class CallState:
    """What changes during a call and goes into its call info."""

    call_sid: str
    sip_status: int
    sip_reason: str
    call_status: str
    account_sid: str
    application_sid: str
    customer_data: Mapping[str, Any] | None = None


def call_info(leg: LegInfo, state: CallState) -> dict[str, Any]:
    """jambonz CallInfo (snake_case), as in ``call:status`` and ``verb:hook``."""
    host, port = leg.local_address
    info: dict[str, Any] = {
        "call_sid": state.call_sid,
        "direction": leg.direction,
        "from": leg.from_user,
        "to": leg.to_user,
        "call_id": leg.call_id,
        "sbc_callid": leg.header("X-CID") or leg.call_id,
        "sip_status": state.sip_status,
        "sip_reason": state.sip_reason,
        "call_status": state.call_status,
        "caller_id": leg.from_user,
        "account_sid": state.account_sid,
        "application_sid": state.application_sid,
        "trace_id": state.call_sid.replace("-", ""),
        "fs_sip_address": f"{host}:{port}",
        "originating_sip_ip": leg.remote_address[0],
    }
    if state.customer_data:
        info["customerData"] = dict(state.customer_data)
    return info


def sip_headers(leg: LegInfo) -> dict[str, str]:
    """The initial request's headers as jambonz gives them: one key per header name (the usual
    ones lowercased), each value whole as received; a header on several lines has its values
    joined with ", " (RFC 3261 §7.3.1), so nothing is dropped."""
    out: dict[str, str] = {}
    for name, value in leg.headers:
        key = name.lower() if name.lower() in _LOWERCASED_HEADERS else name
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def session_new_data(
    leg: LegInfo,
    state: CallState,
    *,
    has_recording: bool,
    env_vars: Mapping[str, str],
    service_provider_sid: str = "aispinner",
) -> dict[str, Any]:
    """The ``data`` of ``session:new`` for a call whose leg is ``leg``: the call info with
    ``local_sip_address`` in place of ``fs_sip_address``, and the initial request under ``sip``
    (``raw`` exactly as it was received)."""
    info = call_info(leg, state)
    info["local_sip_address"] = info.pop("fs_sip_address")
    info["caller_name"] = leg.caller_name
    info["has_recording"] = has_recording
    info["service_provider_sid"] = service_provider_sid
    if leg.raw:
        request_line = leg.raw.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        method = request_line.split(" ", 1)[0]
        body = leg.body.decode("utf-8", "replace")
        info["sip"] = {
            "headers": sip_headers(leg),
            "raw": leg.raw.decode("utf-8", "replace"),
            "body": body,
            "method": method,
            "version": "2.0",
            "uri": leg.request_uri,
            "payload": [{"type": leg.content_type or "", "content": body}] if body else [],
        }
    info["defaults"] = {
        "synthesizer": {"vendor": "espeak-ng", "language": "en-US", "voice": "en-us"},
        "recognizer": {"vendor": "none", "language": "en-US"},
    }
    info["env_vars"] = dict(env_vars)
    return info
