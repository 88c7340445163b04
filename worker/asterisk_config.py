"""The Asterisk configuration the ARI ingress needs, rendered from the worker's settings.

This module owns turning ``Settings`` into the text of Asterisk's ``extensions.conf``,
``pjsip.conf``, ``sorcery.conf``, ``ari.conf``, ``http.conf`` and ``rtp.conf`` (templates in
``worker/dialplan/``, placeholders ``@@NAME@@`` so Asterisk's own ``${...}`` pass through), and
refusing, with a ``ConfigError`` naming the settings, what Asterisk could not run with: an ARI URL
its HTTP server cannot bind, ports Asterisk and the worker would both bind, overlapping RTP
ranges, values that would break a config file. ``render`` is pure; ``write`` puts the files in a
folder. ``aispinner-worker asterisk-config --out DIR`` calls it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TypeAlias
from urllib.parse import urlsplit

from worker.config import Settings
from worker.errors import ConfigError, LocalError

TEMPLATES = (
    "extensions.conf",
    "pjsip.conf",
    "sorcery.conf",
    "ari.conf",
    "http.conf",
    "rtp.conf",
)
"""The files ``render`` returns, in this order; each is a template in ``worker/dialplan/``."""

TRANSPORTS = {"udp": "transport-udp", "tcp": "transport-tcp"}
"""The PJSIP transport that ``pjsip.conf`` defines for each protocol (for pushed endpoints)."""

DEFAULT_CONTEXT = "from-trunk"
"""The dialplan context of the ``trunk-endpoint`` template; always rendered."""

_PLACEHOLDER = re.compile(r"@@([A-Z0-9_]+)@@")
_CONTEXT_HEADER = "[@@CONTEXT@@]"
_APP_NAME = re.compile(r"[A-Za-z0-9._-]+")
_SECTION_FORBIDDEN = re.compile(r"[\[\]();:,\s\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def render(settings: Settings) -> dict[str, str]:
    """Every Asterisk file the ARI ingress needs, by file name, filled from ``settings``.

    Raises ``ConfigError`` for settings Asterisk could not run with.
    """
    ari = settings.ari
    http_address, http_port = _http_bind(ari.url)
    sip_address = _address("ari.asterisk_sip_host", ari.asterisk_sip_host)
    _check_ports(settings, http_address, http_port, sip_address)
    app = _app_name(ari.app)
    values = {
        "APP": app,
        "ARI_USERNAME": _section_name("ari.username", ari.username),
        "ARI_PASSWORD": _value("ari.password", ari.password),
        "HTTP_BIND_ADDRESS": str(http_address),
        "HTTP_BIND_PORT": str(http_port),
        "SIP_BIND": _host_port(sip_address, ari.asterisk_sip_port),
        "RTP_START": str(ari.asterisk_rtp_port_min),
        "RTP_END": str(ari.asterisk_rtp_port_max),
    }
    out: dict[str, str] = {}
    for name in TEMPLATES:
        template = _template(name)
        if name == "extensions.conf":
            out[name] = _extensions(template, _contexts(settings), values)
        else:
            out[name] = _fill(template, values)
    return out


def write(settings: Settings, out: Path) -> list[Path]:
    """Render and write each file into ``out`` (created if missing, files replaced); the paths
    written, in ``TEMPLATES`` order. Nothing is written when the settings are refused."""
    rendered = render(settings)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rendered.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# -- templates -----------------------------------------------------------------------------------


def _template(name: str) -> str:
    return files("worker").joinpath("dialplan", name).read_text(encoding="utf-8")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``@@NAME@@`` in one pass (a value is never scanned again)."""

    def one(match: re.Match[str]) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise LocalError(f"template placeholder {match.group(0)} has no value") from None

    return _PLACEHOLDER.sub(one, template)


def _extensions(template: str, contexts: Iterable[str], values: Mapping[str, str]) -> str:
    """The header once, then the ``[@@CONTEXT@@]`` block once per trunk context."""
    head, marker, block = template.partition(_CONTEXT_HEADER)
    if not marker:
        raise LocalError(f"extensions.conf template has no {_CONTEXT_HEADER} block")
    blocks = [_fill(marker + block, {**values, "CONTEXT": context}) for context in contexts]
    return _fill(head, values) + "\n".join(blocks)


def _contexts(settings: Settings) -> list[str]:
    """``from-trunk`` and every other context an ``[ari.trunks.*]`` sends its calls to."""
    contexts = [DEFAULT_CONTEXT]
    for name, trunk in sorted(settings.ari.trunks.items()):
        context = _section_name(f"ari.trunks.{name}.context", trunk.context)
        if context not in contexts:
            contexts.append(context)
    return contexts


# -- values --------------------------------------------------------------------------------------


def _app_name(app: str) -> str:
    if not _APP_NAME.fullmatch(app):
        raise ConfigError(
            f"ari.app {app!r} cannot be written into Stasis({app},inbound): "
            "use letters, digits, '.', '_' or '-'"
        )
    return app


def _section_name(setting: str, value: str) -> str:
    """A ``[section]`` name (an ARI user, a dialplan context)."""
    if not value or _SECTION_FORBIDDEN.search(value):
        raise ConfigError(
            f"{setting} {value!r} cannot be an Asterisk section name: it must be non-empty, "
            "without spaces or any of [ ] ( ) ; : ,"
        )
    return value


def _value(setting: str, value: str) -> str:
    """A ``key = value`` value: ``;`` escaped (Asterisk reads ``\\;`` as ``;``)."""
    if not value or _CONTROL.search(value) or value != value.strip():
        raise ConfigError(
            f"{setting} cannot be written into an Asterisk config file: it must be non-empty, "
            "without line breaks or control characters, and not start or end with a space"
        )
    return value.replace(";", "\\;")


# -- addresses and ports -------------------------------------------------------------------------


def _address(setting: str, host: str) -> Address:
    """An address Asterisk can bind (``localhost`` is taken as 127.0.0.1)."""
    if host == "localhost":
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{setting} {host!r} is a host name, but Asterisk binds an IP address: "
            "give the address instead"
        ) from None


def _http_bind(url: str) -> tuple[Address, int]:
    """Where http.conf must bind so that the worker reaches ARI at ``url``."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        raise ConfigError(
            f"ari.url {url!r} is https://, but the rendered http.conf serves plain HTTP: set up "
            "TLS in Asterisk yourself (http.conf tlsenable, tlsbindaddr, tlscertfile, "
            "tlsprivatekey) or use an http:// URL on loopback or a private network"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"ari.url {url!r} has a path: the rendered http.conf serves ARI at /ari with no "
            "prefix, so give only http://host:port"
        )
    if parts.username is not None:
        raise ConfigError(
            f"ari.url {url!r} carries credentials: put them in ari.username and ari.password"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"ari.url {url!r} has an invalid port") from None
    return _address("the host of ari.url", parts.hostname or ""), port


def _host_port(address: Address, port: int) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}"


@dataclass(frozen=True)
class _Bind:
    """Ports one program binds: ``address`` None means every address of the host."""

    setting: str
    address: Address | None
    first: int
    last: int
    protocols: frozenset[str]

    def describe(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        where = "every address" if self.address is None else str(self.address)
        return f"{self.setting} ({'/'.join(sorted(self.protocols))} {ports} on {where})"

    def clashes_with(self, other: _Bind) -> bool:
        if not self.protocols & other.protocols:
            return False
        if self.last < other.first or other.last < self.first:
            return False
        return _same_address(self.address, other.address)


def _same_address(a: Address | None, b: Address | None) -> bool:
    """Whether two binds would meet: one on every address (``None`` or 0.0.0.0/::), or equal."""
    if a is None or b is None or a.is_unspecified or b.is_unspecified:
        return True
    return a == b


def _worker_address(host: str) -> Address | None:
    """The worker binds host names through the resolver; take a name as every address."""
    try:
        return _address("", host)
    except ConfigError:
        return None


def _check_ports(
    settings: Settings, http_address: Address, http_port: int, sip_address: Address
) -> None:
    """Refuse ports that Asterisk and the worker (on the same host) would both bind.

    Asterisk binds its RTP range on every address, so the RTP ranges are always compared (the
    settings compare them only when ingress includes "ari"); the worker's SIP port only when
    ingress includes "sip".
    """
    ari, sip, rtp = settings.ari, settings.sip, settings.rtp
    asterisk = [
        _Bind("the port of ari.url", http_address, http_port, http_port, frozenset({"tcp"})),
        _Bind(
            "ari.asterisk_sip_port",
            sip_address,
            ari.asterisk_sip_port,
            ari.asterisk_sip_port,
            frozenset({"udp", "tcp"}),
        ),
        _Bind(
            "ari.asterisk_rtp_port_min..max",
            None,
            ari.asterisk_rtp_port_min,
            ari.asterisk_rtp_port_max,
            frozenset({"udp"}),
        ),
    ]
    worker = [
        _Bind(
            "rtp.port_min..max",
            _worker_address(rtp.host),
            rtp.port_min,
            rtp.port_max,
            frozenset({"udp"}),
        )
    ]
    if "sip" in settings.ingress:
        worker.append(
            _Bind(
                "sip.port",
                _worker_address(sip.host),
                sip.port,
                sip.port,
                frozenset(sip.transports),
            )
        )
    pairs = [(a, b) for i, a in enumerate(asterisk) for b in asterisk[i + 1 :]]
    pairs += [(a, w) for a in asterisk for w in worker]
    for first, second in pairs:
        if first.clashes_with(second):
            hint = ' (or leave "sip" out of ingress)' if second.setting == "sip.port" else ""
            raise ConfigError(
                f"{first.describe()} and {second.describe()} would bind the same port: "
                f"change one of them{hint}"
            )
