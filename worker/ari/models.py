"""Typed ARI objects and events (``rest-api/api-docs/events.json``, ``channels.json``,
``bridges.json``), as far as the worker reads them: frozen pydantic models that ignore fields they
do not name, so a newer Asterisk adding fields changes nothing.

``parse_event`` turns one events-WebSocket message into a typed event. A type the worker does not
use becomes ``UnknownEvent`` (the Stasis app counts and ignores it); a message that is not a JSON
object with a string ``type``, or a known event whose fields are wrong, raises ``AriProtocolError``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from worker.errors import RemoteError


class AriProtocolError(RemoteError):
    """Asterisk sent something that is not a valid ARI message."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class CallerId(_Model):
    name: str = ""
    number: str = ""


class DialplanCep(_Model):
    context: str = ""
    exten: str = ""
    priority: int = 0
    app_name: str = ""
    app_data: str = ""


class Channel(_Model):
    id: str
    name: str = ""
    state: str = ""
    protocol_id: str = ""
    caller: CallerId = CallerId()
    connected: CallerId = CallerId()
    accountcode: str = ""
    dialplan: DialplanCep | None = None
    creationtime: str = ""
    language: str = ""
    channelvars: dict[str, str] | None = None


class Bridge(_Model):
    id: str
    technology: str = ""
    bridge_type: str = ""
    bridge_class: str = ""
    creator: str = ""
    name: str = ""
    channels: list[str] = []


class Application(_Model):
    name: str
    channel_ids: list[str] = []
    bridge_ids: list[str] = []
    endpoint_ids: list[str] = []
    device_names: list[str] = []


class AsteriskInfo(_Model):
    """``GET /asterisk/info``: what the worker logs when it connects."""

    class System(_Model):
        version: str = ""
        entity_id: str = ""

    class Status(_Model):
        startup_time: str = ""
        last_reload_time: str = ""

    system: System = System()
    status: Status = Status()


class ConfigTuple(_Model):
    """One attribute of a dynamic-config object."""

    attribute: str
    value: str


# -- events ---------------------------------------------------------------------------------------


class _Event(_Model):
    application: str = ""
    timestamp: str = ""
    asterisk_id: str | None = None


class StasisStart(_Event):
    type: Literal["StasisStart"]
    args: list[str] = []
    channel: Channel
    replace_channel: Channel | None = None


class StasisEnd(_Event):
    type: Literal["StasisEnd"]
    channel: Channel


class ChannelStateChange(_Event):
    type: Literal["ChannelStateChange"]
    channel: Channel


class ChannelDtmfReceived(_Event):
    """Sent once, when the key is released (no begin event)."""

    type: Literal["ChannelDtmfReceived"]
    digit: str
    duration_ms: int = 0
    channel: Channel


class ChannelHangupRequest(_Event):
    """``cause`` is a Q.850 cause, except that a soft hangup (``soft``) carries the soft-hangup
    flag (32) there; a SIP BYE from the caller carries no cause at all."""

    type: Literal["ChannelHangupRequest"]
    cause: int | None = None
    tech_cause: int | None = None
    soft: bool | None = None
    channel: Channel


class ChannelDestroyed(_Event):
    type: Literal["ChannelDestroyed"]
    cause: int = 0
    cause_txt: str = ""
    tech_cause: int | None = None
    channel: Channel


class ChannelVarset(_Event):
    type: Literal["ChannelVarset"]
    variable: str
    value: str = ""
    channel: Channel | None = None


class ChannelEnteredBridge(_Event):
    type: Literal["ChannelEnteredBridge"]
    bridge: Bridge
    channel: Channel | None = None


class ChannelLeftBridge(_Event):
    type: Literal["ChannelLeftBridge"]
    bridge: Bridge
    channel: Channel


class BridgeDestroyed(_Event):
    type: Literal["BridgeDestroyed"]
    bridge: Bridge


class Dial(_Event):
    """Progress of a dial (an originate, or Asterisk dialling an ExternalMedia channel):
    ``dialstatus`` is "" when it starts, then RINGING, PROGRESS, ANSWER, BUSY, NOANSWER ..."""

    type: Literal["Dial"]
    dialstatus: str = ""
    dialstring: str | None = None
    peer: Channel
    caller: Channel | None = None


class ApplicationReplaced(_Event):
    """Another WebSocket subscribed to this application: this one gets no more events."""

    type: Literal["ApplicationReplaced"]


class UnknownEvent(_Model):
    """An event type the worker does not use."""

    type: str


KnownEvent = Annotated[
    StasisStart
    | StasisEnd
    | ChannelStateChange
    | ChannelDtmfReceived
    | ChannelHangupRequest
    | ChannelDestroyed
    | ChannelVarset
    | ChannelEnteredBridge
    | ChannelLeftBridge
    | BridgeDestroyed
    | Dial
    | ApplicationReplaced,
    Field(discriminator="type"),
]
AriEvent = KnownEvent | UnknownEvent

_KNOWN: TypeAdapter[KnownEvent] = TypeAdapter(KnownEvent)
_KNOWN_TYPES = frozenset(
    (
        "StasisStart",
        "StasisEnd",
        "ChannelStateChange",
        "ChannelDtmfReceived",
        "ChannelHangupRequest",
        "ChannelDestroyed",
        "ChannelVarset",
        "ChannelEnteredBridge",
        "ChannelLeftBridge",
        "BridgeDestroyed",
        "Dial",
        "ApplicationReplaced",
    )
)


def parse_event(message: str | bytes) -> AriEvent:
    """One events-WebSocket message as a typed event; see the module docstring."""
    try:
        data = json.loads(message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AriProtocolError(f"ARI event is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise AriProtocolError("ARI event is not an object with a string 'type'")
    if data["type"] not in _KNOWN_TYPES:
        return UnknownEvent(type=data["type"])
    try:
        return _KNOWN.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        raise AriProtocolError(f"invalid {data['type']} event: {where}: {first['msg']}") from exc
