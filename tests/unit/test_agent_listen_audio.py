"""The audio.jambonz.org listen/stream protocol, sans-I/O: the metadata frame, audio out, DTMF,
marks, playAudio and the streaming return path. No sockets."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.listen_audio import (
    MAX_OUTSTANDING_MARKS,
    AppEvent,
    AudioReceived,
    ClearMarks,
    Disconnect,
    InvalidAudioMessage,
    KillAudio,
    ListenAudioProtocol,
    ListenEvent,
    Mark,
    PlayAudio,
    Transcription,
    interleave_stereo,
    metadata_message,
    mix_saturating,
)
from worker.agent.verbs import ListenVerb, parse_verb
from worker.errors import LocalError

CALL_INFO = {
    "call_sid": "cs-1",
    "direction": "inbound",
    "from": "+15081234567",
    "to": "+15087654321",
    "call_id": "abc@host",
    "sbc_callid": "sbc-1",
    "sip_status": 200,
    "sip_reason": "OK",
    "call_status": "in-progress",
    "account_sid": "acc-1",
    "application_sid": "app-1",
    "fs_sip_address": "10.0.1.5:5070",
    "customerData": {"some_key": 1},
}


def pcm(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def samples(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 2}h", data))


def play_audio(**data: Any) -> str:
    return json.dumps({"type": "playAudio", "data": data})


def only(events: list[ListenEvent]) -> ListenEvent:
    assert len(events) == 1
    return events[0]


def invalid_reason(events: list[ListenEvent]) -> str:
    event = only(events)
    assert isinstance(event, InvalidAudioMessage)
    return event.reason


class TestListenMetadataFirstFrame:
    def test_sample_rate_mix_type_and_camel_case_call_info(self) -> None:
        proto = ListenAudioProtocol(sample_rate=16000, mix_type="stereo")
        frame = json.loads(proto.metadata_message(CALL_INFO, {"myKey": "myValue"}))
        assert list(frame)[:2] == ["sampleRate", "mixType"]
        assert frame["sampleRate"] == 16000
        assert frame["mixType"] == "stereo"
        assert frame["callSid"] == "cs-1"
        assert frame["sbcCallid"] == "sbc-1"
        assert frame["sipStatus"] == 200
        assert frame["callStatus"] == "in-progress"
        assert frame["fsSipAddress"] == "10.0.1.5:5070"
        assert frame["customerData"] == {"some_key": 1}
        assert frame["myKey"] == "myValue"
        assert not any("_" in key for key in frame)

    def test_metadata_wins_over_call_info_like_object_spread(self) -> None:
        frame = json.loads(metadata_message(8000, "mono", {"callSid": "a"}, {"callSid": "b"}))
        assert frame == {"sampleRate": 8000, "mixType": "mono", "callSid": "b"}

    def test_no_metadata(self) -> None:
        frame = json.loads(metadata_message(8000, "mixed", {}))
        assert frame == {"sampleRate": 8000, "mixType": "mixed"}


class TestListenAudioOut:
    def test_mono_is_passthrough(self) -> None:
        proto = ListenAudioProtocol(mix_type="mono")
        frame = pcm(1, -2, 3, 32767)
        assert proto.audio_frame(frame, pcm(9, 9, 9, 9)) == frame

    def test_stereo_interleaves_caller_left_agent_right(self) -> None:
        proto = ListenAudioProtocol(mix_type="stereo")
        assert samples(proto.audio_frame(pcm(1, 2, 3), pcm(-1, -2, -3))) == [1, -1, 2, -2, 3, -3]

    def test_stereo_without_agent_audio_is_silent_on_the_right(self) -> None:
        proto = ListenAudioProtocol(mix_type="stereo")
        assert samples(proto.audio_frame(pcm(5, 6))) == [5, 0, 6, 0]

    def test_mixed_is_a_saturating_sum(self) -> None:
        proto = ListenAudioProtocol(mix_type="mixed")
        out = proto.audio_frame(pcm(100, 32000, -32000, 0), pcm(23, 1000, -1000, -5))
        assert samples(out) == [123, 32767, -32768, -5]

    def test_helpers_pad_the_shorter_frame(self) -> None:
        assert samples(interleave_stereo(pcm(1), pcm(2, 3))) == [1, 2, 0, 3]
        assert samples(mix_saturating(pcm(1, 2, 3), pcm(1))) == [2, 2, 3]

    def test_output_is_little_endian(self) -> None:
        proto = ListenAudioProtocol(mix_type="mixed")
        assert proto.audio_frame(b"\x01\x00", b"\x01\x00") == b"\x02\x00"

    def test_odd_length_is_a_local_error(self) -> None:
        with pytest.raises(LocalError):
            ListenAudioProtocol().audio_frame(b"\x00\x01\x02")
        with pytest.raises(LocalError):
            interleave_stereo(b"\x00", b"\x00\x00")

    def test_end_of_audio_is_a_zero_length_frame(self) -> None:
        assert ListenAudioProtocol.end_of_audio() == b""

    def test_unknown_mix_type_is_a_local_error(self) -> None:
        with pytest.raises(LocalError):
            ListenAudioProtocol(mix_type="quad")  # type: ignore[arg-type]


class TestListenDtmfFrame:
    def test_strings_in_rtp_timestamp_units(self) -> None:
        proto = ListenAudioProtocol(pass_dtmf=True)
        text = proto.dtmf_message("5", 200)
        assert text is not None
        assert json.loads(text) == {
            "event": "dtmf",
            "dtmf": "5",
            "duration": "1600",
        }

    def test_nothing_without_pass_dtmf(self) -> None:
        assert ListenAudioProtocol(pass_dtmf=False).dtmf_message("5", 200) is None

    def test_bad_digit_is_a_local_error(self) -> None:
        proto = ListenAudioProtocol(pass_dtmf=True)
        with pytest.raises(LocalError):
            proto.dtmf_message("55", 100)
        with pytest.raises(LocalError):
            proto.dtmf_message("1", -1)


class TestListenStreamingReturnPath:
    def test_binary_ignored_and_counted_when_not_streaming(self) -> None:
        proto = ListenAudioProtocol(streaming=False)
        assert proto.receive(pcm(1, 2), 0.0) == []
        assert proto.ignored_binary_frames == 1

    def test_streaming_needs_bidirectional_audio_enabled(self) -> None:
        proto = ListenAudioProtocol(bidirectional_enabled=False, streaming=True)
        assert proto.streaming is False
        assert proto.receive(pcm(1), 0.0) == []

    def test_binary_audio_when_streaming(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        assert proto.receive(pcm(1, 2), 0.0) == [AudioReceived(pcm(1, 2))]

    def test_odd_trailing_byte_carried_to_the_next_frame(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        whole = pcm(1000, -1000, 7)
        assert proto.receive(whole[:3], 0.0) == [AudioReceived(whole[:2])]
        assert proto.receive(whole[3:5], 0.02) == [AudioReceived(whole[2:4])]
        assert proto.receive(whole[5:], 0.04) == [AudioReceived(whole[4:])]

    def test_single_byte_frames(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        assert proto.receive(b"\x01", 0.0) == []
        assert proto.receive(b"\x02", 0.0) == [AudioReceived(b"\x01\x02")]

    def test_zero_length_frame(self) -> None:
        assert ListenAudioProtocol(streaming=True).receive(b"", 0.0) == []


class TestListenPlayAudio:
    def test_raw_with_numeric_sample_rate(self) -> None:
        audio = pcm(1, 2, 3, 4)
        text = play_audio(
            audioContent=base64.b64encode(audio).decode(),
            audioContentType="raw",
            sampleRate=24000,
            id="clip-1",
            queuePlay=True,
        )
        assert ListenAudioProtocol().receive(text, 0.0) == [
            PlayAudio(audio, "raw", 24000, "clip-1", True)
        ]

    def test_string_sample_rate_falls_back_to_16000_like_the_module(self) -> None:
        text = play_audio(
            audioContent=base64.b64encode(pcm(1)).decode(),
            audioContentType="raw",
            sampleRate="8000",
        )
        event = only(ListenAudioProtocol().receive(text, 0.0))
        assert isinstance(event, PlayAudio)
        assert event.sample_rate == 16000
        assert event.queue_play is False
        assert event.play_id is None

    @pytest.mark.parametrize(
        ("rate", "expected"),
        [
            (8000, 8000),
            (16000.0, 16000),
            (64000, 64000),
            (44100, 16000),
            (None, 16000),
            (True, 16000),
        ],
    )
    def test_rate_handling(self, rate: Any, expected: int) -> None:
        data: dict[str, Any] = {"audioContent": "AAA=", "audioContentType": "raw"}
        if rate is not None:
            data["sampleRate"] = rate
        event = only(ListenAudioProtocol().receive(play_audio(**data), 0.0))
        assert isinstance(event, PlayAudio)
        assert event.sample_rate == expected

    @pytest.mark.parametrize("kind", ["wav", "wave"])
    def test_wav_carries_its_own_rate(self, kind: str) -> None:
        wav = b"RIFF\x24\x00\x00\x00WAVEfmt "
        text = play_audio(
            audioContent=base64.b64encode(wav).decode(), audioContentType=kind, sampleRate=8000
        )
        assert ListenAudioProtocol().receive(text, 0.0) == [
            PlayAudio(wav, "wav", None, None, False)
        ]

    @pytest.mark.parametrize("rate", ["Infinity", "NaN", "1e400"])
    def test_non_finite_rate_falls_back_to_16000(self, rate: str) -> None:
        text = (
            '{"type":"playAudio","data":{"audioContent":"AAA=","audioContentType":"raw",'
            f'"sampleRate":{rate}}}}}'
        )
        event = only(ListenAudioProtocol().receive(text, 0.0))
        assert isinstance(event, PlayAudio)
        assert event.sample_rate == 16000

    def test_numeric_id_kept(self) -> None:
        text = play_audio(audioContent="AAA=", audioContentType="raw", id=7)
        event = only(ListenAudioProtocol().receive(text, 0.0))
        assert isinstance(event, PlayAudio)
        assert event.play_id == 7

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            ({"audioContentType": "raw"}, "audioContent"),
            ({"audioContent": "!!notbase64", "audioContentType": "raw"}, "base64"),
            ({"audioContent": "AAA=", "audioContentType": "mp3"}, "audioContentType"),
            ({"audioContent": "AAA="}, "audioContentType"),
            ({"audioContent": "AA==", "audioContentType": "raw"}, "even number"),
            ({"audioContent": "AAA=", "audioContentType": "raw", "queuePlay": 1}, "queuePlay"),
            ({"audioContent": "AAA=", "audioContentType": "raw", "id": {"a": 1}}, "id"),
            ({"audioContent": "AAA=", "audioContentType": "raw", "id": True}, "id"),
        ],
    )
    def test_invalid(self, data: dict[str, Any], reason: str) -> None:
        proto = ListenAudioProtocol()
        assert reason in invalid_reason(proto.receive(play_audio(**data), 0.0))
        assert proto.invalid_messages == 1

    def test_needs_a_data_object(self) -> None:
        text = json.dumps({"type": "playAudio"})
        assert "data object" in invalid_reason(ListenAudioProtocol().receive(text, 0.0))

    def test_refused_when_streaming(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        text = play_audio(audioContent="AAA=", audioContentType="raw")
        assert "streaming off" in invalid_reason(proto.receive(text, 0.0))

    def test_refused_when_bidirectional_audio_is_off(self) -> None:
        proto = ListenAudioProtocol(bidirectional_enabled=False)
        text = play_audio(audioContent="AAA=", audioContentType="raw")
        assert "bidirectionalAudio" in invalid_reason(proto.receive(text, 0.0))

    def test_play_done(self) -> None:
        proto = ListenAudioProtocol()
        assert json.loads(proto.play_done("clip-1")) == {
            "type": "playDone",
            "data": {"id": "clip-1"},
        }
        assert json.loads(proto.play_done()) == {"type": "playDone", "data": {}}
        done = json.loads(proto.play_done(3, {"reason": "completed"}))
        assert done == {"type": "playDone", "data": {"reason": "completed", "id": 3}}


def mark(name: Any) -> str:
    return json.dumps({"type": "mark", "data": {"name": name}})


class TestListenMarkLimit:
    def test_mark_becomes_outstanding_until_reported(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        assert proto.receive(mark("m1"), 0.0) == [Mark("m1")]
        assert proto.outstanding_marks == ("m1",)
        assert json.loads(proto.mark_event("m1", "playout")) == {
            "type": "mark",
            "data": {"name": "m1", "event": "playout"},
        }
        assert len(proto.outstanding_marks) == 0

    def test_thirty_outstanding_at_most(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        for i in range(MAX_OUTSTANDING_MARKS):
            assert proto.receive(mark(f"m{i}"), 0.0) == [Mark(f"m{i}")]
        assert "too many outstanding marks" in invalid_reason(proto.receive(mark("extra"), 0.0))
        json.loads(proto.mark_event("m0", "cleared"))
        assert proto.receive(mark("extra"), 0.0) == [Mark("extra")]
        assert len(proto.outstanding_marks) == MAX_OUTSTANDING_MARKS

    def test_clear_marks_forgets_them(self) -> None:
        proto = ListenAudioProtocol(streaming=True)
        proto.receive(mark("a"), 0.0)
        assert proto.receive(json.dumps({"type": "clearMarks"}), 0.0) == [ClearMarks()]
        assert len(proto.outstanding_marks) == 0

    @pytest.mark.parametrize("name", ["", 5, None])
    def test_mark_needs_a_name(self, name: Any) -> None:
        assert "data.name" in invalid_reason(ListenAudioProtocol().receive(mark(name), 0.0))

    def test_unknown_mark_event_is_a_local_error(self) -> None:
        with pytest.raises(LocalError):
            ListenAudioProtocol().mark_event("m", "reached")  # type: ignore[arg-type]

    def test_reporting_an_unknown_mark_still_builds_the_event(self) -> None:
        assert json.loads(ListenAudioProtocol().mark_event("ghost", "cleared"))["data"] == {
            "name": "ghost",
            "event": "cleared",
        }


class TestListenControlMessages:
    def test_kill_audio(self) -> None:
        assert ListenAudioProtocol().receive('{"type":"killAudio"}', 0.0) == [KillAudio()]

    def test_disconnect(self) -> None:
        proto = ListenAudioProtocol()
        assert proto.receive('{"type":"disconnect"}', 0.0) == [Disconnect(None)]
        assert proto.receive('{"type":"disconnect","data":{"reason":"bye"}}', 0.0) == [
            Disconnect({"reason": "bye"})
        ]

    def test_passthrough_types(self) -> None:
        proto = ListenAudioProtocol()
        assert proto.receive('{"type":"transfer","data":{"to":"+1"}}', 0.0) == [
            AppEvent("transfer", {"to": "+1"})
        ]
        assert proto.receive('{"type":"error","data":{"e":1}}', 0.0) == [
            AppEvent("error", {"e": 1})
        ]
        assert proto.receive('{"type":"error"}', 0.0) == [AppEvent("error", {})]
        assert proto.receive('{"type":"json","x":1}', 0.0) == [
            AppEvent("json", {"type": "json", "x": 1})
        ]

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("{nope", "invalid JSON"),
            ("[1]", "JSON object"),
            ('{"data":{}}', "type"),
            ('{"type":5}', "type"),
            ('{"type":"dance"}', "unsupported msg type dance"),
        ],
    )
    def test_invalid(self, text: str, reason: str) -> None:
        event = only(ListenAudioProtocol().receive(text, 0.0))
        assert isinstance(event, InvalidAudioMessage)
        assert reason in event.reason
        assert event.content == text


class TestListenTranscription:
    @pytest.mark.parametrize(
        ("message", "role", "text", "final"),
        [
            (
                {"type": "transcription", "data": {"role": "assistant", "text": "Hi"}},
                "assistant",
                "Hi",
                True,
            ),
            ({"type": "transcription", "role": "user", "message": "yes"}, "user", "yes", True),
            (
                {
                    "type": "transcription",
                    "data": {"speaker": "user", "transcript": "no", "is_final": False},
                },
                "user",
                "no",
                False,
            ),
            (
                {"type": "transcription", "data": {"alternatives": [{"transcript": "maybe"}]}},
                None,
                "maybe",
                True,
            ),
            (
                {"type": "transcription", "role": "user", "data": {"text": "x", "isFinal": True}},
                "user",
                "x",
                True,
            ),
        ],
    )
    def test_flexible_shapes(
        self, message: dict[str, Any], role: str | None, text: str, final: bool
    ) -> None:
        event = only(ListenAudioProtocol().receive(json.dumps(message), 0.0))
        assert isinstance(event, Transcription)
        assert (event.role, event.text, event.is_final) == (role, text, final)
        assert event.payload == message

    def test_without_text_is_invalid(self) -> None:
        text = json.dumps({"type": "transcription", "data": {"role": "user"}})
        assert "without text" in invalid_reason(ListenAudioProtocol().receive(text, 0.0))


class TestListenFromVerb:
    def test_configured_from_the_listen_verb(self) -> None:
        verb = parse_verb(
            {
                "verb": "listen",
                "url": "wss://x",
                "sampleRate": 16000,
                "mixType": "stereo",
                "passDtmf": True,
                "bidirectionalAudio": {"streaming": True, "sampleRate": 24000},
            }
        )
        assert isinstance(verb, ListenVerb)
        proto = ListenAudioProtocol.from_verb(verb)
        assert (proto.sample_rate, proto.mix_type, proto.return_sample_rate) == (
            16000,
            "stereo",
            24000,
        )
        assert proto.streaming is True
        assert proto.pass_dtmf is True

    def test_defaults_from_a_bare_verb(self) -> None:
        verb = parse_verb({"stream": {"url": "ws://x"}})
        assert isinstance(verb, ListenVerb)
        proto = ListenAudioProtocol.from_verb(verb)
        assert (proto.sample_rate, proto.return_sample_rate, proto.streaming) == (8000, 8000, False)
        assert proto.bidirectional_enabled is True


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=12,
)
TYPES = st.sampled_from(
    ["playAudio", "killAudio", "mark", "clearMarks", "disconnect", "transcription", "json", "x"]
)


class TestListenReceiveFuzz:
    @settings(max_examples=400)
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200)), st.booleans())
    def test_never_raises_on_any_frame(self, frame: str | bytes, streaming: bool) -> None:
        ListenAudioProtocol(streaming=streaming).receive(frame, 0.0)

    @settings(max_examples=400)
    @given(TYPES, JSON_VALUES, st.booleans())
    def test_never_raises_on_plausible_messages(
        self, kind: str, data: Any, streaming: bool
    ) -> None:
        proto = ListenAudioProtocol(streaming=streaming)
        events = proto.receive(json.dumps({"type": kind, "data": data}), 0.0)
        assert len(events) == 1

    @settings(max_examples=200)
    @given(st.lists(st.binary(max_size=50), max_size=10))
    def test_streamed_audio_is_never_lost_or_split_mid_sample(self, frames: list[bytes]) -> None:
        proto = ListenAudioProtocol(streaming=True)
        received = b""
        for frame in frames:
            for event in proto.receive(frame, 0.0):
                assert isinstance(event, AudioReceived)
                assert len(event.audio) % 2 == 0
                received += event.audio
        total = b"".join(frames)
        assert received == total[: len(total) - len(total) % 2]
