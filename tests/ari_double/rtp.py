"""The RTP side of an externalMedia (chan_rtp ``UnicastRTP``) channel: one real UDP socket on
127.0.0.1. What the bridge gives it is sent to ``external_host`` in the channel's format as
recorded: µ-law/A-law keep the sender's packetisation (payload = the frame's samples), slin16 is
big-endian 16 kHz L16 (payload type 118) re-framed by a smoother into 640-byte 20 ms payloads;
one SSRC, marker 0, no sequence gaps, timestamp step = samples. What arrives is accepted only
from ``external_host`` itself and in the channel's payload type (stricter than Asterisk's strict
RTP learning), decoded to 8 kHz and given to the bridge; everything is counted for assertions.

Rate conversion between 8 and 16 kHz is exact in length and linear in phase
(``media.halfband``), not Asterisk's resampler: a test comparing waveforms measures the
worker, not the double.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from media.g711 import PCMA, PCMU, AudioCodec
from media.halfband import Downsample2, Upsample2
from media.l16 import SLIN16
from media.rtp import RtpPacket, RtpParseError, RtpSender

FORMATS: dict[str, AudioCodec] = {"ulaw": PCMU, "alaw": PCMA, "slin16": SLIN16}
SLIN16_FRAME_BYTES = 640
# Format names Asterisk's format cache knows but the double does not model (501, not 500).
UNMODELLED_FORMATS = frozenset(
    [
        "gsm",
        "g722",
        "g726",
        "g726aal2",
        "adpcm",
        "slin",
        "slin12",
        "slin24",
        "slin32",
        "slin44",
        "slin48",
        "slin96",
        "slin192",
        "lpc10",
        "g729",
        "speex",
        "speex16",
        "speex32",
        "ilbc",
        "g719",
        "opus",
        "siren7",
        "siren14",
        "testlaw",
    ]
)

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class RtpRecord:
    """One RTP packet seen on an externalMedia socket (``peer`` is where it came from or went)."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload_size: int
    peer: Address
    at: float = 0.0
    """The loop's time when the packet was sent or received (for benchmarks)."""


@dataclass(slots=True)
class MediaStats:
    received: list[RtpRecord] = field(default_factory=list)
    """Packets accepted from ``external_host`` and given to the bridge."""
    ignored: list[tuple[str, Address]] = field(default_factory=list)
    """(reason, source) of datagrams Asterisk would not play: other source, other payload
    type, not RTP."""
    sent: list[RtpRecord] = field(default_factory=list)


class ExternalMedia(asyncio.DatagramProtocol):
    """The UDP socket of one externalMedia channel."""

    def __init__(
        self, format_name: str, remote: Address, on_audio: Callable[[bytes], None]
    ) -> None:
        self.format_name = format_name
        self.codec = FORMATS[format_name]
        self.remote = remote
        self.stats = MediaStats()
        self._on_audio = on_audio
        self._transport: asyncio.DatagramTransport | None = None
        self._sender = RtpSender(
            self.codec.payload_type,
            secrets.randbits(32),
            timestamp=0,
            clock_rate=self.codec.clock_rate,
        )
        self._smoothed = bytearray()
        self._up = Upsample2()
        self._down = Downsample2()
        self.local: Address = ("127.0.0.1", 0)

    async def open(self, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(host, 0), family=socket.AF_INET
        )
        self._transport = transport
        address = transport.get_extra_info("sockname")
        self.local = (str(address[0]), int(address[1]))
        return self.local[1]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def closed(self) -> bool:
        return self._transport is None

    # -- towards external_host -------------------------------------------------------------------
    def send(self, pcm: bytes) -> None:
        """Send one frame of the bridge's 8 kHz PCM."""
        if self._transport is None or not pcm:
            return
        if self.codec is SLIN16:
            self._smoothed += self.codec.encode(self._up.process(pcm))
            while len(self._smoothed) >= SLIN16_FRAME_BYTES:
                payload = bytes(self._smoothed[:SLIN16_FRAME_BYTES])
                del self._smoothed[:SLIN16_FRAME_BYTES]
                self._send_payload(payload, SLIN16_FRAME_BYTES // 2)
        else:
            payload = self.codec.encode(pcm)
            self._send_payload(payload, len(payload))

    def _send_payload(self, payload: bytes, samples: int) -> None:
        assert self._transport is not None
        sequence, stamp = self._sender.next_sequence, self._sender.next_timestamp
        self._transport.sendto(self._sender.build(payload, samples), self.remote)
        self.stats.sent.append(
            RtpRecord(
                self.codec.payload_type,
                sequence,
                stamp,
                self._sender.ssrc,
                False,
                len(payload),
                self.remote,
                asyncio.get_running_loop().time(),
            )
        )

    # -- from the network ------------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        if source != self.remote:
            self.stats.ignored.append(("source is not external_host", source))
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError:
            self.stats.ignored.append(("not RTP", source))
            return
        if packet.payload_type != self.codec.payload_type:
            self.stats.ignored.append((f"payload type {packet.payload_type}", source))
            return
        self.stats.received.append(
            RtpRecord(
                packet.payload_type,
                packet.sequence,
                packet.timestamp,
                packet.ssrc,
                packet.marker,
                len(packet.payload),
                source,
                asyncio.get_running_loop().time(),
            )
        )
        pcm = self.codec.decode(packet.payload)
        if self.codec is SLIN16:
            pcm = self._down.process(pcm[: len(pcm) // 4 * 4])
        self._on_audio(pcm)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        pass
