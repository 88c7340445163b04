"""The REST operations the double serves, one handler per Swagger operation, doing the checks of
Asterisk's resource code in its order (``res/ari/resource_*.c``) before asking the simulated
Asterisk (``core``). Operations without a handler answer 501: not modelled."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.ari_double import events as ev
from tests.ari_double import recordings
from tests.ari_double.bus import Capture, EventBus, Registry
from tests.ari_double.core import HANGUP_REASONS
from tests.ari_double.dialing import Asterisk
from tests.ari_double.errors import AriError, not_modelled
from tests.ari_double.model import Channel
from tests.ari_double.sorcery import Sorcery
from tests.ari_double.swagger import Operation

JsonObject = dict[str, Any]

_LEADING_INT = re.compile(r"\s*([+-]?\d+)")

# Parameters whose absence or value the resource code answers with its own (recorded or
# source-given) message; the double's generic parameter check leaves them alone.
CHECKED_BY_RESOURCE: Mapping[tuple[str, str], frozenset[str]] = {
    ("channels", "originate"): frozenset({"endpoint"}),
    ("channels", "originateWithId"): frozenset({"endpoint"}),
    ("channels", "externalMedia"): frozenset({"app", "format", "external_host"}),
    ("channels", "hangup"): frozenset({"reason"}),
    ("channels", "mute"): frozenset({"direction"}),
    ("channels", "unmute"): frozenset({"direction"}),
    ("channels", "play"): frozenset({"skipms", "offsetms"}),
    ("channels", "playWithId"): frozenset({"skipms", "offsetms"}),
    ("channels", "getChannelVar"): frozenset({"variable"}),
    ("channels", "setChannelVar"): frozenset({"variable"}),
    ("bridges", "addChannel"): frozenset({"channel"}),
    ("bridges", "removeChannel"): frozenset({"channel"}),
    ("asterisk", "getGlobalVar"): frozenset({"variable"}),
    ("asterisk", "setGlobalVar"): frozenset({"variable"}),
}


@dataclass(slots=True)
class AriRequest:
    operation: Operation
    path_vars: Mapping[str, str]
    params: Mapping[str, str]
    body: Any

    def param(self, name: str, default: str = "") -> str:
        return self.params.get(name, default)

    def int_param(self, name: str, default: int = 0) -> int:
        """``atoi``, as the generated glue converts (the double already refused non-integers)."""
        match = _LEADING_INT.match(self.params.get(name, ""))
        return int(match.group(1)) if match else default

    def list_param(self, name: str) -> list[str]:
        return self.params[name].split(",") if name in self.params else []


@dataclass(slots=True)
class AriResponse:
    status: int
    reason: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    capture: Capture | None = None


def ok(body: Any, capture: Capture | None = None) -> AriResponse:
    return AriResponse(200, "OK", body, capture=capture)


def no_content(capture: Capture | None = None) -> AriResponse:
    return AriResponse(204, "No Content", capture=capture)


Handler = Callable[[AriRequest], Awaitable[AriResponse]]


class RestApi:
    def __init__(self, core: Asterisk, bus: EventBus, registry: Registry, sorcery: Sorcery) -> None:
        self.core = core
        self.bus = bus
        self.registry = registry
        self.sorcery = sorcery
        self.global_vars: dict[str, str] = {}
        self.started = ev.timestamp()
        self._handlers: dict[tuple[str, str], Handler] = {
            ("channels", "list"): self.channels_list,
            ("channels", "get"): self.channels_get,
            ("channels", "originate"): self.channels_originate,
            ("channels", "originateWithId"): self.channels_originate,
            ("channels", "hangup"): self.channels_hangup,
            ("channels", "answer"): self.channels_answer,
            ("channels", "ring"): self.channels_ring,
            ("channels", "ringStop"): self.channels_ring_stop,
            ("channels", "progress"): self.channels_progress,
            ("channels", "sendDTMF"): self.channels_dtmf,
            ("channels", "mute"): self.channels_mute,
            ("channels", "unmute"): self.channels_mute,
            ("channels", "play"): self.channels_play,
            ("channels", "playWithId"): self.channels_play,
            ("channels", "getChannelVar"): self.channels_get_var,
            ("channels", "setChannelVar"): self.channels_set_var,
            ("channels", "externalMedia"): self.channels_external_media,
            ("bridges", "list"): self.bridges_list,
            ("bridges", "get"): self.bridges_get,
            ("bridges", "create"): self.bridges_create,
            ("bridges", "createWithId"): self.bridges_create,
            ("bridges", "destroy"): self.bridges_destroy,
            ("bridges", "addChannel"): self.bridges_add,
            ("bridges", "removeChannel"): self.bridges_remove,
            ("applications", "list"): self.applications_list,
            ("applications", "get"): self.applications_get,
            ("asterisk", "getInfo"): self.asterisk_info,
            ("asterisk", "ping"): self.asterisk_ping,
            ("asterisk", "getGlobalVar"): self.asterisk_get_var,
            ("asterisk", "setGlobalVar"): self.asterisk_set_var,
            ("asterisk", "getObject"): self.config_get,
            ("asterisk", "updateObject"): self.config_put,
            ("asterisk", "deleteObject"): self.config_delete,
            ("endpoints", "list"): self.endpoints_list,
            ("endpoints", "listByTech"): self.endpoints_by_tech,
            ("endpoints", "get"): self.endpoints_get,
            ("deviceStates", "list"): self.empty_list,
            ("playbacks", "get"): self.playback_gone,
            ("playbacks", "stop"): self.playback_gone,
            ("playbacks", "control"): self.playback_gone,
        }

    async def handle(self, request: AriRequest) -> AriResponse:
        operation = request.operation
        handler = self._handlers.get((operation.resource, operation.nickname))
        if handler is None:
            raise not_modelled(f"{operation.method} {operation.path} ({operation.nickname})")
        return await handler(request)

    # -- channels --------------------------------------------------------------------------------
    async def channels_list(self, request: AriRequest) -> AriResponse:
        return ok([ch.snapshot() for ch in self.core.channels.values()])

    async def channels_get(self, request: AriRequest) -> AriResponse:
        return ok(self.core.channel(request.path_vars["channelId"]).snapshot())

    async def channels_originate(self, request: AriRequest) -> AriResponse:
        variables = _channel_variables(request.body)
        channel_id = request.path_vars.get("channelId") or request.param("channelId")
        timeout = request.int_param("timeout", 30) if "timeout" in request.params else 30
        with self.bus.capture() as capture:
            body = self.core.originate(
                endpoint=request.param("endpoint"),
                app=request.param("app"),
                app_args=request.param("appArgs"),
                extension=request.param("extension"),
                caller_id=request.param("callerId"),
                timeout=timeout,
                channel_id=channel_id,
                other_channel_id=request.param("otherChannelId"),
                originator=request.param("originator"),
                formats=request.param("formats"),
                variables=variables,
            )
        return ok(body, capture)

    async def channels_hangup(self, request: AriRequest) -> AriResponse:
        ch = self.core.channel(request.path_vars["channelId"])
        reason, reason_code = request.param("reason"), request.param("reason_code")
        if reason and reason_code:
            raise AriError(400, "Bad Request", "The reason and reason_code can't both be specified")
        if reason_code:
            match = _LEADING_INT.match(reason_code)
            if match is None:
                raise AriError(
                    400, "Invalid Reason Code", "Invalid reason for hangup reason code provided"
                )
            cause = int(match.group(1))
        elif reason:
            if reason not in HANGUP_REASONS:
                raise AriError(400, "Invalid Reason", "Invalid reason for hangup reason provided")
            cause = HANGUP_REASONS[reason]
        else:
            cause = 16
        if ch.phone is not None:
            ch.phone.hangup_reason = reason or reason_code or None
        with self.bus.capture() as capture:
            self.core.app_hangup(ch, cause)
        return no_content(capture)

    def _operable(self, request: AriRequest) -> Channel:
        ch = self.core.control(request.path_vars["channelId"])
        self.core.check_state(ch)
        return ch

    async def channels_answer(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        with self.bus.capture() as capture:
            self.core.answer(ch)
        return no_content(capture)

    async def channels_ring(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        if ch.phone is not None:
            ch.phone.ringing = True
        return no_content()

    async def channels_ring_stop(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        if ch.phone is not None:
            ch.phone.ringing = False
        return no_content()

    async def channels_progress(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        if ch.phone is not None:
            ch.phone.progress = True
        return no_content()

    async def channels_dtmf(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        dtmf = request.param("dtmf")
        if not dtmf:
            raise AriError(400, "Bad Request", "DTMF is required")
        self.core.send_dtmf(ch, dtmf)
        return no_content()

    async def channels_mute(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        direction = request.param("direction", "both")
        if not direction:
            raise AriError(400, "Bad Request", "Direction is required")
        if direction not in ("in", "out", "both"):
            raise AriError(400, "Bad Request", "Invalid direction specified")
        if direction in ("in", "both"):  # what the channel sends into the bridge
            ch.muted = request.operation.nickname == "mute"
        return no_content()

    async def channels_play(self, request: AriRequest) -> AriResponse:
        ch = self._operable(request)
        if request.int_param("skipms", 3000) < 0:
            raise AriError(400, "Bad Request", "skipms cannot be negative")
        if request.int_param("offsetms") < 0:
            raise AriError(400, "Bad Request", "offsetms cannot be negative")
        playback_id = request.path_vars.get("playbackId") or request.param("playbackId")
        with self.bus.capture() as capture:
            playback = self.core.play(
                ch, request.list_param("media"), request.param("lang") or None, playback_id or None
            )
        response = AriResponse(201, "Created", playback, capture=capture)
        response.headers["Location"] = f"/ari/playbacks/{playback['id']}"
        return response

    async def channels_get_var(self, request: AriRequest) -> AriResponse:
        variable = request.param("variable")
        if not variable:
            raise AriError(400, "Bad Request", "Variable name is required")
        ch = self.core.channels.get(request.path_vars["channelId"])
        if ch is None:
            raise AriError(404, "Channel Not Found", "Provided channel was not found")
        if variable not in ch.variables:
            raise AriError(404, "Variable Not Found", "Provided variable was not found")
        return ok({"value": ch.variables[variable]})

    async def channels_set_var(self, request: AriRequest) -> AriResponse:
        variable = request.param("variable")
        if not variable:
            raise AriError(400, "Bad Request", "Variable name is required")
        ch = self.core.control(request.path_vars["channelId"])
        with self.bus.capture() as capture:
            self.core.set_variable(ch, variable, request.param("value"))
        return no_content(capture)

    async def channels_external_media(self, request: AriRequest) -> AriResponse:
        variables = _channel_variables(request.body)
        app = request.param("app")
        ch = await self.core.prepare_external_media(
            app=app,
            external_host=request.param("external_host"),
            media_format=request.param("format"),
            channel_id=request.param("channelId"),
            encapsulation=request.param("encapsulation"),
            transport=request.param("transport"),
            connection_type=request.param("connection_type"),
        )
        ch.variables.update(variables)
        with self.bus.capture() as capture:
            body = self.core.start_external_media(ch, app, request.param("data"))
        return ok(body, capture)

    # -- bridges ---------------------------------------------------------------------------------
    async def bridges_list(self, request: AriRequest) -> AriResponse:
        return ok([bridge.snapshot() for bridge in self.core.bridges.values()])

    async def bridges_get(self, request: AriRequest) -> AriResponse:
        bridge = self.core.bridges.get(request.path_vars["bridgeId"])
        if bridge is None:
            raise AriError(404, "Not Found", "Bridge not found")
        return ok(bridge.snapshot())

    async def bridges_create(self, request: AriRequest) -> AriResponse:
        with_id = "bridgeId" in request.path_vars
        bridge = self.core.create_bridge(
            request.param("type") or None,
            request.param("name") or None,
            request.path_vars.get("bridgeId") or request.param("bridgeId") or None,
            with_id=with_id,
        )
        return ok(bridge.snapshot())

    async def bridges_destroy(self, request: AriRequest) -> AriResponse:
        bridge = self.core.find_bridge(request.path_vars["bridgeId"])
        with self.bus.capture() as capture:
            self.core.destroy_bridge(bridge)
        return no_content(capture)

    async def bridges_add(self, request: AriRequest) -> AriResponse:
        bridge = self.core.find_bridge(request.path_vars["bridgeId"])
        channels = self.core.bridge_control(request.list_param("channel"))
        with self.bus.capture() as capture:
            self.core.add_to_bridge(bridge, channels)
        return no_content(capture)

    async def bridges_remove(self, request: AriRequest) -> AriResponse:
        bridge = self.core.find_bridge(request.path_vars["bridgeId"])
        channels = self.core.bridge_control(request.list_param("channel"))
        with self.bus.capture() as capture:
            self.core.remove_from_bridge(bridge, channels)
        return no_content(capture)

    # -- applications ----------------------------------------------------------------------------
    async def applications_list(self, request: AriRequest) -> AriResponse:
        return ok([app.to_json() for app in self.registry.apps.values()])

    async def applications_get(self, request: AriRequest) -> AriResponse:
        app = self.registry.apps.get(request.path_vars["applicationName"])
        if app is None:
            raise AriError(404, "Not Found", "Application not found")
        return ok(app.to_json())

    # -- asterisk --------------------------------------------------------------------------------
    async def asterisk_info(self, request: AriRequest) -> AriResponse:
        info = recordings.asterisk_info()
        info["status"] = {"startup_time": self.started, "last_reload_time": self.started}
        only = [s.lower() for s in request.list_param("only") if s]
        if only:
            info = {key: value for key, value in info.items() if key in only}
        return ok(info)

    async def asterisk_ping(self, request: AriRequest) -> AriResponse:
        return ok({"ping": "pong", "timestamp": ev.timestamp(), "asterisk_id": ev.ASTERISK_ID})

    async def asterisk_get_var(self, request: AriRequest) -> AriResponse:
        variable = request.param("variable")
        if not variable:
            raise AriError(400, "Bad Request", "Variable name is required")
        return ok({"value": self.global_vars.get(variable, "")})

    async def asterisk_set_var(self, request: AriRequest) -> AriResponse:
        variable = request.param("variable")
        if not variable:
            raise AriError(400, "Bad Request", "Variable name is required")
        self.global_vars[variable] = request.param("value")
        return no_content()

    def _config_key(self, request: AriRequest) -> tuple[str, str, str]:
        path = request.path_vars
        return path["configClass"], path["objectType"], path["id"]

    async def config_get(self, request: AriRequest) -> AriResponse:
        return ok(self.sorcery.get_object(*self._config_key(request)))

    async def config_put(self, request: AriRequest) -> AriResponse:
        return ok(self.sorcery.update_object(*self._config_key(request), request.body))

    async def config_delete(self, request: AriRequest) -> AriResponse:
        self.sorcery.delete_object(*self._config_key(request))
        return no_content()

    # -- endpoints -------------------------------------------------------------------------------
    def _endpoint(self, name: str) -> JsonObject:
        return {
            "technology": "PJSIP",
            "resource": name,
            "state": "online" if self.sorcery.endpoint_online(name) else "offline",
            "channel_ids": [ch.id for ch in self.core.channels.values() if ch.endpoint == name],
        }

    async def endpoints_list(self, request: AriRequest) -> AriResponse:
        return ok([self._endpoint(name) for name in self.sorcery.endpoint_names()])

    async def endpoints_by_tech(self, request: AriRequest) -> AriResponse:
        tech = request.path_vars["tech"]
        if tech.lower() != "pjsip":
            raise AriError(404, "Not Found", f"No Endpoints found - invalid tech {tech}")
        return ok([self._endpoint(name) for name in self.sorcery.endpoint_names()])

    async def endpoints_get(self, request: AriRequest) -> AriResponse:
        tech, resource = request.path_vars["tech"], request.path_vars["resource"]
        if tech != "PJSIP" or not self.sorcery.has_endpoint(resource):
            raise AriError(404, "Not Found", "Endpoint not found")
        return ok(self._endpoint(resource))

    # -- the rest --------------------------------------------------------------------------------
    async def empty_list(self, request: AriRequest) -> AriResponse:
        return ok([])

    async def playback_gone(self, request: AriRequest) -> AriResponse:
        # Every playback of the double has failed and is gone by the time anyone asks.
        raise AriError(404, "Not Found", "Playback not found")


def _channel_variables(body: Any) -> dict[str, str]:
    """``{"variables": {...}}`` of an originate or externalMedia body (``json_to_ast_variables``
    in resource_channels.c: string values only)."""
    variables = body.get("variables") if isinstance(body, dict) else None
    if variables is None:
        return {}
    if not isinstance(variables, dict) or not all(
        isinstance(value, str) for value in variables.values()
    ):
        raise AriError(400, "Bad Request", "Only string values in the 'variables' object allowed")
    return {str(name): value for name, value in variables.items()}
