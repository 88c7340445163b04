"""worker/front without processes: which process owns a Call-ID, the frames between the front
and a media process (and what a bad frame does), and each media process's share of the
settings."""

from __future__ import annotations

import asyncio
import itertools
import json
import zlib
from collections import Counter
from pathlib import Path

import pytest

from worker.config import load_settings
from worker.errors import ConfigError
from worker.front import front as front_module
from worker.front.ari_relay import AriRelay
from worker.front.front import Front, media_settings, process_count
from worker.front.ipc import (
    MAX_FRAME,
    AriFrame,
    ControlFrame,
    FrameError,
    SipFrame,
    decode,
    encode_ari,
    encode_control,
    encode_sip,
)
from worker.front.shard import owned_call_id, owned_channel_id, owns_ari_id, shard_of
from worker.sip.message import Message, parse
from worker.sip.transaction import Transport


class TestShard:
    def test_crc32_of_the_call_id_modulo_the_processes(self) -> None:
        call_id = "a84b4c76e66710@pc33.atlanta.example.com"
        assert shard_of(call_id, 3) == zlib.crc32(call_id.encode()) % 3
        assert shard_of(call_id, 1) == 0

    def test_every_message_of_a_dialog_goes_to_one_process(self) -> None:
        assert len({shard_of("same-call@host", 4) for _ in range(10)}) == 1

    def test_random_call_ids_spread_evenly(self) -> None:
        counts = Counter(shard_of(owned_call_id(0, 1), 4) for _ in range(4000))
        assert set(counts) == {0, 1, 2, 3}
        assert all(800 <= n <= 1200 for n in counts.values()), counts

    @pytest.mark.parametrize("processes", [1, 2, 3, 8])
    def test_a_process_places_calls_with_call_ids_that_fall_on_it(self, processes: int) -> None:
        for index in range(processes):
            for _ in range(20):
                call_id = owned_call_id(index, processes, "10.0.0.1")
                assert call_id.endswith("@10.0.0.1")
                assert shard_of(call_id, processes) == index

    def test_an_index_outside_the_processes_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"not in 0\.\.1"):
            owned_call_id(2, 2)


class TestAsteriskCallsShard:
    """A call through Asterisk falls on the process of its channel id; its bridge and its
    ExternalMedia channel, named after it, fall on the same one."""

    @pytest.mark.parametrize("processes", [1, 2, 3, 8])
    def test_a_call_and_its_bridge_and_media_channel_fall_on_one_process(
        self, processes: int
    ) -> None:
        for n in range(50):
            channel = f"1795254489.{n}"
            owner = shard_of(channel, processes)
            for resource in (channel, f"{channel}-bridge", f"{channel}-media"):
                assert owns_ari_id(owner, processes, resource)
                others = [i for i in range(processes) if i != owner]
                assert not any(owns_ari_id(i, processes, resource) for i in others)

    @pytest.mark.parametrize("processes", [1, 2, 3, 8])
    def test_a_process_originates_with_channel_ids_that_fall_on_it(self, processes: int) -> None:
        for index in range(processes):
            for _ in range(20):
                channel = owned_channel_id(index, processes)
                assert channel.startswith("aispinner-")
                assert owns_ari_id(index, processes, channel)
                assert owns_ari_id(index, processes, channel + "-bridge")

    def test_an_index_outside_the_processes_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"not in 0\.\.2"):
            owned_channel_id(3, 3)


class TestFrames:
    @pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
    @pytest.mark.parametrize("peer", [("127.0.0.1", 5060), ("::1", 65535), ("10.1.2.3", 1)])
    def test_sip_frames_round_trip(self, transport: Transport, peer: tuple[str, int]) -> None:
        data = b"INVITE sip:echo@127.0.0.1 SIP/2.0\r\nCall-ID: x\r\n\r\n"
        assert decode(encode_sip(transport, peer, data)) == SipFrame(transport, peer, data)

    def test_an_empty_message_is_a_frame_too(self) -> None:
        assert decode(encode_sip(Transport.UDP, ("h", 1), b"")) == SipFrame(
            Transport.UDP, ("h", 1), b""
        )

    def test_control_frames_round_trip(self) -> None:
        message = {"op": "call", "id": 7, "number": "+1555", "route": None}
        frame = decode(encode_control(message))
        assert isinstance(frame, ControlFrame)
        assert frame.op == "call"
        assert frame.message == message

    @pytest.mark.parametrize(
        ("frame", "why"),
        [
            (b"", "empty"),
            (b"X123", "unknown frame kind"),
            (b"S", "cut short"),
            (b"SU\x13\xc4\x09127.0", "cut short"),
            (b"SZ\x13\xc4\x01h", "unknown transport"),
            (b"SU\x13\xc4\x01\xff", "not ASCII"),
            (b"J{not json", "not JSON"),
            (b"J[1, 2]", "JSON object"),
            (b"J\xff\xfe", "not JSON"),
        ],
    )
    def test_bad_frames_raise_frame_error(self, frame: bytes, why: str) -> None:
        with pytest.raises(FrameError, match=why):
            decode(frame)

    def test_a_host_too_long_for_the_header_is_refused(self) -> None:
        with pytest.raises(FrameError, match="host too long"):
            encode_sip(Transport.UDP, ("h" * 256, 1), b"")

    def test_ari_frames_carry_the_event_as_sent(self) -> None:
        event = b'{"type": "StasisStart", "channel": {"id": "1.2"}}'
        assert decode(encode_ari(event)) == AriFrame(event)

    def test_an_ari_event_too_large_for_a_frame_is_refused(self) -> None:
        assert decode(encode_ari(b"x" * (MAX_FRAME - 1))) == AriFrame(b"x" * (MAX_FRAME - 1))
        with pytest.raises(FrameError, match="does not fit"):
            encode_ari(b"x" * MAX_FRAME)

    def test_control_frames_are_compact_json(self) -> None:
        assert encode_control({"op": "ready", "index": 1}) == b'J{"op":"ready","index":1}'
        assert json.loads(encode_control({"op": "x"})[1:]) == {"op": "x"}


class TestMediaSettings:
    def test_rtp_ports_split_in_even_aligned_slices_that_do_not_overlap(self) -> None:
        settings = load_settings(None, rtp={"port_min": 20001, "port_max": 20400})
        slices = [media_settings(settings, i, 3, None).rtp for i in range(3)]
        for rtp in slices:
            assert rtp.port_min % 2 == 0
            assert rtp.port_max % 2 == 1
            assert 20001 <= rtp.port_min < rtp.port_max <= 20400
        for a, b in itertools.pairwise(slices):
            assert a.port_max < b.port_min

    def test_capacity_and_rate_limits_are_shared(self) -> None:
        settings = load_settings(
            None, sip={"max_calls": 301, "rate_limit_per_second": 200, "rate_limit_burst": 401}
        )
        sip = media_settings(settings, 0, 2, None).sip
        assert sip.max_calls == 151
        assert sip.rate_limit_per_second == 100
        assert sip.rate_limit_burst == 201

    def test_the_front_serves_the_api_and_the_media_processes_share_its_database(self) -> None:
        settings = load_settings(None, store=True)
        child = media_settings(settings, 1, 2, "postgresql://x@127.0.0.1/db")
        assert child.api.enabled is False
        assert child.database_url == "postgresql://x@127.0.0.1/db"
        assert child.processes == 1
        assert settings.api.enabled is True  # the front's own settings are untouched

    def test_too_few_ports_for_the_processes_is_a_config_error(self) -> None:
        settings = load_settings(None, rtp={"port_min": 20000, "port_max": 20015})
        with pytest.raises(ConfigError, match="too small for 4 processes"):
            media_settings(settings, 0, 4, None)

    def test_zero_processes_means_one_per_core(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("os.cpu_count", lambda: 6)
        assert process_count(load_settings(None, processes=0)) == 6
        assert process_count(load_settings(None, processes=3)) == 3


class _Channel:
    """A media process's end of the socket, as the front sees it."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)


def _invite(call_id: str) -> Message:
    return parse(
        (
            "INVITE sip:echo@127.0.0.1 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-1\r\n"
            "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )


class TestHeldUntilReady:
    """Messages for a media process that is not ready (starting, or restarting after a crash)
    are held and handed over in order once it is, not dropped for the peer to retransmit."""

    async def _front(self) -> tuple[Front, _Channel]:
        front = Front(load_settings(None, processes=1))
        child = front.children[0]
        channel = _Channel()
        child.channel = channel  # type: ignore[assignment]
        child.ready = asyncio.get_running_loop().create_future()
        return front, channel

    async def test_held_while_starting_then_handed_over_in_order(self) -> None:
        front, channel = await self._front()
        for n in range(3):
            front._route(_invite(f"call-{n}"), ("127.0.0.1", 5099), Transport.UDP)
        assert channel.sent == []
        front._control(front.children[0], ControlFrame({"op": "ready", "index": 0}))
        sent = [decode(frame) for frame in channel.sent]
        assert [parse(f.data).call_id for f in sent if isinstance(f, SipFrame)] == [
            "call-0",
            "call-1",
            "call-2",
        ]
        front._route(_invite("call-3"), ("127.0.0.1", 5099), Transport.UDP)
        assert len(channel.sent) == 4  # ready: straight through
        assert front.routed == 4

    async def test_one_older_than_the_age_limit_is_dropped_and_counted(self) -> None:
        front, channel = await self._front()
        child = front.children[0]
        clock = [1000.0]
        front.clock = lambda: clock[0]
        front._route(_invite("stale"), ("127.0.0.1", 5099), Transport.UDP)
        clock[0] += front_module.HELD_MAX_AGE_S + 0.1
        front._route(_invite("fresh"), ("127.0.0.1", 5099), Transport.UDP)
        front._control(child, ControlFrame({"op": "ready", "index": 0}))
        sent = [decode(frame) for frame in channel.sent]
        assert [parse(f.data).call_id for f in sent if isinstance(f, SipFrame)] == ["fresh"]
        assert child.dropped == 1

    async def test_beyond_the_limit_the_oldest_is_dropped_and_counted(self) -> None:
        front, channel = await self._front()
        child = front.children[0]
        for n in range(front_module.HELD_MAX + 1):
            front._route(_invite(f"call-{n}"), ("127.0.0.1", 5099), Transport.UDP)
        assert child.dropped == 1
        front._control(child, ControlFrame({"op": "ready", "index": 0}))
        assert len(channel.sent) == front_module.HELD_MAX
        first = decode(channel.sent[0])
        assert isinstance(first, SipFrame)
        assert parse(first.data).call_id == "call-1"


RECORDING = (
    Path(__file__).resolve().parents[1]
    / "data/ari/recordings/inbound_answer_bridge_externalmedia_dtmf_caller_hangup_slin16.jsonl"
)
CALL = "1795254489.2"


def _recorded_events() -> list[str]:
    """Asterisk 22's events for one inbound call (answered, bridged to ExternalMedia, a DTMF
    digit, the caller's hang-up), with the bridge and the ExternalMedia channel named as the
    worker names them (the recording's client let Asterisk name them)."""
    events = []
    for line in RECORDING.read_text().splitlines():
        record = json.loads(line)
        if record.get("dir") == "event":
            events.append(
                json.dumps(record["event"])
                .replace("1795254489.3", f"{CALL}-media")
                .replace("7c180b29-d8c6-45e5-a6cd-1655868e4919", f"{CALL}-bridge")
            )
    return events


class TestAriRelay:
    """PROTOCOLS.md §5 (ARI events) behind a front: every event of a call reaches the process
    that owns it, as Asterisk sent it and in order; what names no call goes nowhere."""

    async def _relay(self, processes: int) -> tuple[AriRelay, list[tuple[int, bytes]]]:
        sent: list[tuple[int, bytes]] = []
        relay = AriRelay(
            load_settings(None).ari,
            processes,
            lambda index, frame: sent.append((index, frame)),
            lambda up: None,
        )
        return relay, sent

    @pytest.mark.parametrize("processes", [2, 3, 5])
    async def test_every_event_of_a_call_goes_to_the_process_that_owns_it(
        self, processes: int
    ) -> None:
        relay, sent = await self._relay(processes)
        events = _recorded_events()
        try:
            for event in events:
                relay.relay(event)
        finally:
            await relay.close()
        routed = [e for e in events if '"ChannelConnectedLine"' not in e]
        assert {index for index, _ in sent} == {shard_of(CALL, processes)}
        assert [decode(frame) for _, frame in sent] == [AriFrame(e.encode()) for e in routed]
        assert relay.counters.events == len(events)
        assert relay.counters.unknown_events == len(events) - len(routed)

    async def test_what_is_not_an_event_of_a_call_goes_nowhere_and_is_counted(self) -> None:
        relay, sent = await self._relay(2)
        huge = json.dumps(
            {
                "type": "StasisStart",
                "args": ["inbound"],
                "channel": {"id": CALL, "channelvars": {"X": "v" * MAX_FRAME}},
            }
        )
        try:
            for message in ("not json", '{"no": "type"}', '{"type": "StasisStart"}', huge):
                relay.relay(message)
            relay.relay('{"type": "ChannelTalkingStarted", "channel": {"id": "x"}}')
        finally:
            await relay.close()
        assert sent == []
        assert relay.counters.invalid_events == 3
        assert relay.counters.unknown_events == 1
        assert relay.counters.too_large == 1

    async def test_application_replaced_lets_the_application_go(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        relay, sent = await self._relay(2)
        replaced: list[bool] = []
        monkeypatch.setattr(relay._events, "replaced", lambda: replaced.append(True))
        try:
            relay.relay('{"type": "ApplicationReplaced", "application": "aispinner"}')
        finally:
            await relay.close()
        assert replaced == [True]
        assert sent == []


class TestAriStateToldToProcesses:
    async def test_held_events_then_the_connection_state_when_a_process_is_ready(self) -> None:
        """The process a call falls on is still starting: the call's events wait for it; the
        running one is told the connection is up at once, the other once it is ready, after
        the events held for it."""
        front = Front(load_settings(None, processes=2, ingress=["ari"]))
        channels = [_Channel(), _Channel()]
        for child, channel in zip(front.children, channels, strict=True):
            child.channel = channel  # type: ignore[assignment]
            child.ready = asyncio.get_running_loop().create_future()
        owner = shard_of(CALL, 2)
        other = 1 - owner
        relay = front.ari = AriRelay(front.settings.ari, 2, front._send_ari, front._announce_ari)
        events = _recorded_events()[:3]
        try:
            front.children[other].ready.set_result(None)  # type: ignore[union-attr]
            relay.up = True
            front._announce_ari(True)
            for event in events:
                relay.relay(event)
            assert channels[owner].sent == []  # held
            front._control(front.children[owner], ControlFrame({"op": "ready", "index": owner}))
        finally:
            await relay.close()
        told = ControlFrame({"op": "ari", "up": True})
        assert [decode(f) for f in channels[other].sent] == [told]
        assert [decode(f) for f in channels[owner].sent] == [
            *(AriFrame(e.encode()) for e in events),
            told,
        ]
