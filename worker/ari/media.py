"""The audio of one Asterisk call: the RTP of its ExternalMedia channel (``channels/chan_rtp.c``)
as the 8 kHz 20 ms PCM frames of the ``Leg`` seam.

Asterisk sends from ``UNICASTRTP_LOCAL_ADDRESS:PORT`` to our socket and takes RTP back only at
that address, from the socket it sends to (strict RTP learns one source). No SDP: the payload type
is fixed by the format asked for: ``ulaw`` is PCMU (PT 0, the caller's packetisation kept, so
30 ms packets arrive as they came), ``slin16`` is big-endian 16 kHz linear (PT 118, 640-byte
20 ms payloads; ``media.l16``). A 16 kHz stream is halved to, and doubled from, the seam's
8 kHz here, frame by frame (``media.halfband``: exact sizes, 3 ms, linear phase).
Packets from any other source are counted and dropped (``RtpEndpoint`` with the source fixed).
"""

from __future__ import annotations

from media.g711 import PCMU, AudioCodec
from media.halfband import Downsample2, Upsample2
from media.l16 import SLIN16
from media.rtp import RtpPacket
from media.stream import RtpStream
from worker.config import RtpSettings
from worker.legs import SAMPLE_RATE, Address, LegObserver, MediaQuality
from worker.rtp import RtpEndpoint

FORMATS: dict[str, AudioCodec] = {"ulaw": PCMU, "slin16": SLIN16}
"""ExternalMedia ``format`` → the codec Asterisk sends and expects."""


class ExternalMedia:
    """One ExternalMedia channel's RTP: ``endpoint`` is our socket; ``connect`` fixes Asterisk's
    address once the channel exists. The leg's ``pull_frame``/``send_frame`` come here."""

    def __init__(self, endpoint: RtpEndpoint, media_format: str, rtp: RtpSettings) -> None:
        codec = FORMATS[media_format]
        self.format = media_format
        self.endpoint = endpoint
        self.stream = RtpStream(
            codec,
            None,
            jitter_min_ms=rtp.jitter_min_ms,
            jitter_max_ms=rtp.jitter_max_ms,
            jitter_early=rtp.jitter_early,
        )
        wideband = codec.clock_rate != SAMPLE_RATE
        if wideband and codec.clock_rate != 2 * SAMPLE_RATE:
            raise ValueError(f"ExternalMedia at {codec.clock_rate} Hz is not supported")
        self._down = Downsample2() if wideband else None
        self._up = Upsample2() if wideband else None
        self.remote: Address | None = None
        self.observer: LegObserver | None = None
        """The leg's observer, told of each packet filed (``LegObserver.on_caller_audio``)."""
        endpoint.attach(self)

    @property
    def local(self) -> Address:
        return self.endpoint.local

    def connect(self, remote: Address) -> None:
        """Asterisk's side of the channel (its ``UNICASTRTP_LOCAL_ADDRESS``/``PORT``): the only
        source taken, the only destination."""
        self.remote = remote
        self.endpoint.set_remote(remote, exact=True)

    # -- PacketReceiver (the endpoint) -----------------------------------------------------------
    def rtp_received(self, packet: RtpPacket, now: float) -> None:
        self.stream.receive(packet, now)
        if self.observer is not None:
            self.observer.on_caller_audio(now)

    def rtcp_received(self, data: bytes, now: float) -> None:
        """chan_rtp sends no RTCP worth reading; counted by the endpoint."""

    # -- the seam --------------------------------------------------------------------------------
    def pull_frame(self, now: float) -> bytes | None:
        frame = self.stream.pull_frame(now)
        if frame is None or self._down is None:
            return frame
        return self._down.process(frame)

    def frame_due(self) -> float | None:
        return self.stream.next_due()

    def send_frame(self, pcm: bytes) -> None:
        if self.remote is None:
            return
        if self._up is not None:
            pcm = self._up.process(pcm)
        self.endpoint.send(self.stream.send_frame(pcm))

    def quality(self) -> MediaQuality:
        counters = self.endpoint.endpoint_counters
        jitter = self.stream.jitter_stats
        return MediaQuality(
            packets_in=self.endpoint.counters.received,
            packets_out=counters.sent,
            lost=jitter.lost,
            late=jitter.late,
            concealed_ms=round(jitter.concealed_ms, 1),
            jitter_ms=round(jitter.jitter_ms, 2),
        )

    def summary(self) -> dict[str, object]:
        counters = self.endpoint.endpoint_counters
        jitter = self.stream.jitter_stats
        return {
            "media_format": self.format,
            "rtp_in": self.endpoint.counters.received,
            "rtp_out": counters.sent,
            "rtp_malformed": self.endpoint.counters.malformed,
            "rtp_foreign": counters.foreign_source,
            "rtp_wrong_payload_type": self.stream.counters.wrong_payload_type,
            "rtp_lost": jitter.lost,
            "rtp_late": jitter.late,
            "jitter_ms": round(jitter.jitter_ms, 2),
        }
