"""The ARI test double's sans-I/O parts, checked against Asterisk's api-docs and the recordings:
Swagger routing and parameter checks, event and snapshot shapes, PJSIP object rules, caller id
parsing, the 8/16 kHz conversions, and the replay's identifier mapping. No sockets."""

from __future__ import annotations

import json

import pytest

from tests.ari_double import events as ev
from tests.ari_double import recordings
from tests.ari_double.dialing import parse_caller_id
from tests.ari_double.errors import AriError
from tests.ari_double.model import Bridge, Channel
from tests.ari_double.replay import MismatchError, Tokens, compare
from tests.ari_double.sorcery import Sorcery
from tests.ari_double.swagger import api, check_params


class TestSwaggerRoutingLikeResAri:
    def test_literal_segments_before_path_variables(self) -> None:
        route = api().route("/channels/externalMedia")
        assert route is not None
        assert route.operations["POST"].nickname == "externalMedia"
        assert route.path_vars == {}
        route = api().route("/channels/1795254475.0/answer")
        assert route is not None
        assert route.operations["POST"].nickname == "answer"
        assert route.path_vars == {"channelId": "1795254475.0"}

    def test_unknown_segment_and_percent_decoding(self) -> None:
        assert api().route("/nosuchresource") is None
        assert api().route("/channels/x/nosuch") is None
        route = api().route("/bridges/a%20b")
        assert route is not None
        assert route.path_vars == {"bridgeId": "a b"}

    def test_walk_stops_at_an_empty_segment(self) -> None:
        route = api().route("/channels//answer")
        assert route is not None
        assert set(route.operations) == {"GET", "POST"}
        assert route.allow_header() == "OPTIONS,GET,POST"

    def test_every_operation_of_every_file_is_loaded(self) -> None:
        on_disk = 0
        for path in api().directory.glob("*.json"):
            doc = json.loads(path.read_text())
            if path.name != "resources.json":
                on_disk += sum(len(entry["operations"]) for entry in doc["apis"])
        assert len(api().operations()) == on_disk


class TestDoubleParameterChecks:
    def test_types_ranges_and_lists(self) -> None:
        originate = api().operation("channels", "originate")
        assert check_params(originate, {"endpoint": "PJSIP/1@a", "timeout": "-1"}) is None
        assert "integer" in str(check_params(originate, {"endpoint": "x", "timeout": "1.5"}))
        play = api().operation("bridges", "play")
        assert "at least 0" in str(check_params(play, {"media": "sound:x", "skipms": "-1"}))
        info = api().operation("asterisk", "getInfo")
        assert check_params(info, {"only": "build,system"}) is None
        assert "must be one of" in str(check_params(info, {"only": "build,bogus"}))
        add = api().operation("bridges", "addChannel")
        assert "boolean" in str(check_params(add, {"channel": "a", "mute": "maybe"}))
        assert check_params(add, {"channel": "a", "mute": "yes"}) is None

    def test_required_unknown_and_resource_checked(self) -> None:
        hangup = api().operation("channels", "hangup")
        assert "must be one of" in str(check_params(hangup, {"reason": "bogus"}))
        assert check_params(hangup, {"reason": "bogus"}, {"reason"}) is None
        assert "Unknown parameter 'foo'" in str(check_params(hangup, {"foo": "1"}))
        play = api().operation("channels", "play")
        assert "Missing required parameter 'media'" in str(check_params(play, {}))


class TestEventShapesFromRecordings:
    def test_every_recorded_event_is_rebuilt_with_its_key_order(self) -> None:
        for name in recordings.names():
            for line in recordings.events(name):
                recorded = line["event"]
                fields = {
                    k: v
                    for k, v in recorded.items()
                    if k not in ("type", "timestamp", "asterisk_id", "application")
                }
                built = ev.make(recorded["type"], ["aispinner"], **fields).render("aispinner")
                assert list(built) == list(recorded)
                assert built["asterisk_id"] == recorded["asterisk_id"]

    def test_unrecorded_shapes_cannot_be_built(self) -> None:
        with pytest.raises(ev.UnrecordedEventShapeError):
            ev.make("StasisStart", ["aispinner"], channel={})  # no args
        with pytest.raises(ev.UnrecordedEventShapeError):
            ev.make("ChannelHold", ["aispinner"], channel={})

    def test_timestamp_format_and_causes(self) -> None:
        assert ev.timestamp(1795254475.3114) == "2026-11-21T09:47:55.311+0000"
        assert ev.cause_text(19) == "User alerting, no answer"
        assert ev.cause_text(4242) == "Unknown"

    def test_channel_and_bridge_snapshots_have_recorded_key_orders(self) -> None:
        line = recordings.events("inbound_answer_bridge_externalmedia_dtmf_caller_hangup")[7]
        event = line["event"]
        assert event["type"] == "ChannelEnteredBridge"
        channel = Channel(id="1.0", name="PJSIP/trunk-00000000", kind="sip-in", state="Up")
        assert list(channel.snapshot()) == list(event["channel"])
        assert list(channel.snapshot()["dialplan"]) == list(event["channel"]["dialplan"])
        assert list(Bridge(id="b", name="", bridge_type="mixing").snapshot()) == list(
            event["bridge"]
        )


class TestPjsipObjects:
    BASE = "/ari/asterisk/config/dynamic/res_pjsip"

    def _recorded(self, method: str, path: str, status: int) -> tuple[object, object]:
        for line in recordings.rest_lines("dynamic_config"):
            if (line["method"], line["path"], line["status"]) == (method, path, status):
                return line["body"], line["response"]
        raise LookupError(path)

    def test_recorded_creations_give_the_recorded_objects(self) -> None:
        sorcery = Sorcery(memory=True, endpoints=["trunk", "sippuas"])
        for kind, name in (
            ("auth", "trunk2-auth"),
            ("aor", "trunk2"),
            ("endpoint", "trunk2"),
            ("identify", "trunk2"),
        ):
            body, response = self._recorded("PUT", f"{self.BASE}/{kind}/{name}", 200)
            assert sorcery.update_object("res_pjsip", kind, name, body) == response

    def test_update_merges_and_allow_is_additive(self) -> None:
        sorcery = Sorcery(memory=True, endpoints=["trunk"])
        body, _ = self._recorded("PUT", f"{self.BASE}/endpoint/trunk2", 200)
        sorcery.update_object("res_pjsip", "endpoint", "trunk2", body)
        update = {"fields": [{"attribute": "allow", "value": "ulaw"}]}
        values = {
            a["attribute"]: a["value"]
            for a in sorcery.update_object("res_pjsip", "endpoint", "trunk2", update)
        }
        assert (values["allow"], values["callerid"], values["aors"]) == (
            "(ulaw|alaw)",
            "unknown",
            "trunk2",
        )

    @pytest.mark.parametrize(
        ("kind", "attribute", "value"),
        [
            ("endpoint", "direct_media", "perhaps"),
            ("endpoint", "allow", "nosuchcodec"),
            ("aor", "max_contacts", "many"),
            ("identify", "match", "carrier.example"),
            ("auth", "no_such_option", "x"),
        ],
    )
    def test_invalid_values_fail_validation(self, kind: str, attribute: str, value: str) -> None:
        sorcery = Sorcery(memory=True, endpoints=["trunk"])
        with pytest.raises(AriError) as failed:
            sorcery.update_object(
                "res_pjsip", kind, "x", {"fields": [{"attribute": attribute, "value": value}]}
            )
        assert (failed.value.status, failed.value.message) == (
            400,
            "Creation of object 'x' failed field value validation",
        )

    def test_endpoint_online_only_with_an_aor_contact(self) -> None:
        sorcery = Sorcery(memory=True, endpoints=["trunk", "sippuas"])
        assert not sorcery.endpoint_online("trunk")
        assert sorcery.endpoint_online("sippuas")
        assert sorcery.endpoint_names() == ["trunk", "sippuas"]


class TestCallerIdParsing:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("+15550001111", ("", "+15550001111")),
            ('"Front Desk" <+1 (555) 000-1111>', ("Front Desk", "+15550001111")),
            ("Front Desk", ("Front Desk", "")),
        ],
    )
    def test_like_ast_callerid_parse(self, value: str, expected: tuple[str, str]) -> None:
        assert parse_caller_id(value) == expected


class TestReplayIdentifierMapping:
    def test_whole_tokens_only(self) -> None:
        tokens = Tokens()
        tokens.learn("1795254336.1", "9.1", "a")
        tokens.learn("1795254336.10", "9.2", "b")
        assert tokens.sub("call-1795254336.1,1795254336.10") == "call-9.1,9.2"
        with pytest.raises(MismatchError):
            tokens.learn("1795254336.1", "9.3", "c")
        with pytest.raises(MismatchError):
            tokens.learn("other", "9.1", "d")

    def test_compare_learns_ids_and_checks_the_rest(self) -> None:
        tokens = Tokens()
        compare({"id": "r1", "state": "Up"}, {"id": "a1", "state": "Up"}, tokens)
        assert tokens.get("r1") == "a1"
        with pytest.raises(MismatchError):
            compare({"id": "r1", "state": "Up"}, {"state": "Up", "id": "a1"}, tokens)
        with pytest.raises(MismatchError):
            compare({"channels": ["r1"]}, {"channels": ["a2"]}, tokens)
