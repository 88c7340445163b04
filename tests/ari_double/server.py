"""The ARI test double: one aiohttp server on 127.0.0.1, like Asterisk's http.conf server,
serving the REST API under ``/ari``, the api-docs and the events websocket ``/ari/events``; and
the handles tests drive it with (a SIP caller dialing in, how originated calls go, websocket
drops). Requests go through Asterisk's order of checks (``res_ari.c``): authentication, a
trailing slash, api-docs, routing (404/405), then the double's parameter checks and the
operation's handler."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from tests.ari_double import events as ev
from tests.ari_double import recordings
from tests.ari_double.bus import EventBus, EventSocket, Registry, dumps
from tests.ari_double.dialing import Asterisk, DialPlan
from tests.ari_double.errors import AriError, internal_error
from tests.ari_double.model import Bridge, Channel
from tests.ari_double.phone import Phone
from tests.ari_double.rest import CHECKED_BY_RESOURCE, AriRequest, AriResponse, RestApi
from tests.ari_double.rtp import MediaStats, RtpRecord
from tests.ari_double.sorcery import Sorcery
from tests.ari_double.swagger import api, check_params

JsonObject = dict[str, Any]
SERVER_HEADERS = {"Server": "Asterisk/22.10.1", "Cache-Control": "no-cache, no-store"}
AUTH_REALM = "Asterisk REST Interface"


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request the double received and what it answered."""

    method: str
    path: str
    """The full path, ``/ari/...``."""
    query: dict[str, str]
    body: Any
    """The parsed JSON body, or None."""
    status: int
    response: Any
    """The JSON answered, or None (204)."""


class AriDouble:
    def __init__(
        self,
        *,
        username: str = "worker",
        password: str = "worker",
        host: str = "127.0.0.1",
        port: int = 0,
        sorcery_memory: bool = True,
        endpoints: Iterable[str] = ("trunk", "sippuas"),
        em_events_before_response: int = 2,
        local_dialplan_delay_s: float = 0.5,
    ) -> None:
        """``sorcery_memory``: sorcery.conf maps PJSIP objects to the memory wizard (recording
        ``dynamic_config`` phase 2); without it ARI dynamic config cannot create objects.
        ``endpoints``: pjsip.conf endpoints, the first being the inbound trunk (no AOR) and the
        others dialable through an AOR with a contact. ``em_events_before_response``: how many
        of externalMedia's five events go out before its HTTP response (recorded: 0, 2, 5)."""
        self.username = username
        self.password = password
        self.host = host
        self.port = port
        self.requests: list[RestCall] = []
        self.events: list[tuple[str, JsonObject]] = []
        """Every event written to a websocket, with the socket's label (``ws1``, ``ws2`` ...)."""
        self.lost_events: list[tuple[str, JsonObject]] = []
        """Events for an app that had no websocket connected (app name, event)."""
        self.ws_labels: list[str] = []
        self.registry = Registry()
        self.bus = EventBus(self.registry, self.events, self.lost_events)
        self.sorcery = Sorcery(memory=sorcery_memory, endpoints=endpoints)
        self.core = Asterisk(
            self.bus,
            self.registry,
            self.sorcery,
            em_events_before_response=em_events_before_response,
            local_dialplan_delay_s=local_dialplan_delay_s,
        )
        self.rest = RestApi(self.core, self.bus, self.registry, self.sorcery)
        self._runner: web.AppRunner | None = None
        self._socket_done: dict[EventSocket, asyncio.Event] = {}
        self._faults: list[tuple[str, str, AriError]] = []

    def fail_next(self, method: str, path_suffix: str, error: AriError | None = None) -> None:
        """Answer the next ``method`` request whose path ends with ``path_suffix`` with
        ``error`` (default: the 500 Asterisk gives when it cannot make a channel) instead of
        doing it: a fault of Asterisk's own (ports exhausted, a module failing), for tests of
        how the worker copes."""
        self._faults.append((method, path_suffix, error or internal_error()))

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/ari", self._handle)
        app.router.add_route("*", "/ari/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for socket in list(self.bus.sockets):
            socket.abort()
            await socket.stop()
        await self.core.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> AriDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- live state ------------------------------------------------------------------------------
    @property
    def channels(self) -> dict[str, Channel]:
        return self.core.channels

    @property
    def bridges(self) -> dict[str, Bridge]:
        return self.core.bridges

    def phone(self, channel_id: str) -> Phone:
        """The phone behind a PJSIP channel (inbound or originated), also after it ended."""
        return self.core.phones[channel_id]

    def em_stats(self, channel_id: str) -> MediaStats:
        """What an externalMedia channel's socket received, ignored and sent."""
        return self.core.media[channel_id].stats

    def em_received(self, channel_id: str) -> list[RtpRecord]:
        return self.em_stats(channel_id).received

    async def settle(self) -> None:
        """Wait until every event made so far has been written to its websocket."""
        await self.bus.drain()

    # -- driving it ------------------------------------------------------------------------------
    async def call_in(
        self,
        exten: str = "4155550100",
        *,
        caller: str = "14155559876",
        caller_name: str = "sipp",
        app: str = "aispinner",
        args: Sequence[str] = ("inbound",),
        context: str = "from-trunk",
        endpoint: str | None = None,
    ) -> Phone:
        """A SIP caller dials ``exten``: its channel (state Ring) enters Stasis(app, args),
        ``StasisStart`` has been written when this returns. Without a connected app, Stasis()
        fails and the call ends at once (``phone.stasis_failed``)."""
        return await self.core.call_in(
            exten=exten,
            caller=caller,
            caller_name=caller_name,
            app=app,
            args=args,
            context=context,
            endpoint=endpoint,
        )

    def on_dial(
        self,
        number_or_endpoint: str,
        outcome: Literal["answer", "busy", "noanswer", "unreachable"],
        *,
        ring_s: float = 0.05,
        echo: bool = False,
    ) -> None:
        """How originates to a number (or to any number of an endpoint) go; unlisted: answer.
        ``ring_s``: time to the answer or the 486; ``echo``: the callee sends back what it
        hears."""
        self.core.dial_plans[number_or_endpoint] = DialPlan(outcome, ring_s, echo)

    async def drop_websockets(self) -> None:
        """Abort every events websocket's TCP connection, no close frame; returns once the
        apps have noticed (events from then on are lost until a socket connects)."""
        waits = []
        for socket in list(self.bus.sockets):
            socket.abort()
            waits.append(self._socket_done[socket].wait())
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=5)

    # -- HTTP ------------------------------------------------------------------------------------
    def _authenticated(self, request: web.Request, params: dict[str, str]) -> bool:
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                decoded = base64.b64decode(token.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            return decoded == f"{self.username}:{self.password}"
        for name, value in params.items():
            if name.lower() == "api_key":
                return value == f"{self.username}:{self.password}"
        return False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, _ = request.raw_path.partition("?")
        tail = raw_path[len("/ari") :]
        params = dict(parse_qsl(request.query_string, keep_blank_values=True))
        raw_body = await request.read()
        content_type = request.content_type
        body: Any = None
        problem: AriError | None = None
        if raw_body and content_type == "application/x-www-form-urlencoded":
            form = dict(parse_qsl(raw_body.decode("utf-8", "replace"), keep_blank_values=True))
            params = {**form, **params}
        elif raw_body and content_type == "application/json":
            try:
                body = json.loads(raw_body)
            except ValueError:
                problem = AriError(400, "Bad Request", "Error parsing request body")
        if problem is None and not self._authenticated(request, params):
            problem = AriError(401, "Unauthorized", "Authentication required")
        if problem is None and tail.endswith("/"):
            slashless = unquote(tail.strip("/"))
            problem = AriError(
                404, "Not Found", f"ARI URLs do not end with a slash. Try /ari/{slashless}"
            )
        if problem is not None:
            return await self._respond(request, params, body, _error_response(problem))
        if tail.startswith("/api-docs/"):
            return await self._respond(request, params, body, self._api_docs(request, tail))
        route = api().route(tail)
        if route is None:
            error = AriError(404, "Not Found", "Resource not found")
            return await self._respond(request, params, body, _error_response(error))
        if request.method == "OPTIONS":
            response = AriResponse(204, "No Content", headers={"Allow": route.allow_header()})
            return await self._respond(request, params, body, response)
        operation = route.operations.get(request.method)
        if operation is None:
            response = _error_response(AriError(405, "Method Not Allowed", "Invalid method"))
            response.headers["Allow"] = route.allow_header()
            return await self._respond(request, params, body, response)
        if operation.upgrade == "websocket":
            return await self._events_websocket(request, params)
        values = {k: v for k, v in params.items() if k.lower() != "api_key"}
        body_param = operation.body_param
        if (
            body_param is not None
            and isinstance(body, dict)
            and body_param.data_type == "containers"
        ):
            for key, value in body.items():
                param = operation.param(key)
                if param is not None and param.param_type == "query":
                    values[key] = _as_param(value)
        claimed = CHECKED_BY_RESOURCE.get((operation.resource, operation.nickname), frozenset())
        message = check_params(operation, values, claimed)
        if message is not None:
            error = AriError(400, "Bad Request", message)
            return await self._respond(request, params, body, _error_response(error))
        ari_request = AriRequest(operation, route.path_vars, values, body)
        for fault in self._faults:
            if request.method == fault[0] and request.path.endswith(fault[1]):
                self._faults.remove(fault)
                return await self._respond(request, params, body, _error_response(fault[2]))
        try:
            response = await self.rest.handle(ari_request)
        except AriError as exc:
            response = _error_response(exc)
        return await self._respond(request, params, body, response)

    async def _respond(
        self, request: web.Request, params: dict[str, str], body: Any, response: AriResponse
    ) -> web.StreamResponse:
        self.requests.append(
            RestCall(request.method, request.path, params, body, response.status, response.body)
        )
        if response.capture is not None:
            self.bus.publish(response.capture.before)
            await self.bus.drain()
        headers = {**SERVER_HEADERS, **response.headers}
        if response.status == 401:
            headers["WWW-Authenticate"] = f'Basic realm="{AUTH_REALM}"'
        if response.body is None:
            web_response = web.Response(
                status=response.status, reason=response.reason, headers=headers
            )
        else:
            headers["Content-Type"] = "application/json"
            web_response = web.Response(
                status=response.status,
                reason=response.reason,
                body=dumps(response.body).encode(),
                headers=headers,
            )
        try:
            await web_response.prepare(request)
            await web_response.write_eof()
        finally:  # the state has changed: its events go out even if the client went away
            if response.capture is not None:
                self.bus.publish(response.capture.after)
        return web_response

    def _api_docs(self, request: web.Request, tail: str) -> AriResponse:
        if request.method != "GET":
            return _error_response(AriError(405, "Method Not Allowed", "Unsupported method"))
        name = unquote(tail[len("/api-docs/") :])
        directory = api().directory
        path = (directory / name).resolve()
        if path.parent != directory.resolve() or not path.is_file():
            return _error_response(AriError(404, "Not Found", "Resource not found"))
        doc = json.loads(path.read_text(encoding="utf-8"))
        if "basePath" in doc:
            doc["basePath"] = f"http://{request.host}/ari"
        return AriResponse(200, "OK", doc)

    # -- events websocket ------------------------------------------------------------------------
    async def _events_websocket(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        apps = tuple(name for name in params.get("app", "").split(",") if name)
        if not apps:
            refused = recordings.ws_connect("ws_noapp")
            self.requests.append(RestCall("GET", request.path, params, None, 400, None))
            return web.Response(
                status=400,
                reason="Bad Request",
                body=refused["body"].encode(),
                headers={**SERVER_HEADERS, "Content-Type": "text/html"},
            )
        ws = web.WebSocketResponse(autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, reason="Upgrade Required", headers=SERVER_HEADERS)
        await ws.prepare(request)
        label = f"ws{len(self.ws_labels) + 1}"
        self.ws_labels.append(label)
        socket = EventSocket(
            label, ws, request.transport, apps, self.bus.record_sent, self.bus.record_lost
        )
        done = asyncio.Event()
        self._socket_done[socket] = done
        self.bus.sockets.append(socket)
        for old in self.registry.connect(socket):
            for name in old.apps:
                if name in apps:
                    old.put(ev.make("ApplicationReplaced", [name]).render(name))
        try:
            async for _ in ws:
                pass  # Asterisk reads nothing from the events socket
        finally:
            socket.closed = True
            self.registry.disconnect(socket)
            done.set()
            await socket.stop()
            self.bus.sockets.remove(socket)
            del self._socket_done[socket]
        return ws


def _error_response(error: AriError) -> AriResponse:
    return AriResponse(error.status, error.reason, error.body())


def _as_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)
