"""A tiny reader of classic libpcap files that yields the UDP datagrams inside them.

It knows the link types SIPp's and tcpdump's captures use (Ethernet, Linux cooked SLL and SLL2,
BSD loopback, raw IP) and IPv4/IPv6 carrying UDP; everything else is skipped, never guessed at.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = (0x8100, 0x88A8)
_IPPROTO_UDP = 17
_BSD_AF_INET6 = (10, 24, 28, 30)  # Linux, NetBSD/OpenBSD, FreeBSD, Darwin

_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


class PcapError(ValueError):
    """The file is not a classic pcap file, or it is cut short."""


class UdpDatagram(NamedTuple):
    """One captured UDP datagram: capture time in seconds, source, destination, payload."""

    timestamp: float
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


class PcapFile(NamedTuple):
    """A capture's link type and its UDP datagrams, in file order."""

    link_type: int
    datagrams: list[UdpDatagram]


def read_pcap(path: Path | str) -> PcapFile:
    """Read a whole capture file."""
    data = Path(path).read_bytes()
    link_type = _header(data)[1]
    return PcapFile(link_type, list(iter_udp(data)))


def iter_udp(data: bytes) -> Iterator[UdpDatagram]:
    """Yield every unfragmented IPv4/IPv6 UDP datagram in a pcap file's bytes."""
    (endian, tick), link_type = _header(data)
    record = struct.Struct(endian + "IIII")
    offset = 24
    while offset < len(data):
        if offset + record.size > len(data):
            raise PcapError(f"record header cut short at offset {offset}")
        ts_sec, ts_frac, incl_len, _orig_len = record.unpack_from(data, offset)
        offset += record.size
        if offset + incl_len > len(data):
            raise PcapError(f"record data cut short at offset {offset}")
        frame = memoryview(data)[offset : offset + incl_len]
        offset += incl_len
        ip = _network_layer(frame, link_type)
        if ip is None:
            continue
        datagram = _udp(ip[0], ip[1], ts_sec + ts_frac * tick)
        if datagram is not None:
            yield datagram


def _header(data: bytes) -> tuple[tuple[str, float], int]:
    if len(data) < 24:
        raise PcapError("shorter than a pcap global header")
    magic = _MAGICS.get(bytes(data[:4]))
    if magic is None:
        raise PcapError(f"not a classic pcap file (magic {data[:4].hex()}); pcapng is not read")
    (link_type,) = struct.unpack_from(magic[0] + "I", data, 20)
    return magic, link_type & 0x0FFFFFFF


def _network_layer(frame: memoryview, link_type: int) -> tuple[int, memoryview] | None:
    """Return (IP version, IP packet) for a link-layer frame, or None if it carries no IP."""
    if link_type == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            return None
        pos = 12
        (ethertype,) = struct.unpack_from("!H", frame, pos)
        while ethertype in _ETHERTYPE_VLAN and len(frame) >= pos + 6:
            pos += 4
            (ethertype,) = struct.unpack_from("!H", frame, pos)
        return _by_ethertype(ethertype, frame[pos + 2 :])
    if link_type == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return None
        return _by_ethertype(struct.unpack_from("!H", frame, 14)[0], frame[16:])
    if link_type == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return None
        return _by_ethertype(struct.unpack_from("!H", frame, 0)[0], frame[20:])
    if link_type == LINKTYPE_NULL:
        if len(frame) < 4:
            return None
        family = struct.unpack_from("<I", frame)[0]
        if family > 0xFFFF:  # written in the other byte order
            family = struct.unpack_from(">I", frame)[0]
        if family == 2:
            return 4, frame[4:]
        return (6, frame[4:]) if family in _BSD_AF_INET6 else None
    if link_type in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        if not frame:
            return None
        version = frame[0] >> 4
        return (version, frame) if version in (4, 6) else None
    return None


def _by_ethertype(ethertype: int, payload: memoryview) -> tuple[int, memoryview] | None:
    if ethertype == _ETHERTYPE_IPV4:
        return 4, payload
    if ethertype == _ETHERTYPE_IPV6:
        return 6, payload
    return None


def _udp(version: int, ip: memoryview, timestamp: float) -> UdpDatagram | None:
    if version == 4:
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return None
        header_len = (ip[0] & 0x0F) * 4
        total_len, flags_fragment = struct.unpack_from("!H2xH", ip, 2)
        if ip[9] != _IPPROTO_UDP or flags_fragment & 0x3FFF:  # not UDP, or a fragment
            return None
        src = str(ipaddress.IPv4Address(bytes(ip[12:16])))
        dst = str(ipaddress.IPv4Address(bytes(ip[16:20])))
        segment = ip[header_len : min(total_len, len(ip))] if total_len else ip[header_len:]
    elif version == 6:
        if len(ip) < 40 or ip[6] != _IPPROTO_UDP:  # extension headers are not walked
            return None
        src = str(ipaddress.IPv6Address(bytes(ip[8:24])))
        dst = str(ipaddress.IPv6Address(bytes(ip[24:40])))
        segment = ip[40:]
    else:
        return None
    if len(segment) < 8:
        return None
    src_port, dst_port, udp_len = struct.unpack_from("!HHH", segment)
    end = udp_len if 8 <= udp_len <= len(segment) else len(segment)
    return UdpDatagram(timestamp, (src, src_port), (dst, dst_port), bytes(segment[8:end]))
