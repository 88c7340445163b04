"""The events a call produces, as frozen pydantic models forming one discriminated union on
``type`` (field names as in ``shared/seeds/realtime-events-websocket.txt``: ``call_id``,
``node_id``, ``status``, ``duration_sec``, ...), with ``to_json()`` and :func:`parse_event`.

Rules:

1. Every event has a literal ``type``; :data:`Event` is the union of all of them and
   :func:`parse_event` rejects an unknown ``type`` (or unknown fields) with a
   ``pydantic.ValidationError`` that names the expected tags.
2. Times are timezone-aware and serialised as ISO 8601 (UTC ``Z``); ``at``/``started_at`` default
   to now. ``call.transcript`` carries the time in the call (``at_sec``) instead.
3. ``call.status`` statuses are jambonz's (``trying`` ... ``no-answer``); ``call.done`` carries the
   final one (``completed``, ``failed``, ``busy`` or ``no-answer``).
4. ``from`` is a Python keyword: the field is ``from_`` in code and ``from`` on the wire.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    TypeAdapter,
)

__all__ = [
    "CallDoneEvent",
    "CallDtmfEvent",
    "CallEvent",
    "CallInterruptionEvent",
    "CallStartedEvent",
    "CallStatusEvent",
    "CallTranscriptEvent",
    "CallVoicemailDetectedEvent",
    "Event",
    "JournalEntry",
    "JournalNewEvent",
    "parse_event",
]

CallStatusValue: TypeAlias = Literal[
    "trying", "ringing", "early-media", "in-progress", "completed", "failed", "busy", "no-answer"
]
FinalStatus: TypeAlias = Literal["completed", "failed", "busy", "no-answer"]
DtmfMethod: TypeAlias = Literal["rfc4733", "sip-info", "inband", "ari"]

_ROLE_SYNONYMS = {
    "agent": "agent",
    "assistant": "agent",
    "bot": "agent",
    "ai": "agent",
    "user": "user",
    "caller": "user",
    "customer": "user",
    "human": "user",
}


def _now() -> datetime:
    return datetime.now(UTC)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _role(value: Any) -> Any:
    """Agents name the speakers differently (``assistant``, ``caller`` ...); the hub knows two."""
    return _ROLE_SYNONYMS.get(value.lower(), value) if isinstance(value, str) else value


DtmfDigit: TypeAlias = Annotated[str, BeforeValidator(_upper), Field(pattern=r"^[0-9*#A-D]$")]
Role: TypeAlias = Annotated[Literal["agent", "user"], BeforeValidator(_role)]
NonEmpty: TypeAlias = Annotated[str, Field(min_length=1)]


class _EventModel(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    def to_json(self) -> str:
        """One compact JSON object (the wire form; ``from_`` is written as ``from``)."""
        return self.model_dump_json()

    def to_dict(self) -> dict[str, Any]:
        """The wire form as plain JSON values."""
        return self.model_dump(mode="json")


class _CallEventModel(_EventModel):
    call_id: NonEmpty
    node_id: str | None = None
    """The PBX / number / agent node the call belongs to, when the worker knows it."""
    workspace_id: Annotated[int, Field(ge=1)] = 1
    """The workspace the call belongs to (its route's)."""


class CallStartedEvent(_CallEventModel):
    """A call arrived (inbound) or was placed (outbound) and was routed to ``route``."""

    type: Literal["call.started"] = "call.started"
    direction: Literal["inbound", "outbound"]
    from_: str = Field(alias="from")
    to: str
    route: str
    started_at: AwareDatetime = Field(default_factory=_now)


class CallStatusEvent(_CallEventModel):
    """The call status changed (one row of the status machine)."""

    type: Literal["call.status"] = "call.status"
    status: CallStatusValue
    sip_status: Annotated[int, Field(ge=100, le=699)] | None = None
    at: AwareDatetime = Field(default_factory=_now)


class MediaQualityFigures(_EventModel):
    """A call's media figures: ``lost``, ``late`` and ``jitter_ms`` as our jitter buffer saw the
    caller's stream; the ``peer_*`` figures and ``round_trip_ms`` as the far end reported our
    stream in RTCP (None when it sent no receiver report)."""

    packets_in: NonNegativeInt
    packets_out: NonNegativeInt
    lost: NonNegativeInt
    late: NonNegativeInt
    jitter_ms: NonNegativeFloat
    peer_fraction_lost: Annotated[float, Field(ge=0, le=1)] | None = None
    peer_cumulative_lost: int | None = None
    peer_jitter_ms: NonNegativeFloat | None = None
    round_trip_ms: NonNegativeFloat | None = None


class CallDoneEvent(_CallEventModel):
    """The call ended; ``duration_sec`` counts from the answer (0 if never answered)."""

    type: Literal["call.done"] = "call.done"
    status: FinalStatus
    duration_sec: NonNegativeInt
    recording_path: str | None = None
    cause: str | None = None
    media: MediaQualityFigures | None = None


class CallDtmfEvent(_CallEventModel):
    """The caller pressed a key, heard as ``method``."""

    type: Literal["call.dtmf"] = "call.dtmf"
    digit: DtmfDigit
    duration_ms: NonNegativeInt
    method: DtmfMethod
    at: AwareDatetime = Field(default_factory=_now)


class CallInterruptionEvent(_CallEventModel):
    """Agent audio was cleared before it played: the caller spoke over the agent
    (``barge-in``), or the agent flushed it (``agent-clear``: jambonz ``killAudio``, Twilio
    ``clear``). ``cleared_ms``: how much audio was dropped."""

    type: Literal["call.interruption"] = "call.interruption"
    at: AwareDatetime = Field(default_factory=_now)
    reason: Literal["barge-in", "agent-clear"] = "barge-in"
    cleared_ms: NonNegativeFloat = 0.0


class CallVoicemailDetectedEvent(_CallEventModel):
    """A voicemail beep was heard at ``beep_hz``."""

    type: Literal["call.voicemail_detected"] = "call.voicemail_detected"
    at: AwareDatetime = Field(default_factory=_now)
    beep_hz: PositiveFloat


class CallTranscriptEvent(_CallEventModel):
    """A finalised transcript turn; ``at_sec`` is the time in the call (``time_in_call_secs``)."""

    type: Literal["call.transcript"] = "call.transcript"
    role: Role
    text: str
    at_sec: NonNegativeFloat


class JournalEntry(_EventModel):
    """One recorded call in the journal (the seed's ``journal.new`` entry)."""

    id: int
    call_id: NonEmpty
    node_id: str | None = None
    status: str
    subscriber_phone: str | None = None
    duration_sec: NonNegativeInt
    created_at: AwareDatetime = Field(default_factory=_now)


class JournalNewEvent(_EventModel):
    """New calls were recorded in the journal."""

    type: Literal["journal.new"] = "journal.new"
    entries: tuple[JournalEntry, ...] = Field(min_length=1)


CallEvent: TypeAlias = (
    CallStartedEvent
    | CallStatusEvent
    | CallDoneEvent
    | CallDtmfEvent
    | CallInterruptionEvent
    | CallVoicemailDetectedEvent
    | CallTranscriptEvent
)
"""Any event about one call (it has ``call_id``, ``workspace_id`` and ``node_id``)."""

Event: TypeAlias = Annotated[
    CallStartedEvent
    | CallStatusEvent
    | CallDoneEvent
    | CallDtmfEvent
    | CallInterruptionEvent
    | CallVoicemailDetectedEvent
    | CallTranscriptEvent
    | JournalNewEvent,
    Field(discriminator="type"),
]
"""Any event; discriminated on ``type``."""

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: str | bytes | dict[str, Any]) -> Event:
    """One event from its JSON text (or an already-decoded object). Raises
    ``pydantic.ValidationError`` for an unknown ``type``, unknown fields or bad values."""
    if isinstance(data, dict):
        return EVENT_ADAPTER.validate_python(data)
    return EVENT_ADAPTER.validate_json(data)
