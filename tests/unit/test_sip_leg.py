"""``SipLeg`` without sockets: the core's call events become ``LegEvent``s, a re-negotiated
codec keeps the stream, and the sweep's questions (inactivity, unsendable media) are answered
from the endpoint's counters."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from media.rtp import RtpPacket
from tests.sip_pair import UaPair
from worker.config import RtpSettings
from worker.legs import (
    LegAnswered,
    LegDtmf,
    LegEvent,
    LegMediaChanged,
    LegRinging,
)
from worker.rtp import RtpEndpoint
from worker.sip.core import CallPhase, UaCall
from worker.sip.leg import UNSENDABLE_ERRORS, SipLeg


class Control:
    local_address = ("127.0.0.1", 5060)

    def __init__(self) -> None:
        self.asked: list[str] = []

    def ring_call(self, call: UaCall, early_media: bool) -> None:
        self.asked.append("ring")

    def answer_call(self, call: UaCall) -> None:
        self.asked.append("answer")

    def hangup_call(self, call: UaCall, cause: str, status: int, reason: str | None) -> None:
        self.asked.append(f"hangup:{cause}")

    def send_in_dialog(
        self,
        call: UaCall,
        method: str,
        body: bytes,
        content_type: str | None,
        headers: list[tuple[str, str]],
    ) -> bool:
        self.asked.append(method)
        return True

    def send_info_dtmf(self, call: UaCall, digit: str, duration_ms: int) -> bool:
        self.asked.append(f"info:{digit}")
        return True


class Events:
    def __init__(self) -> None:
        self.got: list[LegEvent] = []
        self.audio: list[float] = []

    def on_leg_event(self, event: LegEvent) -> None:
        self.got.append(event)

    def on_caller_audio(self, now: float) -> None:
        self.audio.append(now)


async def answered_leg(tmp_path: Path) -> tuple[SipLeg, Control, Events, UaPair]:
    pair = UaPair.create(tmp_path)
    _, inbound = pair.call_a_to_b()
    control = Control()
    leg = SipLeg(control, inbound, RtpEndpoint(asyncio.get_running_loop()), RtpSettings(), 0.0)
    events = Events()
    leg.attach(events)
    assert inbound.media is not None
    leg.apply_media(inbound.media, 0.0)
    leg.progress(CallPhase.ANSWERED, 0.0)
    return leg, control, events, pair


class TestCallerAudioArrival:
    """``LegObserver.on_caller_audio``: the observer is told of each packet of the caller's
    audio, and with ``rtp.jitter_early`` the frame is there to take at once."""

    async def test_each_packet_is_told_and_its_frame_is_there_at_once(self, tmp_path: Path) -> None:
        leg, _, events, _ = await answered_leg(tmp_path)
        leg.rtp_received(RtpPacket(0, 1, 160, 7, b"\xff" * 160), 1.0)
        assert events.audio == [1.0]
        assert leg.pull_frame(1.0) == bytes(320)  # µ-law 0xff is silence
        leg.rtp_received(RtpPacket(0, 2, 320, 7, b"\xff" * 160), 1.02)
        assert events.audio == [1.0, 1.02]
        assert leg.pull_frame(1.02) == bytes(320)

    async def test_without_early_release_the_frame_waits_for_the_jitter_buffer(
        self, tmp_path: Path
    ) -> None:
        pair = UaPair.create(tmp_path)
        _, inbound = pair.call_a_to_b()
        rtp = RtpSettings(jitter_early=False, jitter_min_ms=4)
        leg = SipLeg(Control(), inbound, RtpEndpoint(asyncio.get_running_loop()), rtp, 0.0)
        assert inbound.media is not None
        leg.apply_media(inbound.media, 0.0)
        leg.rtp_received(RtpPacket(0, 1, 160, 7, b"\xff" * 160), 1.0)
        assert leg.pull_frame(1.0) is None
        assert leg.pull_frame(1.005) == bytes(320)


class TestSipLegEvents:
    async def test_events_queued_before_the_observer_arrive_in_order(self, tmp_path: Path) -> None:
        pair = UaPair.create(tmp_path)
        _, inbound = pair.call_a_to_b()
        leg = SipLeg(
            Control(), inbound, RtpEndpoint(asyncio.get_running_loop()), RtpSettings(), 0.0
        )
        leg.progress(CallPhase.RINGING, 0.0)
        leg.dtmf_info("5", 100)
        events = Events()
        leg.attach(events)
        assert events.got == [LegRinging(), LegDtmf("5", 100, "sip-info")]
        assert leg.info.headers[0][0] == "Via"
        assert leg.info.raw.startswith(b"INVITE ")

    async def test_requests_go_to_the_user_agent(self, tmp_path: Path) -> None:
        leg, control, _, _ = await answered_leg(tmp_path)
        leg.ring()
        leg.answer()
        assert leg.send_request("info", "text/plain", "x")
        assert leg.send_dtmf("7")  # telephone-event was negotiated: RFC 4733, not INFO
        leg.hangup("done")
        assert control.asked == ["ring", "answer", "INFO", "hangup:done"]


class TestRfc3264CodecChangeKeepsTheStream:
    async def test_same_stream_and_a_media_changed_event(self, tmp_path: Path) -> None:
        leg, _, events, _ = await answered_leg(tmp_path)
        assert events.got == [LegAnswered("PCMU", True)]
        stream = leg.stream
        media = leg.call.media
        assert media is not None
        changed = replace(media, codec="PCMA", payload_type=8)
        leg.call.media = changed
        leg.apply_media(changed, 1.0)
        assert leg.stream is stream
        assert events.got == [LegAnswered("PCMU", True), LegMediaChanged("PCMA", on_hold=False)]
        assert leg.info.codec == "PCMA"


class TestTheSweepsQuestions:
    async def test_unsendable_media(self, tmp_path: Path) -> None:
        leg, _, _, _ = await answered_leg(tmp_path)
        counters = leg.endpoint.endpoint_counters
        assert not leg.media_unsendable()
        counters.send_errors += UNSENDABLE_ERRORS
        assert leg.media_unsendable()  # errors and nothing sent
        counters.send_errors += UNSENDABLE_ERRORS
        counters.sent += 1
        assert not leg.media_unsendable()  # errors, but packets still leave (ICMP from a peer)

    async def test_inactivity_counts_from_the_answer(self, tmp_path: Path) -> None:
        leg, _, _, pair = await answered_leg(tmp_path)
        answered = pair.now  # the core's answer time
        assert leg.inactive_for(answered + 5.0) == 5.0
        leg.endpoint.last_received = answered + 4.0
        assert leg.inactive_for(answered + 5.0) == 1.0
        assert leg.quality().packets_in == 0
        assert leg.summary()["codec"] == "PCMU"
