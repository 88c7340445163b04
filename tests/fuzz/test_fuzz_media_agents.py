"""Fuzzing the media and agent parsers with mutations of real input: RTP and RFC 4733 packets
from SIPp's captures, RTCP compounds, and jambonz and Twilio Media Streams messages in the form
the official SDKs send. Each parser raises nothing but its own error; the sans-I/O sessions
that take the input (RTP stream, RTCP session, jambonz control, Twilio stream, listen protocol)
never raise at all."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from media.dtmf import DtmfReceiver
from media.g711 import PCMA
from media.rtcp import (
    ReportBlock,
    RtcpParseError,
    RtcpSession,
    SenderInfo,
    build_report,
    parse_compound,
)
from media.rtp import RtpCounters, RtpPacket, RtpParseError, parse_or_count
from media.stream import RtpStream
from tests.fuzz.mutate import FUZZ, mutate
from tests.pcap import read_pcap
from worker.agent import twilio as tw
from worker.agent.jambonz import JambonzControl
from worker.agent.listen_audio import ListenAudioProtocol

SIPP_SHARE = Path("/usr/share/sip-tester")


def rtp_seeds() -> list[bytes]:
    out: list[bytes] = []
    for name in ("g711a.pcap", "dtmf_2833_1.pcap", "dtmf_2833_pound.pcap"):
        datagrams = read_pcap(SIPP_SHARE / name).datagrams
        out.extend(d.payload for d in datagrams[:40])
    return out


def rtcp_seeds() -> list[bytes]:
    block = ReportBlock(0x1234, 12, 3, 70000, 80, 0x11223344, 6553)
    sender = SenderInfo((3900000000 << 32) | 7, 1600, 10, 1600)
    return [
        build_report(0xABCD, sender, (block,), "peer@host"),
        build_report(0xABCD, None, (block, block), "x"),
        RtcpSession(5, "c").bye(),
    ]


JAMBONZ: list[object] = [
    {"type": "ack", "msgid": "m1", "data": [{"verb": "say", "text": "hi"}, {"verb": "hangup"}]},
    {
        "type": "ack",
        "msgid": "m1",
        "data": [
            {
                "verb": "gather",
                "input": ["digits"],
                "numDigits": 3,
                "actionHook": "/g",
                "say": {"text": "press"},
            }
        ],
    },
    {
        "type": "command",
        "command": "redirect",
        "queueCommand": False,
        "data": [
            {
                "verb": "listen",
                "url": "ws://x/a",
                "sampleRate": 16000,
                "bidirectionalAudio": {"enabled": True, "streaming": True, "sampleRate": 16000},
            }
        ],
    },
    {"type": "command", "command": "call:status", "data": {"call_status": "completed"}},
    {"type": "command", "command": "dtmf", "data": {"dtmf": "123", "duration": 250}},
    {
        "type": "command",
        "command": "sip:request",
        "data": {"sip_request": {"method": "INFO", "content_type": "text/plain", "content": "x"}},
    },
]
TWILIO: list[object] = [
    {"event": "media", "streamSid": "MZ1", "media": {"payload": "//7+/g=="}},
    {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m1"}},
    {"event": "clear", "streamSid": "MZ1"},
]
LISTEN: list[object] = [
    {"type": "playAudio", "data": {"audioContent": "AAAA", "audioContentType": "raw",
                                   "sampleRate": 8000}},
    {"type": "killAudio"},
    {"type": "mark", "data": {"name": "m"}},
    {"type": "transcription", "data": {"role": "user", "text": "hello", "is_final": True}},
    {"type": "disconnect"},
]  # fmt: skip


def texts(objects: list[object]) -> list[bytes]:
    return [json.dumps(o).encode() for o in objects]


def mutated(pool: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda seed, salt: mutate(pool[seed], random.Random(salt), pool=pool),
        st.integers(0, len(pool) - 1),
        st.integers(0, 2**32),
    )


RTP = rtp_seeds()
RTCP = rtcp_seeds()


class TestRfc3550RtpUnderMutation:
    @FUZZ
    @given(st.lists(mutated(RTP), min_size=1, max_size=30))
    def test_parser_stream_and_dtmf(self, packets: list[bytes]) -> None:
        counters = RtpCounters()
        stream = RtpStream(PCMA, 101)
        dtmf = DtmfReceiver(8000)
        for i, data in enumerate(packets):
            with contextlib.suppress(RtpParseError):
                RtpPacket.parse(data)
            packet = parse_or_count(data, counters)
            if packet is not None:
                stream.receive(packet, i * 0.02)
                dtmf.feed(packet, i * 0.02)
            stream.pull_frame(i * 0.02)
        assert counters.datagrams == len(packets)


class TestRfc3550RtcpUnderMutation:
    @FUZZ
    @given(st.lists(mutated(RTCP), min_size=1, max_size=10))
    def test_parser_and_session(self, datagrams: list[bytes]) -> None:
        session = RtcpSession(0x1234, "me")
        for i, data in enumerate(datagrams):
            with contextlib.suppress(RtcpParseError):
                parse_compound(data)
            session.receive(data, float(i))
        session.report(100.0, 0)


class TestAgentProtocolsUnderMutation:
    @FUZZ
    @given(st.lists(mutated(texts(JAMBONZ)), min_size=1, max_size=8), st.booleans())
    def test_jambonz_control(self, frames: list[bytes], as_text: bool) -> None:
        control = JambonzControl("call-sid")
        control.connection_made(0.0)
        control.send_session_new({"call_sid": "call-sid"}, 0.0)
        for i, frame in enumerate(frames):
            data: str | bytes = frame.decode("utf-8", "replace") if as_text else frame
            control.receive(data, float(i))
        control.messages_to_send()

    @FUZZ
    @given(st.lists(mutated(texts(TWILIO)), min_size=1, max_size=8))
    def test_twilio_stream(self, frames: list[bytes]) -> None:
        stream = tw.stream_for_call("call-sid")
        stream.connected()
        stream.start()
        for i, frame in enumerate(frames):
            stream.receive(frame.decode("utf-8", "replace"), float(i))

    @FUZZ
    @given(st.lists(mutated(texts(LISTEN)), min_size=1, max_size=8))
    def test_listen_audio(self, frames: list[bytes]) -> None:
        protocol = ListenAudioProtocol(sample_rate=8000, bidirectional_enabled=True, streaming=True)
        for i, frame in enumerate(frames):
            protocol.receive(frame.decode("utf-8", "replace"), float(i))
            protocol.receive(frame, float(i))
