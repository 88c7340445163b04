"""The load test's sans-I/O parts: the probes' timing marker through the worker's real audio path
(G.711 µ-law, 8 → 16 kHz to the agent, 16 → 8 kHz back, µ-law again, with ``media/``'s own
codec and resampler), marker pairing and the figures, the probes' receive statistics, the bulk
callers' RTP capture (read back with the tests' pcap reader) and the worker config it writes."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media.dtmf import TelephoneEvent
from media.g711 import ulaw_decode, ulaw_encode
from media.resample import Resampler
from media.rtp import RtpPacket
from tests.pcap import read_pcap
from worker.config import load_settings
from worker.loadtest import analysis, run, sipp
from worker.loadtest.marker import FREQUENCIES, MarkerDetector, marker_id, marker_tone
from worker.loadtest.rtpstats import ReceiveStats
from worker.loadtest.run import Options, worker_config

FRAME = 160  # samples at 8 kHz
PERIOD = 25  # frames between markers, as the probes send them
LEAD = 10


def probe_stream(frames: int, seed: int = 7) -> tuple[list[bytes], dict[int, int]]:
    """A probe's 8 kHz frames (quiet noise, a marker every 0.5 s) and {marker count: frame}."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(-40, 41, FRAME).astype("<i2").tobytes() for _ in range(frames)]
    starts = {}
    for count, first in enumerate(range(LEAD, frames - 3, PERIOD)):
        tone = marker_tone(marker_id(count), 8000)
        for j in range(3):
            out[first + j] = tone[j * 2 * FRAME : (j + 1) * 2 * FRAME]
        starts[count] = first
    return out, starts


def through_the_worker(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """What the agent receives (16 kHz) and what the phone gets back (8 kHz) for each frame
    sent: µ-law on the wire, the worker's resampling each way, µ-law again towards the phone."""
    up = Resampler(8000, 16000)
    down = Resampler(16000, 8000)
    to_agent, back = [], []
    for frame in frames:
        agent = up.process(ulaw_decode(ulaw_encode(frame)))
        to_agent.append(agent)
        back.append(ulaw_decode(ulaw_encode(down.process(agent))))
    return to_agent, back


def detect(chunks: list[bytes], rate: int) -> list[tuple[int, int]]:
    """(marker id, index of the chunk holding the onset) for each marker heard."""
    detector = MarkerDetector(rate)
    found = []
    for index, chunk in enumerate(chunks):
        found += [(d.marker_id, int(d.at)) for d in detector.feed(chunk, float(index))]
    assert detector.rejected == 0
    return found


class TestMarkerThroughG711AndResampling:
    def test_every_marker_is_heard_at_the_agent_and_back_at_the_phone(self) -> None:
        frames, starts = probe_stream(400)
        to_agent, back = through_the_worker(frames)
        for chunks, rate in ((to_agent, 16000), (back, 8000)):
            heard = detect(chunks, rate)
            assert [m for m, _ in heard] == [marker_id(c) for c in sorted(starts)]
            # Timed by the frame that held the onset: the resamplers' delay moves it by at
            # most two frames (about 10 ms each way here), never earlier than sent.
            delays = [frame - starts[count] for count, (_, frame) in enumerate(heard)]
            assert all(0 <= d <= 3 for d in delays), delays
            assert len(set(delays)) == 1, "the same path delays every marker alike"

    def test_chunk_sizes_do_not_matter(self) -> None:
        frames, starts = probe_stream(200)
        to_agent, _ = through_the_worker(frames)
        stream = b"".join(to_agent)
        detector = MarkerDetector(16000)
        heard = []
        for offset in range(0, len(stream), 222):  # 6.9 ms chunks
            heard += detector.feed(stream[offset : offset + 222], offset / 32000)
        assert [d.marker_id for d in heard] == [marker_id(c) for c in sorted(starts)]
        for count, detection in enumerate(heard):
            onset = detection.at + detection.offset_s
            assert 0 <= onset - starts[count] * 0.02 < 0.03
            assert abs(detection.frequency_hz - FREQUENCIES[marker_id(count)]) < 30

    def test_one_burst_is_one_marker(self) -> None:
        tone = marker_tone(3, 8000)
        detector = MarkerDetector(8000)
        quiet = bytes(2 * FRAME * 10)
        heard = detector.feed(quiet + tone + quiet, 0.0)
        assert [d.marker_id for d in heard] == [3]
        assert detector.feed(quiet, 1.0) == []

    def test_speech_and_noise_are_not_markers(self) -> None:
        detector = MarkerDetector(8000)
        speech = sipp.speech_like(5.0)
        noise = np.random.default_rng(1).integers(-300, 301, 8000 * 2).astype("<i2").tobytes()
        assert detector.feed(speech, 0.0) == []
        assert detector.feed(noise, 1.0) == []


class TestMarkerPairing:
    def test_a_lost_marker_does_not_shift_the_others(self) -> None:
        sent = [(count, 10.0 + 0.5 * count) for count in range(20)]
        heard = [(marker_id(c), t + 0.07) for c, t in sent if c != 5]
        paired = analysis.pair_markers(sent, heard)
        assert 5 not in paired
        assert all(abs(paired[c] - (t + 0.07)) < 1e-9 for c, t in sent if c != 5)

    def test_ids_repeat_every_eight_markers_so_latency_up_to_4_s_pairs(self) -> None:
        sent = [(count, 0.5 * count) for count in range(20)]
        heard = [(marker_id(2), 1.0 + 3.9)]  # marker 2, 3.9 s late
        assert analysis.pair_markers(sent, heard) == {2: pytest.approx(4.9)}
        assert analysis.pair_markers(sent, [(marker_id(2), 1.0 + 4.1)]) == {10: 5.1}

    def test_latency_samples_split_the_round_trip_at_the_agent(self) -> None:
        probes = [{"index": 0, "markers_sent": [[0, 1.0], [1, 1.5]], "echoes": [[0, 1.13, 500]]}]
        agent = [{"probe": 0, "marker_id": 0, "at": 1.07}, {"probe": 1, "marker_id": 1, "at": 1.6}]
        [sample] = analysis.latency_samples(probes, agent)
        assert sample.to_agent_ms == pytest.approx(70)
        assert sample.from_agent_ms == pytest.approx(60)
        assert sample.round_trip_ms == pytest.approx(130)


class TestFigures:
    def test_hold_window_is_where_every_call_is_up(self) -> None:
        timeline = [{"at": float(t), "calls": c} for t, c in enumerate([0, 4, 9, 10, 10, 10, 6])]
        assert analysis.hold_window(timeline, 10) == (3.0, 5.0)
        assert analysis.hold_window(timeline[:3], 10) == (2.0, 2.0)  # never got there: 90 %

    def test_cpu_and_memory_per_call(self) -> None:
        timeline = [
            {
                "at": float(i),
                "calls": c,
                "worker_cpu_percent": 5 + 2.0 * c,
                "worker_pss_kb": 1000 + 300 * c,
            }
            for i, c in enumerate([0, 5, 10, 10, 10])
        ]
        # The ramp down is not fitted: memory is not given back as calls end.
        timeline.append({"at": 5.0, "calls": 2, "worker_cpu_percent": 9, "worker_pss_kb": 4000})
        figures = analysis.resources(
            timeline, {"worker_cpu_percent": 5.0, "worker_pss_kb": 1000}, (2.0, 4.0), 10
        )
        assert figures["cpu_hold_percent"] == 25.0
        assert figures["cpu_per_call_percent"] == 2.5
        assert figures["cpu_slope_percent_per_call"] == pytest.approx(2.0)
        assert figures["pss_per_call_kb"] == 300.0
        assert figures["pss_slope_kb_per_call"] == pytest.approx(300.0)

    def test_the_workers_lost_count_is_taken_as_it_is(self) -> None:
        # 24 telephone-event packets (3 keys of 8) arrived beside 500 audio packets; the
        # worker's rtp_lost leaves their sequence numbers out (media/stream.py), so its one lost
        # audio packet is the loss, and the event packets are only reported.
        records = [{"rtp_in": 524, "rtp_played": 500, "rtp_lost": 1, "rtp_late": 0}]
        loss = analysis.loss_figures([], records)["caller_to_worker"]
        assert (loss["lost"], loss["packets"], loss["lost_in_network"]) == (1, 501, 1)
        assert loss["non_audio_packets"] == 24

    def test_late_packets_count_as_lost_audio(self) -> None:
        # 398 audio packets came, 2 of them after their playout; 2 never came: 4 of 400.
        records = [{"rtp_in": 398, "rtp_played": 398, "rtp_lost": 2, "rtp_late": 2}]
        loss = analysis.loss_figures([], records)["caller_to_worker"]
        assert (loss["lost_in_network"], loss["late"], loss["lost"]) == (2, 2, 4)
        assert loss["percent"] == 1.0

    def test_packets_discarded_by_a_worker_that_fell_behind_count_as_lost(self) -> None:
        # The jitter buffer overflowed (the worker did not take frames for a while): the
        # packets arrived, but never reached the agent.
        records = [{"rtp_in": 1000, "rtp_played": 1000, "rtp_lost": 0, "rtp_overflow": 50}]
        loss = analysis.loss_figures([], records)["caller_to_worker"]
        assert (loss["lost"], loss["discarded"], loss["lost_in_network"]) == (50, 50, 0)
        assert loss["percent"] == 5.0

    def test_ticks_the_worker_skipped_count_as_lost_towards_the_caller(self) -> None:
        # Answered 20 s: 1,000 packets due. One call sent them all (and 3 more: its clock ran
        # a little ahead, nothing is owed back), the other skipped 250 ticks.
        records = [
            {"seconds": 20.0, "rtp_out": 1003},
            {"seconds": 20.0, "rtp_out": 750},
        ]
        loss = analysis.loss_figures([], records)["worker_to_caller"]
        assert (loss["packets"], loss["lost"], loss["calls"]) == (2000, 250, 2)
        assert loss["percent"] == 12.5

    def test_a_part_of_a_period_at_the_end_is_not_owed(self) -> None:
        # 39.611 s: 1,980 whole periods; the tick of a 1,981st may have come after the hangup.
        # A whole period without a packet is still lost.
        records = [{"seconds": 39.611, "rtp_out": 1980}, {"seconds": 39.611, "rtp_out": 1979}]
        loss = analysis.loss_figures([], records)["worker_to_caller"]
        assert (loss["packets"], loss["lost"]) == (3960, 1)

    def test_probe_loss_both_ways(self) -> None:
        probes = [
            {
                "first_sequence": 100,
                "rtcp": {"highest_sequence": 199, "cumulative_lost": 2},
                "received": {"expected": 300, "lost": 3},
            }
        ]
        loss = analysis.loss_figures(probes, None)
        assert loss["caller_to_worker_probes"]["percent"] == 2.0
        assert loss["worker_to_caller_probes"]["percent"] == 1.0
        assert "caller_to_worker" not in loss


class TestReceiveStats:
    def test_loss_duplicates_and_wrap(self) -> None:
        stats = ReceiveStats()
        arrival = 0.0
        for sequence in [65530, 65531, 65533, 65533, 65534, 65535, 0, 1, 3]:
            stats.on_packet(sequence, sequence * 160 & 0xFFFFFFFF, arrival)
            arrival += 0.02
        assert stats.expected == 10  # 65530 .. 3 across the wrap
        assert (stats.received, stats.duplicates, stats.lost) == (8, 1, 2)

    def test_pacing_is_each_inter_arrival_against_20_ms(self) -> None:
        stats = ReceiveStats()
        for sequence, arrival in enumerate([0.0, 0.020, 0.043, 0.058, 0.080]):
            stats.on_packet(sequence, sequence * 160, arrival)
        assert stats.pacing_deviations_s == pytest.approx([0.0, 0.003, 0.005, 0.002])
        assert stats.jitter_s > 0


class TestBulkCallersCapture:
    def test_one_stream_with_the_keys_in_it(self, tmp_path: Path) -> None:
        path = tmp_path / "bulk.pcap"
        sipp.write_capture(path, 4.0)
        datagrams = read_pcap(path).datagrams
        assert len(datagrams) == 200
        packets = [RtpPacket.parse(d.payload) for d in datagrams]
        assert [p.sequence for p in packets] == list(range(200))
        assert {p.ssrc for p in packets} == {sipp.SSRC}
        times = [d.timestamp for d in datagrams]
        assert np.allclose(np.diff(times), 0.02, atol=2e-6)
        events = [p for p in packets if p.payload_type == sipp.PT_EVENT]
        digits: list[tuple[str | None, int]] = []
        for packet in events:
            event = TelephoneEvent.parse(packet.payload)
            if event.end and (not digits or digits[-1][1] != packet.timestamp):
                digits.append((event.digit, packet.timestamp))
        assert "".join(d or "?" for d, _ in digits) == sipp.DIGITS
        ends = [p for p in events if TelephoneEvent.parse(p.payload).end]
        assert len(ends) == 3 * len(sipp.DIGITS)  # RFC 4733 §2.5.1.4
        audio = [p for p in packets if p.payload_type == sipp.PT_PCMU]
        assert all(len(p.payload) == 160 for p in audio)
        assert all(p.timestamp == p.sequence * 160 for p in audio)
        assert sipp.digits_pressed(4.0) == 3
        assert sipp.digits_pressed(2.0) == 1

    def test_the_scenario_plays_the_capture(self, tmp_path: Path) -> None:
        sipp.prepare(tmp_path / "sipp", tmp_path / "bulk.pcap", 3.0)
        text = (tmp_path / "sipp" / "scenario.xml").read_text()
        assert f'play_pcap_audio="{tmp_path / "bulk.pcap"}"' in text
        assert "m=audio [auto_media_port] RTP/AVP 0 101" in text


class TestWorkerConfig:
    def test_the_worker_accepts_it(self, tmp_path: Path) -> None:
        options = Options(calls=10, probes=2, processes=2, record=False, protocol="twilio")
        text = worker_config(
            options, tmp_path, sip_port=15060, rtp_min=24000, rtp_max=24199,
            agent_url="ws://127.0.0.1:9000/",
        )  # fmt: skip
        (tmp_path / "worker.toml").write_text(text)
        settings = load_settings(tmp_path / "worker.toml")
        assert settings.processes == 2
        assert settings.sip.rate_limit_per_second >= 100000
        routes = [(r.match, r.agent_url, r.protocol, r.record) for r in settings.routes]
        assert routes == [
            ("loadtest-probe-0", "ws://127.0.0.1:9000/probe/0", "twilio", False),
            ("loadtest-probe-1", "ws://127.0.0.1:9000/probe/1", "twilio", False),
            ("loadtest*", "ws://127.0.0.1:9000/", "twilio", False),
        ]


def test_marker_tone_is_loud_and_short() -> None:
    tone = np.frombuffer(marker_tone(0, 8000), dtype="<i2")
    assert len(tone) == 480
    assert 11000 < np.abs(tone).max() <= 12000
    assert struct.calcsize("<h") * len(tone) == len(marker_tone(0, 8000))


class TestFreePort:
    def test_a_port_tcp_already_has_is_passed_over(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The kernel's free UDP port can be a TCP connection's local port: SIP needs both."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = int(taken.getsockname()[1])
            picks = [busy]
            real = socket.socket

            class Picking(real):  # type: ignore[misc, valid-type]
                def getsockname(self) -> Any:
                    if self.type == socket.SOCK_DGRAM and picks:
                        return ("127.0.0.1", picks.pop())
                    return super().getsockname()

            monkeypatch.setattr(socket, "socket", Picking)
            port = run._free_port()
        assert picks == []
        assert port != busy
