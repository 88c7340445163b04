"""SDP (RFC 4566) parsing and serialization, and the RFC 3264 offer/answer for one audio stream.

``SessionDescription.parse`` / ``serialize`` keep every line (unknown attributes such as
``a=rtcp`` pass through). ``make_offer``, ``negotiate`` (answer a remote offer) and
``process_answer`` (read the answer to our offer) reduce a session to ``NegotiatedMedia``: where
to send RTP, with which codec, telephone-event payload type, ptime, and the direction from our
point of view. ``LocalSdp`` keeps our ``o=`` line and bumps its version when our SDP changes.
Errors: ``SdpParseError`` (answer 400), ``NoCommonCodecError`` and ``UnusableAddressError``
(answer 488: a media address we cannot send to, an attacker's way to make calls that never end).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from worker.errors import LocalError, RemoteError

STATIC_PAYLOAD_TYPES: Final[dict[int, tuple[str, int]]] = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    4: ("G723", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    18: ("G729", 8000),
}
_STATIC_BY_NAME: Final = {name: pt for pt, (name, _) in STATIC_PAYLOAD_TYPES.items()}
TELEPHONE_EVENT: Final = "telephone-event"
DEFAULT_PTIME: Final = 20
_RTP_PROFILES: Final = frozenset({"RTP/AVP", "RTP/AVPF"})
_DIRECTIONS: Final = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
_LINE_RE: Final = re.compile(r"\r?\n")
_HOLD_ADDRESSES: Final = frozenset({"0.0.0.0", "::"})


class SdpParseError(RemoteError):
    """Malformed SDP or an answer that does not fit its offer: answer 400."""

    status_code = 400


class NoCommonCodecError(RemoteError):
    """No usable audio stream with a codec we support: answer 488 Not Acceptable Here."""

    status_code = 488


class UnusableAddressError(RemoteError):
    """The peer's media address cannot be sent to from our RTP socket (not an IP address, or
    of the other family): answer 488, since a call whose media cannot flow would never end."""

    status_code = 488


def check_media_address(host: str, ours: str) -> None:
    """Raise ``UnusableAddressError`` unless ``host`` is an IP address of ``ours``' family (the
    hold addresses ``0.0.0.0`` and ``::`` included)."""
    try:
        remote = ipaddress.ip_address(host)
    except ValueError:
        raise UnusableAddressError(f"Unusable media address {host[:40]!r}") from None
    try:
        local_version = ipaddress.ip_address(ours).version
    except ValueError:
        local_version = remote.version
    if remote.version != local_version:
        raise UnusableAddressError(f"Media address {host} is not IPv{local_version}")


class Direction(StrEnum):
    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def sends(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def receives(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)

    @classmethod
    def of(cls, *, sends: bool, receives: bool) -> Direction:
        if sends:
            return cls.SENDRECV if receives else cls.SENDONLY
        return cls.RECVONLY if receives else cls.INACTIVE

    def reversed(self) -> Direction:
        """The same stream seen from the other end (sendonly <-> recvonly)."""
        return Direction.of(sends=self.receives, receives=self.sends)

    def __and__(self, other: Direction) -> Direction:
        return Direction.of(
            sends=self.sends and other.sends, receives=self.receives and other.receives
        )


# --------------------------------------------------------------------------------------------
# The description


@dataclass(slots=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>``."""

    username: str
    session_id: str
    version: int
    address: str
    net_type: str = "IN"
    addr_type: str = "IP4"

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.version} "
            f"{self.net_type} {self.addr_type} {self.address}"
        )


@dataclass(slots=True)
class Connection:
    """``c=<nettype> <addrtype> <address>`` (``address`` may carry ``/ttl``)."""

    address: str
    net_type: str = "IN"
    addr_type: str = "IP4"

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return cls(address, "IN", _addr_type(address))

    @property
    def host(self) -> str:
        return self.address.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.net_type} {self.addr_type} {self.address}"


@dataclass(frozen=True, slots=True)
class RtpMap:
    payload_type: int
    encoding: str
    clock_rate: int
    channels: int | None = None

    def __str__(self) -> str:
        tail = f"/{self.channels}" if self.channels is not None else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{tail}"


@dataclass(slots=True)
class MediaDescription:
    """One ``m=`` section with its own ``c=``, other lines (i, b, k) and attributes in order."""

    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    connection: Connection | None = None
    lines: list[tuple[str, str]] = field(default_factory=list)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name:value`` (None when absent or a flag)."""
        for key, value in self.attributes:
            if key == name:
                return value
        return None

    def has_attribute(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)

    def attribute_values(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name and value is not None]

    def rtpmaps(self) -> dict[int, RtpMap]:
        """The listed payload types by number: their ``a=rtpmap``, or the static assignment
        (RFC 3551) for a static type listed without one. Unmapped dynamic types are left out."""
        mapped: dict[int, RtpMap] = {}
        for value in self.attribute_values("rtpmap"):
            rtpmap = _parse_rtpmap(value)
            if rtpmap is not None:
                mapped[rtpmap.payload_type] = rtpmap
        out: dict[int, RtpMap] = {}
        for fmt in self.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            if pt in mapped:
                out[pt] = mapped[pt]
            elif pt in STATIC_PAYLOAD_TYPES:
                name, rate = STATIC_PAYLOAD_TYPES[pt]
                out[pt] = RtpMap(pt, name, rate)
        return out

    def fmtp(self, payload_type: int) -> str | None:
        prefix = f"{payload_type} "
        for value in self.attribute_values("fmtp"):
            if value.startswith(prefix):
                return value[len(prefix) :].strip()
        return None

    @property
    def ptime(self) -> int | None:
        return _int_attribute(self.attribute("ptime"))

    @property
    def maxptime(self) -> int | None:
        return _int_attribute(self.attribute("maxptime"))

    def direction(self, default: Direction = Direction.SENDRECV) -> Direction:
        for key, _ in self.attributes:
            if key in _DIRECTIONS:
                return Direction(key)
        return default

    def __str__(self) -> str:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        out = [f"m={self.media} {port} {self.proto} {' '.join(self.formats)}".rstrip()]
        out += [f"{k}={v}" for k, v in self.lines if k == "i"]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"{k}={v}" for k, v in self.lines if k != "i"]
        out += [f"a={k}" if v is None else f"a={k}:{v}" for k, v in self.attributes]
        return "\r\n".join(out)


def _int_attribute(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if number > 0 else None


def _parse_rtpmap(value: str) -> RtpMap | None:
    pt, _, rest = value.strip().partition(" ")
    parts = rest.strip().split("/")
    if not pt.isdigit() or len(parts) < 2 or not parts[1].strip().isdigit():
        return None
    channels = int(parts[2]) if len(parts) > 2 and parts[2].strip().isdigit() else None
    return RtpMap(int(pt), parts[0].strip(), int(parts[1]), channels)


# Session-level line order (RFC 4566 §5): v o s i u e p c b t r z k a, then the media.
_SESSION_ORDER_BEFORE_C: Final = ("i", "u", "e", "p")
_SESSION_ORDER_AFTER_T: Final = ("z", "k")


@dataclass(slots=True)
class SessionDescription:
    origin: Origin
    session_name: str = "-"
    connection: Connection | None = None
    timing: list[tuple[str, str]] = field(default_factory=lambda: [("t", "0 0")])
    lines: list[tuple[str, str]] = field(default_factory=list)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[MediaDescription] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        origin: Origin | None = None
        session_name: str | None = None
        connection: Connection | None = None
        timing: list[tuple[str, str]] = []
        lines: list[tuple[str, str]] = []
        attributes: list[tuple[str, str | None]] = []
        media: list[MediaDescription] = []
        current: MediaDescription | None = None
        raw_lines = [line for line in _LINE_RE.split(text) if line.strip()]
        if not raw_lines or raw_lines[0].strip() != "v=0":
            raise SdpParseError("SDP must start with v=0")
        for line in raw_lines[1:]:
            if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
                raise SdpParseError(f"Malformed SDP line {line[:30]!r}")
            kind, value = line[0], line[2:]
            if kind == "m":
                current = _parse_media(value)
                media.append(current)
            elif kind == "a":
                name, colon, attr = value.partition(":")
                item = (name.strip(), attr if colon else None)
                (current.attributes if current is not None else attributes).append(item)
            elif kind == "c":
                conn = _parse_connection(value)
                if current is not None:
                    current.connection = conn
                else:
                    connection = conn
            elif current is not None:
                current.lines.append((kind, value))
            elif kind == "o":
                origin = _parse_origin(value)
            elif kind == "s":
                session_name = value
            elif kind in ("t", "r"):
                if kind == "t" and not _valid_timing(value):
                    raise SdpParseError("Malformed t= line")
                timing.append((kind, value))
            elif kind == "v":
                raise SdpParseError("Repeated v= line")
            else:
                lines.append((kind, value))
        if origin is None:
            raise SdpParseError("SDP without o= line")
        return cls(
            origin=origin,
            session_name=session_name if session_name is not None else "-",
            connection=connection,
            timing=timing or [("t", "0 0")],
            lines=lines,
            attributes=attributes,
            media=media,
        )

    def serialize(self) -> bytes:
        return (str(self) + "\r\n").encode()

    def __str__(self) -> str:
        out = ["v=0", f"o={self.origin}", f"s={self.session_name}"]
        out += [f"{k}={v}" for k, v in self.lines if k in _SESSION_ORDER_BEFORE_C]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"{k}={v}" for k, v in self.lines if k == "b"]
        out += [f"{k}={v}" for k, v in self.timing]
        out += [f"{k}={v}" for k, v in self.lines if k in _SESSION_ORDER_AFTER_T]
        known = {"b", *_SESSION_ORDER_BEFORE_C, *_SESSION_ORDER_AFTER_T}
        out += [f"{k}={v}" for k, v in self.lines if k not in known]
        out += [f"a={k}" if v is None else f"a={k}:{v}" for k, v in self.attributes]
        out += [str(m) for m in self.media]
        return "\r\n".join(out)

    @property
    def direction(self) -> Direction:
        """The session-level direction attribute (sendrecv when absent)."""
        for key, _ in self.attributes:
            if key in _DIRECTIONS:
                return Direction(key)
        return Direction.SENDRECV

    def media_direction(self, media: MediaDescription) -> Direction:
        return media.direction(self.direction)

    def media_connection(self, media: MediaDescription) -> Connection | None:
        return media.connection or self.connection


def _parse_origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6 or not parts[2].isdigit():
        raise SdpParseError("Malformed o= line")
    return Origin(parts[0], parts[1], int(parts[2]), parts[5], parts[3], parts[4])


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpParseError("Malformed c= line")
    return Connection(parts[2], parts[0], parts[1])


def _valid_timing(value: str) -> bool:
    parts = value.split()
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _parse_media(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise SdpParseError("Malformed m= line")
    port_text, slash, count = parts[1].partition("/")
    if not port_text.isdigit() or int(port_text) > 65535 or (slash and not count.isdigit()):
        raise SdpParseError("Invalid port in m= line")
    return MediaDescription(
        media=parts[0],
        port=int(port_text),
        proto=parts[2],
        formats=parts[3:],
        port_count=int(count) if slash else None,
    )


# --------------------------------------------------------------------------------------------
# Offer / answer


@dataclass(frozen=True, slots=True)
class NegotiatedMedia:
    """The outcome of an offer/answer for the audio stream, from our point of view.

    ``direction`` is ours (``sends``: we may send RTP). ``remote_hold`` is True when the peer
    asked not to receive (sendonly / inactive / ``c=0.0.0.0``). ``ptime`` is the packetization
    to send with (the peer's ``a=ptime``, else ours).
    """

    remote_address: str
    remote_port: int
    codec: str
    payload_type: int
    clock_rate: int
    telephone_event_pt: int | None
    ptime: int
    direction: Direction
    remote_hold: bool
    rtcp_port: int = 0
    """Where the peer takes RTCP: its ``a=rtcp`` port (RFC 3605), else the RTP port + 1; with
    ``rtcp_mux`` the RTP port itself (RFC 5761)."""
    rtcp_mux: bool = False


def _rtcp_of(media: MediaDescription, mux: bool) -> int:
    """The peer's RTCP port for ``media`` (RFC 3605 ``a=rtcp``, RFC 5761 mux, else port + 1)."""
    if mux:
        return media.port
    value = media.attribute("rtcp")
    if value:
        first = value.split()[0]
        if first.isdigit() and 0 < int(first) < 65536:
            return int(first)
    return media.port + 1


def _codec_names(codecs: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in codecs:
        upper = name.upper()
        if upper not in _STATIC_BY_NAME:
            raise LocalError(f"codec {name!r} has no static payload type")
        out.append(upper)
    return out


def _audio_section(
    port: int,
    codecs: Sequence[tuple[int, str, int]],
    telephone_event: tuple[int, str] | None,
    ptime: int,
    direction: Direction,
) -> MediaDescription:
    formats = [str(pt) for pt, _, _ in codecs]
    attributes: list[tuple[str, str | None]] = [
        ("rtpmap", f"{pt} {name}/{rate}") for pt, name, rate in codecs
    ]
    if telephone_event is not None:
        pt, events = telephone_event
        formats.append(str(pt))
        attributes.append(("rtpmap", f"{pt} {TELEPHONE_EVENT}/8000"))
        attributes.append(("fmtp", f"{pt} {events}"))
    attributes.append(("ptime", str(ptime)))
    attributes.append((str(direction), None))
    return MediaDescription("audio", port, "RTP/AVP", formats, attributes=attributes)


def make_offer(
    address: str,
    port: int,
    *,
    codecs: Iterable[str] = ("PCMU", "PCMA"),
    telephone_event_pt: int | None = 101,
    ptime: int = DEFAULT_PTIME,
    direction: Direction = Direction.SENDRECV,
    origin: Origin | None = None,
) -> SessionDescription:
    """An audio offer (RFC 3264 §5) for G.711 and friends, in ``codecs`` preference order."""
    listed = [(_STATIC_BY_NAME[name], name, 8000) for name in _codec_names(codecs)]
    event = (telephone_event_pt, "0-16") if telephone_event_pt is not None else None
    return SessionDescription(
        origin=origin or Origin("-", _new_session_id(), 1, address, "IN", _addr_type(address)),
        connection=Connection.for_address(address),
        media=[_audio_section(port, listed, event, ptime, direction)],
    )


def _addr_type(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _new_session_id() -> str:
    return str(secrets.randbelow(2**62) + 1)


@dataclass(frozen=True, slots=True)
class _Pick:
    index: int
    codec: RtpMap
    telephone_event: RtpMap | None


def _pick_codec(
    media: MediaDescription, allowed: Sequence[str]
) -> tuple[RtpMap, RtpMap | None] | None:
    """The first format of ``media`` (in its own order) whose encoding is in ``allowed``."""
    maps = media.rtpmaps()
    codec: RtpMap | None = None
    event: RtpMap | None = None
    for fmt in media.formats:
        if not fmt.isdigit():
            continue
        rtpmap = maps.get(int(fmt))
        if rtpmap is None:
            continue
        name = rtpmap.encoding.upper()
        if name == TELEPHONE_EVENT.upper():
            if event is None:
                event = rtpmap
        elif codec is None and name in allowed and rtpmap.clock_rate == 8000:
            codec = rtpmap
    if codec is None:
        return None
    if event is not None and event.clock_rate != codec.clock_rate:
        event = None
    return codec, event


def _usable_audio(media: MediaDescription) -> bool:
    return media.media == "audio" and media.port != 0 and media.proto.upper() in _RTP_PROFILES


def negotiate(
    offer: SessionDescription,
    supported: Iterable[str] = ("PCMU", "PCMA"),
    *,
    address: str,
    port: int,
    ptime: int = DEFAULT_PTIME,
    direction: Direction = Direction.SENDRECV,
    telephone_event: bool = True,
    origin: Origin | None = None,
) -> tuple[SessionDescription, NegotiatedMedia]:
    """Answer a remote offer (RFC 3264 §6): accept the first usable audio stream with the first
    codec of the offer's list that we support, reject every other stream (port 0).

    Raises ``NoCommonCodecError`` when no audio stream can be accepted.
    """
    allowed = _codec_names(supported)
    chosen: _Pick | None = None
    for index, media in enumerate(offer.media):
        if not _usable_audio(media):
            continue
        picked = _pick_codec(media, allowed)
        if picked is not None:
            chosen = _Pick(index, picked[0], picked[1] if telephone_event else None)
            break
    if chosen is None:
        raise NoCommonCodecError("No common codec")
    offered = offer.media[chosen.index]
    remote_connection = offer.media_connection(offered)
    if remote_connection is None:
        raise SdpParseError("Offer has no c= line for its audio stream")
    remote_dir = offer.media_direction(offered)
    remote_host = remote_connection.host
    check_media_address(remote_host, address)
    remote_hold = not remote_dir.receives or remote_host in _HOLD_ADDRESSES
    ours = remote_dir.reversed() & direction
    if remote_host in _HOLD_ADDRESSES:
        ours = ours & Direction.RECVONLY
    sections: list[MediaDescription] = []
    for index, media in enumerate(offer.media):
        if index == chosen.index:
            codec = chosen.codec
            event = chosen.telephone_event
            event_spec = None
            if event is not None:
                event_spec = (event.payload_type, offered.fmtp(event.payload_type) or "0-15")
            section = _audio_section(
                port,
                [(codec.payload_type, codec.encoding, codec.clock_rate)],
                event_spec,
                ptime,
                ours,
            )
            if offered.has_attribute("rtcp-mux"):  # RFC 5761 §5.1.1: accept the offer of mux
                section.attributes.append(("rtcp-mux", None))
            sections.append(section)
        else:
            sections.append(
                MediaDescription(media.media, 0, media.proto, list(media.formats) or ["0"])
            )
    answer = SessionDescription(
        origin=origin or Origin("-", _new_session_id(), 1, address, "IN", _addr_type(address)),
        connection=Connection.for_address(address),
        media=sections,
    )
    negotiated = NegotiatedMedia(
        remote_address=remote_host,
        remote_port=offered.port,
        codec=chosen.codec.encoding.upper(),
        payload_type=chosen.codec.payload_type,
        clock_rate=chosen.codec.clock_rate,
        telephone_event_pt=chosen.telephone_event.payload_type if chosen.telephone_event else None,
        ptime=offered.ptime or ptime,
        direction=ours,
        remote_hold=remote_hold,
        rtcp_port=_rtcp_of(offered, offered.has_attribute("rtcp-mux")),
        rtcp_mux=offered.has_attribute("rtcp-mux"),
    )
    return answer, negotiated


def process_answer(
    offer: SessionDescription, answer: SessionDescription, *, address: str | None = None
) -> NegotiatedMedia:
    """Read the peer's answer to ``offer`` (RFC 3264 §7) for our first audio stream.

    Raises ``SdpParseError`` when the answer does not match the offer's m-lines and
    ``NoCommonCodecError`` when the audio stream was rejected or answered with a codec we did
    not offer.
    """
    if len(answer.media) != len(offer.media):
        raise SdpParseError("Answer and offer have different numbers of m-lines")
    for index, ours in enumerate(offer.media):
        if not _usable_audio(ours):
            continue
        theirs = answer.media[index]
        if theirs.port == 0:
            raise NoCommonCodecError("Audio stream rejected")
        offered_names = [m.encoding.upper() for m in ours.rtpmaps().values()]
        picked = _pick_codec(theirs, offered_names)
        if picked is None:
            raise NoCommonCodecError("Answer has no codec from the offer")
        codec, event = picked
        connection = answer.media_connection(theirs)
        if connection is None:
            raise SdpParseError("Answer has no c= line for its audio stream")
        their_dir = answer.media_direction(theirs)
        host = connection.host
        check_media_address(host, address or host)
        direction = their_dir.reversed() & offer.media_direction(ours)
        if host in _HOLD_ADDRESSES:
            direction = direction & Direction.RECVONLY
        offered_event = any(m.encoding.lower() == TELEPHONE_EVENT for m in ours.rtpmaps().values())
        mux = ours.has_attribute("rtcp-mux") and theirs.has_attribute("rtcp-mux")
        return NegotiatedMedia(
            remote_address=host,
            remote_port=theirs.port,
            codec=codec.encoding.upper(),
            payload_type=codec.payload_type,
            clock_rate=codec.clock_rate,
            telephone_event_pt=event.payload_type if event and offered_event else None,
            ptime=theirs.ptime or ours.ptime or DEFAULT_PTIME,
            direction=direction,
            remote_hold=not their_dir.receives or host in _HOLD_ADDRESSES,
            rtcp_port=_rtcp_of(theirs, mux),
            rtcp_mux=mux,
        )
    raise LocalError("our offer has no audio stream")


class LocalSdp:
    """Our side of one session's SDP: a fixed ``o=`` session id, and a version that goes up by
    one whenever the SDP we send differs from the previous one (RFC 3264 §8)."""

    def __init__(
        self,
        address: str,
        *,
        session_id: str | None = None,
        username: str = "-",
        first_version: int = 1,
    ) -> None:
        self.address = address
        self.origin = Origin(
            username,
            session_id or _new_session_id(),
            first_version,
            address,
            "IN",
            _addr_type(address),
        )
        self._last: str | None = None

    def _stamp(self, sdp: SessionDescription) -> SessionDescription:
        content = str(replace(sdp, origin=replace(self.origin, version=0)))
        if self._last is not None and content != self._last:
            self.origin.version += 1
        self._last = content
        sdp.origin = replace(self.origin)
        return sdp

    def offer(
        self,
        port: int,
        *,
        codecs: Iterable[str] = ("PCMU", "PCMA"),
        telephone_event_pt: int | None = 101,
        ptime: int = DEFAULT_PTIME,
        direction: Direction = Direction.SENDRECV,
    ) -> SessionDescription:
        """An offer (initial or re-offer, e.g. ``direction=SENDONLY`` to hold)."""
        sdp = make_offer(
            self.address,
            port,
            codecs=codecs,
            telephone_event_pt=telephone_event_pt,
            ptime=ptime,
            direction=direction,
            origin=self.origin,
        )
        return self._stamp(sdp)

    def answer(
        self,
        offer: SessionDescription,
        port: int,
        *,
        codecs: Iterable[str] = ("PCMU", "PCMA"),
        ptime: int = DEFAULT_PTIME,
        direction: Direction = Direction.SENDRECV,
        telephone_event: bool = True,
    ) -> tuple[SessionDescription, NegotiatedMedia]:
        sdp, negotiated = negotiate(
            offer,
            codecs,
            address=self.address,
            port=port,
            ptime=ptime,
            direction=direction,
            telephone_event=telephone_event,
            origin=self.origin,
        )
        return self._stamp(sdp), negotiated
