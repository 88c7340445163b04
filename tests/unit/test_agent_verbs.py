"""jambonz verb parsing: both verb shapes, every supported verb, errors that name the field."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.verbs import (
    VERB_MODELS,
    AnswerVerb,
    ConfigVerb,
    DialVerb,
    DtmfVerb,
    GatherVerb,
    HangupVerb,
    ListenVerb,
    PauseVerb,
    PlayVerb,
    RedirectVerb,
    SayVerb,
    SipDeclineVerb,
    TagVerb,
    VerbError,
    WebhookSpec,
    hook_url,
    parse_verb,
    parse_verbs,
)
from worker.errors import RemoteError

# One valid example of every supported verb, in the flat form.
EXAMPLES: dict[str, dict[str, Any]] = {
    "answer": {"verb": "answer"},
    "hangup": {"verb": "hangup", "headers": {"X-Reason": "done"}},
    "pause": {"verb": "pause", "length": 1.5},
    "play": {
        "verb": "play",
        "url": "https://example.com/a.wav",
        "loop": 2,
        "earlyMedia": True,
        "timeoutSecs": 10,
        "actionHook": "/played",
    },
    "say": {
        "verb": "say",
        "text": "Hello",
        "synthesizer": {"vendor": "google", "language": "en-US", "voice": "en-US-Wavenet-C"},
        "loop": 1,
        "earlyMedia": False,
    },
    "gather": {
        "verb": "gather",
        "input": ["digits", "speech"],
        "numDigits": 4,
        "minDigits": 1,
        "maxDigits": 6,
        "finishOnKey": "#",
        "timeout": 5,
        "interDigitTimeout": 2,
        "actionHook": "/digits",
        "say": {"text": "Enter your PIN"},
        "bargein": True,
        "dtmfBargein": True,
    },
    "listen": {
        "verb": "listen",
        "url": "wss://agent.example.com/audio",
        "mixType": "stereo",
        "sampleRate": 16000,
        "bidirectionalAudio": {"enabled": True, "streaming": True, "sampleRate": 24000},
        "passDtmf": True,
        "finishOnKey": "*",
        "maxLength": 3600,
        "metadata": {"agentId": "a1"},
        "wsAuth": {"username": "u", "password": "p"},
        "actionHook": "/listen-done",
        "playBeep": False,
    },
    "stream": {"verb": "stream", "url": "ws://agent/audio", "sampleRate": 8000},
    "dial": {
        "verb": "dial",
        "target": [
            {"type": "phone", "number": "+15551234567", "trunk": "carrier-a"},
            {"type": "sip", "sipUri": "sip:bob@example.com"},
            {"type": "user", "name": "alice@example.com"},
        ],
        "callerId": "+15550000000",
        "timeout": 30,
        "answerOnBridge": True,
        "actionHook": "/dial-done",
        "headers": {"X-Account": "42"},
        "listen": {"url": "wss://agent/audio", "mixType": "mixed"},
    },
    "dtmf": {"verb": "dtmf", "dtmf": "12w#", "duration": 250},
    "tag": {"verb": "tag", "data": {"customer": "c-1", "tier": 2}},
    "sip:decline": {"verb": "sip:decline", "status": 486, "reason": "Busy Here", "headers": {}},
    "redirect": {"verb": "redirect", "actionHook": {"url": "/next", "method": "GET"}},
    "config": {
        "verb": "config",
        "notifyEvents": True,
        "bargeIn": {"enable": True, "input": ["speech"], "actionHook": "/barge"},
        "synthesizer": {"vendor": "elevenlabs", "voice": "Rachel"},
        "recognizer": {"vendor": "deepgram", "language": "en-US"},
        "listen": {"enable": True, "url": "wss://agent/bg", "sampleRate": 16000},
    },
}

MODEL_FOR: dict[str, type] = {
    "answer": AnswerVerb,
    "hangup": HangupVerb,
    "pause": PauseVerb,
    "play": PlayVerb,
    "say": SayVerb,
    "gather": GatherVerb,
    "listen": ListenVerb,
    "stream": ListenVerb,
    "dial": DialVerb,
    "dtmf": DtmfVerb,
    "tag": TagVerb,
    "sip:decline": SipDeclineVerb,
    "redirect": RedirectVerb,
    "config": ConfigVerb,
}


def keyed(flat: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in flat.items() if k != "verb"}
    return {flat["verb"]: body}


def error_of(doc: Any) -> VerbError:
    with pytest.raises(VerbError) as info:
        parse_verbs(doc)
    return info.value


class TestEveryVerbParses:
    def test_examples_cover_every_supported_verb(self) -> None:
        assert set(EXAMPLES) == set(VERB_MODELS) == set(MODEL_FOR)

    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_flat_form(self, name: str) -> None:
        (verb,) = parse_verbs([EXAMPLES[name]])
        assert isinstance(verb, MODEL_FOR[name])
        assert verb.verb == name

    def test_field_values_land_in_snake_case_attributes(self) -> None:
        verbs = parse_verbs([EXAMPLES[name] for name in sorted(EXAMPLES)])
        by_name = {v.verb: v for v in verbs}
        gather = by_name["gather"]
        assert isinstance(gather, GatherVerb)
        assert gather.num_digits == 4
        assert gather.finish_on_key == "#"
        assert gather.inter_digit_timeout == 2.0
        assert gather.dtmf_bargein is True
        assert gather.say is not None
        assert gather.say.texts == ["Enter your PIN"]
        listen = by_name["listen"]
        assert isinstance(listen, ListenVerb)
        assert listen.mix_type == "stereo"
        assert listen.bidirectional_audio.sample_rate == 24000
        assert listen.ws_auth is not None
        assert listen.ws_auth.username == "u"
        assert listen.metadata == {"agentId": "a1"}
        dial = by_name["dial"]
        assert isinstance(dial, DialVerb)
        assert [t.type for t in dial.target] == ["phone", "sip", "user"]
        assert dial.target[1].sip_uri == "sip:bob@example.com"
        assert dial.answer_on_bridge is True
        assert dial.listen is not None
        assert dial.listen.mix_type == "mixed"
        play = by_name["play"]
        assert isinstance(play, PlayVerb)
        assert play.timeout_secs == 10.0
        assert play.early_media is True
        config = by_name["config"]
        assert isinstance(config, ConfigVerb)
        assert config.notify_events is True
        assert config.barge_in is not None
        assert config.barge_in.enable is True
        assert config.listen is not None
        assert config.listen.url == "wss://agent/bg"
        decline = by_name["sip:decline"]
        assert isinstance(decline, SipDeclineVerb)
        assert decline.status == 486
        redirect = by_name["redirect"]
        assert isinstance(redirect, RedirectVerb)
        assert hook_url(redirect.action_hook) == "/next"

    def test_list_and_string_forms_read_the_same(self) -> None:
        one, many = parse_verbs(
            [
                {"verb": "play", "url": "a.wav"},
                {"verb": "play", "url": ["a.wav", "b.wav"]},
            ]
        )
        assert isinstance(one, PlayVerb)
        assert isinstance(many, PlayVerb)
        assert one.urls == ["a.wav"]
        assert many.urls == ["a.wav", "b.wav"]
        assert SayVerb(text=["a", "b"]).texts == ["a", "b"]

    def test_every_verb_carries_an_optional_id(self) -> None:
        for name, flat in EXAMPLES.items():
            (verb,) = parse_verbs([{**flat, "id": f"id-{name}"}])
            assert verb.id == f"id-{name}"
        (plain,) = parse_verbs([EXAMPLES["answer"]])
        assert plain.id is None


class TestBothVerbShapes:
    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_keyed_form_equals_flat_form(self, name: str) -> None:
        assert parse_verbs([keyed(EXAMPLES[name])]) == parse_verbs([EXAMPLES[name]])

    def test_mixed_shapes_in_one_document(self) -> None:
        verbs = parse_verbs(
            [{"say": {"text": "Hi", "id": "b5e39996"}}, {"verb": "hangup"}, {"answer": {}}]
        )
        assert [v.verb for v in verbs] == ["say", "hangup", "answer"]
        assert verbs[0].id == "b5e39996"

    def test_lone_verb_key_is_the_flat_form(self) -> None:
        (verb,) = parse_verbs([{"verb": "hangup"}])
        assert isinstance(verb, HangupVerb)

    def test_verb_key_inside_keyed_body_is_ignored(self) -> None:
        (verb,) = parse_verbs([{"say": {"verb": "play", "text": "x"}}])
        assert isinstance(verb, SayVerb)

    def test_stream_alias_keeps_the_name_the_app_used(self) -> None:
        (verb,) = parse_verbs([{"stream": {"url": "wss://a/b"}}])
        assert isinstance(verb, ListenVerb)
        assert verb.verb == "stream"

    def test_to_wire_is_the_flat_camel_case_form_and_parses_back(self) -> None:
        for flat in EXAMPLES.values():
            (verb,) = parse_verbs([flat])
            wire = verb.to_wire()
            assert wire["verb"] == flat["verb"]
            assert "action_hook" not in json.dumps(wire)
            assert parse_verbs([wire]) == [verb]


class TestVerbDocumentShape:
    def test_document_must_be_an_array(self) -> None:
        error = error_of({"verb": "say", "text": "x"})
        assert error.index is None
        assert "array" in error.reason

    def test_element_must_be_an_object(self) -> None:
        error = error_of([{"verb": "answer"}, "hangup"])
        assert error.index == 1

    def test_several_keys_without_verb(self) -> None:
        error = error_of([{"say": {"text": "x"}, "play": {"url": "u"}}])
        assert error.index == 0
        assert "exactly one key" in error.reason

    def test_keyed_body_must_be_an_object(self) -> None:
        error = error_of([{"say": "hello"}])
        assert error.verb == "say"

    def test_verb_name_must_be_a_string(self) -> None:
        error = error_of([{"verb": 7}])
        assert error.field == "verb"

    def test_empty_document_is_fine(self) -> None:
        assert parse_verbs([]) == []


class TestUnknownVerb:
    def test_error_names_the_verb_and_index(self) -> None:
        error = error_of([{"verb": "answer"}, {"verb": "conference", "name": "room"}])
        assert error.index == 1
        assert error.verb == "conference"
        assert "unknown verb 'conference'" in str(error)

    def test_keyed_unknown_verb(self) -> None:
        assert error_of([{"teleport": {}}]).verb == "teleport"

    def test_verb_error_is_a_remote_error(self) -> None:
        assert isinstance(error_of([{"verb": "nope"}]), RemoteError)


class TestBadFieldsNameTheField:
    @pytest.mark.parametrize(
        ("verb", "field"),
        [
            ({"verb": "say", "text": 5}, "text"),
            ({"verb": "say"}, "text"),
            ({"verb": "say", "text": "x", "synthesizer": {"vendor": 3}}, "synthesizer.vendor"),
            ({"verb": "say", "text": "x", "earlyMedia": "yes"}, "earlyMedia"),
            ({"verb": "say", "text": "x", "loop": "2"}, "loop"),
            ({"verb": "say", "text": "x", "id": 3}, "id"),
            ({"verb": "play", "url": []}, "url"),
            ({"verb": "play", "url": "u", "actionHook": 5}, "actionHook"),
            ({"verb": "pause"}, "length"),
            ({"verb": "pause", "length": "2"}, "length"),
            ({"verb": "pause", "length": True}, "length"),
            ({"verb": "gather", "numDigits": "4"}, "numDigits"),
            ({"verb": "gather", "input": ["dtmf"]}, "input[0]"),
            ({"verb": "gather", "finishOnKey": "##"}, "finishOnKey"),
            ({"verb": "gather", "say": {"text": 1}}, "say.text"),
            ({"verb": "listen"}, "url"),
            ({"verb": "listen", "url": "ftp://x"}, "url"),
            ({"verb": "listen", "url": "wss://x", "mixType": "quad"}, "mixType"),
            ({"verb": "listen", "url": "wss://x", "sampleRate": "16000"}, "sampleRate"),
            ({"verb": "listen", "url": "wss://x", "sampleRate": 44100}, "sampleRate"),
            (
                {"verb": "listen", "url": "wss://x", "bidirectionalAudio": {"streaming": 1}},
                "bidirectionalAudio.streaming",
            ),
            ({"verb": "listen", "url": "wss://x", "wsAuth": {"username": "u"}}, "wsAuth.password"),
            ({"verb": "dial", "target": []}, "target"),
            ({"verb": "dial", "target": [{"type": "phone"}]}, "target[0]"),
            ({"verb": "dial", "target": [{"type": "fax", "number": "1"}]}, "target[0].type"),
            ({"verb": "dtmf", "dtmf": "12x"}, "dtmf"),
            ({"verb": "dtmf", "dtmf": 12}, "dtmf"),
            ({"verb": "tag", "data": "x"}, "data"),
            ({"verb": "sip:decline", "status": 200}, "status"),
            ({"verb": "sip:decline", "status": "486"}, "status"),
            ({"verb": "hangup", "headers": {"X-Code": 1}}, "headers.X-Code"),
            ({"verb": "redirect"}, "actionHook"),
            ({"verb": "config", "notifyEvents": "true"}, "notifyEvents"),
            ({"verb": "config", "bargeIn": {"enable": "y"}}, "bargeIn.enable"),
        ],
    )
    def test_field_named(self, verb: dict[str, Any], field: str) -> None:
        error = error_of([{"verb": "answer"}, verb])
        assert error.index == 1
        assert error.verb == verb["verb"]
        assert error.field == field
        assert f"verbs[1] ({verb['verb']}): {field}: " in str(error)

    def test_keyed_form_errors_name_the_field_too(self) -> None:
        error = error_of([{"gather": {"timeout": "5"}}])
        assert (error.index, error.verb, error.field) == (0, "gather", "timeout")

    def test_whole_verb_rule_has_no_field(self) -> None:
        error = error_of([{"verb": "gather", "minDigits": 5, "maxDigits": 2}])
        assert error.field is None
        assert "minDigits" in error.reason


class TestForwardCompatibleExtras:
    def test_unknown_properties_are_ignored(self) -> None:
        (verb,) = parse_verbs([{"verb": "say", "text": "x", "futureOption": {"a": 1}}])
        assert verb == SayVerb(text="x")

    def test_unknown_nested_properties_are_ignored(self) -> None:
        (verb,) = parse_verbs(
            [{"verb": "say", "text": "x", "synthesizer": {"vendor": "v", "newKnob": 3}}]
        )
        assert isinstance(verb, SayVerb)
        assert verb.synthesizer is not None
        assert verb.synthesizer.vendor == "v"


class TestJsonNumbers:
    def test_integral_float_accepted_where_an_integer_is_expected(self) -> None:
        (verb,) = parse_verbs([{"verb": "gather", "numDigits": 4.0}])
        assert isinstance(verb, GatherVerb)
        assert verb.num_digits == 4
        (listen,) = parse_verbs([{"verb": "listen", "url": "wss://x", "sampleRate": 16000.0}])
        assert isinstance(listen, ListenVerb)
        assert listen.sample_rate == 16000

    def test_fractional_float_rejected_where_an_integer_is_expected(self) -> None:
        assert error_of([{"verb": "gather", "numDigits": 4.5}]).field == "numDigits"

    def test_int_accepted_where_a_float_is_expected(self) -> None:
        (verb,) = parse_verbs([{"verb": "pause", "length": 2}])
        assert isinstance(verb, PauseVerb)
        assert verb.length == 2.0


class TestListenVerbRules:
    def test_defaults(self) -> None:
        (verb,) = parse_verbs([{"verb": "listen", "url": "wss://x"}])
        assert isinstance(verb, ListenVerb)
        assert verb.mix_type == "mono"
        assert verb.sample_rate == 8000
        assert verb.bidirectional_audio.enabled is True
        assert verb.bidirectional_audio.streaming is False
        assert verb.bidirectional_enabled is True
        assert verb.bidirectional_streaming is False
        assert verb.return_sample_rate == 8000
        assert verb.pass_dtmf is False

    @pytest.mark.parametrize("rate", [8000, 16000, 24000, 32000, 48000, 64000])
    def test_sample_rates(self, rate: int) -> None:
        (verb,) = parse_verbs([{"verb": "listen", "url": "wss://x", "sampleRate": rate}])
        assert isinstance(verb, ListenVerb)
        assert verb.sample_rate == rate

    def test_return_rate_defaults_to_the_listen_rate(self) -> None:
        (verb,) = parse_verbs(
            [{"verb": "listen", "url": "wss://x", "sampleRate": 16000, "bidirectionalAudio": {}}]
        )
        assert isinstance(verb, ListenVerb)
        assert verb.return_sample_rate == 16000

    def test_disable_bidirectional_audio_wins(self) -> None:
        (verb,) = parse_verbs(
            [
                {
                    "verb": "listen",
                    "url": "wss://x",
                    "disableBidirectionalAudio": True,
                    "bidirectionalAudio": {"enabled": True, "streaming": True},
                }
            ]
        )
        assert isinstance(verb, ListenVerb)
        assert verb.bidirectional_enabled is False
        assert verb.bidirectional_streaming is False

    @pytest.mark.parametrize("url", ["ws://a", "wss://a", "http://a", "https://a"])
    def test_url_schemes(self, url: str) -> None:
        (verb,) = parse_verbs([{"verb": "listen", "url": url}])
        assert isinstance(verb, ListenVerb)

    def test_config_listen_needs_url_only_when_enabled(self) -> None:
        (verb,) = parse_verbs([{"verb": "config", "listen": {"enable": False}}])
        assert isinstance(verb, ConfigVerb)
        assert verb.listen is not None
        assert verb.listen.enable is False
        error = error_of([{"verb": "config", "listen": {"enable": True}}])
        assert error.field == "listen"


class TestDialTargets:
    @pytest.mark.parametrize(
        ("target", "needs"),
        [
            ({"type": "phone"}, "number"),
            ({"type": "teams"}, "number"),
            ({"type": "sip"}, "sipUri"),
            ({"type": "user"}, "name"),
        ],
    )
    def test_each_type_needs_its_address(self, target: dict[str, Any], needs: str) -> None:
        error = error_of([{"verb": "dial", "target": [target]}])
        assert error.field == "target[0]"
        assert needs in error.reason


class TestHooks:
    def test_string_hook_is_kept_as_written(self) -> None:
        (verb,) = parse_verbs([{"verb": "gather", "actionHook": "/digit"}])
        assert isinstance(verb, GatherVerb)
        assert verb.action_hook == "/digit"
        assert hook_url(verb.action_hook) == "/digit"

    def test_object_hook(self) -> None:
        (verb,) = parse_verbs(
            [{"verb": "play", "url": "u", "actionHook": {"url": "https://h/x", "method": "GET"}}]
        )
        assert isinstance(verb, PlayVerb)
        assert isinstance(verb.action_hook, WebhookSpec)
        assert verb.action_hook.method == "GET"
        assert hook_url(verb.action_hook) == "https://h/x"


class TestParseVerbSingle:
    def test_single_verb(self) -> None:
        assert parse_verb({"say": {"text": "x"}}) == SayVerb(text="x")

    def test_single_verb_error_without_index(self) -> None:
        with pytest.raises(VerbError) as info:
            parse_verb({"verb": "say"})
        assert info.value.index is None
        assert str(info.value).startswith("verbs (say): text: ")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
VERB_NAMES = st.sampled_from([*VERB_MODELS, "unknown"])
FIELD_NAMES = st.sampled_from(
    ["text", "url", "length", "target", "actionHook", "sampleRate", "dtmf", "data", "status", "id"]
)


class TestVerbParsingFuzz:
    @settings(max_examples=300)
    @given(JSON)
    def test_arbitrary_json_parses_or_raises_verb_error(self, raw: Any) -> None:
        with contextlib.suppress(VerbError):
            parse_verbs(raw)

    @settings(max_examples=300)
    @given(VERB_NAMES, st.dictionaries(FIELD_NAMES, JSON, max_size=5), st.booleans())
    def test_plausible_verbs_parse_or_raise_verb_error(
        self, name: str, body: dict[str, Any], flat: bool
    ) -> None:
        raw = {"verb": name, **body} if flat else {name: body}
        index: int | None = 0
        try:
            parse_verbs([raw])
        except VerbError as error:
            index = error.index
        assert index == 0
