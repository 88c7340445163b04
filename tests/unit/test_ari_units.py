"""The sans-I/O parts of the ARI ingress, checked against Asterisk's recorded traffic: event
models (every recorded event parses), Q.850 causes (the recorded busy/no-answer/unreachable
endings), hangup reasons (the values channels.json allows), trunk objects (dependency order,
fields the recording's memory wizard took), ExternalMedia audio (ulaw and big-endian slin16
as recorded), and the ExternalMedia address from the channel variables."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from media.g711 import ulaw_encode
from media.l16 import PT_SLIN16, SLIN16, swap16
from media.rtp import RtpPacket, RtpSender
from media.stream import RtpStream
from tests.fakes import FakeLeg
from worker.ari.causes import hangup_reason, unanswered_end
from worker.ari.client import HANGUP_REASONS, AriClient
from worker.ari.leg import AriLeg, Phase, _rtp_source
from worker.ari.media import ExternalMedia
from worker.ari.models import (
    AriProtocolError,
    ChannelDestroyed,
    ChannelDtmfReceived,
    ChannelHangupRequest,
    StasisStart,
    UnknownEvent,
    parse_event,
)
from worker.ari.trunks import trunk_objects
from worker.config import AriSettings, AriTrunkSettings, RtpSettings
from worker.legs import LegWatch, MediaQuality
from worker.log import call_logger
from worker.rtp import RtpEndpoint

DATA = Path(__file__).resolve().parents[1] / "data" / "ari"
RECORDINGS = DATA / "recordings"


def recorded(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (RECORDINGS / f"{name}.jsonl").read_text().splitlines()]


def recorded_events(name: str) -> list[dict[str, Any]]:
    return [line["event"] for line in recorded(name) if line["dir"] == "event"]


class TestEventsJsonModels:
    """rest-api/api-docs/events.json, as Asterisk 22.10.1 sent the events."""

    def test_every_recorded_event_parses(self) -> None:
        seen: set[str] = set()
        for path in sorted(RECORDINGS.glob("*.jsonl")):
            for event in recorded_events(path.stem):
                parsed = parse_event(json.dumps(event))
                assert parsed.type == event["type"]
                seen.add(type(parsed).__name__)
        assert {"StasisStart", "StasisEnd", "ChannelDtmfReceived", "ChannelDestroyed"} <= seen
        assert "UnknownEvent" in seen  # ChannelConnectedLine, ChannelDialplan, Playback*

    def test_recorded_fields(self) -> None:
        events = [
            parse_event(json.dumps(e))
            for e in recorded_events("inbound_answer_bridge_externalmedia_dtmf_caller_hangup")
        ]
        start = events[0]
        assert isinstance(start, StasisStart)
        assert start.args == ["inbound"]
        assert start.channel.state == "Ring"
        assert start.channel.dialplan is not None
        assert start.channel.dialplan.exten == "4155550100"
        assert start.channel.caller.number == "14155559876"
        dtmf = [e for e in events if isinstance(e, ChannelDtmfReceived)]
        assert [(d.digit, d.duration_ms) for d in dtmf] == [("1", 280)]
        hangups = [e for e in events if isinstance(e, ChannelHangupRequest)]
        assert hangups[0].cause is None  # the caller's BYE carries none
        assert hangups[1].soft is True
        assert hangups[1].cause == 32

    def test_unknown_type_is_not_an_error(self) -> None:
        assert parse_event('{"type": "ChannelTalkingStarted", "x": 1}') == UnknownEvent(
            type="ChannelTalkingStarted"
        )

    @pytest.mark.parametrize(
        "message",
        [
            b"\xff\xfe",
            "not json",
            "[]",
            '{"type": 5}',
            '{"no": "type"}',
            '{"type": "StasisStart"}',
            '{"type": "ChannelDtmfReceived", "digit": "1", "channel": {"id": 7}}',
            '{"type": "ChannelDestroyed", "cause": "x", "channel": {"id": "1"}}',
        ],
    )
    def test_malformed_events_raise_one_error_type(self, message: str | bytes) -> None:
        with pytest.raises(AriProtocolError):
            parse_event(message)


class TestQ850Causes:
    """RFC 3398 §7.2.4.1 as Asterisk maps it; the recordings' busy, no answer, unreachable."""

    @pytest.mark.parametrize(
        ("recording", "token", "status"),
        [
            ("outbound_originate_busy", "busy", 486),
            ("outbound_originate_noanswer", "no-answer", 480),
            ("outbound_originate_unreachable", "no-answer", 480),
        ],
    )
    def test_recorded_failed_originates(self, recording: str, token: str, status: int) -> None:
        destroyed = [
            parse_event(json.dumps(e))
            for e in recorded_events(recording)
            if e["type"] == "ChannelDestroyed"
        ]
        assert len(destroyed) == 1
        event = destroyed[0]
        assert isinstance(event, ChannelDestroyed)
        end = unanswered_end(event.cause, event.tech_cause)
        assert (end.cause, end.sip_status) == (token, status)

    @pytest.mark.parametrize(
        ("cause", "token", "status"),
        [
            (16, "failed", 480),
            (17, "busy", 486),
            (18, "no-answer", 408),
            (19, "no-answer", 480),
            (21, "rejected", 603),
            (34, "congestion", 503),
            (38, "congestion", 503),
            (1, "unallocated", 404),
            (None, "failed", 500),
            (999, "failed", 500),
        ],
    )
    def test_without_tech_cause(self, cause: int | None, token: str, status: int) -> None:
        end = unanswered_end(cause, None)
        assert (end.cause, end.sip_status) == (token, status)

    def test_a_sip_tech_cause_wins(self) -> None:
        assert unanswered_end(21, 403).sip_status == 403
        assert unanswered_end(21, 7).sip_status == 603  # not a SIP status: ignored

    def test_hangup_reasons_are_ones_asterisk_accepts(self) -> None:
        channels = json.loads((DATA / "api-docs" / "channels.json").read_text())
        allowed: set[str] = set()
        for api in channels["apis"]:
            if api["path"] == "/channels/{channelId}":
                for op in api["operations"]:
                    if op["httpMethod"] == "DELETE":
                        for param in op["parameters"]:
                            if param["name"] == "reason":
                                allowed = set(param["allowableValues"]["values"])
        assert allowed == HANGUP_REASONS
        for status in range(100, 700):
            assert hangup_reason(status, answered=False) in allowed
        assert hangup_reason(486, answered=False) == "busy"
        assert hangup_reason(404, answered=False) == "unallocated"
        assert hangup_reason(503, answered=False) == "congestion"
        assert hangup_reason(486, answered=True) == "normal"


class TestDynamicConfigTrunkObjects:
    """PROTOCOLS.md §5.1: auth → aor → endpoint → identify → registration."""

    def test_dependency_order_and_classes(self) -> None:
        trunk = AriTrunkSettings(
            host="sip.example", username="acct", password="pw", registration=True
        )
        objects = trunk_objects("carrier", trunk)
        assert [(o.config_class, o.object_type, o.id) for o in objects] == [
            ("res_pjsip", "auth", "carrier-auth"),
            ("res_pjsip", "aor", "carrier"),
            ("res_pjsip", "endpoint", "carrier"),
            ("res_pjsip", "identify", "carrier"),
            ("res_pjsip", "registration", "carrier"),
        ]
        endpoint = dict(objects[2].fields)
        assert endpoint["outbound_auth"] == "carrier-auth"
        assert endpoint["aors"] == "carrier"
        names = [name for name, _ in objects[2].fields]
        assert names.index("disallow") < names.index("allow")  # replaces, not adds
        assert dict(objects[3].fields) == {"endpoint": "carrier", "match": "sip.example"}

    def test_no_auth_no_registration(self) -> None:
        objects = trunk_objects("t", AriTrunkSettings(host="h", transport="tcp", match=["a", "b"]))
        assert [o.object_type for o in objects] == ["aor", "endpoint", "identify"]
        assert dict(objects[0].fields)["contact"] == "sip:h:5060;transport=tcp"
        assert "outbound_auth" not in dict(objects[1].fields)
        assert dict(objects[2].fields)["match"] == "a,b"

    def test_fields_the_recorded_memory_wizard_knows(self) -> None:
        """Every attribute we set is one Asterisk listed or took in a PUT (dynamic_config)."""
        known: dict[str, set[str]] = {}
        for line in recorded("dynamic_config"):
            if line["dir"] != "rest" or line["status"] != 200 or "/dynamic/" not in line["path"]:
                continue
            parts = line["path"].split("/")
            names = known.setdefault(parts[parts.index("dynamic") + 2], set())
            if isinstance(line["response"], list):
                names.update(item["attribute"] for item in line["response"])
            if line["method"] == "PUT":
                names.update(item["attribute"] for item in line["body"]["fields"])
        trunk = AriTrunkSettings(host="h", username="u", password="p", from_user="f")
        for obj in trunk_objects("t", trunk):
            if obj.object_type in known:
                unknown = {name for name, _ in obj.fields} - known[obj.object_type]
                assert unknown == set(), (obj.object_type, unknown)


def _tone(samples: int, rate: int) -> bytes:
    t = np.arange(samples) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


class TestExternalMediaAudio:
    """PROTOCOLS.md §4.2: slin16 is big-endian 16 kHz on PT 118, 640-byte payloads."""

    def test_swap16_is_big_endian(self) -> None:
        assert (
            swap16(np.array([1, -2], dtype="<i2").tobytes())
            == np.array([1, -2], dtype=">i2").tobytes()
        )
        assert swap16(b"\x01\x02\x03") == b"\x02\x01"

    def test_slin16_stream_frames_and_packets(self) -> None:
        stream = RtpStream(SLIN16, None)
        assert (stream.rate, stream.frame_bytes) == (16000, 640)
        sender = RtpSender(PT_SLIN16, 1234, clock_rate=16000)
        pcm = _tone(320 * 10, 16000)
        frames: list[bytes] = []
        for i in range(10):  # packets every 20 ms, pulled every 20 ms
            wire = sender.build(swap16(pcm[i * 640 : (i + 1) * 640]), 320)
            stream.receive(RtpPacket.parse(wire), i * 0.02)
            frame = stream.pull_frame(i * 0.02 + 0.001)
            if frame is not None:
                frames.append(frame)
        assert frames
        assert all(len(f) == 640 for f in frames)
        assert b"".join(frames) in pcm  # byte order restored, samples unchanged
        packet = RtpPacket.parse(stream.send_frame(pcm[:640]))
        assert packet.payload_type == 118
        assert packet.payload == swap16(pcm[:640])

    def test_ulaw_keeps_thirty_ms_packets_working(self) -> None:
        """Asterisk keeps the caller's 30 ms packetisation on ulaw (240-byte payloads)."""
        from media.g711 import PCMU

        stream = RtpStream(PCMU, None)
        sender = RtpSender(0, 99)
        pcm = _tone(240 * 20, 8000)
        got = bytearray()
        now = 0.0
        for i in range(20):
            payload = ulaw_encode(pcm[i * 480 : (i + 1) * 480])
            stream.receive(RtpPacket.parse(sender.build(payload, 240)), now)
            now += 0.03
            for _ in range(3):
                frame = stream.pull_frame(now)
                if frame is not None:
                    assert len(frame) == 320
                    got += frame
        assert len(got) >= 320 * 20

    async def test_each_packet_is_told_to_the_leg_and_its_frame_is_there_at_once(self) -> None:
        """``LegObserver.on_caller_audio`` (with ``rtp.jitter_early``, the default)."""

        class Observer(LegWatch):
            told: list[float]

            def on_caller_audio(self, now: float) -> None:
                self.told.append(now)

        leg = TestLegContractGuards()._leg("inbound")
        endpoint = RtpEndpoint(asyncio.get_running_loop())
        leg.media = ExternalMedia(endpoint, "ulaw", RtpSettings())
        observer = Observer()
        observer.told = []
        leg.attach(observer)
        leg.media.rtp_received(RtpPacket(0, 1, 160, 7, b"\xff" * 160), 2.0)
        assert observer.told == [2.0]
        assert leg.media.pull_frame(2.0) == bytes(320)  # µ-law 0xff is silence

    def test_mixed_rates_are_refused(self) -> None:
        from media.g711 import PCMU

        stream = RtpStream(SLIN16, None)
        with pytest.raises(ValueError, match="16000"):
            stream.set_codec(PCMU, None)


class TestExternalMediaAddress:
    """The recorded channelvars: both strings; anything else is refused clearly."""

    def test_recorded(self) -> None:
        for line in recorded("inbound_answer_bridge_externalmedia_dtmf_caller_hangup"):
            if line["dir"] == "rest" and line["path"].endswith("/externalMedia"):
                variables = line["response"]["channelvars"]
                port = int(variables["UNICASTRTP_LOCAL_PORT"])
                assert _rtp_source(variables) == ("127.0.0.1", port)
                return
        raise AssertionError("no externalMedia call in the recording")

    @pytest.mark.parametrize(
        "variables",
        [
            None,
            {},
            {"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1"},
            {"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": "x"},
            {"UNICASTRTP_LOCAL_ADDRESS": "127.0.0.1", "UNICASTRTP_LOCAL_PORT": "70000"},
            {"UNICASTRTP_LOCAL_ADDRESS": "", "UNICASTRTP_LOCAL_PORT": "2000"},
        ],
    )
    def test_unusable(self, variables: dict[str, str] | None) -> None:
        with pytest.raises(AriProtocolError):
            _rtp_source(variables)


class _NoRestHost:
    """An ``AriLegHost`` for the leg's guards: any REST call would fail the test."""

    settings = AriSettings()

    @property
    def client(self) -> AriClient:
        raise AssertionError("no REST call expected")

    def media_host(self) -> str:
        return "127.0.0.1"

    async def open_media(self) -> ExternalMedia:
        raise AssertionError("no media expected")

    def close_media(self, media: ExternalMedia) -> None:
        raise AssertionError("no media expected")

    def release(self, leg: AriLeg) -> None:
        pass


class TestLegContractGuards:
    """worker/legs.py's contract where nothing goes to Asterisk: requests that do not apply
    are no-ops or False, and there is no audio before the join."""

    def _leg(self, direction: Literal["inbound", "outbound"]) -> AriLeg:
        return AriLeg(
            _NoRestHost(),
            channel_id="c1",
            direction=direction,
            from_user="a",
            to_user="b",
            log=call_logger("c1"),
        )

    async def test_outbound_leg_ignores_inbound_requests(self) -> None:
        leg = self._leg("outbound")
        leg.ring()
        leg.ring(early_media=True)
        leg.answer()
        assert leg.phase is Phase.NEW
        assert not leg.send_dtmf("1")  # not answered
        assert not leg.send_request("INFO", "text/plain", "x")
        assert leg.pull_frame(0.0) is None
        leg.send_frame(bytes(320))
        assert leg.quality() == MediaQuality()
        assert not leg.connect(FakeLeg())
        assert leg.info.headers == (("X-Asterisk-Channel", "c1"),)
        assert leg.info.codec == "slin16"

    async def test_events_for_other_channels_are_ignored(self) -> None:
        leg = self._leg("inbound")
        watch = LegWatch()
        leg.attach(watch)
        other = {"id": "other"}
        for event in (
            {"type": "ChannelDtmfReceived", "digit": "1", "channel": other},
            {"type": "StasisEnd", "channel": other},
            {"type": "Dial", "dialstatus": "RINGING", "peer": other},
            {"type": "BridgeDestroyed", "bridge": {"id": "not-ours"}},
        ):
            leg.on_event(parse_event(json.dumps(event)))
        assert watch.events == []
        assert not leg.ended
