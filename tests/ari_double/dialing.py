"""Making channels in the simulated Asterisk: originate (PJSIP with the outcome scripted per
number by ``on_dial``, the recorded ``Local/echo@tone-test``) and externalMedia (a UnicastRTP
channel with its UDP socket), each checked as ``res/ari/resource_channels.c`` checks it and
followed by the recorded events: ``Dial ""``, ringing, ``Dial ANSWER`` and Stasis when
answered; ``ChannelHangupRequest 17/486``, ``Dial BUSY``, ``ChannelDestroyed`` when busy;
``ChannelDestroyed 19/480`` at the originate's timeout when nobody answers or nothing answers."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tests.ari_double.bus import EventBus, Registry
from tests.ari_double.core import Core
from tests.ari_double.errors import AriError, allocation_failed, internal_error, not_modelled
from tests.ari_double.model import OUTGOING_LINE, Channel
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


class Asterisk(Core):
    """The core plus the ways channels are made."""

    def __init__(
        self,
        bus: EventBus,
        registry: Registry,
        sorcery: Sorcery,
        *,
        em_events_before_response: int = 2,
        local_dialplan_delay_s: float = 0.5,
    ) -> None:
        super().__init__(bus, registry, sorcery)
        self.dial_plans: dict[str, DialPlan] = {}
        self.em_events_before_response = em_events_before_response
        self.local_dialplan_delay_s = local_dialplan_delay_s

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
