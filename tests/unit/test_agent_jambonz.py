"""The ws.jambonz.org control protocol, sans-I/O: envelopes, acks on a virtual clock, commands,
invalid messages and the session:reconnect rules. No sockets."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.jambonz import (
    ACK_TIMEOUT,
    AckDiscarded,
    AckFailed,
    AckReceived,
    AckTimedOut,
    CallStatusCommand,
    CommandReceived,
    ConfigCommand,
    ControlEvent,
    ControlState,
    DtmfCommand,
    HangupRequired,
    InvalidMessage,
    JambonzControl,
    ListenStatusCommand,
    MuteStatusCommand,
    RedirectCommand,
    RedirectHookCommand,
    SipRequestCommand,
    camel_case_keys,
    snake_case_key,
    snake_case_keys,
    to_camel_case,
)
from worker.agent.verbs import HangupVerb, SayVerb, WebhookSpec
from worker.errors import LocalError

CALL_SID = "9fb35c28-2a3c-4f5e-9d1b-5d7e2b3c4a11"
CALL_INFO: dict[str, Any] = {
    "callSid": CALL_SID,
    "direction": "inbound",
    "from": "+15083084809",
    "to": "+15083728299",
    "callId": "d8907723-c3a1",
    "sbcCallid": "a1b2",
    "sipStatus": 100,
    "callStatus": "trying",
    "accountSid": "acc-1",
    "applicationSid": "app-1",
    "callerName": "",
    "customerData": {"tierLevel": 2},
    "sip": {"headers": {"X-CID": "a1b2", "call-id": "d8907723-c3a1"}},
    "env_vars": {"API_KEY": "k"},
}


def state(control: JambonzControl) -> ControlState:
    """The state, read through a call so that mypy does not narrow it between steps."""
    return control.state


def make_control(**kwargs: Any) -> JambonzControl:
    counter = itertools.count(1)
    return JambonzControl(CALL_SID, msgid_factory=lambda: f"m{next(counter)}", **kwargs)


@pytest.fixture
def ctl() -> JambonzControl:
    control = make_control()
    control.connection_made(0.0)
    return control


def sent(control: JambonzControl) -> list[dict[str, Any]]:
    return [json.loads(text) for text in control.messages_to_send()]


def ack(msgid: str, data: Any = None, **extra: Any) -> str:
    obj: dict[str, Any] = {"type": "ack", "msgid": msgid, **extra}
    if data is not None:
        obj["data"] = data
    return json.dumps(obj)


def command(name: str, data: Any = None, **extra: Any) -> str:
    obj: dict[str, Any] = {"type": "command", "command": name, **extra}
    if data is not None:
        obj["data"] = data
    return json.dumps(obj)


def started(control: JambonzControl, now: float = 0.0) -> str:
    """Send session:new, ack it, drain the outbox; returns the session:new msgid."""
    msgid = control.send_session_new(CALL_INFO, now).msgid
    control.messages_to_send()
    (event,) = control.receive(ack(msgid), now)
    assert isinstance(event, AckReceived)
    return msgid


def the_command(events: list[ControlEvent]) -> Any:
    (event,) = events
    assert isinstance(event, CommandReceived)
    return event.command


class TestJambonzEnvelope:
    def test_session_new_shape(self, ctl: JambonzControl) -> None:
        out = ctl.send_session_new(CALL_INFO, 0.0)
        (msg,) = sent(ctl)
        assert list(msg) == ["type", "msgid", "call_sid", "data"]
        assert msg["type"] == "session:new"
        assert msg["msgid"] == out.msgid == "m1"
        assert msg["call_sid"] == CALL_SID
        assert isinstance(msg["data"], dict)
        assert json.loads(out.text) == msg
        assert not out.queued
        assert not out.discarded

    def test_session_new_data_is_snake_cased_except_passthrough_subtrees(
        self, ctl: JambonzControl
    ) -> None:
        ctl.send_session_new(CALL_INFO, 0.0)
        (msg,) = sent(ctl)
        data = msg["data"]
        assert data["call_sid"] == CALL_SID
        assert data["sbc_callid"] == "a1b2"
        assert data["sip_status"] == 100
        assert data["call_status"] == "trying"
        assert data["caller_name"] == ""
        assert data["customerData"] == {"tierLevel": 2}
        assert data["sip"] == {"headers": {"X-CID": "a1b2", "call-id": "d8907723-c3a1"}}
        assert data["env_vars"] == {"API_KEY": "k"}
        assert "callSid" not in data

    def test_every_message_gets_a_fresh_msgid(self, ctl: JambonzControl) -> None:
        started(ctl)
        ids = {
            ctl.send_call_status({**CALL_INFO, "callStatus": "ringing"}, 0.1).msgid,
            ctl.send_verb_error("boom", 0.2, verb="say").msgid,
            ctl.send_verb_hook("/h", CALL_INFO, None, 0.3).msgid,
        }
        assert len(ids) == 3
        assert all(m["call_sid"] == CALL_SID for m in sent(ctl))

    def test_default_msgids_are_short_and_unique(self) -> None:
        control = JambonzControl(CALL_SID)
        control.connection_made(0.0)
        ids = [control.send_verb_error("e", 0.0, verb="say").msgid for _ in range(200)]
        assert len(set(ids)) == 200
        assert all(len(i) == 22 and i.isascii() for i in ids)

    def test_messages_wait_in_the_outbox_until_drained(self, ctl: JambonzControl) -> None:
        ctl.send_session_new(CALL_INFO, 0.0)
        assert len(ctl.messages_to_send()) == 1
        assert ctl.messages_to_send() == []

    def test_messages_built_before_the_socket_opens_go_out_on_open(self) -> None:
        control = make_control()
        out = control.send_session_new(CALL_INFO, 0.0)
        assert out.queued
        assert control.messages_to_send() == []
        control.connection_made(0.2)
        assert [m["type"] for m in sent(control)] == ["session:new"]
        assert control.next_timeout() == pytest.approx(0.2 + ACK_TIMEOUT)


class TestJambonzSnakeCaseKeys:
    @pytest.mark.parametrize(
        ("key", "snake"),
        [
            ("callSid", "call_sid"),
            ("sbcCallid", "sbc_callid"),
            ("fsSipAddress", "fs_sip_address"),
            ("call_sid", "call_sid"),
            ("X-CID", "x_cid"),
            ("from", "from"),
            ("dialCallDuration", "dial_call_duration"),
            ("SIPStatus", "s_i_p_status"),
            ("Caller Name", "caller_name"),
            ("", ""),
        ],
    )
    def test_keys_like_to_snake_case(self, key: str, snake: str) -> None:
        assert snake_case_key(key) == snake

    def test_excluded_subtrees_anywhere(self) -> None:
        value = {
            "outerKey": {"customerData": {"aB": 1}, "innerKey": [{"cD": 2}], "args": {"eF": 3}}
        }
        assert snake_case_keys(value) == {
            "outer_key": {"customerData": {"aB": 1}, "inner_key": [{"c_d": 2}], "args": {"eF": 3}}
        }

    def test_camel_case_for_listen_metadata(self) -> None:
        assert to_camel_case("call_sid") == "callSid"
        assert to_camel_case("fs_sip_address") == "fsSipAddress"
        assert to_camel_case("callSid") == "callSid"
        info = {
            "call_sid": "c",
            "sbc_callid": "s",
            "customerData": {"a_b": 1},
            "headers": {"X-A": "1"},
        }
        assert camel_case_keys(info) == {
            "callSid": "c",
            "sbcCallid": "s",
            "customerData": {"a_b": 1},
            "headers": {"X-A": "1"},
        }


class TestJambonzAckWithinFiveSeconds:
    def test_ack_before_deadline_delivers_the_verbs(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 10.0).msgid
        ctl.messages_to_send()
        assert ctl.pending_ack_deadline == pytest.approx(15.0)
        assert ctl.next_timeout() == pytest.approx(15.0)
        assert ctl.awaiting_ack() == [msgid]
        events = ctl.receive(ack(msgid, [{"verb": "say", "text": "Hi"}, {"hangup": {}}]), 14.9)
        assert events == [
            AckReceived(msgid, "session:new", (SayVerb(text="Hi"), HangupVerb()), msgid)
        ]
        assert ctl.next_timeout() is None
        assert ctl.messages_to_send() == []

    def test_timeout_at_exactly_five_seconds(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 100.0).msgid
        assert ctl.handle_timeout(104.999) == []
        assert ctl.handle_timeout(105.0) == [AckTimedOut(msgid, "session:new", msgid)]
        assert ctl.next_timeout() is None
        assert ctl.handle_timeout(106.0) == []

    def test_ack_without_data_releases_the_hook(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 0.0).msgid
        (event,) = ctl.receive(ack(msgid), 1.0)
        assert event == AckReceived(msgid, "session:new", None, msgid)

    def test_ack_with_empty_array(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 0.0).msgid
        (event,) = ctl.receive(ack(msgid, []), 1.0)
        assert isinstance(event, AckReceived)
        assert event.verbs == ()

    def test_ack_with_non_array_data_is_ignored_like_jambonz(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 0.0).msgid
        (event,) = ctl.receive(ack(msgid, {"say": {"text": "x"}}), 1.0)
        assert event == AckReceived(msgid, "session:new", None, msgid)

    def test_notifications_wait_for_no_ack(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_call_status({**CALL_INFO, "callStatus": "ringing"}, 1.0)
        ctl.send_verb_error("no credentials", 1.0, verb="say")
        assert ctl.next_timeout() is None
        assert ctl.handle_timeout(100.0) == []

    def test_custom_timeout(self) -> None:
        control = make_control(ack_timeout=2.0)
        control.connection_made(0.0)
        msgid = control.send_session_new(CALL_INFO, 0.0).msgid
        assert control.handle_timeout(2.0) == [AckTimedOut(msgid, "session:new", msgid)]

    def test_bad_settings(self) -> None:
        with pytest.raises(LocalError):
            JambonzControl(CALL_SID, ack_timeout=0)
        with pytest.raises(LocalError):
            JambonzControl(CALL_SID, max_reconnects=-1)


class TestJambonzLateAckDiscarded:
    def test_ack_after_deadline_is_discarded_and_counted(self, ctl: JambonzControl) -> None:
        started(ctl)
        msgid = ctl.send_verb_hook("/digits", CALL_INFO, {"digits": "1"}, 1.0).msgid
        ctl.messages_to_send()
        assert ctl.handle_timeout(6.0) == [AckTimedOut(msgid, "verb:hook", msgid)]
        assert ctl.receive(ack(msgid, [{"verb": "hangup"}]), 6.5) == [AckDiscarded(msgid, "late")]
        assert ctl.late_acks == 1
        assert ctl.messages_to_send() == []


class TestJambonzManyLateAcks:
    def test_memory_of_expired_msgids_is_bounded(self, ctl: JambonzControl) -> None:
        started(ctl)
        first = ctl.send_verb_hook("/h", CALL_INFO, None, 0.0).msgid
        now = 0.0
        for _ in range(300):
            now += ACK_TIMEOUT
            assert len(ctl.handle_timeout(now)) == 1
            ctl.send_verb_hook("/h", CALL_INFO, None, now)
        # The oldest expired msgids are forgotten: a very late ack is then just unknown.
        assert ctl.receive(ack(first), now) == [AckDiscarded(first, "unknown")]


class TestJambonzAckToUnknownMsgidIgnored:
    def test_discarded_silently(self, ctl: JambonzControl) -> None:
        started(ctl)
        assert ctl.receive(ack("nobody-sent-this"), 1.0) == [
            AckDiscarded("nobody-sent-this", "unknown")
        ]
        assert ctl.unknown_acks == 1
        assert ctl.messages_to_send() == []

    def test_second_ack_to_the_same_msgid_is_unknown(self, ctl: JambonzControl) -> None:
        msgid = started(ctl)
        assert ctl.receive(ack(msgid), 1.0) == [AckDiscarded(msgid, "unknown")]

    def test_ack_to_a_notification_is_unknown(self, ctl: JambonzControl) -> None:
        started(ctl)
        msgid = ctl.send_call_status({**CALL_INFO, "callStatus": "ringing"}, 1.0).msgid
        assert ctl.receive(ack(msgid), 1.1) == [AckDiscarded(msgid, "unknown")]


class TestJambonzAckWithBadVerbs:
    def test_hook_fails_and_the_app_hears_why(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 0.0).msgid
        ctl.messages_to_send()
        text = ack(msgid, [{"verb": "say", "text": "ok"}, {"verb": "say", "text": 5}])
        invalid, failed = ctl.receive(text, 1.0)
        assert isinstance(invalid, InvalidMessage)
        assert "verbs[1] (say): text" in invalid.details
        assert invalid.content == text
        assert isinstance(failed, AckFailed)
        assert (failed.msgid, failed.for_type) == (msgid, "session:new")
        (error,) = sent(ctl)
        assert error["type"] == "jambonz:error"
        assert error["data"]["msg"] == "InvalidMessage"
        assert "verbs[1] (say): text" in error["data"]["details"]
        assert ctl.next_timeout() is None


class TestJambonzVerbHook:
    def test_hook_as_written_and_data_merged(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_verb_hook(
            "/gather-done", CALL_INFO, {"digits": "1234", "reason": "dtmfDetected"}, 1.0
        )
        (msg,) = sent(ctl)
        assert msg["type"] == "verb:hook"
        assert msg["hook"] == "/gather-done"
        assert msg["call_sid"] == CALL_SID
        assert msg["data"]["digits"] == "1234"
        assert msg["data"]["call_sid"] == CALL_SID
        assert msg["data"]["call_status"] == "trying"
        assert "verb_id" not in msg["data"]

    def test_verb_id_when_the_verb_had_one(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_verb_hook("/x", CALL_INFO, {"speech": {"alternatives": []}}, 1.0, verb_id="g-7")
        (msg,) = sent(ctl)
        assert msg["data"]["verb_id"] == "g-7"

    def test_object_hook_sends_its_url(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_verb_hook(WebhookSpec(url="/listen-done", method="GET"), CALL_INFO, None, 1.0)
        (msg,) = sent(ctl)
        assert msg["hook"] == "/listen-done"

    def test_results_override_call_info_and_are_snake_cased(self, ctl: JambonzControl) -> None:
        started(ctl)
        results = {"callStatus": "in-progress", "dialCallDuration": 12}
        ctl.send_verb_hook("/x", CALL_INFO, results, 1.0)
        (msg,) = sent(ctl)
        assert msg["data"]["call_status"] == "in-progress"
        assert msg["data"]["dial_call_duration"] == 12


class TestJambonzOneHookAtATime:
    def test_second_hook_waits_for_the_first_ack(self, ctl: JambonzControl) -> None:
        started(ctl)
        first = ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        second = ctl.send_verb_hook("/b", CALL_INFO, None, 1.5)
        assert not first.queued
        assert second.queued
        assert [m["hook"] for m in sent(ctl)] == ["/a"]
        ctl.receive(ack(first.msgid), 2.0)
        assert [m["hook"] for m in sent(ctl)] == ["/b"]
        assert ctl.next_timeout() == pytest.approx(2.0 + ACK_TIMEOUT)

    def test_held_hook_goes_after_the_first_times_out(self, ctl: JambonzControl) -> None:
        started(ctl)
        first = ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        ctl.send_verb_hook("/b", CALL_INFO, None, 1.5)
        ctl.messages_to_send()
        assert ctl.handle_timeout(6.0) == [AckTimedOut(first.msgid, "verb:hook", first.msgid)]
        assert [m["hook"] for m in sent(ctl)] == ["/b"]

    def test_notifications_are_not_held(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        ctl.send_verb_hook("/b", CALL_INFO, None, 1.0)
        status = ctl.send_call_status({**CALL_INFO, "callStatus": "in-progress"}, 1.1)
        assert not status.queued
        assert [m["type"] for m in sent(ctl)] == ["verb:hook", "call:status"]

    def test_can_be_turned_off(self) -> None:
        control = make_control(serialize_hooks=False)
        control.connection_made(0.0)
        control.send_session_new(CALL_INFO, 0.0)
        control.send_verb_hook("/a", CALL_INFO, None, 0.0)
        assert [m["type"] for m in sent(control)] == ["session:new", "verb:hook"]


class TestJambonzCallStatus:
    def test_no_duration_before_completed(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_call_status({**CALL_INFO, "callStatus": "in-progress", "duration": 9}, 1.0)
        (msg,) = sent(ctl)
        assert msg["type"] == "call:status"
        assert msg["data"]["call_status"] == "in-progress"
        assert "duration" not in msg["data"]

    def test_duration_with_completed(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_call_status({**CALL_INFO, "callStatus": "completed"}, 61.0, duration=61)
        (msg,) = sent(ctl)
        assert msg["data"]["duration"] == 61

    def test_completed_needs_duration(self, ctl: JambonzControl) -> None:
        with pytest.raises(LocalError):
            ctl.send_call_status({**CALL_INFO, "callStatus": "completed"}, 1.0)

    def test_duration_refused_before_completed(self, ctl: JambonzControl) -> None:
        with pytest.raises(LocalError):
            ctl.send_call_status({**CALL_INFO, "callStatus": "ringing"}, 1.0, duration=3)

    def test_unknown_status_refused(self, ctl: JambonzControl) -> None:
        with pytest.raises(LocalError):
            ctl.send_call_status({**CALL_INFO, "callStatus": "on-fire"}, 1.0)


class TestJambonzVerbStatusOnlyWithNotifyEvents:
    def test_nothing_when_off(self, ctl: JambonzControl) -> None:
        started(ctl)
        assert ctl.send_verb_status("starting", 1.0, verb="say", verb_id="s1") is None
        assert ctl.messages_to_send() == []

    def test_lifecycle_and_per_verb_events_when_on(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.notify_events = True
        ctl.send_verb_status("starting", 1.0, verb="say", verb_id="s1")
        ctl.send_verb_status("start-playback", 1.1, verb="say", verb_id="s1")
        ctl.send_verb_status("finished", 2.0, verb="say")
        first, second, third = sent(ctl)
        assert first["type"] == "verb:status"
        assert first["data"] == {"event": "starting", "id": "s1", "name": "say"}
        assert second["data"] == {"event": "start-playback", "verb": "say", "id": "s1"}
        assert third["data"] == {"event": "finished", "name": "say"}
        assert ctl.next_timeout() is None


class TestJambonzErrorMessages:
    def test_verb_error_shape(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.send_verb_error("Speech credentials not found", 1.0, verb="say", verb_id="s1")
        (msg,) = sent(ctl)
        assert msg["type"] == "jambonz:error"
        assert msg["data"] == {"error": "Speech credentials not found", "verb": "say", "id": "s1"}

    def test_generic_send(self, ctl: JambonzControl) -> None:
        started(ctl)
        out = ctl.send("session:redirect", CALL_INFO, 1.0, hook="/new-app")
        (msg,) = sent(ctl)
        assert (msg["type"], msg["hook"]) == ("session:redirect", "/new-app")
        assert ctl.awaiting_ack() == [out.msgid]

    def test_generic_send_checks_its_arguments(self, ctl: JambonzControl) -> None:
        with pytest.raises(LocalError):
            ctl.send("made:up", {}, 0.0)
        with pytest.raises(LocalError):
            ctl.send("session:new", {}, 0.0)
        with pytest.raises(LocalError):
            ctl.send("session:redirect", {}, 0.0)
        with pytest.raises(LocalError):
            ctl.send("call:status", {}, 0.0, hook="/x")


class TestJambonzCommands:
    def test_redirect_with_verbs_replaces_by_default(self, ctl: JambonzControl) -> None:
        cmd = the_command(ctl.receive(command("redirect", [{"say": {"text": "Hello"}}]), 1.0))
        assert cmd == RedirectCommand((SayVerb(text="Hello"),), queue_command=False)

    def test_redirect_with_queue_command(self, ctl: JambonzControl) -> None:
        text = command("redirect", [{"verb": "say", "text": "x"}], queueCommand=True)
        cmd = the_command(ctl.receive(text, 1.0))
        assert isinstance(cmd, RedirectCommand)
        assert cmd.queue_command is True

    def test_redirect_object_form(self, ctl: JambonzControl) -> None:
        cmd = the_command(ctl.receive(command("redirect", {"call_hook": "https://app/next"}), 1.0))
        assert cmd == RedirectHookCommand("https://app/next", None, None, None)
        cmd = the_command(
            ctl.receive(
                command("redirect", {"call_hook": {"url": "/n"}, "parent_call": [{"hangup": {}}]}),
                1.0,
            )
        )
        assert isinstance(cmd, RedirectHookCommand)
        assert cmd.call_hook == WebhookSpec(url="/n")
        assert cmd.parent_call == (HangupVerb(),)

    @pytest.mark.parametrize("data", [{"call_status": "completed"}, "completed"])
    def test_call_status_completed(self, ctl: JambonzControl, data: Any) -> None:
        cmd = the_command(ctl.receive(command("call:status", data), 1.0))
        assert cmd == CallStatusCommand("completed")

    def test_call_status_no_answer(self, ctl: JambonzControl) -> None:
        cmd = the_command(ctl.receive(command("call:status", {"call_status": "no-answer"}), 1.0))
        assert cmd == CallStatusCommand("no-answer")

    @pytest.mark.parametrize(
        ("data", "mute"),
        [("mute", True), ("unmute", False), ({"mute_status": "mute"}, True)],
    )
    def test_mute_status_both_shapes(self, ctl: JambonzControl, data: Any, mute: bool) -> None:
        assert the_command(ctl.receive(command("mute:status", data), 1.0)) == MuteStatusCommand(
            mute
        )

    @pytest.mark.parametrize(
        ("name", "data", "expected"),
        [
            ("listen:status", {"listen_status": "pause"}, ListenStatusCommand("listen", "pause")),
            ("listen:status", "resume", ListenStatusCommand("listen", "resume")),
            ("stream:status", {"stream_status": "resume"}, ListenStatusCommand("stream", "resume")),
            ("stream:status", {"listen_status": "pause"}, ListenStatusCommand("stream", "pause")),
        ],
    )
    def test_listen_and_stream_status(
        self, ctl: JambonzControl, name: str, data: Any, expected: ListenStatusCommand
    ) -> None:
        assert the_command(ctl.receive(command(name, data), 1.0)) == expected

    def test_dtmf_shape_the_server_reads(self, ctl: JambonzControl) -> None:
        cmd = the_command(
            ctl.receive(command("dtmf", {"dtmf": {"digit": "5", "duration": 400}}), 1)
        )
        assert cmd == DtmfCommand("5", 400)

    def test_dtmf_duration_written_as_a_float(self, ctl: JambonzControl) -> None:
        cmd = the_command(ctl.receive(command("dtmf", {"digit": "a", "duration": 300.0}), 1.0))
        assert cmd == DtmfCommand("A", 300)

    def test_dtmf_shape_the_sdk_sends(self, ctl: JambonzControl) -> None:
        cmd = the_command(ctl.receive(command("dtmf", {"digit": "#"}), 1.0))
        assert cmd == DtmfCommand("#", 250)

    def test_sip_request_shape_the_server_reads(self, ctl: JambonzControl) -> None:
        data = {
            "sip_request": {
                "method": "INFO",
                "content_type": "application/json",
                "content": '{"a":1}',
                "headers": {"X-Foo": "bar"},
            }
        }
        cmd = the_command(ctl.receive(command("sip:request", data), 1.0))
        assert cmd == SipRequestCommand("INFO", "application/json", '{"a":1}', {"X-Foo": "bar"})

    def test_sip_request_shape_the_sdk_sends(self, ctl: JambonzControl) -> None:
        data = {"method": "notify", "content_type": "text/plain", "content": "hi"}
        cmd = the_command(ctl.receive(command("sip:request", data), 1.0))
        assert cmd == SipRequestCommand("NOTIFY", "text/plain", "hi", {})

    def test_config(self, ctl: JambonzControl) -> None:
        data = {"notifyEvents": True, "synthesizer": {"vendor": "google"}}
        cmd = the_command(ctl.receive(command("config", data), 1.0))
        assert isinstance(cmd, ConfigCommand)
        assert cmd.config.notify_events is True

    def test_target_leg_and_msgid(self, ctl: JambonzControl) -> None:
        text = command("call:status", {"call_status": "completed"}, callSid="child-1", msgid="c1")
        (event,) = ctl.receive(text, 1.0)
        assert event == CommandReceived(CallStatusCommand("completed"), "c1", "child-1")

    def test_commands_do_not_touch_pending_acks(self, ctl: JambonzControl) -> None:
        msgid = ctl.send_session_new(CALL_INFO, 0.0).msgid
        ctl.receive(command("mute:status", "mute"), 1.0)
        assert ctl.awaiting_ack() == [msgid]


def assert_invalid(control: JambonzControl, frame: str | bytes, details: str) -> None:
    events = control.receive(frame, 1.0)
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, InvalidMessage)
    assert details in event.details
    (error,) = sent(control)
    assert error["type"] == "jambonz:error"
    assert error["call_sid"] == CALL_SID
    assert error["data"]["msg"] == "InvalidMessage"
    assert details in error["data"]["details"]
    expected = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
    assert error["data"]["content"] == expected


class TestJambonzInvalidMessage:
    def test_invalid_json(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, "{not json", "invalid JSON")

    def test_missing_type(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"msgid":"m1"}', "type property not supplied")

    def test_json_that_is_not_an_object(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, "[1,2]", "type property not supplied")

    def test_unknown_type(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"type":"hello"}', "invalid type property: hello")

    def test_binary_frame(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, b'{"type":"ack","msgid":"m1"}', "binary frames")

    def test_binary_garbage(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, b"\xff\x00\x81", "binary frames")

    def test_ack_without_msgid(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"type":"ack"}', "msgid not supplied")

    def test_ack_with_numeric_msgid(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"type":"ack","msgid":5}', "msgid must be a string")

    def test_command_without_command(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"type":"command","data":{}}', "command property not supplied")

    def test_command_without_data(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, command("redirect"), "data property not supplied")

    def test_unknown_command(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, command("teleport", {"x": 1}), "invalid command: teleport")

    def test_command_jambonz_knows_but_we_do_not_do(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, command("whisper", [{"say": {"text": "x"}}]), "unsupported command")

    def test_command_name_must_be_a_string(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, '{"type":"command","command":5,"data":{}}', "command must be a string")

    def test_command_msgid_must_be_a_string(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, command("mute:status", "mute", msgid=9), "msgid must be a string")

    def test_deeply_nested_json(self, ctl: JambonzControl) -> None:
        frame = '{"type":"ack","msgid":"m1","data":' + "[" * 100_000 + "]" * 100_000 + "}"
        events = ctl.receive(frame, 1.0)
        assert len(events) == 1
        assert isinstance(events[0], InvalidMessage)
        (error,) = sent(ctl)
        assert error["data"]["content"] == frame[:4096]

    def test_queue_command_must_be_boolean(self, ctl: JambonzControl) -> None:
        text = command("redirect", [{"hangup": {}}], queueCommand="yes")
        assert_invalid(ctl, text, "queueCommand must be a boolean")

    def test_target_leg_must_be_a_string(self, ctl: JambonzControl) -> None:
        assert_invalid(ctl, command("mute:status", "mute", callSid=4), "callSid must be a string")

    @pytest.mark.parametrize(
        ("name", "data", "details"),
        [
            ("dtmf", {"dtmf": {"digit": 5}}, "digit"),
            ("dtmf", {"digit": "x"}, "digit"),
            ("dtmf", {"digit": "1", "duration": "250"}, "duration"),
            ("dtmf", "5", "data must be an object"),
            ("sip:request", {"sip_request": {"method": "BYE"}}, "method"),
            ("sip:request", {"method": "INFO", "content": "x"}, "content needs content_type"),
            ("sip:request", {"method": "INFO", "headers": {"X": 1}}, "headers"),
            ("sip:request", {"method": "INFO", "content_type": 7}, "content_type"),
            ("sip:request", {"method": "INFO", "content_type": "a/b", "content": 7}, "content"),
            ("sip:request", ["INFO"], "data must be an object"),
            ("mute:status", {"mute_status": "loud"}, "mute_status"),
            ("call:status", {"call_status": "busy"}, "call_status"),
            ("listen:status", {"listen_status": "stop"}, "listen_status"),
            ("redirect", [{"verb": "say"}], "verbs[0] (say): text"),
            ("redirect", {"nothing": 1}, "needs call_hook"),
            ("redirect", {"call_hook": 5}, "call_hook"),
            ("redirect", {"call_hook": {"method": "GET"}}, "call_hook"),
            ("redirect", "https://x", "verb array or an object"),
            ("config", {"notifyEvents": "yes"}, "notifyEvents"),
            ("config", ["x"], "data must be an object"),
        ],
    )
    def test_bad_field_types(self, ctl: JambonzControl, name: str, data: Any, details: str) -> None:
        assert_invalid(ctl, command(name, data), details)

    def test_invalid_messages_are_counted(self, ctl: JambonzControl) -> None:
        ctl.receive("x", 1.0)
        ctl.receive(b"y", 1.0)
        assert ctl.invalid_messages == 2


class TestJambonzSessionReconnectRule:
    def test_graceful_close_does_not_reconnect_and_discards_later_messages(
        self, ctl: JambonzControl
    ) -> None:
        started(ctl)
        hook = ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        decision = ctl.on_close(1000, 2.0)
        assert decision.reconnect is False
        assert decision.hangup is False
        assert decision.failed == (
            AckFailed(hook.msgid, "verb:hook", hook.msgid, "socket closed gracefully by the app"),
        )
        assert state(ctl) is ControlState.CLOSED
        later = ctl.send_call_status({**CALL_INFO, "callStatus": "completed"}, 3.0, duration=3)
        assert later.discarded
        assert ctl.messages_to_send() == []
        assert ctl.receive(command("mute:status", "mute"), 3.0) == []
        assert ctl.discarded_messages == 2
        assert ctl.on_close(1006, 4.0).reconnect is False

    def test_abnormal_close_reconnects_after_backoff(self, ctl: JambonzControl) -> None:
        started(ctl)
        decision = ctl.on_close(1011, 10.0)
        assert decision.reconnect is True
        assert decision.delay == pytest.approx(0.5)
        assert decision.reconnect_at == pytest.approx(10.5)
        assert decision.attempt == 1
        assert decision.hangup is False
        assert state(ctl) is ControlState.RECONNECTING

    def test_backoff_sequence_and_limit(self) -> None:
        control = make_control(max_reconnects=6)
        control.connection_made(0.0)
        started(control)
        delays = []
        decision = control.on_close(1006, 0.0)
        while decision.reconnect:
            assert decision.delay is not None
            delays.append(decision.delay)
            decision = control.on_connect_failed(0.0)
        assert delays == [0.5, 1.0, 2.0, 4.0, 6.0, 8.0]
        assert decision.hangup is True
        assert "exhausted" in decision.reason
        assert state(control) is ControlState.FAILED

    def test_backoff_keeps_growing_across_drops_in_one_call(self, ctl: JambonzControl) -> None:
        msgid = started(ctl)
        assert ctl.on_close(1011, 0.0).delay == pytest.approx(0.5)
        ctl.connection_made(1.0)
        (reconnect,) = sent(ctl)
        ctl.receive(ack(reconnect["msgid"]), 1.1)
        assert state(ctl) is ControlState.OPEN
        assert ctl.on_close(1011, 5.0).delay == pytest.approx(1.0)
        assert ctl.reconnects == 2
        assert msgid == "m1"

    def test_no_reconnects_allowed(self) -> None:
        control = make_control(max_reconnects=0)
        control.connection_made(0.0)
        started(control)
        decision = control.on_close(1011, 1.0)
        assert (decision.reconnect, decision.hangup) == (False, True)

    def test_session_reconnect_goes_first_with_the_original_data(self, ctl: JambonzControl) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.messages_to_send()
        ctl.receive(ack(original.msgid), 0.5)
        ctl.on_close(1011, 1.0)
        status = ctl.send_call_status({**CALL_INFO, "callStatus": "in-progress"}, 1.2)
        hook = ctl.send_verb_hook("/h", CALL_INFO, None, 1.3)
        assert status.queued
        assert hook.queued
        assert ctl.messages_to_send() == []
        ctl.connection_made(1.5)
        (reconnect,) = sent(ctl)
        assert reconnect["type"] == "session:reconnect"
        assert reconnect["call_sid"] == CALL_SID
        assert reconnect["data"] == json.loads(original.text)["data"]
        assert state(ctl) is ControlState.AWAITING_RECONNECT_ACK
        # Everything else stays queued until the reconnect is acked.
        ctl.send_verb_error("x", 1.6, verb="say")
        assert ctl.messages_to_send() == []
        (event,) = ctl.receive(ack(reconnect["msgid"]), 2.0)
        assert event == AckReceived(
            reconnect["msgid"], "session:reconnect", None, reconnect["msgid"]
        )
        assert state(ctl) is ControlState.OPEN
        assert [m["type"] for m in sent(ctl)] == ["call:status", "verb:hook", "jambonz:error"]
        assert ctl.next_timeout() == pytest.approx(2.0 + ACK_TIMEOUT)

    def test_pending_acks_fail_when_the_socket_drops(self, ctl: JambonzControl) -> None:
        started(ctl)
        hook = ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        ctl.messages_to_send()
        decision = ctl.on_close(1006, 2.0)
        assert decision.failed == (AckFailed(hook.msgid, "verb:hook", hook.msgid, "socket lost"),)
        assert ctl.next_timeout() is None
        ctl.connection_made(2.5)
        (reconnect,) = sent(ctl)
        ctl.receive(ack(reconnect["msgid"]), 2.6)
        assert ctl.receive(ack(hook.msgid), 2.7) == [AckDiscarded(hook.msgid, "unknown")]

    def test_session_new_ack_transfers_to_the_reconnect_msgid(self, ctl: JambonzControl) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.messages_to_send()
        decision = ctl.on_close(1006, 1.0)
        assert decision.failed == ()
        assert ctl.handle_timeout(30.0) == []  # the session:new timer is not running meanwhile
        ctl.connection_made(31.0)
        (reconnect,) = sent(ctl)
        assert reconnect["type"] == "session:reconnect"
        assert reconnect["msgid"] != original.msgid
        assert ctl.awaiting_ack() == [original.msgid]
        assert ctl.next_timeout() == pytest.approx(31.0 + ACK_TIMEOUT)
        (event,) = ctl.receive(ack(reconnect["msgid"], [{"verb": "answer"}]), 32.0)
        assert isinstance(event, AckReceived)
        assert event.msgid == reconnect["msgid"]
        assert event.for_type == "session:new"
        assert event.request_msgid == original.msgid
        assert event.verbs is not None
        assert [v.verb for v in event.verbs] == ["answer"]
        assert ctl.receive(ack(original.msgid), 32.5) == [AckDiscarded(original.msgid, "unknown")]

    def test_session_new_transfer_survives_a_second_drop(self, ctl: JambonzControl) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.messages_to_send()
        ctl.on_close(1006, 1.0)
        ctl.connection_made(1.5)
        ctl.messages_to_send()
        decision = ctl.on_close(1006, 2.0)
        assert decision.reconnect is True
        assert decision.failed == ()
        ctl.connection_made(3.0)
        (reconnect,) = sent(ctl)
        (event,) = ctl.receive(ack(reconnect["msgid"]), 3.5)
        assert isinstance(event, AckReceived)
        assert (event.for_type, event.request_msgid) == ("session:new", original.msgid)

    def test_reconnect_ack_timeout_hangs_up(self, ctl: JambonzControl) -> None:
        started(ctl)
        ctl.on_close(1011, 1.0)
        ctl.connection_made(1.5)
        (reconnect,) = sent(ctl)
        hook = ctl.send_verb_hook("/h", CALL_INFO, None, 2.0)
        assert ctl.handle_timeout(6.4) == []
        events = ctl.handle_timeout(6.5)
        assert events[0] == AckTimedOut(reconnect["msgid"], "session:reconnect", reconnect["msgid"])
        assert (
            AckFailed(hook.msgid, "verb:hook", hook.msgid, "session:reconnect was not acknowledged")
            in events
        )
        assert isinstance(events[-1], HangupRequired)
        assert state(ctl) is ControlState.FAILED
        assert ctl.messages_to_send() == []

    def test_reconnect_ack_timeout_with_transferred_session_new(self, ctl: JambonzControl) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.messages_to_send()
        ctl.on_close(1011, 1.0)
        ctl.connection_made(1.5)
        (reconnect,) = sent(ctl)
        events = ctl.handle_timeout(6.5)
        assert events == [
            AckTimedOut(reconnect["msgid"], "session:new", original.msgid),
            HangupRequired("session:reconnect was not acknowledged"),
        ]

    def test_unsent_messages_at_drop_are_held_not_failed(self, ctl: JambonzControl) -> None:
        started(ctl)
        hook = ctl.send_verb_hook("/h", CALL_INFO, None, 1.0)
        status = ctl.send_call_status({**CALL_INFO, "callStatus": "in-progress"}, 1.0)
        # The adapter had not drained the outbox when the socket dropped.
        decision = ctl.on_close(1006, 1.1)
        assert decision.failed == ()
        ctl.connection_made(1.6)
        (reconnect,) = sent(ctl)
        ctl.receive(ack(reconnect["msgid"]), 1.7)
        assert [m["msgid"] for m in sent(ctl)] == [hook.msgid, status.msgid]

    def test_unsent_session_new_at_drop_becomes_the_reconnect(self, ctl: JambonzControl) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.on_close(1006, 0.1)
        ctl.connection_made(0.6)
        (reconnect,) = sent(ctl)
        assert reconnect["type"] == "session:reconnect"
        assert reconnect["data"] == json.loads(original.text)["data"]
        (event,) = ctl.receive(ack(reconnect["msgid"]), 0.7)
        assert isinstance(event, AckReceived)
        assert (event.for_type, event.request_msgid) == ("session:new", original.msgid)

    def test_graceful_close_while_reconnecting_fails_the_transferred_session_new(
        self, ctl: JambonzControl
    ) -> None:
        original = ctl.send_session_new(CALL_INFO, 0.0)
        ctl.messages_to_send()
        ctl.on_close(1006, 1.0)
        ctl.connection_made(1.5)
        ctl.messages_to_send()
        decision = ctl.on_close(1000, 2.0)
        assert [(f.for_type, f.request_msgid) for f in decision.failed] == [
            ("session:new", original.msgid)
        ]

    def test_exhausted_reconnects_fail_the_transferred_session_new(self) -> None:
        control = make_control(max_reconnects=1)
        control.connection_made(0.0)
        original = control.send_session_new(CALL_INFO, 0.0)
        control.messages_to_send()
        assert control.on_close(1006, 1.0).reconnect is True
        decision = control.on_close(1006, 1.5)  # the reconnect attempt itself failed
        assert (decision.reconnect, decision.hangup) == (False, True)
        assert [(f.for_type, f.request_msgid) for f in decision.failed] == [
            ("session:new", original.msgid)
        ]

    def test_failed_initial_connect_hangs_up(self) -> None:
        control = make_control()
        out = control.send_session_new(CALL_INFO, 0.0)
        decision = control.on_connect_failed(1.5)
        assert (decision.reconnect, decision.hangup) == (False, True)
        assert [f.request_msgid for f in decision.failed] == [out.msgid]
        assert state(control) is ControlState.FAILED

    def test_lifecycle_misuse_is_a_local_error(self, ctl: JambonzControl) -> None:
        with pytest.raises(LocalError):
            ctl.connection_made(0.0)
        with pytest.raises(LocalError):
            ctl.on_connect_failed(0.0)


class TestJambonzCloseByWorker:
    def test_close_fails_what_still_waits(self, ctl: JambonzControl) -> None:
        started(ctl)
        first = ctl.send_verb_hook("/a", CALL_INFO, None, 1.0)
        second = ctl.send_verb_hook("/b", CALL_INFO, None, 1.0)
        events = ctl.close()
        assert [(e.request_msgid, type(e)) for e in events] == [
            (first.msgid, AckFailed),
            (second.msgid, AckFailed),
        ]
        assert state(ctl) is ControlState.CLOSED
        assert ctl.messages_to_send() == []
        assert ctl.close() == []
        assert ctl.on_close(1000, 2.0).reconnect is False


FRAMES = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.builds(
        json.dumps,
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda c: (
                st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4)
            ),
            max_leaves=20,
        ),
    ),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=12,
)
COMMANDS = st.sampled_from(
    [
        "redirect",
        "call:status",
        "mute:status",
        "listen:status",
        "stream:status",
        "dtmf",
        "sip:request",
        "config",
        "whisper",
        "tts:flush",
        "nope",
    ]
)


class TestJambonzReceiveFuzz:
    @settings(max_examples=400)
    @given(FRAMES)
    def test_never_raises_on_any_frame(self, frame: str | bytes) -> None:
        control = make_control()
        control.connection_made(0.0)
        control.send_session_new(CALL_INFO, 0.0)
        events = control.receive(frame, 1.0)
        for event in events:
            if isinstance(event, InvalidMessage):
                assert any('"jambonz:error"' in t for t in control.messages_to_send())

    @settings(max_examples=400)
    @given(COMMANDS, JSON_VALUES, st.sampled_from(["command", "ack"]), st.booleans())
    def test_never_raises_on_plausible_messages(
        self, name: str, data: Any, kind: str, known_msgid: bool
    ) -> None:
        control = make_control()
        control.connection_made(0.0)
        msgid = control.send_session_new(CALL_INFO, 0.0).msgid
        obj: dict[str, Any] = {"type": kind, "data": data}
        if kind == "command":
            obj["command"] = name
        else:
            obj["msgid"] = msgid if known_msgid else name
        events = control.receive(json.dumps(obj), 1.0)
        assert events
