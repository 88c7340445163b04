"""Twilio Media Streams with the worker as Twilio, sans-I/O: message shapes, the counters as
strings, mark echo, and what an agent server (shaped like Pipecat's serializer) sends back."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.twilio import (
    Clear,
    InvalidTwilioMessage,
    MarkRequested,
    MediaReceived,
    TwilioEvent,
    TwilioStream,
)
from worker.errors import LocalError

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL_SID = "CA0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"


def make_stream(**kwargs: Any) -> TwilioStream:
    return TwilioStream(STREAM_SID, CALL_SID, ACCOUNT_SID, **kwargs)


@pytest.fixture
def stream() -> TwilioStream:
    s = make_stream(custom_parameters={"agent": "sales", "lang": "en"})
    s.connected()
    s.start()
    return s


def server_media(payload: bytes, stream_sid: str = STREAM_SID) -> str:
    """What Pipecat's TwilioFrameSerializer sends for output audio."""
    return json.dumps(
        {
            "event": "media",
            "streamSid": stream_sid,
            "media": {"payload": base64.b64encode(payload).decode()},
        }
    )


def only(events: list[TwilioEvent]) -> TwilioEvent:
    assert len(events) == 1
    return events[0]


def invalid_reason(events: list[TwilioEvent]) -> str:
    event = only(events)
    assert isinstance(event, InvalidTwilioMessage)
    return event.reason


class TestTwilioConnectedFirst:
    def test_connected_shape(self) -> None:
        assert json.loads(make_stream().connected()) == {
            "event": "connected",
            "protocol": "Call",
            "version": "1.0.0",
        }

    def test_order_is_enforced(self) -> None:
        s = make_stream()
        with pytest.raises(LocalError):
            s.start()
        with pytest.raises(LocalError):
            s.media(b"\xff")
        s.connected()
        with pytest.raises(LocalError):
            s.connected()
        with pytest.raises(LocalError):
            s.mark("m")
        s.start()
        with pytest.raises(LocalError):
            s.start()
        s.stop()
        with pytest.raises(LocalError):
            s.media(b"\xff")
        with pytest.raises(LocalError):
            s.stop()

    def test_constructor_checks(self) -> None:
        with pytest.raises(LocalError):
            TwilioStream("", CALL_SID, ACCOUNT_SID)
        with pytest.raises(LocalError):
            TwilioStream(STREAM_SID, CALL_SID, ACCOUNT_SID, tracks=["both"])
        with pytest.raises(LocalError):
            TwilioStream(STREAM_SID, CALL_SID, ACCOUNT_SID, tracks=[])


class TestTwilioStartMessage:
    def test_start_shape(self) -> None:
        s = make_stream(custom_parameters={"agent": "sales"})
        s.connected()
        msg = json.loads(s.start())
        assert msg == {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "streamSid": STREAM_SID,
                "accountSid": ACCOUNT_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": {"agent": "sales"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": STREAM_SID,
        }

    def test_custom_parameters_default_to_empty(self) -> None:
        s = make_stream()
        s.connected()
        assert json.loads(s.start())["start"]["customParameters"] == {}

    def test_pipecat_reads_stream_and_call_sid_from_the_first_two_messages(self) -> None:
        s = make_stream()
        first, second = json.loads(s.connected()), json.loads(s.start())
        start = next(m for m in (first, second) if m["event"] == "start")
        assert start["start"]["streamSid"] == STREAM_SID
        assert start["start"]["callSid"] == CALL_SID


class TestTwilioMediaMessage:
    def test_counters_are_strings_and_count_up(self, stream: TwilioStream) -> None:
        first = json.loads(stream.media(b"\xff" * 160))
        second = json.loads(stream.media(b"\x7f" * 160))
        assert first == {
            "event": "media",
            "sequenceNumber": "2",
            "media": {
                "track": "inbound",
                "chunk": "1",
                "timestamp": "0",
                "payload": base64.b64encode(b"\xff" * 160).decode(),
            },
            "streamSid": STREAM_SID,
        }
        assert (second["sequenceNumber"], second["media"]["chunk"]) == ("3", "2")
        assert second["media"]["timestamp"] == "20"

    def test_timestamp_follows_the_audio_sent(self, stream: TwilioStream) -> None:
        stream.media(b"\x00" * 80)
        stream.media(b"\x00" * 400)
        assert json.loads(stream.media(b"\x00"))["media"]["timestamp"] == "60"

    def test_explicit_timestamp(self, stream: TwilioStream) -> None:
        assert json.loads(stream.media(b"\x00", timestamp_ms=1234))["media"]["timestamp"] == "1234"

    def test_track_must_be_one_of_the_stream_tracks(self, stream: TwilioStream) -> None:
        with pytest.raises(LocalError):
            stream.media(b"\x00", track="outbound")

    def test_payload_round_trip(self, stream: TwilioStream) -> None:
        audio = bytes(range(256))
        payload = json.loads(stream.media(audio))["media"]["payload"]
        assert base64.b64decode(payload) == audio


class TestTwilioDtmf:
    @pytest.mark.parametrize("digit", list("0123456789*#"))
    def test_digits(self, stream: TwilioStream, digit: str) -> None:
        text = stream.dtmf(digit)
        assert text is not None
        msg = json.loads(text)
        assert msg == {
            "event": "dtmf",
            "streamSid": STREAM_SID,
            "sequenceNumber": "2",
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    @pytest.mark.parametrize("digit", ["A", "D", "12", ""])
    def test_keys_twilio_cannot_carry(self, stream: TwilioStream, digit: str) -> None:
        assert stream.dtmf(digit) is None
        assert json.loads(stream.mark("m"))["sequenceNumber"] == "2"


class TestTwilioMarkEcho:
    def test_mark_shape(self, stream: TwilioStream) -> None:
        assert json.loads(stream.mark("greeting-done")) == {
            "event": "mark",
            "sequenceNumber": "2",
            "streamSid": STREAM_SID,
            "mark": {"name": "greeting-done"},
        }

    def test_requested_mark_echoed_by_name(self, stream: TwilioStream) -> None:
        request = json.dumps({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "m-7"}})
        event = only(stream.receive(request, 0.0))
        assert event == MarkRequested("m-7")
        assert isinstance(event, MarkRequested)
        assert json.loads(stream.mark(event.name))["mark"] == {"name": "m-7"}


class TestTwilioStop:
    def test_stop_shape(self, stream: TwilioStream) -> None:
        stream.media(b"\x00")
        assert json.loads(stream.stop()) == {
            "event": "stop",
            "sequenceNumber": "3",
            "streamSid": STREAM_SID,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        }


class TestTwilioServerMessages:
    def test_media_round_trip(self, stream: TwilioStream) -> None:
        audio = bytes([0x7F, 0xFF, 0x00, 0x80]) * 80
        assert stream.receive(server_media(audio), 0.0) == [MediaReceived(audio)]

    def test_clear(self, stream: TwilioStream) -> None:
        text = json.dumps({"event": "clear", "streamSid": STREAM_SID})
        assert stream.receive(text, 0.0) == [Clear()]

    def test_empty_media_payload_is_dropped(self, stream: TwilioStream) -> None:
        assert stream.receive(server_media(b""), 0.0) == []
        assert stream.invalid_messages == 0

    def test_twilio_round_trip_through_our_own_messages(self, stream: TwilioStream) -> None:
        # An echo bot: reads our media message and sends the payload straight back.
        ours = json.loads(stream.media(b"\x01\x02\x03"))
        reply = {
            "event": "media",
            "streamSid": ours["streamSid"],
            "media": {"payload": ours["media"]["payload"]},
        }
        assert stream.receive(json.dumps(reply), 0.0) == [MediaReceived(b"\x01\x02\x03")]

    @pytest.mark.parametrize(
        ("frame", "reason"),
        [
            (b'{"event":"clear"}', "binary frames"),
            ("{oops", "invalid JSON"),
            ('"clear"', "JSON object"),
            ('{"event":"dance","streamSid":"' + STREAM_SID + '"}', "unknown event 'dance'"),
            ('{"streamSid":"' + STREAM_SID + '"}', "unknown event None"),
            ('{"event":"clear"}', "streamSid missing"),
            ('{"event":"clear","streamSid":"MZother"}', "does not match"),
            ('{"event":"media","streamSid":"' + STREAM_SID + '"}', "needs a media object"),
            (
                '{"event":"media","streamSid":"' + STREAM_SID + '","media":{}}',
                "media.payload",
            ),
            (
                '{"event":"media","streamSid":"' + STREAM_SID + '","media":{"payload":"%%%"}}',
                "not valid base64",
            ),
            ('{"event":"mark","streamSid":"' + STREAM_SID + '","mark":{}}', "mark.name"),
            ('{"event":"mark","streamSid":"' + STREAM_SID + '","mark":{"name":3}}', "mark.name"),
        ],
    )
    def test_invalid(self, stream: TwilioStream, frame: str | bytes, reason: str) -> None:
        assert reason in invalid_reason(stream.receive(frame, 0.0))
        assert stream.invalid_messages == 1

    def test_wav_header_is_refused(self, stream: TwilioStream) -> None:
        wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 16
        assert "WAV header" in invalid_reason(stream.receive(server_media(wav), 0.0))

    def test_foreign_stream_sid_on_media(self, stream: TwilioStream) -> None:
        assert "does not match" in invalid_reason(
            stream.receive(server_media(b"\xff", stream_sid="MZnope"), 0.0)
        )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=12,
)


class TestTwilioReceiveFuzz:
    @settings(max_examples=400)
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
    def test_never_raises_on_any_frame(self, frame: str | bytes) -> None:
        make_stream().receive(frame, 0.0)

    @settings(max_examples=400)
    @given(st.sampled_from(["media", "mark", "clear", "start", "x"]), JSON_VALUES, st.booleans())
    def test_never_raises_on_plausible_messages(
        self, event: str, body: Any, right_sid: bool
    ) -> None:
        s = make_stream()
        text = json.dumps(
            {"event": event, "streamSid": STREAM_SID if right_sid else "MZx", event: body}
        )
        for result in s.receive(text, 0.0):
            assert isinstance(result, MediaReceived | MarkRequested | Clear | InvalidTwilioMessage)
