"""SIP messages (RFC 3261 §7, §20, §25): the parser, the serializer and typed header values.

This module owns the wire format only. It keeps no state between messages and does no I/O;
``StreamFramer`` cuts a TCP byte stream into messages by Content-Length.

Errors: ``SipParseError`` (answer 400, or ``status_code`` when it is more precise: 416, 505) and
``MessageTooLarge`` (answer 513) share the base ``SipMessageError``, a ``RemoteError``. Each carries
what could be parsed (start line, method, headers) so ``error_response`` can still build the answer.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Final

from worker.errors import LocalError, RemoteError
from worker.status_codes import REASON_PHRASES

SIP_VERSION: Final = "SIP/2.0"
MAGIC_COOKIE: Final = "z9hG4bK"
DEFAULT_MAX_MESSAGE_SIZE: Final = 65_535
DEFAULT_MAX_HEADER_SIZE: Final = 16_384
MAX_CSEQ: Final = 2**31 - 1

Param = tuple[str, str | None]

# --------------------------------------------------------------------------------------------
# Errors


class SipMessageError(RemoteError):
    """The peer's bytes are not an acceptable SIP message.

    ``reason`` is a short human sentence fit for a reason phrase. ``start_line``, ``method`` and
    ``headers`` hold whatever was parsed before the fault, for ``error_response``.
    """

    status_code: int = 400

    def __init__(
        self,
        reason: str,
        *,
        status_code: int | None = None,
        start_line: str | None = None,
        method: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if status_code is not None:
            self.status_code = status_code
        self.start_line = start_line
        self.method = method
        self.headers = headers if headers is not None else Headers()


class SipParseError(SipMessageError):
    """Malformed message or header value: answer ``status_code`` (400 unless more precise)."""


class MessageTooLarge(SipMessageError):  # noqa: N818  (named after the 513 reason phrase)
    """The message exceeds the configured size limit: answer 513."""

    status_code = 513


# --------------------------------------------------------------------------------------------
# Character classes and small helpers

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?")
_URI_BAD_RE: Final = re.compile(r'[\x00-\x20<>"\x7f]')
_DISPLAY_BAD_RE: Final = re.compile(r"[^A-Za-z0-9.!%*_+`'~\- \t\x80-\U0010ffff]")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_VIA_PROTOCOL_RE: Final = re.compile(
    r"\s*([^\s/]+)\s*/\s*([^\s/]+)\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+(\S.*)", re.DOTALL
)
_HEAD_END_RE: Final = re.compile(rb"\r?\n\r?\n")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str, limit: int = 60) -> str:
    """Peer data made safe for a reason phrase: no control characters, bounded length."""
    return _CONTROL_RE.sub("?", text)[:limit]


def is_token(text: str) -> bool:
    """RFC 3261 §25.1 ``token``."""
    return _TOKEN_RE.fullmatch(text) is not None


def quote(text: str) -> str:
    """A quoted-string (RFC 3261 §25.1) holding ``text``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote(text: str) -> str:
    """The content of a quoted-string, escapes resolved; other text is returned stripped."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out: list[str] = []
        i = 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\" and i + 1 < len(inner):
                out.append(inner[i + 1])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)
    return text


def _quoted_end(text: str, start: int) -> int:
    """Index just past the quoted-string opening at ``text[start]``, or -1 if unterminated."""
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
        elif ch == '"':
            return i + 1
        else:
            i += 1
    return -1


def split_outside_quotes(text: str, sep: str, *, angle: bool = False) -> list[str]:
    """Split ``text`` on ``sep`` except inside quoted strings (and ``<...>`` when ``angle``).

    Raises ``SipParseError`` on an unterminated quoted string or angle bracket.
    """
    if '"' not in text and (not angle or "<" not in text):
        return text.split(sep)
    parts: list[str] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            end = _quoted_end(text, i)
            if end < 0:
                raise SipParseError("Unterminated quoted string")
            i = end
            continue
        if angle and ch == "<":
            end = text.find(">", i + 1)
            if end < 0:
                raise SipParseError("Unterminated <> in header value")
            i = end + 1
            continue
        if ch == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _find_param(params: tuple[Param, ...], name: str) -> Param | None:
    lname = name.lower()
    for item in params:
        if item[0].lower() == lname:
            return item
    return None


def _replace_param(params: tuple[Param, ...], name: str, value: str | None) -> tuple[Param, ...]:
    lname = name.lower()
    out = [item for item in params if item[0].lower() != lname]
    out.append((name, value))
    return tuple(out)


def _drop_param(params: tuple[Param, ...], name: str) -> tuple[Param, ...]:
    lname = name.lower()
    return tuple(item for item in params if item[0].lower() != lname)


def _format_params(params: tuple[Param, ...]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def parse_header_params(text: str, *, what: str) -> tuple[Param, ...]:
    """Parse ``*( SEMI generic-param )`` with the RFC's optional whitespace around ``;`` and ``=``.

    ``text`` must be empty, whitespace, or start (after whitespace) with ``;``. Quoted values keep
    their quotes, so they serialize back unchanged.
    """
    if not text or text.isspace():
        return ()
    pieces = split_outside_quotes(text, ";")
    if pieces[0].strip():
        raise SipParseError(f"Unexpected text in {what}")
    out: list[Param] = []
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        name = name.strip()
        if not name or not is_token(name):
            raise SipParseError(f"Empty or invalid parameter in {what}")
        if not eq:
            out.append((name, None))
            continue
        value = value.strip()
        if not value:
            raise SipParseError(f"Parameter {_printable(name)} without value in {what}")
        if value[0] == '"':
            if _quoted_end(value, 0) != len(value):
                raise SipParseError(f"Bad quoted parameter value in {what}")
        elif not _param_value_ok(value):
            raise SipParseError(f"Invalid parameter value in {what}")
        out.append((name, value))
    return tuple(out)


# Looser than the grammar's token / host on purpose: devices in the field put ``/``, ``<urn:..>``
# and the like in unquoted values. Whitespace and stray quotes are still refused.
_PARAM_VALUE_RE: Final = re.compile(r'[^\s"]+')


def _param_value_ok(value: str) -> bool:
    return _PARAM_VALUE_RE.fullmatch(value) is not None


def _parse_port(text: str, what: str) -> int:
    if not _DIGITS_RE.fullmatch(text) or len(text) > 5 or int(text) > 65535:
        raise SipParseError(f"Invalid port in {what}")
    return int(text)


def _parse_hostport(text: str, what: str) -> tuple[str, int | None]:
    """``host [":" port]`` with IPv6 references kept in brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"Unterminated IPv6 reference in {what}")
        host = text[: end + 1]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise SipParseError(f"Invalid IPv6 address in {what}") from None
        rest = text[end + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise SipParseError(f"Invalid host in {what}")
        return host, _parse_port(rest[1:], what)
    host, colon, port = text.partition(":")
    if not host or _HOSTNAME_RE.fullmatch(host) is None:
        raise SipParseError(f"Invalid host in {what}")
    if colon:
        return host, _parse_port(port, what)
    return host, None


def strip_brackets(host: str) -> str:
    """``[2001:db8::1]`` -> ``2001:db8::1``; other hosts unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def _host_for_uri(host: str) -> str:
    """An address as it must appear in a URI or Via: IPv6 in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


# --------------------------------------------------------------------------------------------
# URIs, name-addr, Via, CSeq


@dataclass(frozen=True, slots=True)
class SipUri:
    """A ``sip:``/``sips:`` URI (RFC 3261 §19.1), a ``tel:`` URI (RFC 3966), or any other scheme.

    Escaped characters stay escaped, so ``str(SipUri.parse(s))`` gives ``s`` back for any URI
    that uses the canonical layout. ``host`` keeps IPv6 brackets; ``address`` drops them. For
    ``tel:`` the number is in ``user``; for other schemes everything after ``:`` is ``opaque``.
    """

    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: tuple[Param, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    opaque: str | None = None

    @classmethod
    def parse(cls, text: str) -> SipUri:
        colon = text.find(":")
        if colon <= 0 or _SCHEME_RE.fullmatch(text[:colon]) is None:
            raise SipParseError("Invalid URI scheme")
        if _URI_BAD_RE.search(text) is not None:
            raise SipParseError("Invalid character in URI")
        scheme = text[:colon].lower()
        rest = text[colon + 1 :]
        if not rest:
            raise SipParseError("Empty URI")
        if scheme == "tel":
            number, _, tel_params = rest.partition(";")
            if not number:
                raise SipParseError("Empty tel URI")
            tel = _parse_uri_params(tel_params) if tel_params else ()
            return cls(scheme="tel", user=number, params=tel)
        if scheme not in ("sip", "sips"):
            return cls(scheme=scheme, opaque=rest)
        user: str | None = None
        password: str | None = None
        at = rest.rfind("@")
        if at >= 0:
            userinfo = rest[:at]
            rest = rest[at + 1 :]
            user, pcolon, pwd = userinfo.partition(":")
            if not user:
                raise SipParseError("Empty user part in URI")
            if pcolon:
                password = pwd
        uri_headers: tuple[tuple[str, str], ...] = ()
        qmark = rest.find("?")
        if qmark >= 0:
            uri_headers = _parse_uri_headers(rest[qmark + 1 :])
            rest = rest[:qmark]
        semi = rest.find(";")
        params: tuple[Param, ...] = ()
        if semi >= 0:
            params = _parse_uri_params(rest[semi + 1 :])
            rest = rest[:semi]
        host, port = _parse_hostport(rest, "URI")
        return cls(scheme, user, password, host, port, params, uri_headers)

    def __str__(self) -> str:
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            return f"tel:{self.user}{_format_params(self.params)}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":")
                out.append(self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        if self.params:
            out.append(_format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers))
        return "".join(out)

    @property
    def address(self) -> str:
        """The host without IPv6 brackets, as a socket API wants it."""
        return strip_brackets(self.host)

    @property
    def is_sip(self) -> bool:
        return self.scheme in ("sip", "sips")

    def param(self, name: str) -> str | None:
        """The value of URI parameter ``name`` (case-insensitive); None if absent or valueless."""
        found = _find_param(self.params, name)
        return None if found is None else found[1]

    def has_param(self, name: str) -> bool:
        return _find_param(self.params, name) is not None

    def with_param(self, name: str, value: str | None = None) -> SipUri:
        return replace(self, params=_replace_param(self.params, name, value))

    def without_param(self, name: str) -> SipUri:
        return replace(self, params=_drop_param(self.params, name))

    def without_headers(self) -> SipUri:
        return replace(self, headers=())


def _parse_uri_params(text: str) -> tuple[Param, ...]:
    out: list[Param] = []
    for piece in text.split(";"):
        name, eq, value = piece.partition("=")
        if not name:
            raise SipParseError("Empty URI parameter")
        out.append((name, value if eq else None))
    return tuple(out)


def _parse_uri_headers(text: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for piece in text.split("&"):
        name, _, value = piece.partition("=")
        if not name:
            raise SipParseError("Empty URI header")
        out.append((name, value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class NameAddr:
    """``[display-name] <URI> *(;param)`` or ``addr-spec *(;param)`` (From, To, Contact, Route).

    ``display_name`` is unquoted (escapes resolved); ``str()`` always writes the ``<>`` form.
    """

    uri: SipUri
    display_name: str | None = None
    params: tuple[Param, ...] = ()

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip(" \t")
        display: str | None = None
        if text.startswith('"'):
            end = _quoted_end(text, 0)
            if end < 0:
                raise SipParseError("Unterminated quoted display name")
            display = unquote(text[:end])
            rest = text[end:].lstrip(" \t")
            if not rest.startswith("<"):
                raise SipParseError("Display name without <URI>")
        else:
            lt = text.find("<")
            if lt >= 0:
                raw = text[:lt].strip(" \t")
                if raw:
                    if _DISPLAY_BAD_RE.search(raw) is not None:
                        raise SipParseError("Invalid character in display name")
                    display = raw
                rest = text[lt:]
            else:
                semi = text.find(";")
                uri_text = text if semi < 0 else text[:semi]
                uri_text = uri_text.rstrip(" \t")
                if not uri_text:
                    raise SipParseError("Missing URI")
                if "?" in uri_text or "," in uri_text:
                    raise SipParseError("URI with ? or , must be enclosed in <>")
                uri = SipUri.parse(uri_text)
                params = parse_header_params(text[len(uri_text) :], what="name-addr")
                return cls(uri, None, params)
        gt = rest.find(">")
        if gt < 0:
            raise SipParseError("Unterminated <URI>")
        uri = SipUri.parse(rest[1:gt])
        params = parse_header_params(rest[gt + 1 :], what="name-addr")
        return cls(uri, display, params)

    def __str__(self) -> str:
        head = (
            f"<{self.uri}>"
            if self.display_name is None
            else f"{quote(self.display_name)} <{self.uri}>"
        )
        return head + _format_params(self.params) if self.params else head

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    def param(self, name: str) -> str | None:
        found = _find_param(self.params, name)
        return None if found is None else found[1]

    def has_param(self, name: str) -> bool:
        return _find_param(self.params, name) is not None

    def with_param(self, name: str, value: str | None = None) -> NameAddr:
        return NameAddr(self.uri, self.display_name, _replace_param(self.params, name, value))

    def with_tag(self, tag: str) -> NameAddr:
        return self.with_param("tag", tag)

    def without_params(self) -> NameAddr:
        return NameAddr(self.uri, self.display_name, ())


@dataclass(frozen=True, slots=True)
class Via:
    """One Via value (RFC 3261 §20.42, RFC 3581 ``rport``); ``host`` keeps IPv6 brackets."""

    transport: str
    host: str
    port: int | None = None
    params: tuple[Param, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Via:
        m = _VIA_PROTOCOL_RE.fullmatch(text)
        if m is None:
            raise SipParseError("Malformed Via header")
        name, version, transport, rest = m.groups()
        if name.upper() != "SIP" or version != "2.0":
            raise SipParseError("Unsupported protocol in Via header")
        semi = split_outside_quotes(rest, ";", angle=False)
        sent_by = semi[0].strip(" \t")
        host, port = _parse_hostport(sent_by, "Via")
        params = parse_header_params(rest[len(semi[0]) :], what="Via")
        return cls(transport.upper(), host, port, params)

    @classmethod
    def new(
        cls,
        transport: str,
        host: str,
        port: int | None,
        *,
        branch: str | None = None,
        rport: bool = True,
    ) -> Via:
        """A Via for a request we send: fresh RFC 3261 branch unless given, ``rport`` asked."""
        params: list[Param] = [("branch", branch or generate_branch())]
        if rport:
            params.append(("rport", None))
        return cls(transport.upper(), _host_for_uri(host), port, tuple(params))

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"SIP/2.0/{self.transport} {self.host}{port}{_format_params(self.params)}"

    def param(self, name: str) -> str | None:
        found = _find_param(self.params, name)
        return None if found is None else found[1]

    def has_param(self, name: str) -> bool:
        return _find_param(self.params, name) is not None

    def with_param(self, name: str, value: str | None = None) -> Via:
        return Via(self.transport, self.host, self.port, _replace_param(self.params, name, value))

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    @property
    def received(self) -> str | None:
        return self.param("received")

    @property
    def maddr(self) -> str | None:
        return self.param("maddr")

    @property
    def rport_requested(self) -> bool:
        """True when the ``rport`` parameter is present, with or without a value."""
        return self.has_param("rport")

    @property
    def rport(self) -> int | None:
        """The ``rport`` value filled in by the server, or None (absent or a bare flag)."""
        value = self.param("rport")
        if value is None or not value.isdigit():
            return None
        return int(value)

    @property
    def sent_by(self) -> str:
        """``host:port`` as written (port 5060/5061 implied when absent)."""
        default = 5061 if self.transport == "TLS" else 5060
        return f"{self.host.lower()}:{self.port or default}"

    @property
    def has_rfc3261_branch(self) -> bool:
        branch = self.branch
        return branch is not None and branch.startswith(MAGIC_COOKIE)


@dataclass(frozen=True, slots=True)
class CSeq:
    """``CSeq: <number> <method>`` (RFC 3261 §20.16)."""

    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2:
            raise SipParseError("Malformed CSeq header")
        number, method = parts
        if not _DIGITS_RE.fullmatch(number) or len(number) > 10 or int(number) > MAX_CSEQ:
            raise SipParseError("Invalid CSeq number")
        if not is_token(method):
            raise SipParseError("Invalid CSeq method")
        return cls(int(number), method)

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


# --------------------------------------------------------------------------------------------
# Headers


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_COMPACT_FORMS: Final = {
    "i": "Call-ID",
    "m": "Contact",
    "f": "From",
    "t": "To",
    "v": "Via",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "s": "Subject",
    "e": "Content-Encoding",
    "o": "Event",
    "u": "Allow-Events",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "y": "Identity",
    "n": "Identity-Info",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
}

_KNOWN_NAMES: Final = _words(
    """
    Accept Accept-Contact Accept-Encoding Accept-Language Alert-Info Allow Allow-Events
    Authentication-Info Authorization Call-ID Call-Info Contact Content-Disposition
    Content-Encoding Content-Language Content-Length Content-Type CSeq Date Diversion Error-Info
    Event Expires From Identity Identity-Info In-Reply-To Max-Forwards Min-Expires Min-SE
    MIME-Version Organization P-Asserted-Identity P-Preferred-Identity Path Priority Privacy
    Proxy-Authenticate Proxy-Authorization Proxy-Require RAck Reason Record-Route Refer-To
    Referred-By Reject-Contact Remote-Party-ID Replaces Reply-To Request-Disposition Require
    Retry-After Route RSeq Server Service-Route Session-Expires Subject Subscription-State
    Supported Timestamp To Unsupported User-Agent Via Warning WWW-Authenticate
    """
)

_CANONICAL: Final[dict[str, str]] = {name.lower(): name for name in _KNOWN_NAMES}
for _short, _long in _COMPACT_FORMS.items():
    _CANONICAL[_short] = _long
# Exact spellings seen on the wire map straight to the canonical name (the parser's fast path).
_EXACT: Final[dict[str, str]] = {name: name for name in _KNOWN_NAMES}
_EXACT.update(_COMPACT_FORMS)
_EXACT.update({short.upper(): long for short, long in _COMPACT_FORMS.items()})

# Headers whose comma-separated values are split into one entry each (RFC 3261 §7.3.1). Never
# WWW-Authenticate, Authorization or Proxy-*-ate/-ization: their commas separate auth-params.
MULTI_VALUE_HEADERS: Final = frozenset(
    _words(
        """
    Via Route Record-Route Contact Allow Supported Require Proxy-Require Unsupported
    Allow-Events Accept Accept-Encoding Accept-Language Content-Encoding Content-Language Path
    Service-Route In-Reply-To P-Asserted-Identity
    """
    )
)


def canonical_name(name: str) -> str:
    """Compact forms expanded, known names in their canonical spelling, others left as given."""
    exact = _EXACT.get(name)
    if exact is not None:
        return exact
    return _CANONICAL.get(name.lower(), name)


class Headers:
    """Ordered, multi-valued, case-insensitive SIP header fields.

    Names are stored canonical (``v`` -> ``Via``, ``cseq`` -> ``CSeq``); unknown names keep their
    spelling but still match case-insensitively. Each value is one list element: ``Via: a, b``
    is held as two ``Via`` entries.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    @staticmethod
    def _check(name: str, value: str) -> None:
        if not is_token(name):
            raise LocalError(f"invalid SIP header name {name!r}")
        if "\n" in value or "\r" in value:
            raise LocalError(f"line break in SIP header {name!r}")

    def add(self, name: str, value: str) -> None:
        """Append one value."""
        self._check(name, value)
        self._items.append((canonical_name(name), value))

    def _add_trusted(self, name: str, value: str) -> None:
        self._items.append((name, value))

    def prepend(self, name: str, value: str) -> None:
        """Insert one value before every other header (a new top Via)."""
        self._check(name, value)
        self._items.insert(0, (canonical_name(name), value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one, at the first one's position."""
        self._check(name, value)
        key = canonical_name(name)
        lkey = key.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for item in self._items:
            if item[0].lower() == lkey:
                if not placed:
                    out.append((key, value))
                    placed = True
            else:
                out.append(item)
        if not placed:
            out.append((key, value))
        self._items = out

    def replace_first(self, name: str, value: str) -> None:
        """Replace only the first value of ``name`` (the top Via), or append it."""
        self._check(name, value)
        key = canonical_name(name)
        lkey = key.lower()
        for i, item in enumerate(self._items):
            if item[0].lower() == lkey:
                self._items[i] = (key, value)
                return
        self._items.append((key, value))

    def remove(self, name: str) -> None:
        """Drop every value of ``name`` (no error when absent)."""
        lkey = canonical_name(name).lower()
        self._items = [item for item in self._items if item[0].lower() != lkey]

    def remove_first(self, name: str) -> None:
        lkey = canonical_name(name).lower()
        for i, item in enumerate(self._items):
            if item[0].lower() == lkey:
                del self._items[i]
                return

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = canonical_name(name)
        for item in self._items:
            if item[0] == key:
                return item[1]
        lkey = key.lower()
        for item in self._items:
            if item[0].lower() == lkey:
                return item[1]
        return default

    def get_all(self, name: str) -> list[str]:
        lkey = canonical_name(name).lower()
        return [value for key, value in self._items if key.lower() == lkey]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def copy(self) -> Headers:
        new = Headers()
        new._items = list(self._items)
        return new

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


# --------------------------------------------------------------------------------------------
# Messages


class SipMessage:
    """What requests and responses share: headers, body, typed accessors, ``serialize()``.

    Accessors parse on each call and raise ``SipParseError`` when a header is missing or bad
    (``parse()`` has already validated Via, From, To, Call-ID, CSeq and Content-Length).
    """

    __slots__ = ()
    headers: Headers
    body: bytes

    def start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """Wire bytes; Content-Length is always written and always equals ``len(body)``."""
        body = self.body
        lines = [self.start_line()]
        length_written = False
        for name, value in self.headers._items:
            if name == "Content-Length":
                if length_written:
                    continue
                value = str(len(body))
                length_written = True
            lines.append(f"{name}: {value}")
        if not length_written:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body

    def _required(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise SipParseError(f"Missing {name} header")
        return value

    @property
    def call_id(self) -> str:
        return self._required("Call-ID")

    @property
    def cseq(self) -> CSeq:
        return CSeq.parse(self._required("CSeq"))

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self._required("From"))

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self._required("To"))

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag

    @property
    def via(self) -> Via:
        """The topmost Via."""
        return Via.parse(self._required("Via"))

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("Via")]

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("Max-Forwards")
        if value is None:
            return None
        value = value.strip()
        if not _DIGITS_RE.fullmatch(value) or int(value) > 255:
            raise SipParseError("Invalid Max-Forwards")
        return int(value)

    @property
    def content_type(self) -> str | None:
        """The media type, lower-cased, without parameters (``application/sdp``)."""
        value = self.headers.get("Content-Type")
        if value is None:
            return None
        return value.split(";", 1)[0].strip().lower()

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values (empty for ``Contact: *``; see ``is_star_contact``)."""
        return [NameAddr.parse(v) for v in self.headers.get_all("Contact") if v.strip() != "*"]

    @property
    def contact(self) -> NameAddr | None:
        contacts = self.contacts
        return contacts[0] if contacts else None

    @property
    def is_star_contact(self) -> bool:
        return any(v.strip() == "*" for v in self.headers.get_all("Contact"))

    @property
    def record_routes(self) -> list[NameAddr]:
        return [NameAddr.parse(v) for v in self.headers.get_all("Record-Route")]

    @property
    def routes(self) -> list[NameAddr]:
        return [NameAddr.parse(v) for v in self.headers.get_all("Route")]

    @property
    def expires(self) -> int | None:
        value = self.headers.get("Expires")
        if value is None:
            return None
        value = value.strip()
        if not _DIGITS_RE.fullmatch(value) or len(value) > 10:
            raise SipParseError("Invalid Expires")
        return int(value)


@dataclass(slots=True, eq=True)
class SipRequest(SipMessage):
    """A request. ``uri`` is the Request-URI; ``headers`` keeps order and repeats."""

    method: str
    uri: SipUri
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    raw: bytes = field(default=b"", compare=False, repr=False)
    """The message exactly as it came off the wire (empty for requests we build)."""

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"


@dataclass(slots=True, eq=True)
class SipResponse(SipMessage):
    """A response: status code, reason phrase, headers, body."""

    status: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    raw: bytes = field(default=b"", compare=False, repr=False)
    """The message exactly as it came off the wire (empty for responses we build)."""

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    @property
    def is_provisional(self) -> bool:
        return self.status < 200

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


Message = SipRequest | SipResponse

# --------------------------------------------------------------------------------------------
# Parsing

_REQUIRED: Final = ("Via", "From", "To", "Call-ID", "CSeq")


@dataclass(slots=True)
class _Head:
    start_line: str
    headers: Headers
    error: SipParseError | None


def _parse_head(text: str) -> _Head:
    """Split the header block into the start line and header fields (unfolding continuations).

    Line-level faults do not stop the parse: the first is kept in ``error`` and the remaining
    lines are still read, so the caller can answer with what it has.
    """
    lines = text.split("\n")
    start_line = lines[0].removesuffix("\r")
    headers = Headers()
    error: SipParseError | None = None
    name: str | None = None
    parts: list[str] = []
    for raw in lines[1:]:
        line = raw.removesuffix("\r")
        if not line:
            continue
        if line[0] in " \t":
            if name is None:
                if error is None:
                    error = SipParseError("Continuation line before the first header")
                continue
            parts.append(line.strip(" \t"))
            continue
        if name is not None:
            error = _add_parsed(headers, name, parts, error)
        hname, colon, value = line.partition(":")
        hname = hname.rstrip(" \t")
        if not colon or not is_token(hname):
            if error is None:
                error = SipParseError(f"Malformed header line {_printable(line, 30)!r}")
            name = None
            continue
        name = hname
        parts = [value.strip(" \t")]
    if name is not None:
        error = _add_parsed(headers, name, parts, error)
    return _Head(start_line, headers, error)


def _add_parsed(
    headers: Headers, name: str, parts: list[str], error: SipParseError | None
) -> SipParseError | None:
    key = canonical_name(name)
    value = " ".join(p for p in parts if p) if len(parts) > 1 else parts[0]
    if key in MULTI_VALUE_HEADERS and "," in value:
        try:
            pieces = split_outside_quotes(value, ",", angle=True)
        except SipParseError as exc:
            headers._add_trusted(key, value)
            return error or SipParseError(f"{exc.reason} in {key}")
        for piece in pieces:
            piece = piece.strip(" \t")
            if not piece:
                if error is None:
                    error = SipParseError(f"Empty element in {key} header")
                continue
            headers._add_trusted(key, piece)
        return error
    headers._add_trusted(key, value)
    return error


def _split_message(data: bytes, max_size: int) -> tuple[_Head, int, int]:
    """Find and parse the header block: (head, body start, message start).

    A header block longer than ``max_size`` is cut to its complete lines and the body start is -1.
    """
    start = 0
    n = len(data)
    while start < n and data[start] in (13, 10):
        start += 1
    m = _HEAD_END_RE.search(data, start)
    if m is None:
        head_bytes = data[start:]
        body_start = n
    else:
        head_bytes = data[start : m.start()]
        body_start = m.end()
    if len(head_bytes) > max_size:
        # Keep the complete lines within the limit: enough, usually, to answer 513.
        text = head_bytes[:max_size].decode("utf-8", "surrogateescape").rpartition("\n")[0]
        return _parse_head(text), -1, start
    return _parse_head(head_bytes.decode("utf-8", "surrogateescape")), body_start, start


def parse(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Parse one SIP message from a datagram (or one frame cut by ``StreamFramer``).

    Content-Length is honoured: octets past it are ignored; a shorter body is an error; without
    Content-Length the body is the rest of the datagram (RFC 3261 §18.3). Leading CRLFs are
    skipped. Raises ``SipParseError`` or ``MessageTooLarge``; nothing else.
    """
    head, body_start, start = _split_message(data, max_size)
    if body_start < 0 or len(data) - start > max_size:
        method = _method_of(head.start_line)
        raise MessageTooLarge(
            "Message Too Large", start_line=head.start_line, method=method, headers=head.headers
        )
    return _finish(head, data[start:] if start else data, body_start - start)


def _method_of(start_line: str) -> str | None:
    if start_line.startswith("SIP/"):
        return None
    method = start_line.split(" ", 1)[0]
    return method if is_token(method) else None


def _fail(head: _Head, reason: str, status: int | None = None) -> SipParseError:
    return SipParseError(
        reason,
        status_code=status,
        start_line=head.start_line,
        method=_method_of(head.start_line),
        headers=head.headers,
    )


def _content_length(head: _Head) -> int | None:
    values = head.headers.get_all("Content-Length")
    if not values:
        return None
    if len(set(values)) > 1:
        raise _fail(head, "Conflicting Content-Length headers")
    value = values[0].strip()
    if not _DIGITS_RE.fullmatch(value) or len(value) > 9:
        raise _fail(head, "Invalid Content-Length")
    return int(value)


def _finish(head: _Head, data: bytes | bytearray, body_start: int) -> Message:
    if head.error is not None:
        raise _fail(head, head.error.reason, head.error.status_code)
    line = head.start_line
    headers = head.headers
    message: Message = (
        _parse_status_line(head) if line.startswith("SIP/") else _parse_request_line(head)
    )
    for name in _REQUIRED:
        if headers.get(name) is None:
            raise _fail(head, f"Missing {name} header")
    try:
        cseq = CSeq.parse(headers["CSeq"])
        for via in headers.get_all("Via"):
            Via.parse(via)
        if len(headers.get_all("From")) != 1 or len(headers.get_all("To")) != 1:
            raise SipParseError("Exactly one From and one To are required")
        NameAddr.parse(headers["From"])
        NameAddr.parse(headers["To"])
        call_id = headers["Call-ID"].strip()
        if not call_id or " " in call_id or "\t" in call_id:
            raise SipParseError("Invalid Call-ID")
        if isinstance(message, SipRequest):
            if cseq.method != message.method:
                raise SipParseError("CSeq method does not match the Request-Line")
            message.max_forwards  # noqa: B018  (validates 0..255)
    except SipParseError as exc:
        raise _fail(head, exc.reason) from None
    length = _content_length(head)
    available = len(data) - body_start
    if length is None:
        body = bytes(data[body_start:])
    elif available < length:
        raise _fail(head, "Body shorter than Content-Length")
    else:
        body = bytes(data[body_start : body_start + length])
    message.body = body
    message.raw = bytes(data[: body_start + len(body)])
    return message


def _parse_request_line(head: _Head) -> SipRequest:
    parts = head.start_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _fail(head, "Malformed Request-Line")
    method, uri_text, version = parts
    if not is_token(method):
        raise _fail(head, "Invalid method")
    if version.upper() != SIP_VERSION:
        if version.upper().startswith("SIP/"):
            raise _fail(head, "Version Not Supported", 505)
        raise _fail(head, "Malformed Request-Line")
    try:
        uri = SipUri.parse(uri_text)
    except SipParseError as exc:
        raise _fail(head, f"Invalid Request-URI: {exc.reason}") from None
    if uri.opaque is not None:
        raise _fail(head, "Unsupported URI Scheme", 416)
    if uri.headers:
        raise _fail(head, "Request-URI must not carry headers")
    return SipRequest(method, uri, head.headers)


def _parse_status_line(head: _Head) -> SipResponse:
    version, _, rest = head.start_line.partition(" ")
    if version.upper() != SIP_VERSION:
        raise _fail(head, "Unsupported SIP version in Status-Line")
    code, _, reason = rest.partition(" ")
    if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
        raise _fail(head, "Invalid status code")
    return SipResponse(int(code), reason, head.headers)


def is_keepalive(data: bytes) -> bool:
    """True for an RFC 5626 CRLF keep-alive (``\\r\\n\\r\\n`` ping or ``\\r\\n`` pong)."""
    return bool(data) and not data.strip(b"\r\n")


class StreamFramer:
    """Cuts a stream transport's bytes into SIP messages by Content-Length (RFC 3261 §18.3).

    ``feed`` returns each complete message, or the ``SipMessageError`` for a message that was
    framed but does not parse (answer it and carry on). CRLF keep-alives between messages are
    skipped. A fault that loses the framing (oversized header block or body, bad
    Content-Length) is raised instead: close the connection. Without Content-Length the body is
    taken as empty.
    """

    def __init__(
        self,
        *,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_body_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._buffer = bytearray()
        self._max_header = max_header_size
        self._max_body = max_body_size
        self._failed = False

    @property
    def buffered(self) -> int:
        """Octets received but not yet part of a complete message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message | SipMessageError]:
        if self._failed:
            raise LocalError("StreamFramer.feed() after a framing error")
        buf = self._buffer
        buf += data
        out: list[Message | SipMessageError] = []
        while True:
            skip = 0
            while skip < len(buf) and buf[skip] in (13, 10):
                skip += 1
            if skip:
                del buf[:skip]
            if not buf:
                break
            m = _HEAD_END_RE.search(buf)
            if m is None or m.start() > self._max_header:
                if m is None and len(buf) <= self._max_header:
                    break
                self._failed = True
                head = _parse_head(bytes(buf[: self._max_header]).decode("utf-8", "replace"))
                buf.clear()
                raise MessageTooLarge(
                    "Header block too large",
                    start_line=head.start_line,
                    method=_method_of(head.start_line),
                    headers=head.headers,
                )
            head = _parse_head(bytes(buf[: m.start()]).decode("utf-8", "surrogateescape"))
            try:
                length = _content_length(head) or 0
            except SipParseError:
                self._failed = True
                buf.clear()
                raise
            if length > self._max_body:
                self._failed = True
                buf.clear()
                raise MessageTooLarge(
                    "Message Too Large",
                    start_line=head.start_line,
                    method=_method_of(head.start_line),
                    headers=head.headers,
                )
            end = m.end() + length
            if len(buf) < end:
                break
            frame = bytes(buf[:end])
            del buf[:end]
            try:
                out.append(_finish(head, frame, m.end()))
            except SipMessageError as exc:
                out.append(exc)
        return out


# --------------------------------------------------------------------------------------------
# Building messages


DIALOG_CREATING_METHODS: Final = frozenset({"INVITE", "SUBSCRIBE", "REFER"})


def generate_branch() -> str:
    """A fresh RFC 3261 branch (``z9hG4bK`` + 64 random bits)."""
    return MAGIC_COOKIE + secrets.token_hex(8)


def generate_tag() -> str:
    return secrets.token_hex(6)


def generate_call_id(host: str | None = None) -> str:
    value = secrets.token_hex(12)
    return f"{value}@{host}" if host else value


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> SipResponse:
    """A response to ``request`` per RFC 3261 §8.2.6: Via, From, To, Call-ID, CSeq copied.

    ``to_tag`` is added to To unless the request already has one (never on 100). Record-Route is
    copied for 101-299 answers to dialog-creating requests (§12.1.1).
    """
    src = request.headers
    out = Headers()
    for via in src.get_all("Via"):
        out._add_trusted("Via", via)
    out._add_trusted("From", src["From"])
    to = src["To"]
    if to_tag is not None and status > 100 and NameAddr.parse(to).tag is None:
        to = f"{to};tag={to_tag}"
    out._add_trusted("To", to)
    out._add_trusted("Call-ID", src["Call-ID"])
    out._add_trusted("CSeq", src["CSeq"])
    if 100 < status < 300 and request.method in DIALOG_CREATING_METHODS:
        for rr in src.get_all("Record-Route"):
            out._add_trusted("Record-Route", rr)
    for name, value in headers:
        out.add(name, value)
    if content_type is not None:
        out.set("Content-Type", content_type)
    return SipResponse(status, reason or REASON_PHRASES.get(status, "Unknown"), out, body)


def error_response(error: SipMessageError, *, to_tag: str | None = None) -> SipResponse | None:
    """The 400/416/505/513 answer to a request that failed to parse, if one can be routed.

    None when the bytes were a response, an ACK, or lack Via, From, To, Call-ID or CSeq.
    The reason phrase is the error's human reason.
    """
    if error.start_line is None or error.start_line.startswith("SIP/"):
        return None
    src = error.headers
    if any(src.get(name) is None for name in _REQUIRED):
        return None
    method = error.method or src["CSeq"].rpartition(" ")[2].strip()
    if method == "ACK":
        return None
    out = Headers()
    for via in src.get_all("Via"):
        out._add_trusted("Via", via)
    out._add_trusted("From", src["From"])
    to = src["To"]
    try:
        has_tag = NameAddr.parse(to).tag is not None
    except SipParseError:
        has_tag = ";tag=" in to.replace(" ", "").lower()
    if not has_tag:
        to = f"{to};tag={to_tag or generate_tag()}"
    out._add_trusted("To", to)
    out._add_trusted("Call-ID", src["Call-ID"])
    out._add_trusted("CSeq", src["CSeq"])
    return SipResponse(error.status_code, _printable(error.reason, 100), out)


def make_cancel(invite: SipRequest) -> SipRequest:
    """CANCEL for a pending INVITE (RFC 3261 §9.1): same Request-URI, Call-ID, From, To, top Via
    (so the same branch), Route; CSeq number kept with method CANCEL."""
    return request_on_invite_branch(invite, "CANCEL", invite.headers["To"])


def request_on_invite_branch(invite: SipRequest, method: str, to: str) -> SipRequest:
    """A request that travels on the INVITE's branch (CANCEL, §9.1; the ACK for a non-2xx,
    §17.1.1.3): the INVITE's Request-URI, top Via, Route, From, Call-ID and CSeq number, with
    ``method`` and the To header field value ``to``."""
    src = invite.headers
    out = Headers()
    out._add_trusted("Via", src["Via"])
    for route in src.get_all("Route"):
        out._add_trusted("Route", route)
    out._add_trusted("Max-Forwards", "70")
    out._add_trusted("From", src["From"])
    out._add_trusted("To", to)
    out._add_trusted("Call-ID", src["Call-ID"])
    out._add_trusted("CSeq", f"{invite.cseq.number} {method}")
    return SipRequest(method, invite.uri, out)
