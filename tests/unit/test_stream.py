"""media.stream: one leg's RTP in/out on the 20 ms tick, against SIPp's real captures."""

from __future__ import annotations

from pathlib import Path

from media.dtmf import DtmfReceiver
from media.g711 import PCMA, PCMU
from media.jitter import JitterBuffer, JitterOutput
from media.rtp import RtpPacket
from media.stream import FRAME_BYTES, FRAME_SAMPLES, RtpStream
from tests.pcap import read_pcap


def _packets(path: Path) -> list[tuple[float, RtpPacket]]:
    return [(d.timestamp, RtpPacket.parse(d.payload)) for d in read_pcap(path).datagrams]


class TestPacketisationToTicks:
    """SIPp's g711a.pcap carries 30 ms PCMA packets; the stream yields exact 20 ms frames."""

    def test_30ms_packets_become_20ms_frames_without_losing_audio(self, sipp_share: Path) -> None:
        packets = _packets(sipp_share / "g711a.pcap")
        stream = RtpStream(PCMA, 101)
        start = packets[0][0]
        expected = b"".join(PCMA.decode(p.payload) for _, p in packets)
        out = bytearray()
        index = 0
        now = 0.0
        while now < (packets[-1][0] - start) + 1.0:
            while index < len(packets) and packets[index][0] - start <= now:
                stream.receive(packets[index][1], now)
                index += 1
            frame = stream.pull_frame(now)
            if frame is not None:
                assert len(frame) == FRAME_BYTES
                out += frame
            now += 0.02
        stats = stream.jitter_stats
        assert stats.lost == 0
        assert stats.late == 0
        # Everything came out in order and whole; after the stream ends, the buffer conceals
        # a bounded stretch with silence (max_conceal_ms), then goes quiet.
        assert bytes(out[: len(expected)]) == expected
        tail = bytes(out[len(expected) :])
        assert tail == bytes(len(tail))
        assert len(tail) <= 8 * 300 * 2 + FRAME_BYTES

    def test_nothing_before_the_first_packet(self) -> None:
        assert RtpStream(PCMU).pull_frame(5.0) is None


class TestNextFrameDue:
    """``next_due``: when the caller's next 20 ms frame can be pulled (the session ticks right
    after it), known only for packets a frame long."""

    def test_20ms_packets_give_the_next_packets_due_time(self) -> None:
        stream = RtpStream(PCMU, jitter_min_ms=4)
        assert stream.next_due() is None
        for i in range(3):
            stream.receive(RtpPacket(0, i, 160 * i, 1, bytes(160)), 10.0 + 0.02 * i)
        due = stream.next_due()
        assert due is not None
        assert due == stream.jitter.next_due()
        assert stream.pull_frame(due - 0.001) is None
        assert stream.pull_frame(due) is not None

    def test_a_second_pull_at_the_same_time_gives_only_what_was_already_due(self) -> None:
        reads: list[float] = []

        class Counted(JitterBuffer):
            def pop(self, now: float) -> list[JitterOutput]:
                reads.append(now)
                return super().pop(now)

        stream = RtpStream(PCMU, jitter_min_ms=4)
        stream.jitter = Counted(8000, min_ms=4, samples_of=lambda pcm: len(pcm) // 2)
        for i in range(3):
            stream.receive(RtpPacket(0, i, 160 * i, 1, bytes([0xFF - i]) * 160), 10.0 + 0.02 * i)
        now = 10.05  # all three due (4 ms after their arrival): one frame a pull
        frames = [stream.pull_frame(now) for _ in range(4)]
        assert [f is not None for f in frames] == [True, True, True, False]
        assert reads == [now]  # the jitter buffer read once for this now
        stream.pull_frame(10.07)
        assert reads == [now, 10.07]

    def test_30ms_packets_give_none(self, sipp_share: Path) -> None:
        stream = RtpStream(PCMA, 101)
        now = 0.0
        for _, packet in _packets(sipp_share / "g711a.pcap")[:5]:
            stream.receive(packet, now)
            stream.pull_frame(now)
            assert stream.next_due() is None
            now += 0.03


class TestRfc4733RoundTrip:
    def test_sent_digits_decode_back(self) -> None:
        stream = RtpStream(PCMU, 101)
        assert stream.queue_dtmf("7", 100)
        receiver = DtmfReceiver()
        digits = []
        audio_packets = 0
        for tick in range(20):
            packet = RtpPacket.parse(stream.send_frame(bytes(FRAME_BYTES)))
            if packet.payload_type == 101:
                got = receiver.feed(packet, tick * 0.02)
                if got is not None:
                    digits.append(got.digit)
            else:
                audio_packets += 1
        assert digits == ["7"]
        assert audio_packets > 0

    def test_audio_timestamps_keep_running_through_dtmf(self) -> None:
        stream = RtpStream(PCMU, 101)
        first = RtpPacket.parse(stream.send_frame(bytes(FRAME_BYTES)))
        stream.queue_dtmf("1", 60)
        packets = [RtpPacket.parse(stream.send_frame(bytes(FRAME_BYTES))) for _ in range(12)]
        audio = [p for p in packets if p.payload_type == PCMU.payload_type]
        ticks_later = packets.index(audio[0]) + 1
        assert audio[0].timestamp - first.timestamp == ticks_later * FRAME_SAMPLES
        assert first.marker
        assert not audio[0].marker

    def test_no_telephone_event_negotiated(self) -> None:
        assert RtpStream(PCMU, None).queue_dtmf("1") is False


class TestInboundRouting:
    def test_dtmf_pcap_gives_its_digit(self, sipp_share: Path) -> None:
        stream = RtpStream(PCMA, 101)
        digits = [
            d.digit
            for t, p in _packets(sipp_share / "dtmf_2833_pound.pcap")
            if (d := stream.receive(p, t)) is not None
        ]
        assert digits == ["#"]

    def test_unknown_payload_type_is_counted(self) -> None:
        stream = RtpStream(PCMU, 101)
        stream.receive(RtpPacket(payload_type=18, sequence=1, timestamp=0, ssrc=1, payload=b"x"), 0)
        assert stream.counters.wrong_payload_type == 1


class TestRfc3264Section8_3_3CodecChange:
    """Defect 11: a re-negotiation from PCMU to PCMA keeps the stream: packets still in PCMU
    while the peer switches are played (transcoded), nothing is dropped, the counters go on,
    and we send PCMA from then on with the same numbering."""

    def test_old_payload_type_still_plays_after_the_switch(self) -> None:
        stream = RtpStream(PCMU, 101, ssrc=7)
        level = b"\x00\x10" * 80  # one frame at a constant 4096
        heard: list[bytes] = []
        first_out = RtpPacket.parse(stream.send_frame(level))
        for seq in range(30):
            now = seq * 0.02
            if seq == 10:
                stream.set_codec(PCMA, 101)
            codec, pt = (PCMU, 0) if seq < 20 else (PCMA, 8)  # the peer switches at 20
            stream.receive(RtpPacket(pt, seq, seq * 160, 99, codec.encode(level)), now)
            frame = stream.pull_frame(now)
            if frame is not None:
                heard.append(frame)
        for tick in range(30, 40):
            frame = stream.pull_frame(tick * 0.02)
            if frame is not None:
                heard.append(frame)
        assert stream.counters.wrong_payload_type == 0
        assert stream.counters.previous_codec == 10
        assert stream.jitter_stats.received == 30
        assert stream.jitter_stats.lost == 0
        levels = [int.from_bytes(f[:2], "little", signed=True) for f in heard]
        assert sum(1 for v in levels if abs(v - 4096) < 200) == 30, levels
        after = RtpPacket.parse(stream.send_frame(level))
        assert after.payload_type == 8
        assert after.sequence == (first_out.sequence + 1) & 0xFFFF
        assert after.ssrc == first_out.ssrc


class TestRfc4733Section2_1EventsShareTheAudioSequence:
    """Events are sent in the audio's own RTP stream (same SSRC, the next sequence numbers); the
    jitter buffer only sees audio, so the numbers an event took must not count as lost audio.
    Real loss still counts."""

    @staticmethod
    def call(with_events: bool) -> RtpStream:
        stream = RtpStream(PCMU, 101)
        ssrc = 0x5EED
        now = 0.0
        seq = 0
        ts = 0
        for _ in range(10):  # 200 ms of audio
            stream.receive(RtpPacket(0, seq, ts, ssrc, b"\xff" * 160), now)
            seq += 1
            ts += 160
            now += 0.02
            stream.pull_frame(now)
        event_ts = ts
        for n in range(6):  # a key press: 4 updates and the end packet sent 3 times... as 6
            duration = min(160 * (n + 1), 640)
            end = 0x80 if n >= 3 else 0
            payload = bytes([5, end | 10]) + duration.to_bytes(2, "big")
            if with_events:
                stream.receive(RtpPacket(101, seq, event_ts, ssrc, payload, marker=n == 0), now)
            seq += 1
            if n < 4:
                ts += 160
                now += 0.02
                stream.pull_frame(now)
        for _ in range(15):  # audio again, after the event's duration
            stream.receive(RtpPacket(0, seq, ts, ssrc, b"\xff" * 160), now)
            seq += 1
            ts += 160
            now += 0.02
            stream.pull_frame(now)
        for _ in range(10):
            now += 0.02
            stream.pull_frame(now)
        return stream

    def test_event_packets_are_not_lost_audio(self) -> None:
        stream = self.call(with_events=True)
        assert stream.counters.dtmf_in == 1
        assert stream.counters.event_packets == 6
        assert stream.jitter.stats.lost == 6  # what the buffer alone sees
        assert stream.jitter_stats.lost == 0

    def test_the_same_numbers_really_missing_are_lost(self) -> None:
        stream = self.call(with_events=False)
        assert stream.counters.event_packets == 0
        assert stream.jitter_stats.lost == 6

    def test_events_from_another_ssrc_take_nothing_from_the_audio(self) -> None:
        stream = RtpStream(PCMU, 101)
        stream.receive(RtpPacket(0, 1, 0, 0xA, b"\xff" * 160), 0.0)
        stream.receive(RtpPacket(101, 900, 160, 0xB, bytes([1, 0x8A, 0, 160])), 0.02)
        assert stream.counters.event_packets == 0
