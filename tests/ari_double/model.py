"""The live state of the simulated Asterisk: channels and bridges, and their JSON snapshots in
the key order Asterisk 22 uses (``ast_channel_snapshot_to_json``, ``ast_bridge_snapshot_to_json``
as recorded)."""

from __future__ import annotations

import itertools
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tests.ari_double.events import timestamp

if TYPE_CHECKING:
    from tests.ari_double.phone import Phone
    from tests.ari_double.rtp import ExternalMedia

JsonObject = dict[str, Any]
ChannelKind = Literal["sip-in", "sip-out", "em", "local-1", "local-2"]
OUTGOING_LINE = ("AppDial2", "(Outgoing Line)")


@dataclass(eq=False)
class Channel:
    id: str
    name: str
    kind: ChannelKind
    state: str
    protocol_id: str = ""
    caller: tuple[str, str] = ("", "")
    """(name, number)"""
    connected: tuple[str, str] = ("", "")
    context: str = "default"
    exten: str = "s"
    priority: int = 1
    app_name: str = ""
    app_data: str = ""
    creationtime: str = field(default_factory=timestamp)
    language: str = "en"
    variables: dict[str, str] = field(default_factory=dict)
    stasis_app: str | None = None
    """The app the channel is in Stasis with (Asterisk's ``stasis_app_control``), if any."""
    explicit_apps: set[str] = field(default_factory=set)
    """Apps subscribed by originate/externalMedia: they outlive Stasis and see ChannelDestroyed."""
    bridge: Bridge | None = None
    endpoint: str | None = None
    dialstring: str = ""
    phone: Phone | None = None
    em: ExternalMedia | None = None
    partner: Channel | None = None
    """The other half of a Local channel pair."""
    muted: bool = False
    far_end_hung_up: bool = False
    """The SIP side sent the BYE (the phone hung up), not Asterisk."""

    @property
    def apps(self) -> set[str]:
        """Apps that receive this channel's events now."""
        return self.explicit_apps | ({self.stasis_app} if self.stasis_app else set())

    @property
    def created_by_ari(self) -> bool:
        return self.kind in ("sip-out", "em", "local-1")

    def snapshot(self) -> JsonObject:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "protocol_id": self.protocol_id,
            "caller": {"name": self.caller[0], "number": self.caller[1]},
            "connected": {"name": self.connected[0], "number": self.connected[1]},
            "accountcode": "",
            "dialplan": {
                "context": self.context,
                "exten": self.exten,
                "priority": self.priority,
                "app_name": self.app_name,
                "app_data": self.app_data,
            },
            "creationtime": self.creationtime,
            "language": self.language,
        }


@dataclass(eq=False)
class Bridge:
    id: str
    name: str
    bridge_type: str
    """``mixing`` or ``holding``"""
    video_mode: str = "talker"
    creationtime: str = field(default_factory=timestamp)
    members: list[Channel] = field(default_factory=list)
    apps: set[str] = field(default_factory=set)

    @property
    def technology(self) -> str:
        if self.bridge_type == "holding":
            return "holding_bridge"
        return "simple_bridge" if len(self.members) <= 2 else "softmix"

    def snapshot(self) -> JsonObject:
        return {
            "id": self.id,
            "technology": self.technology,
            "bridge_type": self.bridge_type,
            "bridge_class": "stasis",
            "creator": "Stasis",
            "name": self.name,
            "channels": [member.id for member in self.members],
            "creationtime": self.creationtime,
            "video_mode": self.video_mode,
        }


class Ids:
    """Identifiers as Asterisk makes them: channel ids ``<epoch>.<sequence>``, PJSIP and Local
    channel name counters (``-%08x``), UnicastRTP names carrying a pointer, SIPp-style Call-IDs
    for inbound calls and UUIDs for bridges, playbacks and outbound Call-IDs."""

    def __init__(self) -> None:
        self._sequence = itertools.count()
        self._pjsip = itertools.count()
        self._local = itertools.count()
        self._sipp_call = itertools.count(1)
        self._sipp_pid = 20000 + secrets.randbelow(9000)

    def channel_id(self) -> str:
        return f"{int(time.time())}.{next(self._sequence)}"

    def pjsip_name(self, endpoint: str) -> str:
        return f"PJSIP/{endpoint}-{next(self._pjsip):08x}"

    def local_names(self, resource: str) -> tuple[str, str]:
        base = f"Local/{resource}-{next(self._local):08x}"
        return f"{base};1", f"{base};2"

    @staticmethod
    def unicast_rtp_name(external_host: str) -> str:
        return f"UnicastRTP/{external_host}-0x7f{secrets.token_hex(5)}"

    def sipp_call_id(self) -> str:
        return f"{next(self._sipp_call)}-{self._sipp_pid}@127.0.0.1"

    @staticmethod
    def uuid() -> str:
        return str(uuid.uuid4())
