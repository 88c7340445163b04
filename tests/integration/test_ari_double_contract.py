"""Contract tests of the ARI test double (``tests/ari_double``) against the traffic recorded from
Asterisk 22.10.1 (``tests/data/ari``): the double must answer and behave like the recorded
Asterisk, never more permissively.

- Every recording is replayed on a fresh double (``tests/ari_double/replay.py``): the same
  websockets, the same REST calls with the recording's ids mapped to the double's, the SIP side
  doing what SIPp did, a UDP listener as ``external_host``. Each REST line must get the same
  status, reason, error message and JSON (keys in order; values except ids and timestamps), each
  refused handshake the same answer, the event sequence the same events with the same keys and
  values, and the listener the same kind of RTP.
- Then the double's own rules: Swagger routing and parameter checks, authentication, the events
  websocket (replacement, events lost in a gap), externalMedia RTP, originate outcomes, bridges,
  dynamic configuration, DTMF, and cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import statistics
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from media.g711 import ulaw_decode, ulaw_encode
from media.rtp import RtpPacket, RtpSender
from tests.ari_double import AriDouble, recordings
from tests.ari_double import core as double_core
from tests.ari_double import errors as double_errors
from tests.ari_double.replay import Listener, ReplayResult, replay, tone
from tests.ari_double.swagger import api

JsonObject = dict[str, Any]
NAMES = recordings.names()
AUTH = {"Authorization": aiohttp.encode_basic_auth("worker", "worker")}


@functools.cache
def replayed(name: str) -> ReplayResult:
    return replay(name)


def _rest_cases() -> list[Any]:
    cases = []
    for name in NAMES:
        for index, line in enumerate(recordings.load(name)):
            if line["dir"] == "rest":
                label = f"{name}:{index}:{line['method']} {line['path']} {line['raw_query']}"
                cases.append(pytest.param(name, index, id=label.strip()))
    return cases


def _refused_handshakes() -> list[Any]:
    return [
        pytest.param(name, index, id=f"{name}:{line['ws']}")
        for name in NAMES
        for index, line in enumerate(recordings.load(name))
        if line["dir"] == "ws" and line["action"] == "connect" and not line["ok"]
    ]


def _with_events() -> list[str]:
    return [name for name in NAMES if recordings.events(name)]


def _with_rtp() -> list[str]:
    return [
        name for name in NAMES if any(line.get("kind") == "rtp" for line in recordings.load(name))
    ]


# -- the recordings, replayed ----------------------------------------------------------------------
class TestRecordedRestCalls:
    @pytest.mark.parametrize(("name", "index"), _rest_cases())
    def test_same_status_reason_and_body(self, name: str, index: int) -> None:
        result = replayed(name)
        assert not result.problems
        assert index in result.rest, "this REST line was not replayed"
        problem = result.rest[index].problem
        assert problem is None, problem


class TestRecordedWebsocketHandshakes:
    @pytest.mark.parametrize(("name", "index"), _refused_handshakes())
    def test_refused_the_same_way(self, name: str, index: int) -> None:
        result = replayed(name)
        assert index in result.handshakes
        problem = result.handshakes[index].problem
        assert problem is None, problem


class TestRecordedEventSequences:
    @pytest.mark.parametrize("name", _with_events())
    def test_same_events_in_the_same_order(self, name: str) -> None:
        """Type, socket, keys (in order) and values of every event, ids mapped."""
        result = replayed(name)
        assert not result.problems
        assert result.event_problems == []
        recorded = [(label, event["type"]) for label, event in result.recorded_events]
        assert [(label, event["type"]) for label, event in result.events] == recorded

    def test_ari_basics_has_no_events(self) -> None:
        result = replayed("ari_basics")
        assert result.events == []
        assert not result.problems


def _rtp_figures(result: ReplayResult) -> JsonObject:
    packets = [
        (at, RtpPacket.parse(data), source)
        for at, data, source in result.rtp
        if source[1] in result.em_ports
    ]
    assert packets, "the listener received no RTP from externalMedia"
    deltas = {
        (b.timestamp - a.timestamp) & 0xFFFFFFFF
        for (_, a, _), (_, b, _) in itertools.pairwise(packets)
    }
    gaps = sum(
        1
        for (_, a, _), (_, b, _) in itertools.pairwise(packets)
        if (b.sequence - a.sequence) & 0xFFFF != 1
    )
    arrivals = [b - a for (a, _, _), (b, _, _) in itertools.pairwise(packets)]
    return {
        "payload_types": {p.payload_type for _, p, _ in packets},
        "payload_sizes": {len(p.payload) for _, p, _ in packets},
        "timestamp_deltas": deltas,
        "ssrcs": len({p.ssrc for _, p, _ in packets}),
        "marker_bits": sum(p.marker for _, p, _ in packets),
        "seq_discontinuities": gaps,
        "sources": {f"{host}:{port}" for _, _, (host, port) in packets},
        "back_to_back": any(gap < 0.005 for gap in arrivals),
        "median_ms": statistics.median(arrivals) * 1000 if arrivals else 0.0,
    }


class TestRecordedRtp:
    @pytest.mark.parametrize("name", _with_rtp())
    def test_same_rtp_towards_external_host(self, name: str) -> None:
        """Payload types, sizes and timestamp steps as recorded, one SSRC, marker 0, no gaps,
        sent from the channel's UNICASTRTP_LOCAL_ADDRESS:PORT; slin16's re-framing of 30 ms
        packets into 20 ms ones shows as back-to-back packets, as recorded."""
        note = recordings.rtp_note(name)
        result = replayed(name)
        figures = _rtp_figures(result)
        assert figures["payload_types"] == {int(k) for k in note["payload_types"]}
        assert figures["payload_sizes"] == {int(k) for k in note["payload_sizes"]}
        assert figures["timestamp_deltas"] == {int(k) for k in note["timestamp_deltas"]}
        assert (figures["ssrcs"], note["ssrcs"]) == (1, 1)
        assert (figures["marker_bits"], note["marker_bits"]) == (0, 0)
        assert (figures["seq_discontinuities"], note["seq_discontinuities"]) == (0, 0)
        recorded_port = next(
            line["response"]["channelvars"]["UNICASTRTP_LOCAL_PORT"]
            for line in recordings.rest_lines(name)
            if line["path"] == "/ari/channels/externalMedia" and line["status"] == 200
        )
        assert set(note["sources"]) == {f"127.0.0.1:{recorded_port}"}
        assert figures["sources"] == {f"127.0.0.1:{port}" for port in result.em_ports}
        if "0" in note["interarrival_ms_histogram_5ms_buckets"]:
            assert figures["back_to_back"]  # structural: two 20 ms frames out of one 30 ms
        else:  # the sender's cadence (a loaded machine may bunch a few packets: the median)
            assert abs(figures["median_ms"] - note["interarrival_ms_median"]) < 8


class TestReplayDetectsDeviations:
    """The contract itself: a double that answers or orders events differently is caught."""

    def test_a_changed_error_message_fails_its_rest_line(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def sloppy() -> double_errors.AriError:
            return double_errors.AriError(404, "Not Found", "No such channel")

        monkeypatch.setattr(double_core, "channel_not_found", sloppy)
        result = replay("ari_errors")
        failed = {r.line["path"] for r in result.rest.values() if r.problem}
        assert "/ari/channels/no-such-channel-id" in failed

    def test_reordered_bridge_events_fail_the_sequence(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        original = double_core.Core._update_peers

        def peers_first(self: double_core.Core, bridge: Any, joiner: Any) -> None:
            if joiner is not None and len(bridge.members) == 2:
                self._set_connected(joiner, ("x", "1"))
            original(self, bridge, joiner)

        monkeypatch.setattr(double_core.Core, "_update_peers", peers_first)
        result = replay("ws_replace")  # no bridge: unaffected
        assert result.event_problems == []
        result = replay("inbound_app_hangup")
        assert result.event_problems


# -- the double's own rules --------------------------------------------------------------------
class EventStream:
    """One events websocket, read in the background."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[JsonObject] = []
        self._new = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            self.events.append(json.loads(message.data))
            self._new.set()

    async def next_of(self, event_type: str, within_s: float = 3.0) -> JsonObject:
        """The first event of ``event_type`` not returned before."""
        async with asyncio.timeout(within_s):
            while True:
                for event in self.events:
                    if event["type"] == event_type and not event.get("_seen"):
                        event["_seen"] = True
                        return {k: v for k, v in event.items() if k != "_seen"}
                self._new.clear()
                await self._new.wait()

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Ari:
    """A minimal ARI client for the focused tests."""

    def __init__(self, double: AriDouble, session: aiohttp.ClientSession) -> None:
        self.double = double
        self.session = session
        self.streams: list[EventStream] = []

    async def call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            f"{self.double.url}/ari{path}",
            params=params,
            json=body,
            headers=AUTH if headers is None else headers,
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def events(self, app: str = "aispinner") -> EventStream:
        ws = await self.session.ws_connect(
            f"{self.double.url}/ari/events",
            params={"app": app, "subscribeAll": "false", "api_key": "worker:worker"},
        )
        stream = EventStream(ws)
        self.streams.append(stream)
        return stream

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()

    async def bridged_call(
        self, listener: Listener, media_format: str = "ulaw"
    ) -> tuple[str, str, str]:
        """An answered inbound call bridged with externalMedia: (caller, em, bridge) ids."""
        phone = await self.double.call_in()
        caller = phone.channel_id
        assert (await self.call("POST", f"/channels/{caller}/answer"))[0] == 204
        status, bridge = await self.call("POST", "/bridges", {"type": "mixing,dtmf_events"})
        assert status == 200
        params = {
            "app": "aispinner",
            "external_host": f"127.0.0.1:{listener.port}",
            "format": media_format,
        }
        status, em = await self.call("POST", "/channels/externalMedia", params)
        assert status == 200
        channels = {"channel": f"{caller},{em['id']}"}
        assert (await self.call("POST", f"/bridges/{bridge['id']}/addChannel", channels))[0] == 204
        return caller, em["id"], bridge["id"]


@pytest.fixture
async def double() -> AsyncIterator[AriDouble]:
    async with AriDouble(local_dialplan_delay_s=0.05) as ari_double:
        yield ari_double


@pytest.fixture
async def ari(double: AriDouble) -> AsyncIterator[Ari]:
    async with aiohttp.ClientSession() as session:
        client = Ari(double, session)
        yield client
        await client.close()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    udp = Listener()
    await udp.open()
    yield udp
    udp.close()


def _channel_of(event: JsonObject) -> JsonObject:
    channel: JsonObject = event.get("channel") or event["peer"]
    return channel


async def _wait(condition: Any, limit_s: float = 2.0) -> None:
    for _ in range(int(limit_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


class TestSwaggerRouting:
    async def test_every_operation_is_routed(self, ari: Ari) -> None:
        """Each operation of the api-docs reaches its handler: never 404 Resource not found or
        405 Invalid method (501 for what the double does not model)."""
        for operation in api().operations():
            if operation.upgrade:
                continue
            path = operation.path
            for param in operation.params:
                if param.param_type == "path":
                    path = path.replace("{" + param.name + "}", "x")
            status, body = await ari.call(operation.method, path)
            message = body.get("message") if isinstance(body, dict) else None
            assert message not in ("Resource not found", "Invalid method"), (operation, body)
            assert status < 600

    async def test_literal_segment_before_path_variable(self, ari: Ari) -> None:
        async with ari.session.get(
            f"{ari.double.url}/ari/channels/externalMedia", headers=AUTH
        ) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "OPTIONS,POST"
            assert await response.json() == {"message": "Invalid method"}

    async def test_trailing_slash_is_not_found(self, ari: Ari) -> None:
        status, body = await ari.call("GET", "/channels/")
        assert status == 404
        assert body == {"message": "ARI URLs do not end with a slash. Try /ari/channels"}

    async def test_api_docs_are_served(self, ari: Ari) -> None:
        status, listing = await ari.call("GET", "/api-docs/resources.json")
        assert status == 200
        assert listing["basePath"] == f"{ari.double.url}/ari"
        status, channels = await ari.call("GET", "/api-docs/channels.json")
        on_disk = json.loads((api().directory / "channels.json").read_text())
        assert status == 200
        assert channels["apis"] == on_disk["apis"]
        assert (await ari.call("GET", "/api-docs/nosuch.json"))[0] == 404
        assert await ari.call("POST", "/api-docs/channels.json") == (
            405,
            {"message": "Unsupported method"},
        )

    async def test_responses_look_like_asterisk(self, ari: Ari) -> None:
        async with ari.session.get(f"{ari.double.url}/ari/asterisk/ping", headers=AUTH) as r:
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers["Server"] == "Asterisk/22.10.1"
            text = await r.text()
            assert " " not in text  # pretty = no
        await ari.events()
        phone = await ari.double.call_in()
        async with ari.session.post(
            f"{ari.double.url}/ari/channels/{phone.channel_id}/ring", headers=AUTH
        ) as r:
            assert r.status == 204
            assert await r.read() == b""
            assert "Content-Type" not in r.headers


class TestParameterChecks:
    """Stricter than Asterisk's glue (which checks nothing): a 400 with a message."""

    async def test_unknown_parameter(self, ari: Ari) -> None:
        status, body = await ari.call("GET", "/channels", {"foo": "1"})
        assert status == 400
        assert "Unknown parameter 'foo'" in body["message"]

    async def test_integer_parameter(self, ari: Ari) -> None:
        params = {"endpoint": "PJSIP/1@sippuas", "app": "aispinner", "timeout": "soon"}
        status, body = await ari.call("POST", "/channels", params)
        assert status == 400
        assert "'timeout' must be an integer" in body["message"]

    async def test_allowable_values(self, ari: Ari) -> None:
        params = {
            "app": "aispinner",
            "external_host": "127.0.0.1:9",
            "format": "ulaw",
            "direction": "in",
        }
        status, body = await ari.call("POST", "/channels/externalMedia", params)
        assert status == 400
        assert "'direction' must be one of both" in body["message"]

    async def test_required_parameter(self, ari: Ari) -> None:
        status, body = await ari.call("POST", "/channels/x/play")
        assert status == 400
        assert "Missing required parameter 'media'" in body["message"]

    async def test_resource_checks_keep_asterisk_messages(self, ari: Ari) -> None:
        assert await ari.call("GET", "/asterisk/variable") == (
            400,
            {"message": "Variable name is required"},
        )

    async def test_json_body_parameters_and_bad_json(self, ari: Ari, double: AriDouble) -> None:
        await ari.events()
        body = {"endpoint": "PJSIP/4155550123@sippuas", "app": "aispinner", "timeout": 5}
        status, channel = await ari.call("POST", "/channels", body=body)
        assert status == 200
        assert channel["name"].startswith("PJSIP/sippuas-")
        async with ari.session.post(
            f"{double.url}/ari/channels",
            data=b"{not json",
            headers={**AUTH, "Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert await response.json() == {"message": "Error parsing request body"}


class TestAuthentication:
    async def test_basic_header_wins_over_api_key(self, ari: Ari) -> None:
        wrong = {"Authorization": aiohttp.encode_basic_auth("worker", "wrong")}
        status, body = await ari.call("GET", "/channels", {"api_key": "worker:worker"}, None, wrong)
        assert (status, body) == (401, {"message": "Authentication required"})

    async def test_challenge_and_api_key(self, ari: Ari) -> None:
        async with ari.session.get(f"{ari.double.url}/ari/channels") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Basic realm="Asterisk REST Interface"'
            assert await response.text() == '{"message":"Authentication required"}'
        assert await ari.call("GET", "/channels", {"api_key": "worker:worker"}, None, {}) == (
            200,
            [],
        )

    async def test_events_socket_needs_credentials(self, ari: Ari) -> None:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await ari.session.ws_connect(
                f"{ari.double.url}/ari/events", params={"app": "aispinner"}
            )
        assert refused.value.status == 401


class TestEventsWebsocket:
    async def test_application_replaced(self, ari: Ari, double: AriDouble) -> None:
        old = await ari.events()
        new = await ari.events()
        replaced = await old.next_of("ApplicationReplaced")
        assert list(replaced) == ["type", "timestamp", "application", "asterisk_id"]
        assert replaced["application"] == "aispinner"
        await double.call_in()
        await new.next_of("StasisStart")
        await double.settle()
        assert old.types() == ["ApplicationReplaced"]
        assert not old.ws.closed

    async def test_events_in_a_gap_are_lost_and_not_replayed(
        self, ari: Ari, double: AriDouble
    ) -> None:
        first = await ari.events()
        phone = await double.call_in()
        await first.next_of("StasisStart")
        await double.drop_websockets()
        status, apps = await ari.call("GET", "/applications")
        assert status == 200
        assert apps[0]["channel_ids"] == [phone.channel_id]  # still registered
        await phone.hang_up()
        assert [e["type"] for _, e in double.lost_events] == ["ChannelHangupRequest", "StasisEnd"]
        second = await ari.events()
        assert await ari.call("GET", f"/channels/{phone.channel_id}") == (
            404,
            {"message": "Channel not found"},
        )
        another = await double.call_in()
        started = await second.next_of("StasisStart")
        assert started["channel"]["id"] == another.channel_id
        assert second.types() == ["StasisStart"]  # nothing replayed

    async def test_stasis_fails_without_a_connected_app(self, ari: Ari, double: AriDouble) -> None:
        phone = await double.call_in()
        assert phone.stasis_failed
        assert phone.ended.is_set()
        assert double.channels == {}
        assert await ari.call("GET", "/applications/aispinner") == (
            404,
            {"message": "Application not found"},
        )

    async def test_missing_app_is_an_html_400(self, ari: Ari) -> None:
        async with ari.session.get(
            f"{ari.double.url}/ari/events",
            params={"api_key": "worker:worker"},
            headers={"Connection": "Upgrade", "Upgrade": "websocket"},
        ) as response:
            assert response.status == 400
            assert "HTTP request is missing param: [app]" in await response.text()


class TestExternalMediaRtp:
    async def test_rtp_only_from_external_host_in_its_payload_type(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        await ari.events()
        caller, em, _ = await ari.bridged_call(listener)
        phone = double.phone(caller)
        port = int(double.channels[em].variables["UNICASTRTP_LOCAL_PORT"])
        sender = RtpSender(0, 7, timestamp=0)
        audio = tone(0.1)
        for n in range(5):
            listener.send(sender.build(ulaw_encode(audio[n * 320 : (n + 1) * 320]), 160), port)
        stranger = Listener()
        await stranger.open()
        stranger.send(RtpSender(0, 8).build(b"\xff" * 160, 160), port)
        listener.send(RtpSender(8, 9).build(b"\xd5" * 160, 160), port)
        await _wait(lambda: len(double.em_stats(em).ignored) == 2)
        stranger.close()
        assert len(double.em_received(em)) == 5
        assert len(phone.heard) == 5 * 320
        assert bytes(phone.heard) == ulaw_decode(ulaw_encode(audio[: 5 * 320]))
        reasons = sorted(reason for reason, _ in double.em_stats(em).ignored)
        assert reasons == ["payload type 8", "source is not external_host"]

    async def test_slin16_is_big_endian_and_reframed(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        await ari.events()
        caller, _, _ = await ari.bridged_call(listener, "slin16")
        loud = (1000).to_bytes(2, "little", signed=True) * 240  # 30 ms
        await double.phone(caller).send_audio(loud * 4, ptime_ms=30, realtime=False)
        await _wait(lambda: len(listener.packets) == 6)  # 4 x 30 ms = 6 x 20 ms
        packets = [RtpPacket.parse(data) for _, data, _ in listener.packets]
        assert {(p.payload_type, len(p.payload)) for p in packets} == {(118, 640)}
        assert [p.timestamp - packets[0].timestamp for p in packets] == [
            0,
            320,
            640,
            960,
            1280,
            1600,
        ]
        assert packets[1].payload[:4] == (1000).to_bytes(2, "big") * 2

    async def test_nothing_flows_outside_a_bridge(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        await ari.events()
        phone = await double.call_in()
        await ari.call("POST", f"/channels/{phone.channel_id}/answer")
        params = {
            "app": "aispinner",
            "external_host": f"127.0.0.1:{listener.port}",
            "format": "ulaw",
        }
        status, em = await ari.call("POST", "/channels/externalMedia", params)
        assert status == 200
        await phone.send_audio(tone(0.06), realtime=False)
        await asyncio.sleep(0.05)
        assert listener.packets == []
        assert double.em_stats(em["id"]).sent == []


class TestExternalMediaResponseOrder:
    async def test_events_before_the_response_when_asked(self, listener: Listener) -> None:
        """``em_events_before_response=5`` (as recorded with slin16): all five events are written
        before the 200, so the app may see StasisStart for a channel id it does not know yet."""
        async with (
            AriDouble(em_events_before_response=5) as double,
            aiohttp.ClientSession() as session,
        ):
            client = Ari(double, session)
            await client.events()
            params = {"app": "aispinner", "external_host": f"127.0.0.1:{listener.port}"}
            status, em = await client.call(
                "POST", "/channels/externalMedia", {**params, "format": "ulaw"}
            )
            assert status == 200
            sent = [(e["type"], _channel_of(e)["id"]) for _, e in double.events]
            assert sent[-1] == ("StasisStart", em["id"])
            assert len(sent) == 5
            await client.close()


class TestOriginate:
    async def test_no_answer_ends_at_the_originate_timeout(
        self, ari: Ari, double: AriDouble
    ) -> None:
        events = await ari.events()
        double.on_dial("5550001", "noanswer")
        loop = asyncio.get_running_loop()
        started = loop.time()
        params = {"endpoint": "PJSIP/5550001@sippuas", "app": "aispinner", "timeout": "1"}
        status, channel = await ari.call("POST", "/channels", params)
        assert status == 200
        destroyed = await events.next_of("ChannelDestroyed")
        assert 0.9 < loop.time() - started < 2
        assert (destroyed["cause"], destroyed["tech_cause"]) == (19, 480)
        assert double.phone(channel["id"]).ended.is_set()

    async def test_app_hangup_while_ringing_cancels(self, ari: Ari, double: AriDouble) -> None:
        events = await ari.events()
        double.on_dial("5550002", "noanswer")
        params = {"endpoint": "PJSIP/5550002@sippuas", "app": "aispinner"}
        _, channel = await ari.call("POST", "/channels", params)
        await events.next_of("Dial")
        assert await ari.call("POST", f"/channels/{channel['id']}/answer") == (
            409,
            {"message": "Channel not in Stasis application"},
        )
        assert (await ari.call("DELETE", f"/channels/{channel['id']}"))[0] == 204
        request = await events.next_of("ChannelHangupRequest")
        assert (request["cause"], request["soft"]) == (32, True)
        assert (await events.next_of("ChannelDestroyed"))["cause"] == 16
        assert "CANCEL" in [e.get("dialstatus") for e in events.events]

    async def test_answered_enters_stasis_with_app_args(self, ari: Ari, double: AriDouble) -> None:
        events = await ari.events()
        double.on_dial("5550003", "answer", ring_s=0.02)
        params = {
            "endpoint": "PJSIP/5550003@sippuas",
            "app": "aispinner",
            "appArgs": "outbound,camp_9",
            "callerId": "Desk <+1 (555) 000-2222>",
        }
        _, channel = await ari.call("POST", "/channels", params)
        assert channel["caller"] == {"name": "Desk", "number": "+15550002222"}
        started = await events.next_of("StasisStart")
        assert started["args"] == ["outbound", "camp_9"]
        assert started["channel"]["dialplan"]["app_data"] == "aispinner,outbound,camp_9"
        assert double.phone(channel["id"]).answered

    async def test_only_endpoints_with_a_contact_are_dialable(self, ari: Ari) -> None:
        failed = (500, {"error": "Allocation failed"})
        params = {"endpoint": "PJSIP/4155550123@trunk", "app": "aispinner"}
        assert await ari.call("POST", "/channels", params) == failed
        fields = [{"attribute": "contact", "value": "sip:127.0.0.1:5099"}]
        base = "/asterisk/config/dynamic/res_pjsip"
        assert (await ari.call("PUT", f"{base}/aor/carrier", body={"fields": fields}))[0] == 200
        fields = [{"attribute": "aors", "value": "carrier"}]
        assert (await ari.call("PUT", f"{base}/endpoint/carrier", body={"fields": fields}))[
            0
        ] == 200
        status, endpoint = await ari.call("GET", "/endpoints/PJSIP/carrier")
        assert (status, endpoint["state"]) == (200, "online")
        params = {"endpoint": "PJSIP/4155550123@carrier", "app": "aispinner"}
        assert (await ari.call("POST", "/channels", params))[0] == 200
        assert (await ari.call("DELETE", f"{base}/endpoint/carrier"))[0] == 204
        assert await ari.call("POST", "/channels", params) == failed


class TestPhones:
    async def test_two_phones_in_a_bridge_hear_each_other(
        self, ari: Ari, double: AriDouble
    ) -> None:
        events = await ari.events()
        caller = await double.call_in()
        await ari.call("POST", f"/channels/{caller.channel_id}/answer")
        double.on_dial("5550006", "answer", ring_s=0.01, echo=True)
        status, callee = await ari.call(
            "POST",
            "/channels/5550006-leg",
            {"endpoint": "PJSIP/5550006@sippuas", "app": "aispinner"},
            body={"variables": {"CAMPAIGN": "c1"}},
        )
        assert (status, callee["id"]) == (200, "5550006-leg")
        await events.next_of("StasisStart")
        await events.next_of("StasisStart")
        assert await ari.call(
            "GET", "/channels/5550006-leg/variable", {"variable": "CAMPAIGN"}
        ) == (
            200,
            {"value": "c1"},
        )
        _, bridge = await ari.call("POST", "/bridges")
        channels = {"channel": f"{caller.channel_id},5550006-leg"}
        assert (await ari.call("POST", f"/bridges/{bridge['id']}/addChannel", channels))[0] == 204
        spoken = tone(0.1)
        await caller.send_audio(spoken, realtime=False)
        await _wait(lambda: len(caller.heard) == len(spoken))  # the callee echoes
        assert bytes(double.phone("5550006-leg").heard) == spoken
        assert bytes(caller.heard) == spoken
        await caller.hang_up()
        assert caller.hangup_cause is None  # it sent the BYE
        await events.next_of("StasisEnd")
        peer = [e for e in events.events if e.get("variable") == "RTPAUDIOQOSBRIDGED"]
        assert peer[0]["channel"]["id"] == "5550006-leg"


class TestBridges:
    async def test_moving_a_channel_leaves_the_old_bridge(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        events = await ari.events()
        caller, em, first = await ari.bridged_call(listener)
        _, second = await ari.call("POST", "/bridges", {"type": "mixing"})
        assert (await ari.call("POST", f"/bridges/{second['id']}/addChannel", {"channel": em}))[
            0
        ] == 204
        left = await events.next_of("ChannelLeftBridge")
        assert (left["bridge"]["id"], left["channel"]["id"]) == (first, em)
        assert double.bridges[first].snapshot()["channels"] == [caller]
        assert double.bridges[second["id"]].snapshot()["channels"] == [em]

    async def test_destroying_a_bridge_lets_its_channels_go_first(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        events = await ari.events()
        caller, em, bridge = await ari.bridged_call(listener)
        mark = len(events.events)
        assert (await ari.call("DELETE", f"/bridges/{bridge}"))[0] == 204
        await events.next_of("BridgeDestroyed")
        assert events.types()[mark:].count("ChannelLeftBridge") == 2
        assert events.types()[-1] == "BridgeDestroyed"
        assert (await ari.call("GET", f"/channels/{caller}"))[0] == 200
        assert await ari.call("POST", f"/bridges/{bridge}/removeChannel", {"channel": em}) == (
            404,
            {"message": "Bridge not found"},
        )

    async def test_bridge_types(self, ari: Ari) -> None:
        status, holding = await ari.call("POST", "/bridges", {"type": "holding"})
        assert (status, holding["bridge_type"], holding["technology"]) == (
            200,
            "holding",
            "holding_bridge",
        )
        for bad in ("mixing,holding", "dtmf_events", "mixing,bogus"):
            status, body = await ari.call("POST", "/bridges", {"type": bad})
            assert status == 500
            assert body["message"].startswith("Unable to create bridge")

    async def test_remove_a_channel_not_in_the_bridge(
        self, ari: Ari, double: AriDouble, listener: Listener
    ) -> None:
        await ari.events()
        caller, _, bridge = await ari.bridged_call(listener)
        assert (await ari.call("POST", f"/bridges/{bridge}/removeChannel", {"channel": caller}))[
            0
        ] == 204
        assert await ari.call("POST", f"/bridges/{bridge}/removeChannel", {"channel": caller}) == (
            422,
            {"message": "Channel not in this bridge"},
        )


class TestDynamicConfiguration:
    async def test_registration_objects(self, ari: Ari) -> None:
        path = "/asterisk/config/dynamic/res_pjsip/registration/carrier"
        fields = [{"attribute": "server_uri", "value": "sip:carrier.example"}]
        status, attributes = await ari.call("PUT", path, body={"fields": fields})
        assert status == 200
        names = [a["attribute"] for a in attributes]
        assert names[:3] == ["server_uri", "client_uri", "contact_user"]
        assert "outbound_proxy" in names
        bad = [{"attribute": "no_such_option", "value": "1"}]
        assert await ari.call("PUT", f"{path}2", body={"fields": bad}) == (
            400,
            {"message": "Creation of object 'carrier2' failed field value validation"},
        )

    async def test_default_mapping_refuses_creation(self) -> None:
        async with AriDouble(sorcery_memory=False) as double, aiohttp.ClientSession() as session:
            client = Ari(double, session)
            path = "/asterisk/config/dynamic/res_pjsip/registration/carrier"
            assert await client.call("PUT", path, body={"fields": []}) == (
                403,
                {"message": "Cannot create sorcery objects of type 'registration'"},
            )

    async def test_identify_match_must_be_an_address(self, ari: Ari) -> None:
        path = "/asterisk/config/dynamic/res_pjsip/identify/carrier"
        fields = [{"attribute": "match", "value": "carrier.example"}]
        status, body = await ari.call("PUT", path, body={"fields": fields})
        assert status == 400
        assert body["message"].endswith("failed field value validation")


class TestDtmfAndCallControl:
    async def test_caller_digit_reported_once_at_its_end(self, ari: Ari, double: AriDouble) -> None:
        events = await ari.events()
        phone = await double.call_in()
        await ari.call("POST", f"/channels/{phone.channel_id}/answer")
        phone.press("5", duration_ms=60)
        digit = await events.next_of("ChannelDtmfReceived")
        assert (digit["digit"], digit["duration_ms"]) == ("5", 60)
        await asyncio.sleep(0.1)
        assert events.types().count("ChannelDtmfReceived") == 1

    async def test_app_digits_ring_and_progress_reach_the_phone(
        self, ari: Ari, double: AriDouble
    ) -> None:
        await ari.events()
        phone = await double.call_in()
        cid = phone.channel_id
        assert (await ari.call("POST", f"/channels/{cid}/ring"))[0] == 204
        assert (await ari.call("POST", f"/channels/{cid}/progress"))[0] == 204
        assert (phone.ringing, phone.progress, phone.answered) == (True, True, False)
        assert (await ari.call("POST", f"/channels/{cid}/dtmf", {"dtmf": "12#"}))[0] == 204
        assert phone.dtmf_sent == ["1", "2", "#"]
        assert (await ari.call("DELETE", f"/channels/{cid}", {"reason_code": "17"}))[0] == 204
        assert (phone.hangup_reason, phone.hangup_cause) == ("17", 17)

    async def test_down_channels_cannot_be_operated(self, ari: Ari, double: AriDouble) -> None:
        await ari.events()
        double.on_dial("5550004", "answer", ring_s=5)
        _, channel = await ari.call(
            "POST", "/channels", {"endpoint": "PJSIP/5550004@sippuas", "app": "aispinner"}
        )
        assert await ari.call("POST", f"/channels/{channel['id']}/dtmf", {"dtmf": "1"}) == (
            409,
            {"message": "Channel not in Stasis application"},
        )


class TestCleanup:
    async def test_stop_closes_every_socket_and_task(self, listener: Listener) -> None:
        before = asyncio.all_tasks()
        double = AriDouble()
        await double.start()
        async with aiohttp.ClientSession() as session:
            client = Ari(double, session)
            events = await client.events()
            caller, em, _ = await client.bridged_call(listener)
            double.on_dial("5550005", "noanswer")
            await client.call(
                "POST", "/channels", {"endpoint": "PJSIP/5550005@sippuas", "app": "aispinner"}
            )
            await double.stop()
            await asyncio.sleep(0.05)
            assert events.ws.closed
            await client.close()
        assert double.core.media[em].closed
        assert double.phone(caller).ended.is_set()
        assert asyncio.all_tasks() - before == set()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", double.port)
