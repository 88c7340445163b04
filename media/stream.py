"""One call leg's media, sans-I/O: RTP in → (RFC 4733 | decode → jitter buffer) → 20 ms PCM
frames on the media tick; 20 ms PCM frames (or queued DTMF) → encode → RTP out.

PCM is at the codec's clock rate: 8 kHz for G.711 (the SIP legs), 16 kHz for Asterisk's
``slin16`` (``media.l16``, the ExternalMedia legs); ``frame_bytes`` is one 20 ms frame of it.

The leg's asyncio adapter calls ``receive(packet, now)`` for each packet and, on every 20 ms tick,
``pull_frame(now)`` for the caller's audio and ``send_frame(pcm)`` for what the caller should hear.
Packets are decoded on arrival, each with the codec of its own payload type, and the jitter
buffer holds PCM: a re-negotiation that changes the codec (``set_codec``) keeps the stream, its
numbering and its counters, and packets still arriving in a previous codec while the peer
switches (or already queued) play as they should.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import deque
from dataclasses import dataclass

from media.dtmf import DtmfDigit, DtmfFrame, DtmfReceiver, DtmfSender
from media.g711 import AudioCodec
from media.jitter import Gap, JitterBuffer, JitterStats
from media.rtp import RtpPacket, RtpSender

FRAME_MS = 20
SAMPLE_RATE = 8000
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2


@dataclass(slots=True)
class StreamCounters:
    frames_in: int = 0
    frames_out: int = 0
    dtmf_in: int = 0
    dtmf_out: int = 0
    wrong_payload_type: int = 0
    previous_codec: int = 0  # packets in a codec negotiated before the current one
    pending_dropped_bytes: int = 0
    event_packets: int = 0  # RFC 4733 packets in the audio's own sequence (not lost audio)


class RtpStream:
    """Media for one negotiated RTP session with one codec and optional telephone-event. A
    re-negotiated codec (``set_codec``) must keep the clock rate."""

    def __init__(
        self,
        codec: AudioCodec,
        telephone_event_pt: int | None = None,
        *,
        jitter_min_ms: float = 40.0,
        jitter_max_ms: float = 200.0,
        jitter_early: bool = False,
        ssrc: int | None = None,
    ) -> None:
        """``jitter_early``: the caller's packets go out as soon as they are here in order,
        not at their place in the jitter buffer's playout (``JitterBuffer``'s ``early``)."""
        self.codec = codec
        self.telephone_event_pt = telephone_event_pt
        rate = codec.clock_rate
        self.rate = rate
        self.frame_samples = rate * FRAME_MS // 1000
        self.frame_bytes = self.frame_samples * 2
        self._max_pending = self.frame_bytes * 10  # 200 ms of decoded audio waiting for ticks
        self.jitter = JitterBuffer(
            rate,
            min_ms=jitter_min_ms,
            max_ms=jitter_max_ms,
            samples_of=_pcm_samples,
            early=jitter_early,
        )
        self.sender = RtpSender(
            codec.payload_type, secrets.randbits(32) if ssrc is None else ssrc, clock_rate=rate
        )
        self._dtmf_in = DtmfReceiver(rate)
        self._dtmf_out = (
            DtmfSender(telephone_event_pt, rate) if telephone_event_pt is not None else None
        )
        self._decoders: dict[int, AudioCodec] = {codec.payload_type: codec}  # every one negotiated
        self._decoded = _Decoded()
        self._dtmf_queue: deque[DtmfFrame] = deque()
        self._dtmf_start = 0
        self._pending = bytearray()
        self._popped_at: float | None = None  # the jitter buffer was last read for this now
        self._first_packet = True
        self.counters = StreamCounters()

    def set_codec(self, codec: AudioCodec, telephone_event_pt: int | None) -> None:
        """Use a re-negotiated codec from now on (sending and receiving)."""
        if codec.clock_rate != self.rate:
            raise ValueError(
                f"{codec.name} runs at {codec.clock_rate} Hz, this stream at {self.rate}"
            )
        if codec is not self.codec:
            self._decoders[codec.payload_type] = codec
            self.codec = codec
            self.sender.payload_type = codec.payload_type
        if telephone_event_pt != self.telephone_event_pt:
            self.telephone_event_pt = telephone_event_pt
            self._dtmf_out = (
                DtmfSender(telephone_event_pt, self.rate)
                if telephone_event_pt is not None
                else None
            )

    # inbound ---------------------------------------------------------------------------------
    def receive(self, packet: RtpPacket, now: float) -> DtmfDigit | None:
        """File one packet from the peer; returns a DTMF digit when a key press completes."""
        pt = packet.payload_type
        decoder = self._decoders.get(pt)
        if decoder is not None:
            if decoder is not self.codec:
                self.counters.previous_codec += 1
            decoded = self._decoded  # one reused holder: the jitter buffer keeps only the PCM
            decoded.sequence = packet.sequence
            decoded.timestamp = packet.timestamp
            decoded.ssrc = packet.ssrc
            decoded.marker = packet.marker
            decoded.payload = decoder.decode(packet.payload)
            self.jitter.push(decoded, now)
            return None
        if pt == self.telephone_event_pt:
            if packet.ssrc == self._decoded.ssrc:
                # It takes a sequence number of the audio stream (RFC 4733 §2.1: one RTP
                # stream); the jitter buffer, which only sees audio, must not call it lost.
                self.counters.event_packets += 1
            digit = self._dtmf_in.feed(packet, now)
            if digit is not None:
                self.counters.dtmf_in += 1
            return digit
        self.counters.wrong_payload_type += 1
        return None

    def poll_dtmf(self, now: float) -> DtmfDigit | None:
        """A key press whose end packets never came, reported after its timeout."""
        digit = self._dtmf_in.poll(now)
        if digit is not None:
            self.counters.dtmf_in += 1
        return digit

    def pull_frame(self, now: float) -> bytes | None:
        """The caller's next 20 ms of PCM due at ``now`` (loss concealed with silence), or None
        when the peer is not sending (before the first packet, or after a long silence). Called
        again with the same ``now`` it gives the next frame already due, if any (the jitter
        buffer is read once per ``now``)."""
        pending = self._pending
        frame_bytes = self.frame_bytes
        if now != self._popped_at:
            self._popped_at = now
            for item in self.jitter.pop(now):
                if isinstance(item, Gap):
                    pending += bytes(item.samples * 2)
                else:
                    pending += item.payload
        if len(pending) > self._max_pending:
            excess = len(pending) - self._max_pending
            excess -= excess % frame_bytes
            del pending[:excess]
            self.counters.pending_dropped_bytes += excess
        if len(pending) < frame_bytes:
            return None
        frame = bytes(pending[:frame_bytes])
        del pending[:frame_bytes]
        self.counters.frames_in += 1
        return frame

    def next_due(self) -> float | None:
        """When ``pull_frame`` can next return the caller's audio: the jitter buffer's next
        packet falls due. None before the first packet, and for packets of another length than
        a frame (30 ms ones complete the 20 ms frames at three moments of a 60 ms cycle: no one
        moment of the 20 ms is right after them all)."""
        if self._pending or self.jitter.packet_samples != self.frame_samples:
            return None
        return self.jitter.next_due()

    @property
    def jitter_stats(self) -> JitterStats:
        """The jitter buffer's figures, with the sequence numbers RFC 4733 packets took out of
        ``lost`` (the buffer sees only audio, so it finds a hole where each event packet was)."""
        stats = self.jitter.stats
        events = self.counters.event_packets
        if events and stats.lost:
            return dataclasses.replace(stats, lost=max(0, stats.lost - events))
        return stats

    # outbound --------------------------------------------------------------------------------
    def queue_dtmf(self, digit: str, duration_ms: int = 160) -> bool:
        """Queue an RFC 4733 key press to replace audio on the next ticks. False if the peer
        did not negotiate telephone-event (the caller may fall back to SIP INFO)."""
        if self._dtmf_out is None:
            return False
        self._dtmf_queue.extend(self._dtmf_out.packets_for(digit, duration_ms))
        self.counters.dtmf_out += 1
        return True

    def send_frame(self, pcm: bytes) -> bytes:
        """The RTP packet carrying this tick's 20 ms: the next DTMF frame if one is queued,
        else ``pcm`` encoded (which must be one frame, ``frame_bytes``, at the codec's rate)."""
        marker = self._first_packet
        self._first_packet = False
        queue = self._dtmf_queue
        if queue and self._dtmf_out is not None:
            frame = queue.popleft()
            if frame.marker:
                self._dtmf_start = self.sender.next_timestamp
            return self.sender.build(
                frame.payload,
                frame.samples,
                frame.marker,
                payload_type=self._dtmf_out.payload_type,
                timestamp=self._dtmf_start,
            )
        self.counters.frames_out += 1
        return self.sender.build(self.codec.encode(pcm), self.frame_samples, marker)


def _pcm_samples(pcm: bytes) -> int:
    return len(pcm) >> 1


class _Decoded:
    """A received packet with its payload decoded to PCM, as the jitter buffer reads it."""

    __slots__ = ("marker", "payload", "sequence", "ssrc", "timestamp")

    def __init__(self) -> None:
        self.sequence = 0
        self.timestamp = 0
        self.ssrc = 0
        self.marker = False
        self.payload = b""
