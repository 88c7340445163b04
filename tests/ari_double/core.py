"""The simulated Asterisk behind the REST API: channels entering and leaving Stasis, answering,
hangups, bridges, originate with scripted outcomes, externalMedia, the recorded Local channel,
DTMF and audio between bridge members. Every sequence of events is the recorded one:

- Stasis: ``STASISSTATUS=""`` then ``StasisStart``; ``StasisEnd`` then ``STASISSTATUS=SUCCESS``.
  An app subscribed only because the channel entered Stasis (an inbound call) stops seeing the
  channel at ``StasisEnd``, so it never gets its ``ChannelDestroyed``; channels the app created
  (originate, externalMedia) stay subscribed and do.
- Hangup: the five RTPAUDIOQOS* variables of an answered PJSIP channel (alternating with the
  ``...BRIDGED`` copies on a two-party bridge's other channel), ``ChannelHangupRequest`` (no cause
  for a BYE, ``{"cause": 32, "soft": true}`` for the app's DELETE), leaving the bridge, Stasis,
  and ``ChannelDestroyed``.
- Bridge: ``ChannelEnteredBridge``, then ``BRIDGEPEER`` on each member, ``BRIDGEPVTCALLID`` (the
  peer's Call-ID) on the member whose peer has one, connected line updates (joiner first);
  leaving clears the leaver's variables, then ``ChannelLeftBridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tests.ari_double import events as ev
from tests.ari_double import recordings
from tests.ari_double.bus import EventBus, Registry
from tests.ari_double.errors import (
    AriError,
    allocation_failed,
    channel_not_found,
    internal_error,
    not_modelled,
)
from tests.ari_double.model import OUTGOING_LINE, Bridge, Channel, Ids
from tests.ari_double.phone import Phone
from tests.ari_double.rtp import FORMATS, UNMODELLED_FORMATS, ExternalMedia
from tests.ari_double.sorcery import Sorcery

JsonObject = dict[str, Any]
Outcome = Literal["answer", "busy", "noanswer", "unreachable"]

MAX_PUBLIC_UNIQUEID = 149  # AST_MAX_PUBLIC_UNIQUEID
SIP_TIMER_B_S = 32.0
# Channel technologies Asterisk 22 ships that the double does not model (501, not 500).
UNMODELLED_TECHS = frozenset(
    t.lower()
    for t in (
        "UnicastRTP",
        "MulticastRTP",
        "AudioSocket",
        "WebSocket",
        "IAX2",
        "DAHDI",
        "Console",
        "Announcer",
        "Recorder",
        "Bridge",
        "Snoop",
    )
)
HANGUP_REASONS = {
    "normal": 16,
    "busy": 17,
    "congestion": 34,
    "no_answer": 19,
    "timeout": 18,
    "rejected": 21,
    "unallocated": 1,
    "normal_unspecified": 31,
    "number_incomplete": 28,
    "codec_mismatch": 58,
    "interworking": 127,
    "failure": 38,
    "answered_elsewhere": 26,
}
_BRIDGE_TYPES = frozenset(
    {"mixing", "holding", "dtmf_events", "proxy_media", "video_sfu", "video_single", "sdp_label"}
)
_SHRINK = re.compile(r"[()\-. ]")
_PHONE_NUMBER = re.compile(r"[0-9+#*()\-. ]+\Z")


@dataclass(frozen=True, slots=True)
class DialPlan:
    """How an originate to a number goes (what the SIPp UAS of the recordings did)."""

    outcome: Outcome
    ring_s: float = 0.05
    echo: bool = False


def parse_caller_id(value: str) -> tuple[str, str]:
    """``ast_callerid_parse`` and ``ast_shrink_phone_number``: (name, number)."""
    value = value.strip()
    if "<" in value and value.endswith(">"):
        name, _, number = value[:-1].partition("<")
        name, number = name.strip().strip('"'), number.strip()
    elif _PHONE_NUMBER.match(value):
        name, number = "", value
    else:
        name, number = value.strip('"'), ""
    if _PHONE_NUMBER.match(number):
        number = _SHRINK.sub("", number)
    return name, number


class Asterisk:
    def __init__(
        self,
        bus: EventBus,
        registry: Registry,
        sorcery: Sorcery,
        *,
        em_events_before_response: int = 2,
        local_dialplan_delay_s: float = 0.5,
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.sorcery = sorcery
        self.ids = Ids()
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.phones: dict[str, Phone] = {}
        self.dial_plans: dict[str, DialPlan] = {}
        self.media: dict[str, ExternalMedia] = {}
        """Every externalMedia socket by channel id, kept after the channel is gone."""
        self.em_events_before_response = em_events_before_response
        self.local_dialplan_delay_s = local_dialplan_delay_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self.channels.values():
            if channel.em is not None:
                channel.em.close()
            if channel.phone is not None:
                channel.phone.end(None)

    # -- small helpers ---------------------------------------------------------------------------
    def _emit(self, event_type: str, apps: set[str], **fields: Any) -> None:
        if apps:
            self.bus.emit(ev.make(event_type, apps, **fields))

    def _channel_event(self, ch: Channel, event_type: str, **fields: Any) -> None:
        self._emit(event_type, ch.apps, **fields, channel=ch.snapshot())

    def _set_var(self, ch: Channel, name: str, value: str) -> None:
        ch.variables[name] = value
        self._channel_event(ch, "ChannelVarset", variable=name, value=value)

    def _set_state(self, ch: Channel, state: str) -> None:
        ch.state = state
        self._channel_event(ch, "ChannelStateChange")

    def _dial_event(self, ch: Channel, status: str) -> None:
        self._emit(
            "Dial",
            ch.apps,
            dialstatus=status,
            forward="",
            dialstring=ch.dialstring,
            peer=ch.snapshot(),
        )

    def _hangup_request(self, ch: Channel, **fields: Any) -> None:
        self._channel_event(ch, "ChannelHangupRequest", **fields)

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        def run() -> None:
            self._timers.discard(handle)
            if not self._closed:
                callback()

        handle = asyncio.get_running_loop().call_later(delay, run)
        self._timers.add(handle)

    def _spawn(self, key: str, coroutine: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coroutine
            finally:
                if self._tasks.get(key) is task:
                    del self._tasks[key]

        task = asyncio.get_running_loop().create_task(run())
        self._tasks[key] = task

    def _cancel_task(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _new_id(self, requested: str | None) -> str:
        return requested if requested else self.ids.channel_id()

    # -- lookups as the resource code does them --------------------------------------------------
    def channel(self, channel_id: str) -> Channel:
        """``ast_channel_get_by_name``: any live channel."""
        ch = self.channels.get(channel_id)
        if ch is None:
            raise channel_not_found()
        return ch

    def control(self, channel_id: str) -> Channel:
        """``find_control`` in resource_channels.c: a channel in Stasis."""
        ch = self.channel(channel_id)
        if ch.stasis_app is None:
            raise AriError(409, "Conflict", "Channel not in Stasis application")
        return ch

    @staticmethod
    def check_state(ch: Channel) -> None:
        """``channel_state_invalid``: Down, Rsrvd and Ringing channels cannot be operated."""
        if ch.state in ("Down", "Rsrvd", "Ringing"):
            raise AriError(412, "Precondition Failed", "Channel in invalid state")

    def bridge_control(self, channel_ids: Sequence[str]) -> list[Channel]:
        """``control_list_create`` in resource_bridges.c."""
        found = []
        for channel_id in channel_ids:
            if not channel_id:
                continue
            ch = self.channels.get(channel_id)
            if ch is None:
                raise AriError(400, "Bad Request", "Channel not found")
            if ch.stasis_app is None:
                raise AriError(422, "Unprocessable Entity", "Channel not in Stasis application")
            found.append(ch)
        if not found:
            raise AriError(400, "Bad Request", "Missing parameter channel")
        return found

    def find_bridge(self, bridge_id: str) -> Bridge:
        bridge = self.bridges.get(bridge_id)
        if bridge is None:
            raise AriError(404, "Not found", "Bridge not found")
        return bridge

    # -- Stasis ----------------------------------------------------------------------------------
    def _enter_stasis(self, ch: Channel, app: str, args: Sequence[str]) -> bool:
        if not self.registry.is_active(app):
            return False
        ch.app_name, ch.app_data = "Stasis", ",".join([app, *args])
        self._set_var(ch, "STASISSTATUS", "")
        ch.stasis_app = app
        self.registry.subscribe_channel(app, ch.id)
        self._channel_event(ch, "StasisStart", args=list(args))
        return True

    def _leave_stasis(self, ch: Channel) -> None:
        app = ch.stasis_app
        if app is None:
            return
        self._channel_event(ch, "StasisEnd")
        ch.stasis_app = None
        if app not in ch.explicit_apps:
            self.registry.unsubscribe_channel(app, ch.id)
        self._set_var(ch, "STASISSTATUS", "SUCCESS")

    def _subscribe(self, ch: Channel, app: str | None) -> None:
        """``stasis_app_subscribe_channel``: only a registered app can be subscribed."""
        if app and self.registry.subscribe_channel(app, ch.id):
            ch.explicit_apps.add(app)

    def _destroy(self, ch: Channel, cause: int, tech_cause: int | None = None) -> None:
        if ch.id not in self.channels:
            return
        if ch.created_by_ari:
            ch.app_name, ch.app_data = OUTGOING_LINE
        elif ch.kind == "local-2":
            ch.app_name, ch.app_data = "", ""
        fields: dict[str, Any] = {"cause": cause, "cause_txt": ev.cause_text(cause)}
        if tech_cause is not None:
            fields["tech_cause"] = tech_cause
        if ch.bridge is not None:  # not reached by the recorded paths: kept consistent anyway
            self._leave_bridge(ch, response_point=False)
        self._channel_event(ch, "ChannelDestroyed", **fields)
        for app in ch.apps:
            self.registry.unsubscribe_channel(app, ch.id)
        ch.explicit_apps.clear()
        ch.stasis_app = None
        del self.channels[ch.id]
        self._cancel_task(ch.id)
        if ch.em is not None:
            ch.em.close()
        if ch.phone is not None:
            ch.phone.end(None if ch.far_end_hung_up else cause)

    def _rtp_quality(self, ch: Channel) -> None:
        if ch.kind not in ("sip-in", "sip-out") or ch.state != "Up":
            return
        peer = self._bridge_peer(ch)
        for name, value in recordings.rtp_quality_values():
            self._set_var(ch, name, value)
            if peer is not None:
                self._set_var(peer, f"{name}BRIDGED", value)

    def _teardown(self, ch: Channel, cause: int) -> None:
        """After the hangup request: leave the bridge and Stasis, then be destroyed."""
        if ch.bridge is not None:
            self._leave_bridge(ch, response_point=True)
        else:
            self.bus.response_point()
        self._leave_stasis(ch)
        partner = ch.partner
        if ch.kind == "local-1" and partner is not None and partner.id in self.channels:
            self._hangup_request(partner, cause=16)
            self._destroy(ch, cause)
            self._hangup_request(partner, cause=16, soft=True)
            if partner.bridge is not None:
                self._leave_bridge(partner, response_point=False)
            self._destroy(partner, 16)
            return
        self._destroy(ch, cause)

    # -- inbound calls ---------------------------------------------------------------------------
    async def call_in(
        self,
        *,
        exten: str,
        caller: str,
        caller_name: str,
        app: str,
        args: Sequence[str],
        context: str,
        endpoint: str | None,
    ) -> Phone:
        endpoint = endpoint or self.sorcery.inbound_endpoint
        ch = Channel(
            id=self.ids.channel_id(),
            name=self.ids.pjsip_name(endpoint),
            kind="sip-in",
            state="Ring",
            protocol_id=self.ids.sipp_call_id(),
            caller=(caller_name, caller),
            context=context,
            exten=exten,
            priority=2,
            app_name="Stasis",
            app_data=",".join([app, *args]),
            endpoint=endpoint,
        )
        phone = Phone(self, ch.id)
        ch.phone = phone
        self.phones[ch.id] = phone
        if not self.registry.is_active(app):
            # Stasis(): "Stasis app '...' not registered/active", the dialplan hangs up.
            phone.stasis_failed = True
            phone.end(16)
            return phone
        self.channels[ch.id] = ch
        self._enter_stasis(ch, app, args)
        await self.bus.drain()
        return phone

    # -- what the phones do ----------------------------------------------------------------------
    def phone_audio(self, channel_id: str, pcm: bytes) -> None:
        ch = self.channels.get(channel_id)
        if ch is not None and self._media_flows(ch):
            self.deliver_audio(ch, pcm)

    def phone_dtmf(self, channel_id: str, digit: str, duration_ms: int) -> None:
        ch = self.channels.get(channel_id)
        if ch is None or not self._media_flows(ch):
            raise RuntimeError(f"channel {channel_id} has no media: no RTP to carry a digit")

        def digit_end() -> None:
            if ch.id in self.channels:
                self._channel_event(ch, "ChannelDtmfReceived", digit=digit, duration_ms=duration_ms)

        self._later(duration_ms / 1000, digit_end)

    async def phone_hangup(self, channel_id: str) -> None:
        ch = self.channels.get(channel_id)
        if ch is None:
            return
        if ch.kind == "sip-out" and ch.state != "Up":
            raise RuntimeError("the callee has not answered: script refusals with on_dial()")
        ch.far_end_hung_up = True
        self._rtp_quality(ch)
        self._hangup_request(ch)
        self._teardown(ch, 16)
        await self.bus.drain()

    def _media_flows(self, ch: Channel) -> bool:
        return ch.state == "Up" or (ch.phone is not None and ch.phone.progress)

    def deliver_audio(self, source: Channel, pcm: bytes) -> None:
        """A frame from ``source`` to every other member of its bridge."""
        bridge = source.bridge
        if bridge is None or source.muted:
            return
        for member in list(bridge.members):
            if member is source:
                continue
            if member.em is not None:
                member.em.send(pcm)
            elif member.phone is not None and self._media_flows(member):
                member.phone.hear(pcm)

    # -- channel operations ----------------------------------------------------------------------
    def answer(self, ch: Channel) -> None:
        if ch.state != "Up":
            self._set_state(ch, "Up")
        if ch.phone is not None:
            ch.phone.answered = True
            ch.phone.ringing = False

    def app_hangup(self, ch: Channel, cause: int) -> None:
        if ch.kind == "sip-out" and ch.state != "Up":  # still dialing: CANCEL
            self._cancel_task(ch.id)
            self._hangup_request(ch, cause=32, soft=True)
            self.bus.response_point()
            self._dial_event(ch, "CANCEL")
            self._destroy(ch, cause)
            return
        if ch.kind == "local-2":
            partner = ch.partner
            self._hangup_request(ch, cause=32, soft=True)
            self.bus.response_point()
            if partner is not None and partner.id in self.channels:
                self._hangup_request(partner, cause=16)
                if partner.bridge is not None:
                    self._leave_bridge(partner, response_point=False)
                self._leave_stasis(partner)
            self._destroy(ch, cause)
            if partner is not None:
                self._destroy(partner, 16)
            return
        self._rtp_quality(ch)
        self._hangup_request(ch, cause=32, soft=True)
        self._teardown(ch, cause)

    def send_dtmf(self, ch: Channel, dtmf: str) -> None:
        if ch.phone is not None:
            ch.phone.dtmf_sent.extend(dtmf)

    def play(
        self, ch: Channel, media: Sequence[str], lang: str | None, playback_id: str | None
    ) -> JsonObject:
        """Every playback fails at once: the double has no sound files (as recorded for a
        missing one: ``PlaybackStarted`` then ``PlaybackFinished`` with ``state: failed``)."""
        playback = {
            "id": playback_id or self.ids.uuid(),
            "media_uri": media[0],
            "target_uri": f"channel:{ch.id}",
            "language": lang or ch.language,
            "state": "playing",
        }
        self._emit("PlaybackStarted", ch.apps, playback=dict(playback))
        playback["state"] = "failed"
        self._emit("PlaybackFinished", ch.apps, playback=dict(playback))
        return playback

    def set_variable(self, ch: Channel, name: str, value: str) -> None:
        self._set_var(ch, name, value)

    # -- bridges ---------------------------------------------------------------------------------
    def create_bridge(
        self, bridge_type: str | None, name: str | None, bridge_id: str | None, *, with_id: bool
    ) -> Bridge:
        if bridge_id and bridge_id in self.bridges:
            raise AriError(409, "Conflict", f"Bridge with id '{bridge_id}' already exists")
        tokens = [t.strip() for t in (bridge_type or "mixing").split(",")]
        mixing, holding = "mixing" in tokens, "holding" in tokens
        # Asterisk ignores unknown words ("mixing,foo" works); the double refuses them.
        if any(t not in _BRIDGE_TYPES for t in tokens) or mixing == holding:
            message = "Unable to create bridge"
            if not with_id:
                message += f". Possible duplicate bridge id '{bridge_id or '(null)'}'"
            raise AriError(500, "Internal Error", message)
        video_mode = "talker"
        if "video_sfu" in tokens:
            video_mode = "sfu"
        elif "video_single" in tokens:
            video_mode = "single"
        bridge = Bridge(
            id=bridge_id or self.ids.uuid(),
            name=name or "",
            bridge_type="mixing" if mixing else "holding",
            video_mode=video_mode,
        )
        self.bridges[bridge.id] = bridge
        return bridge

    def _bridge_peer(self, ch: Channel) -> Channel | None:
        bridge = ch.bridge
        if bridge is None or len(bridge.members) != 2:
            return None
        return next(m for m in bridge.members if m is not ch)

    def add_to_bridge(self, bridge: Bridge, channels: Sequence[Channel]) -> None:
        for ch in channels:
            if ch.bridge is bridge:
                continue
            if ch.bridge is not None:  # Asterisk moves it
                self._leave_bridge(ch, response_point=False)
            bridge.members.append(ch)
            ch.bridge = bridge
            for app in ch.apps:
                bridge.apps.add(app)
                self.registry.subscribe_bridge(app, bridge.id)
            self._emit(
                "ChannelEnteredBridge",
                ch.apps | bridge.apps,
                bridge=bridge.snapshot(),
                channel=ch.snapshot(),
            )
            self._update_peers(bridge, joiner=ch)

    def _update_peers(self, bridge: Bridge, joiner: Channel | None) -> None:
        members = bridge.members
        if len(members) < 2:
            return
        for member in members:
            peers = ",".join(other.name for other in members if other is not member)
            if member.variables.get("BRIDGEPEER", "") != peers:
                self._set_var(member, "BRIDGEPEER", peers)
        if len(members) != 2:
            return
        first, second = members
        for channel, peer in ((first, second), (second, first)):
            if peer.protocol_id and channel.variables.get("BRIDGEPVTCALLID") != peer.protocol_id:
                self._set_var(channel, "BRIDGEPVTCALLID", peer.protocol_id)
        if joiner is not None:
            other = first if joiner is second else second
            self._set_connected(joiner, other.caller)
            self._set_connected(other, joiner.caller)

    def _set_connected(self, ch: Channel, party: tuple[str, str]) -> None:
        if ch.connected != party:
            ch.connected = party
            self._channel_event(ch, "ChannelConnectedLine")

    def _leave_bridge(self, ch: Channel, *, response_point: bool) -> None:
        bridge = ch.bridge
        assert bridge is not None
        for name in ("BRIDGEPEER", "BRIDGEPVTCALLID"):
            if ch.variables.get(name):
                self._set_var(ch, name, "")
        if response_point:
            self.bus.response_point()
        bridge.members.remove(ch)
        ch.bridge = None
        self._emit(
            "ChannelLeftBridge",
            ch.apps | bridge.apps,
            bridge=bridge.snapshot(),
            channel=ch.snapshot(),
        )
        self._update_peers(bridge, joiner=None)

    def remove_from_bridge(self, bridge: Bridge, channels: Sequence[Channel]) -> None:
        if any(ch.bridge is not bridge for ch in channels):
            raise AriError(422, "Unprocessable Entity", "Channel not in this bridge")
        for ch in channels:
            self._leave_bridge(ch, response_point=False)

    def destroy_bridge(self, bridge: Bridge) -> None:
        for ch in list(bridge.members):
            self._leave_bridge(ch, response_point=False)
        self._emit("BridgeDestroyed", set(bridge.apps), bridge=bridge.snapshot())
        for app in bridge.apps:
            self.registry.unsubscribe_bridge(app, bridge.id)
        del self.bridges[bridge.id]

    # -- originate -------------------------------------------------------------------------------
    def originate(
        self,
        *,
        endpoint: str,
        app: str,
        app_args: str,
        extension: str,
        caller_id: str,
        timeout: int,
        channel_id: str,
        other_channel_id: str,
        originator: str,
        formats: str,
        variables: Mapping[str, str],
    ) -> JsonObject:
        """``ari_channels_handle_originate_with_id`` in resource_channels.c, check by check;
        returns the new channel as it was when the response went out (before it dialed)."""
        for requested in (channel_id, other_channel_id):
            if len(requested) > MAX_PUBLIC_UNIQUEID:
                raise AriError(
                    400,
                    "Bad Request",
                    f"Uniqueid length exceeds maximum of {MAX_PUBLIC_UNIQUEID}",
                )
        if not endpoint:
            raise AriError(400, "Bad Request", "Endpoint must be specified")
        if originator and formats:
            raise AriError(400, "Bad Request", "Originator and formats can't both be specified")
        tech, _, resource = endpoint.partition("/")
        if not tech or not resource:
            raise AriError(400, "Bad Request", "Invalid endpoint specified")
        if not app:
            if extension:
                raise not_modelled("originate into the dialplan (extension/context)")
            raise AriError(400, "Bad Request", "Application or extension must be specified")
        if originator and originator not in self.channels:
            raise AriError(400, "Bad Request", "Provided originator channel was not found")
        for name in (f.strip() for f in formats.split(",") if formats):
            if name not in FORMATS and name not in UNMODELLED_FORMATS:
                raise AriError(400, "Bad Request", f"Provided format ({name}) was not found")
        for requested in (channel_id, other_channel_id):
            if requested and requested in self.channels:
                raise AriError(409, "Conflict", "Channel with given unique ID already exists")
        args = app_args.split(",") if app_args else []
        seconds: float | None = 30.0
        if timeout > 0:
            seconds = float(timeout)
        elif timeout == -1:
            seconds = None
        if tech.lower() == "pjsip":
            return self._originate_pjsip(
                resource, app, args, caller_id, seconds, channel_id, variables
            )
        if tech.lower() == "local":
            return self._originate_local(resource, app, args, channel_id, other_channel_id)
        if tech.lower() in UNMODELLED_TECHS:
            raise not_modelled(f"originate to {tech} channels")
        raise allocation_failed()

    def _originate_pjsip(
        self,
        resource: str,
        app: str,
        args: list[str],
        caller_id: str,
        timeout_s: float | None,
        channel_id: str,
        variables: Mapping[str, str],
    ) -> JsonObject:
        location = None
        user = ""
        if "/" in resource:
            endpoint, _, location = resource.partition("/")
        elif "@" in resource:
            user, _, endpoint = resource.rpartition("@")
        else:
            endpoint = resource
        if not self.sorcery.has_endpoint(endpoint):
            raise allocation_failed()
        if location is None and not self.sorcery.endpoint_online(endpoint):
            raise allocation_failed()  # no AOR contact to send the INVITE to
        plan = (
            self.dial_plans.get(user)
            or self.dial_plans.get(endpoint)
            or self.dial_plans.get(resource)
            or DialPlan("answer")
        )
        party = parse_caller_id(caller_id) if caller_id else ("", "")
        ch = Channel(
            id=self._new_id(channel_id),
            name=self.ids.pjsip_name(endpoint),
            kind="sip-out",
            state="Down",
            protocol_id=self.ids.uuid(),
            caller=party,
            connected=party,
            context=self.sorcery.endpoint_context(endpoint),
            exten="s",
            priority=1,
            app_name=OUTGOING_LINE[0],
            app_data=OUTGOING_LINE[1],
            endpoint=endpoint,
            dialstring=resource,
            variables=dict(variables),
        )
        ch.phone = Phone(self, ch.id, echo=plan.echo)
        self.phones[ch.id] = ch.phone
        self.channels[ch.id] = ch
        self._subscribe(ch, app)
        response = ch.snapshot()
        self.bus.response_point()
        if plan.outcome == "noanswer":  # recorded order: the 180 overtook the Dial event
            self._set_state(ch, "Ringing")
            self._dial_event(ch, "")
            self._dial_event(ch, "RINGING")
            ch.phone.ringing = True
        elif plan.outcome == "answer":
            self._dial_event(ch, "")
            self._set_state(ch, "Ringing")
            self._dial_event(ch, "RINGING")
            ch.phone.ringing = True
        else:
            self._dial_event(ch, "")
        self._spawn(ch.id, self._dial_progress(ch, plan, timeout_s, app, args))
        return response

    async def _dial_progress(
        self, ch: Channel, plan: DialPlan, timeout_s: float | None, app: str, args: list[str]
    ) -> None:
        if plan.outcome in ("answer", "busy") and (timeout_s is None or plan.ring_s < timeout_s):
            await asyncio.sleep(plan.ring_s)
            if ch.id not in self.channels:
                return
            if plan.outcome == "answer":
                self._set_state(ch, "Up")
                assert ch.phone is not None
                ch.phone.answered = True
                ch.phone.ringing = False
                self._dial_event(ch, "ANSWER")
                if not self._enter_stasis(ch, app, args):
                    self._destroy(ch, 16)  # Stasis() failed, the channel is hung up
            else:
                self._hangup_request(ch, cause=17, tech_cause=486)
                self._dial_event(ch, "BUSY")
                self._destroy(ch, 17, tech_cause=486)
            return
        if timeout_s is None:
            if plan.outcome != "unreachable":
                return  # rings until the app hangs up
            timeout_s = SIP_TIMER_B_S
        await asyncio.sleep(timeout_s)
        self._destroy(ch, 19, tech_cause=480)

    def _originate_local(
        self, resource: str, app: str, args: list[str], channel_id: str, other_channel_id: str
    ) -> JsonObject:
        exten, _, context = resource.partition("@")
        if (exten, context) != ("echo", "tone-test"):
            raise not_modelled(
                f"Local channels other than the recorded Local/echo@tone-test ({resource})"
            )
        name1, name2 = self.ids.local_names(resource)
        one = Channel(
            id=self._new_id(channel_id),
            name=name1,
            kind="local-1",
            state="Down",
            context=context,
            exten=exten,
            app_name=OUTGOING_LINE[0],
            app_data=OUTGOING_LINE[1],
            dialstring=resource,
        )
        two = Channel(
            id=self._new_id(other_channel_id),
            name=name2,
            kind="local-2",
            state="Ring",
            context=context,
            exten=exten,
            app_name="Answer",
        )
        one.partner, two.partner = two, one
        for ch in (one, two):
            self.channels[ch.id] = ch
            self._subscribe(ch, app)
        response = one.snapshot()
        self.bus.response_point()
        self._dial_event(one, "")
        self._channel_event(two, "ChannelDialplan", dialplan_app="Answer", dialplan_app_data="")
        self._set_state(two, "Up")
        self._set_state(one, "Up")
        self._dial_event(one, "ANSWER")
        if not self._enter_stasis(one, app, args):
            self._destroy(one, 16)
            self._destroy(two, 16)
            return response

        def echo() -> None:
            if two.id in self.channels:
                two.priority, two.app_name = 2, "Echo"
                self._channel_event(
                    two, "ChannelDialplan", dialplan_app="Echo", dialplan_app_data=""
                )

        self._later(self.local_dialplan_delay_s, echo)
        return response

    # -- externalMedia ---------------------------------------------------------------------------
    async def prepare_external_media(
        self,
        *,
        app: str,
        external_host: str,
        media_format: str,
        channel_id: str,
        encapsulation: str,
        transport: str,
        connection_type: str,
    ) -> Channel:
        """The checks of ``ast_ari_channels_external_media`` (their order as in its source; the
        recordings have one missing parameter at a time) and the UDP socket: a channel not yet
        known to anyone. ``start_external_media`` makes it live."""
        websocket = transport.lower() == "websocket"
        if not app:
            raise AriError(400, "Bad Request", "app cannot be empty")
        if not external_host and not (websocket and connection_type == "server"):
            raise AriError(
                400,
                "Bad Request",
                "external_host is required for all but websocket server connections",
            )
        host, port = _split_host_port(external_host)
        if not websocket and port is None:
            raise AriError(
                400,
                "Bad Request",
                "external_host must be <host>:<port> for all transports other than websocket",
            )
        if not media_format:
            raise AriError(400, "Bad Request", "format cannot be empty")
        encapsulation = (encapsulation or "rtp").lower()
        transport = (transport or "udp").lower()
        if (encapsulation, transport) != ("rtp", "udp"):
            if (encapsulation, transport) in (("audiosocket", "tcp"), ("none", "websocket")):
                raise not_modelled(f"externalMedia over {encapsulation}/{transport}")
            raise AriError(
                501, "Not Implemented", "The encapsulation and/or transport is not supported"
            )
        if media_format not in FORMATS:
            if media_format in UNMODELLED_FORMATS:
                raise not_modelled(f"externalMedia format {media_format}")
            raise internal_error()
        if channel_id and channel_id in self.channels:
            raise internal_error()
        address = _resolve(host, port)
        ch = Channel(
            id=self._new_id(channel_id),
            name=self.ids.unicast_rtp_name(external_host),
            kind="em",
            state="Down",
            app_name=OUTGOING_LINE[0],
            app_data=OUTGOING_LINE[1],
            dialstring=f"{external_host}/c({media_format})",
        )

        def heard_from_network(pcm: bytes) -> None:
            self.deliver_audio(ch, pcm)

        ch.em = ExternalMedia(media_format, address, heard_from_network)
        local_port = await ch.em.open()
        self.media[ch.id] = ch.em
        ch.variables["UNICASTRTP_LOCAL_PORT"] = str(local_port)
        ch.variables["UNICASTRTP_LOCAL_ADDRESS"] = "127.0.0.1"
        return ch

    def start_external_media(self, ch: Channel, app: str, data: str) -> JsonObject:
        """The channel dials (answers at once) and enters Stasis: ``Dial ""``,
        ``ChannelStateChange Up``, ``Dial ANSWER``, ``STASISSTATUS=""``, ``StasisStart []``; the
        response goes out after ``em_events_before_response`` of them (recorded: 0, 2 and 5)."""
        if ch.id in self.channels:  # taken while the socket was being opened
            assert ch.em is not None
            ch.em.close()
            raise internal_error()
        self.channels[ch.id] = ch
        self._subscribe(ch, app)
        response = ch.snapshot()
        response["channelvars"] = {
            "UNICASTRTP_LOCAL_PORT": ch.variables["UNICASTRTP_LOCAL_PORT"],
            "UNICASTRTP_LOCAL_ADDRESS": ch.variables["UNICASTRTP_LOCAL_ADDRESS"],
        }
        self._dial_event(ch, "")
        self._set_state(ch, "Up")
        self._dial_event(ch, "ANSWER")
        if not self._enter_stasis(ch, app, data.split(",") if data else []):
            self._destroy(ch, 16)
        self.bus.response_after(self.em_events_before_response)
        return response


def _split_host_port(value: str) -> tuple[str, int | None]:
    """``ast_sockaddr_split_hostport`` with PARSE_PORT_REQUIRE: the port is required."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise internal_error()
    return host, int(port_text)


def _resolve(host: str, port: int | None) -> tuple[str, int]:
    assert port is not None
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        raise internal_error() from None
    address = infos[0][4]
    return str(address[0]), int(address[1])
