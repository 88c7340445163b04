"""The core of the simulated Asterisk: channels entering and leaving Stasis, answering, hangups,
bridges, DTMF and audio between bridge members (making channels, by originate or externalMedia,
is ``dialing.py``). Every sequence of events is the recorded one:

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tests.ari_double import events as ev
from tests.ari_double import recordings
from tests.ari_double.bus import EventBus, Registry
from tests.ari_double.errors import AriError, channel_not_found
from tests.ari_double.model import OUTGOING_LINE, Bridge, Channel, Ids
from tests.ari_double.phone import Phone
from tests.ari_double.rtp import ExternalMedia
from tests.ari_double.sorcery import Sorcery

JsonObject = dict[str, Any]

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


class Core:
    def __init__(self, bus: EventBus, registry: Registry, sorcery: Sorcery) -> None:
        self.bus = bus
        self.registry = registry
        self.sorcery = sorcery
        self.ids = Ids()
        self.channels: dict[str, Channel] = {}
        self.bridges: dict[str, Bridge] = {}
        self.phones: dict[str, Phone] = {}
        self.media: dict[str, ExternalMedia] = {}
        """Every externalMedia socket by channel id, kept after the channel is gone."""
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
                member.phone.hear(pcm, source.id)

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
