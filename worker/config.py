"""Typed settings for the worker, read from a TOML file and ``AISPINNER_*`` environment variables.

Precedence (highest first): keyword arguments, environment (``AISPINNER_SIP__PORT=5070``; nested
sections joined with ``__``), the TOML file (``--config`` or ``AISPINNER_CONFIG``), defaults.
Every setting is documented in ``config/worker.example.toml``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.errors import ConfigError
from worker.signing import secret_key

Codec = Literal["PCMU", "PCMA"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_networks(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise ValueError(f"source {item!r} is not an IP address or CIDR") from exc
    return value


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class SipSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5060, ge=1, le=65535)
    transports: list[Literal["udp", "tcp"]] = ["udp", "tcp"]
    public_host: str | None = None
    user_agent: str = "aispinner-worker"
    max_message_bytes: int = Field(65535, ge=1024)
    max_calls: int = Field(500, ge=1)
    rate_limit_per_second: float = Field(200.0, gt=0)
    rate_limit_burst: int = Field(400, ge=1)
    t1_ms: int = Field(500, ge=50)
    t2_ms: int = Field(4000, ge=100)
    t4_ms: int = Field(5000, ge=100)
    auth_realm: str = "aispinner"
    users: dict[str, str] = Field(default_factory=dict)
    trusted_sources: list[str] = ["127.0.0.0/8", "::1/128"]
    max_call_seconds: float = Field(4 * 3600.0, gt=0)
    receive_buffer_bytes: int = Field(4 * 1024 * 1024, ge=65536)
    tcp_max_connections_per_source: int = Field(32, ge=1)
    tcp_message_timeout_s: float = Field(10.0, gt=0)

    @field_validator("trusted_sources")
    @classmethod
    def _trusted(cls, value: list[str]) -> list[str]:
        return _check_networks(value)


class RtpSettings(_Section):
    host: str = "127.0.0.1"
    port_min: int = Field(20000, ge=1024, le=65534)
    port_max: int = Field(30000, ge=1025, le=65535)
    inactivity_timeout_s: float = Field(30.0, gt=0)
    jitter_min_ms: int = Field(4, ge=1)
    jitter_max_ms: int = Field(200, ge=20)
    jitter_early: bool = True
    """The caller's packets go to the agent as soon as they are here in order (True), or at
    their place in the jitter buffer's playout, up to the target delay later (False)."""
    nat_latch: bool = False

    @model_validator(mode="after")
    def _range(self) -> RtpSettings:
        if self.port_max - self.port_min < 2:
            raise ValueError("rtp.port_max must be at least port_min + 2")
        if self.jitter_min_ms >= self.jitter_max_ms:
            raise ValueError(
                f"rtp.jitter_min_ms ({self.jitter_min_ms}) must be below rtp.jitter_max_ms"
                f" ({self.jitter_max_ms})"
            )
        return self


class PromptSettings(_Section):
    allow_private_urls: bool | None = None
    """``play`` URLs whose host is loopback or on a private network: None (the default) allows
    them only when the worker itself listens on loopback (a development host)."""


class TrunkSettings(_Section):
    host: str
    port: int = Field(5060, ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    username: str | None = None
    password: str | None = None
    registration: bool = False
    registration_expires_s: int = Field(3600, ge=60)
    from_user: str | None = None
    from_domain: str | None = None
    codecs: list[Codec] = ["PCMU", "PCMA"]
    inbound_sources: list[str] = Field(default_factory=list)

    @field_validator("inbound_sources")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return _check_networks(value)


AsteriskCodec = Literal["ulaw", "alaw", "g722", "slin16"]


class AriTrunkSettings(_Section):
    """A SIP trunk the worker pushes into Asterisk at runtime (PJSIP auth, aor, endpoint,
    identify and registration objects through ARI dynamic configuration)."""

    host: str
    port: int = Field(5060, ge=1, le=65535)
    transport: Literal["udp", "tcp"] = "udp"
    username: str | None = None
    password: str | None = None
    registration: bool = False
    registration_expires_s: int = Field(3600, ge=60)
    from_user: str | None = None
    from_domain: str | None = None
    codecs: list[AsteriskCodec] = ["ulaw", "alaw"]
    context: str = "from-trunk"
    match: list[str] = Field(default_factory=list)
    """Source addresses whose calls are this trunk's (PJSIP identify); empty: ``host``."""


class AriSettings(_Section):
    """Asterisk's REST Interface: where it is, who we are, how calls' media leaves Asterisk."""

    url: str = "http://127.0.0.1:8088"
    username: str = "aispinner"
    password: str = "aispinner"
    app: str = "aispinner"
    media_format: Literal["slin16", "ulaw"] = "slin16"
    media_host: str | None = None
    """The address Asterisk sends ExternalMedia RTP to (a port of the worker's RTP range on
    it); default: ``rtp.host``."""
    bridge_type: Literal["mixing,dtmf_events", "mixing,proxy_media"] = "mixing,dtmf_events"
    request_timeout_s: float = Field(5.0, gt=0)
    reconnect_max_s: float = Field(30.0, ge=1)
    trunks: dict[str, AriTrunkSettings] = Field(default_factory=dict)
    asterisk_sip_host: str = "0.0.0.0"
    asterisk_sip_port: int = Field(5060, ge=1, le=65535)
    asterisk_rtp_port_min: int = Field(10000, ge=1024, le=65534)
    asterisk_rtp_port_max: int = Field(19999, ge=1025, le=65535)

    @model_validator(mode="after")
    def _ranges(self) -> AriSettings:
        if self.asterisk_rtp_port_max <= self.asterisk_rtp_port_min:
            raise ValueError("ari.asterisk_rtp_port_max must be above asterisk_rtp_port_min")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"ari.url must start with http:// or https://, not {self.url!r}")
        return self


class ApiSettings(_Section):
    """The HTTP API (REST, the realtime hub WebSocket, SSE, the per-call observer)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    jwt_secret: str | None = None
    """HS256 shared secret for the Bearer and ``?token=`` JWTs."""
    jwt_public_key: str | None = None
    """RS256 public key (PEM text, or a path to a PEM file) instead of a shared secret."""
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    hub_ping_interval_s: float = Field(30.0, gt=0)
    hub_queue_events: int = Field(1000, ge=10)
    """Events a hub client may have waiting; a client further behind is cut off (close code
    1013) and resumes by id."""
    max_request_bytes: int = Field(1024 * 1024, ge=1024)


class MetricsSettings(_Section):
    """Prometheus metrics (``GET /metrics``) on an address of their own, for a worker whose API
    is off; the API serves them at ``/metrics`` too. No authentication: a private address."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class EventSettings(_Section):
    """Where events go besides the hub: the on-disk spool, webhooks, an upstream hub."""

    spool_max_events: int = Field(100_000, ge=100)
    """Events kept on disk while PostgreSQL is unreachable; beyond this, new ones are dropped
    (counted and logged)."""
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_retry_window_s: float = Field(24 * 3600.0, gt=0)
    """How long a failing delivery is retried (exponential backoff) before it is dead."""
    webhook_max_backoff_s: float = Field(3600.0, gt=0)
    hub_url: str | None = None
    """The API's hub to push every event to, in signed HTTP batches (``http(s)://``); None: no
    push."""
    hub_secret: str | None = None
    """Signs the pushed batches (Standard Webhooks: ``whsec_`` and base64); required with
    ``hub_url``."""


class RouteSettings(_Section):
    """Where calls to a dialled number go: the built-in echo, or a voice agent."""

    match: str = Field(description="dialled number; '*' matches anything, a trailing '*' a prefix")
    action: Literal["echo", "agent", "reject"] = "agent"
    trunk: str | None = None
    agent_url: str | None = None
    protocol: Literal["jambonz", "twilio"] = "jambonz"
    username: str | None = None
    password: str | None = None
    record: bool = True
    barge_in: bool = False
    voicemail_detection: Literal["outbound", "always", "off"] = "outbound"
    """Listen for an answering machine's beep (``call.voicemail_detected``) in the first minute of
    agent calls: ``outbound`` ones (the dialer's, a ``dial`` verb's; the default), ``always``
    (inbound ones too, e.g. calls an Asterisk dialer hands in) or ``off``."""
    custom_parameters: dict[str, str] = Field(default_factory=dict)
    workspace_id: int = Field(1, ge=1)
    """The workspace the route's calls and events belong to."""
    node_id: str | None = None
    """The PBX / number / agent node of the route's calls (in the journal and the events)."""

    def matches(self, number: str) -> bool:
        if self.match == "*":
            return True
        if self.match.endswith("*"):
            return number.startswith(self.match[:-1])
        return number == self.match


class Settings(BaseSettings):
    """All of the worker's settings. Sections mirror ``config/worker.example.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="AISPINNER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    data_dir: Path = Path("data")
    log: LogSettings = LogSettings()
    sip: SipSettings = SipSettings()
    rtp: RtpSettings = RtpSettings()
    prompts: PromptSettings = PromptSettings()
    trunks: dict[str, TrunkSettings] = Field(default_factory=dict)
    ingress: list[Literal["sip", "ari"]] = ["sip"]
    """Where calls come from: the worker's own SIP user agent, Asterisk over ARI, or both."""
    ari: AriSettings = AriSettings()
    store: bool = True
    """Keep the call journal and the event outbox in PostgreSQL and serve the API; False:
    events only go to data_dir/events.jsonl (a host without a database, most tests)."""
    database_url: str | None = None
    """PostgreSQL for the journal and the event outbox; None: a private server in data_dir."""
    worker_id: str | None = None
    """This worker's name in the journal and in webhook claims; None: host name and port."""
    processes: int = Field(0, ge=0, le=256)
    """Media processes behind the one SIP address (``aispinner-worker run``): 0 = one per CPU
    core, 1 = a single process doing everything."""
    realtime_priority: int = Field(10, ge=0, le=99)
    """SCHED_RR priority of the worker's processes (the front and the media processes, or the
    single process; not their children): 1-99; 0 = the normal scheduler. Refused by the kernel
    (not root, no ``CAP_SYS_NICE`` nor ``RLIMIT_RTPRIO``): logged, and they run at the normal
    one."""
    drain_grace_s: float = Field(30.0, ge=0)
    """On SIGTERM: how long live calls may go on (no new ones are taken) before they are hung
    up and the worker exits."""
    api: ApiSettings = ApiSettings()
    events: EventSettings = EventSettings()
    metrics: MetricsSettings = MetricsSettings()
    routes: list[RouteSettings] = Field(
        default_factory=lambda: [RouteSettings(match="echo", action="echo", record=False)]
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlValues(settings_cls, _FILE_VALUES.get({})))

    @model_validator(mode="after")
    def _asterisk_rtp_apart(self) -> Settings:
        ari, rtp = self.ari, self.rtp
        if "ari" in self.ingress and not (
            ari.asterisk_rtp_port_max < rtp.port_min or ari.asterisk_rtp_port_min > rtp.port_max
        ):
            raise ValueError(
                f"ari.asterisk_rtp_port_min..max ({ari.asterisk_rtp_port_min}-"
                f"{ari.asterisk_rtp_port_max}) overlaps rtp.port_min..max ({rtp.port_min}-"
                f"{rtp.port_max}): Asterisk and the worker would fight for ports"
            )
        if not self.ingress:
            raise ValueError("ingress must name at least one of sip, ari")
        if self.events.hub_url is not None:
            if not self.events.hub_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"events.hub_url must be http:// or https://, not {self.events.hub_url!r}"
                )
            if not self.events.hub_secret:
                raise ValueError("events.hub_url needs events.hub_secret to sign what it pushes")
            try:
                secret_key(self.events.hub_secret)
            except ValueError as exc:
                raise ValueError(f"events.hub_secret: {exc}") from None
        if self.api.jwt_secret and self.api.jwt_public_key:
            raise ValueError("set api.jwt_secret (HS256) or api.jwt_public_key (RS256), not both")
        return self

    def private_urls_allowed(self) -> bool:
        """Whether ``play`` may fetch from loopback and private-network hosts."""
        if self.prompts.allow_private_urls is not None:
            return self.prompts.allow_private_urls
        try:
            return ipaddress.ip_address(self.sip.host).is_loopback
        except ValueError:
            return self.sip.host == "localhost"

    def route_for(self, number: str) -> RouteSettings | None:
        for route in self.routes:
            if route.matches(number):
                return route
        return None


class _TomlValues(PydanticBaseSettingsSource):
    """The parsed TOML file as the lowest-precedence settings source."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


_FILE_VALUES: ContextVar[dict[str, Any]] = ContextVar("_FILE_VALUES")


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (or ``$AISPINNER_CONFIG``), the environment and ``overrides``.

    Raises ``ConfigError`` listing every problem, never a raw validation traceback.
    """
    if path is None:
        env_path = os.environ.get("AISPINNER_CONFIG")
        path = Path(env_path) if env_path else None
    file_values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    token = _FILE_VALUES.set(file_values)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    finally:
        _FILE_VALUES.reset(token)
