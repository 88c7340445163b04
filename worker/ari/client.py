"""A small typed client for Asterisk's REST Interface: the REST calls the worker makes (channels,
bridges, applications, asterisk info, dynamic configuration) over one keep-alive HTTP connection
pool, and the URL and credentials of the events WebSocket (``worker.ari.events`` connects it).

Every failure is an ``AriError`` (a ``RemoteError``) carrying the HTTP status and Asterisk's own
message, which is in ``message`` for most errors and in ``error`` for a failed originate
(``{"error": "Allocation failed"}``, as recorded). ``AriUnreachableError`` (status 0) means no
answer at all: refused, reset or timed out.

Why not a library: aioari (on the design card) was last released in 2020, needs a live Asterisk to
build its client from the Swagger at connect and leaks its HTTP session when that fails; asyncari
wraps the same Swagger loader in anyio task groups. The worker uses a dozen calls; httpx and
websockets (already dependencies) carry them in a few hundred lines that type-check.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from worker.ari.models import Application, AsteriskInfo, Bridge, Channel, ConfigTuple
from worker.errors import RemoteError

HANGUP_REASONS = frozenset(
    {
        "normal",
        "busy",
        "congestion",
        "no_answer",
        "timeout",
        "rejected",
        "unallocated",
        "normal_unspecified",
        "number_incomplete",
        "codec_mismatch",
        "interworking",
        "failure",
        "answered_elsewhere",
    }
)
"""``DELETE /channels/{id}?reason=``: the values Asterisk accepts (channels.json)."""


class AriError(RemoteError):
    """An ARI request failed: ``status`` (0 when Asterisk did not answer) and its message."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        where = f"{method} /ari{path}"
        text = f"{where}: {status} {message}" if status else f"{where}: {message}"
        super().__init__(text)
        self.method = method
        self.path = path
        self.status = status
        self.message = message


class AriUnreachableError(AriError):
    """Asterisk did not answer (connection refused or reset, or a timeout)."""


class AriAuthError(AriError):
    """401: the ARI user or password is wrong."""

    def advice(self, url: str) -> str:
        """What a worker that cannot start because of it says: the settings to change."""
        return (
            f"Asterisk at {url} refused the ARI credentials ({self.status} {self.message}): "
            "set ari.username / ari.password (AISPINNER_ARI__USERNAME / "
            "AISPINNER_ARI__PASSWORD) to a user of its ari.conf"
        )


class AriNotFoundError(AriError):
    """404: the channel, bridge or object is gone (or never was)."""


class AriClient:
    """REST calls to one Asterisk. ``url`` is its HTTP server (``http://host:8088``)."""

    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self._password = password
        self._http = httpx.AsyncClient(
            base_url=f"{self.url}/ari",
            auth=(username, password),
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the events WebSocket ----------------------------------------------------------------------
    def events_url(self, app: str) -> str:
        """``ws://host:port/ari/events?app=<app>&subscribeAll=false`` (credentials go in the
        Authorization header, ``events_headers``, never in the URL that gets logged)."""
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return (
            f"{scheme}://{parts.netloc}{parts.path}/ari/events?app={quote(app)}&subscribeAll=false"
        )

    def events_headers(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    # -- requests ----------------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
    ) -> Any:
        """One REST call; the parsed JSON answer, or None for an empty one (204)."""
        try:
            response = await self._http.request(
                method, path, params=dict(params) if params else None, json=body
            )
        except httpx.TimeoutException as exc:
            raise AriUnreachableError(method, path, 0, "no answer in time") from exc
        except httpx.HTTPError as exc:
            raise AriUnreachableError(method, path, 0, f"cannot reach Asterisk ({exc})") from exc
        status = response.status_code
        if status >= 400:
            raise _error(method, path, response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise AriError(method, path, status, "the answer is not JSON") from exc

    # -- asterisk ----------------------------------------------------------------------------------
    async def info(self) -> AsteriskInfo:
        return AsteriskInfo.model_validate(await self.request("GET", "/asterisk/info"))

    async def application(self, app: str) -> Application:
        return Application.model_validate(await self.request("GET", f"/applications/{quote(app)}"))

    # -- channels ----------------------------------------------------------------------------------
    async def channels(self) -> list[Channel]:
        return [Channel.model_validate(c) for c in await self.request("GET", "/channels")]

    async def channel(self, channel_id: str) -> Channel:
        return Channel.model_validate(await self.request("GET", f"/channels/{quote(channel_id)}"))

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{quote(channel_id)}/answer")

    async def ring(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{quote(channel_id)}/ring")

    async def progress(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{quote(channel_id)}/progress")

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        if reason not in HANGUP_REASONS:
            raise ValueError(f"not an ARI hangup reason: {reason!r}")
        await self.request("DELETE", f"/channels/{quote(channel_id)}", {"reason": reason})

    async def send_dtmf(self, channel_id: str, digits: str, duration_ms: int = 100) -> None:
        params: dict[str, str | int] = {"dtmf": digits, "duration": duration_ms}
        await self.request("POST", f"/channels/{quote(channel_id)}/dtmf", params)

    async def external_media(
        self,
        app: str,
        external_host: str,
        media_format: str,
        *,
        channel_id: str | None = None,
    ) -> Channel:
        """An ExternalMedia channel sending RTP to ``external_host`` (``host:port``); its
        ``channelvars`` name the address it sends from (``UNICASTRTP_LOCAL_ADDRESS``/``PORT``)."""
        params: dict[str, str | int] = {
            "app": app,
            "external_host": external_host,
            "format": media_format,
        }
        if channel_id is not None:
            params["channelId"] = channel_id
        return Channel.model_validate(await self.request("POST", "/channels/externalMedia", params))

    async def originate(
        self,
        endpoint: str,
        app: str,
        app_args: Sequence[str],
        *,
        channel_id: str,
        caller_id: str | None = None,
        timeout_s: int = 30,
        variables: Mapping[str, str] | None = None,
    ) -> Channel:
        """Dial ``endpoint`` (``PJSIP/<number>@<endpoint>``); the channel enters ``app`` with
        ``app_args`` once answered. Returns at once with the channel (state Down)."""
        params: dict[str, str | int] = {
            "endpoint": endpoint,
            "app": app,
            "appArgs": ",".join(app_args),
            "timeout": timeout_s,
            "channelId": channel_id,
        }
        if caller_id:
            params["callerId"] = caller_id
        body = {"variables": dict(variables)} if variables else None
        return Channel.model_validate(await self.request("POST", "/channels", params, body))

    # -- bridges -----------------------------------------------------------------------------------
    async def bridges(self) -> list[Bridge]:
        return [Bridge.model_validate(b) for b in await self.request("GET", "/bridges")]

    async def create_bridge(self, bridge_id: str, bridge_type: str, name: str) -> Bridge:
        params = {"type": bridge_type, "name": name, "bridgeId": bridge_id}
        return Bridge.model_validate(await self.request("POST", "/bridges", params))

    async def add_channels(self, bridge_id: str, channel_ids: Sequence[str]) -> None:
        params = {"channel": ",".join(channel_ids)}
        await self.request("POST", f"/bridges/{quote(bridge_id)}/addChannel", params)

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self.request("DELETE", f"/bridges/{quote(bridge_id)}")

    # -- dynamic configuration ---------------------------------------------------------------------
    async def config_get(self, config_class: str, object_type: str, id_: str) -> list[ConfigTuple]:
        data = await self.request("GET", _config_path(config_class, object_type, id_))
        return [ConfigTuple.model_validate(item) for item in data]

    async def config_put(
        self, config_class: str, object_type: str, id_: str, fields: Sequence[tuple[str, str]]
    ) -> list[ConfigTuple]:
        body = {"fields": [{"attribute": name, "value": value} for name, value in fields]}
        data = await self.request("PUT", _config_path(config_class, object_type, id_), body=body)
        return [ConfigTuple.model_validate(item) for item in data or []]

    async def config_delete(self, config_class: str, object_type: str, id_: str) -> None:
        await self.request("DELETE", _config_path(config_class, object_type, id_))


def _config_path(config_class: str, object_type: str, id_: str) -> str:
    return f"/asterisk/config/dynamic/{quote(config_class)}/{quote(object_type)}/{quote(id_)}"


def _error(method: str, path: str, response: httpx.Response) -> AriError:
    status = response.status_code
    message = response.reason_phrase or "error"
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
        if text:
            message = text[:200]
    else:
        if isinstance(data, dict):
            found = data.get("message", data.get("error"))
            if isinstance(found, str):
                message = found
    cls = {401: AriAuthError, 404: AriNotFoundError}.get(status, AriError)
    return cls(method, path, status, message)
