"""The agent connections (worker/agent/connection.py) against real ``websockets`` servers on
127.0.0.1, each played by the test: the jambonz control socket (acks, timeouts, reconnect with
``session:reconnect``), the listen/stream audio socket and Twilio Media Streams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import pytest
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from worker.agent import listen_audio as la
from worker.agent import twilio as tw
from worker.agent.connection import (
    AgentConnectError,
    ConnectionLost,
    JambonzConnection,
    JambonzConnectionEvent,
    ListenClosed,
    ListenConnection,
    ListenConnectionEvent,
    Reconnected,
    TwilioClosed,
    TwilioConnection,
    TwilioConnectionEvent,
)
from worker.agent.jambonz import (
    AckFailed,
    AckReceived,
    AckTimedOut,
    CommandReceived,
    HangupRequired,
    InvalidMessage,
    RedirectCommand,
)
from worker.agent.verbs import SayVerb
from worker.errors import LocalError

WAIT = 5.0  # bound on every single wait
QUIET = 0.3  # how long "nothing arrives" is watched
CONTROL = [Subprotocol("ws.jambonz.org")]
AUDIO = [Subprotocol("audio.jambonz.org")]
CALL_SID = "9fb35c28-7a64-4bf5-9d2f-0c1b1d1b2c3d"
FRAME = 320  # 20 ms of L16 at 8 kHz

ProcessRequest = Callable[[ServerConnection, Request], Response | None]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- the test's servers


class Peer:
    """The server side of one accepted connection: what it received, and how it ended."""

    def __init__(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.messages: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.ended: asyncio.Future[tuple[int | None, str | None]] = (
            asyncio.get_running_loop().create_future()
        )

    async def recv(self) -> str | bytes:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    async def recv_json(self) -> dict[str, Any]:
        message = await self.recv()
        assert isinstance(message, str), f"expected text, got {len(message)} binary bytes"
        value = json.loads(message)
        assert isinstance(value, dict)
        return value

    async def nothing_more(self) -> None:
        """Nothing arrives for a while."""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.messages.get(), QUIET)

    async def send_json(self, obj: Any) -> None:
        await self.conn.send(json.dumps(obj))

    async def ack(self, msgid: str, verbs: list[dict[str, Any]] | None = None) -> None:
        message: dict[str, Any] = {"type": "ack", "msgid": msgid}
        if verbs is not None:
            message["data"] = verbs
        await self.send_json(message)

    async def close_code(self) -> tuple[int | None, str | None]:
        """The close code and reason the client sent."""
        return await asyncio.wait_for(asyncio.shield(self.ended), WAIT)


class AgentServer:
    """A websockets server on 127.0.0.1 whose connections the test drives by hand."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.requests: list[Headers] = []
        self.refuse_next = 0
        """Answer this many upgrade requests with HTTP 503."""
        self._server: Server | None = None

    async def start(self, subprotocols: Sequence[Subprotocol] | None) -> None:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            subprotocols=subprotocols,
            process_request=self._process_request,
            compression=None,
        )

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/agent"

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request.headers)
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return conn.respond(503, "agent busy\n")
        return None

    async def _handler(self, conn: ServerConnection) -> None:
        peer = Peer(conn)
        await self.peers.put(peer)
        try:
            async for message in conn:
                peer.messages.put_nowait(message)
        except ConnectionClosed:
            pass
        peer.ended.set_result((conn.close_code, conn.close_reason))

    async def next_peer(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), WAIT)

    async def no_new_peer(self, within: float) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.peers.get(), within)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


ServerFactory = Callable[[Sequence[Subprotocol] | None], Awaitable[AgentServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    servers: list[AgentServer] = []

    async def make(subprotocols: Sequence[Subprotocol] | None) -> AgentServer:
        server = AgentServer()
        await server.start(subprotocols)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.close()


class Events(Generic[_T]):
    """Collects what a connection hands to ``on_event``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_T] = asyncio.Queue()
        self.seen: list[_T] = []

    def __call__(self, event: _T) -> None:
        self.seen.append(event)
        self.queue.put_nowait(event)

    async def next(self) -> _T:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    async def next_of(self, kind: type[Any]) -> Any:
        while True:
            event = await self.next()
            if isinstance(event, kind):
                return event


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _own_tasks(url: str) -> list[asyncio.Task[Any]]:
    """The connection's tasks still alive (they are named after its URL)."""
    prefix = url.split("#")[0]
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


@contextlib.contextmanager
def _socket_full(conn: ListenConnection | TwilioConnection) -> Iterator[None]:
    """The socket does not take data: the transport has told the connection its buffer is over
    the high-water mark (asyncio's ``pause_writing``), as a stalled agent's socket does. Frames
    sent meanwhile must wait in the lane's queue."""
    ws = conn._ws
    assert ws is not None
    ws.pause_writing()
    try:
        yield
    finally:
        ws.resume_writing()


# --------------------------------------------------------------------------- jambonz control


def _session_data() -> dict[str, Any]:
    return {
        "callSid": CALL_SID,
        "direction": "inbound",
        "from": "+15083084809",
        "to": "+15083728299",
        "callerName": "",
        "sipStatus": 100,
        "callStatus": "trying",
        "sip": {"headers": {"X-CID": "abc"}, "raw": "INVITE ..."},
    }


def _call_info(status: str = "in-progress") -> dict[str, Any]:
    return {"call_sid": CALL_SID, "direction": "inbound", "call_status": status}


@pytest.fixture
async def control_server(make_server: ServerFactory) -> AgentServer:
    return await make_server(CONTROL)


def _control(server: AgentServer, events: Events[Any], **kwargs: Any) -> JambonzConnection:
    kwargs.setdefault("ack_timeout", 0.3)
    return JambonzConnection(server.url, CALL_SID, on_event=events, **kwargs)


async def _started_session(
    server: AgentServer, conn: JambonzConnection
) -> tuple[Peer, dict[str, Any]]:
    """Connect, send session:new and ack it; returns the peer and the session:new it got."""
    await conn.connect()
    peer = await server.next_peer()
    pending = asyncio.ensure_future(conn.session_new(_session_data()))
    session_new = await peer.recv_json()
    await peer.ack(session_new["msgid"])
    assert isinstance(await asyncio.wait_for(pending, WAIT), AckReceived)
    return peer, session_new


class TestJambonzSubprotocolWsJambonzOrg:
    async def test_subprotocol_is_offered_and_negotiated(self, control_server: AgentServer) -> None:
        conn = _control(control_server, Events())
        try:
            await conn.connect()
            peer = await control_server.next_peer()
            assert peer.conn.subprotocol == "ws.jambonz.org"
            assert control_server.requests[0]["Sec-WebSocket-Protocol"] == "ws.jambonz.org"
        finally:
            await conn.close()

    async def test_server_that_does_not_select_it_is_a_connect_error(
        self, make_server: ServerFactory
    ) -> None:
        server = await make_server(None)
        conn = _control(server, Events())
        with pytest.raises(AgentConnectError, match=r"ws\.jambonz\.org") as info:
            await conn.connect()
        assert info.value.kind == "subprotocol"
        await conn.close()


class TestJambonzConnectFailures:
    async def test_refused_port_is_a_connect_error(self) -> None:
        url = f"ws://127.0.0.1:{_closed_port()}/agent#rc=0"
        conn = JambonzConnection(url, CALL_SID)
        with pytest.raises(AgentConnectError, match="connection refused") as info:
            await conn.connect()
        assert info.value.kind == "refused"
        assert "#" not in str(info.value)
        await conn.close()

    async def test_http_status_is_a_connect_error_naming_it(
        self, control_server: AgentServer
    ) -> None:
        control_server.refuse_next = 1
        conn = _control(control_server, Events())  # default policy retries "ct" only
        with pytest.raises(AgentConnectError, match="HTTP 503") as info:
            await conn.connect()
        assert (info.value.kind, info.value.status) == ("status", 503)
        assert len(control_server.requests) == 1
        await conn.close()

    async def test_silent_server_is_a_handshake_timeout(self) -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # accepts the TCP connection, never answers the upgrade

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = JambonzConnection(f"ws://127.0.0.1:{port}/#rc=0", CALL_SID, open_timeout=0.3)
        try:
            with pytest.raises(AgentConnectError, match=r"handshake within 0\.3 s") as info:
                await conn.connect()
        finally:
            await conn.close()
            server.close()
            for writer in accepted:
                writer.close()
                await writer.wait_closed()
            await server.wait_closed()
        assert info.value.kind == "timeout"
        assert len(accepted) == 1

    @pytest.mark.parametrize("url", ["ws://[::1/agent", "ws://127.0.0.1:99999/agent"])
    async def test_a_malformed_url_is_a_connect_error(self, url: str) -> None:
        conn = JambonzConnection(url, CALL_SID, username="u", password="p")
        with pytest.raises(AgentConnectError, match="invalid URL") as info:
            await conn.connect()
        assert info.value.kind == "url"
        await conn.close()

    async def test_session_new_waiting_before_a_failed_connect_fails(self) -> None:
        conn = JambonzConnection(f"ws://127.0.0.1:{_closed_port()}/#rc=0", CALL_SID)
        pending = asyncio.ensure_future(conn.session_new(_session_data()))
        await asyncio.sleep(0)
        with pytest.raises(AgentConnectError):
            await conn.connect()
        outcome = await asyncio.wait_for(pending, WAIT)
        assert isinstance(outcome, AckFailed)
        assert outcome.for_type == "session:new"
        await conn.close()


class TestJambonzRetryFragment:
    async def test_rc_and_rp_5xx_retry_the_first_connect(self, control_server: AgentServer) -> None:
        control_server.refuse_next = 1
        url = control_server.url + "#rc=2&rp=ct,5xx"
        conn = JambonzConnection(url, CALL_SID, ack_timeout=0.3)
        try:
            await conn.connect()
            peer = await control_server.next_peer()
            assert peer.conn.request is not None
            assert peer.conn.request.path == "/agent"  # the fragment is never sent
            assert len(control_server.requests) == 2
        finally:
            await conn.close()


class TestJambonzBasicAuth:
    async def test_authorization_header_when_username_and_password_are_set(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events(), username="app", password="s3cret:x")
        try:
            await conn.connect()
        finally:
            await conn.close()
        expected = "Basic " + base64.b64encode(b"app:s3cret:x").decode()
        assert control_server.requests[0]["Authorization"] == expected

    async def test_no_authorization_header_without_credentials(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events())
        try:
            await conn.connect()
        finally:
            await conn.close()
        assert "Authorization" not in control_server.requests[0]


class TestJambonzAckRule:
    async def test_session_new_is_sent_and_its_ack_returned_with_verbs(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events())
        try:
            await conn.connect()
            peer = await control_server.next_peer()
            pending = asyncio.ensure_future(conn.session_new(_session_data()))
            message = await peer.recv_json()
            assert message["type"] == "session:new"
            assert message["call_sid"] == CALL_SID
            assert message["data"]["call_sid"] == CALL_SID
            assert message["data"]["caller_name"] == ""
            assert message["data"]["sip"] == {"headers": {"X-CID": "abc"}, "raw": "INVITE ..."}
            await peer.ack(message["msgid"], [{"verb": "say", "text": "Hi"}])
            outcome = await asyncio.wait_for(pending, WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckReceived)
        assert outcome.request_msgid == message["msgid"]
        assert outcome.verbs is not None
        (say,) = outcome.verbs
        assert isinstance(say, SayVerb)
        assert say.text == "Hi"

    async def test_missing_ack_times_out_after_ack_timeout(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events(), ack_timeout=0.3)
        loop = asyncio.get_running_loop()
        try:
            await conn.connect()
            peer = await control_server.next_peer()
            started = loop.time()
            outcome = await asyncio.wait_for(conn.session_new(_session_data()), WAIT)
            elapsed = loop.time() - started
            message = await peer.recv_json()
        finally:
            await conn.close()
        assert isinstance(outcome, AckTimedOut)
        assert outcome.request_msgid == message["msgid"]
        assert 0.3 <= elapsed < 1.5

    async def test_verb_hook_carries_hook_results_and_verb_id(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events())
        try:
            peer, _ = await _started_session(control_server, conn)
            pending = asyncio.ensure_future(
                conn.verb_hook("/gather-done", _call_info(), {"digits": "42"}, verb_id="g1")
            )
            hook = await peer.recv_json()
            assert (hook["type"], hook["hook"]) == ("verb:hook", "/gather-done")
            assert hook["data"]["digits"] == "42"
            assert hook["data"]["verb_id"] == "g1"
            await peer.ack(hook["msgid"])
            outcome = await asyncio.wait_for(pending, WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckReceived)
        assert outcome.verbs is None

    async def test_call_status_is_fire_and_forget(self, control_server: AgentServer) -> None:
        conn = _control(control_server, Events())
        try:
            peer, _ = await _started_session(control_server, conn)
            sent = conn.call_status(_call_info("completed"), 12)
            message = await peer.recv_json()
        finally:
            await conn.close()
        assert message["msgid"] == sent.msgid
        assert message["type"] == "call:status"
        assert message["data"]["call_status"] == "completed"
        assert message["data"]["duration"] == 12

    async def test_request_awaits_other_acked_types_and_notify_does_not(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events())
        try:
            peer, _ = await _started_session(control_server, conn)
            with pytest.raises(LocalError, match="notify"):
                await conn.request("llm:event", {})
            with pytest.raises(LocalError, match="request"):
                conn.notify("session:redirect", {}, hook="/x")
            conn.notify("llm:event", {"kind": "x"}, hook="/llm")
            pending = asyncio.ensure_future(
                conn.request("session:redirect", _call_info(), hook="/next-app")
            )
            event = await peer.recv_json()
            redirect = await peer.recv_json()
            await peer.ack(redirect["msgid"], [{"verb": "pause", "length": 1}])
            outcome = await asyncio.wait_for(pending, WAIT)
        finally:
            await conn.close()
        assert (event["type"], event["hook"]) == ("llm:event", "/llm")
        assert (redirect["type"], redirect["hook"]) == ("session:redirect", "/next-app")
        assert isinstance(outcome, AckReceived)

    async def test_verb_error_and_verb_status(self, control_server: AgentServer) -> None:
        conn = _control(control_server, Events())
        try:
            peer, _ = await _started_session(control_server, conn)
            assert conn.verb_status("starting", verb="say", verb_id="s1") is None  # not enabled
            conn.notify_events = True
            conn.verb_status("starting", verb="say", verb_id="s1")
            conn.verb_error("no synthesizer", verb="say", verb_id="s1")
            status = await peer.recv_json()
            error = await peer.recv_json()
        finally:
            await conn.close()
        assert status["type"] == "verb:status"
        assert status["data"] == {"event": "starting", "id": "s1", "name": "say"}
        assert error["type"] == "jambonz:error"
        assert error["data"] == {"error": "no synthesizer", "verb": "say", "id": "s1"}


class TestJambonzInvalidMessageRule:
    async def test_garbage_from_the_app_is_answered_with_jambonz_error(
        self, control_server: AgentServer
    ) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events)
        try:
            peer, _ = await _started_session(control_server, conn)
            await peer.conn.send("this is not json")
            error = await peer.recv_json()
            event = await events.next_of(InvalidMessage)
        finally:
            await conn.close()
        assert error["type"] == "jambonz:error"
        assert error["data"]["msg"] == "InvalidMessage"
        assert error["data"]["content"] == "this is not json"
        assert event.content == "this is not json"


class TestJambonzCommandsReachTheSession:
    async def test_commands_reach_on_event(self, control_server: AgentServer) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events)
        try:
            peer, _ = await _started_session(control_server, conn)
            await peer.send_json(
                {
                    "type": "command",
                    "command": "redirect",
                    "queueCommand": True,
                    "data": [{"say": {"text": "Hello"}}],
                }
            )
            event = await events.next_of(CommandReceived)
        finally:
            await conn.close()
        assert isinstance(event.command, RedirectCommand)
        assert event.command.queue_command is True


class TestJambonzSessionReconnectRule:
    async def test_close_1011_reconnects_with_session_reconnect_then_held_hook(
        self, control_server: AgentServer
    ) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events, ack_timeout=3.0)
        try:
            first, session_new = await _started_session(control_server, conn)
            await first.conn.close(1011, "agent restarting")
            lost = await events.next_of(ConnectionLost)
            assert lost == ConnectionLost(1011, "agent restarting", reconnecting=True)

            hook = asyncio.ensure_future(conn.verb_hook("/after", _call_info(), {"x": 1}))
            second = await control_server.next_peer()
            reconnect = await second.recv_json()
            assert reconnect["type"] == "session:reconnect"
            assert reconnect["data"] == session_new["data"]
            assert reconnect["msgid"] != session_new["msgid"]
            await second.nothing_more()  # the hook waits for the reconnect ack

            await second.ack(reconnect["msgid"])
            assert await events.next_of(Reconnected) == Reconnected(1)
            message = await second.recv_json()
            assert (message["type"], message["hook"]) == ("verb:hook", "/after")
            await second.ack(message["msgid"], [{"verb": "hangup"}])
            outcome = await asyncio.wait_for(hook, WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckReceived)
        assert outcome.verbs is not None
        assert [v.verb for v in outcome.verbs] == ["hangup"]

    async def test_a_message_over_the_size_limit_is_named_after_the_reconnect(
        self, control_server: AgentServer
    ) -> None:
        """Issue 11 #10: a frame over the limit closes the socket with 1009 (not a bare 1006),
        the reconnect follows the rule, and the app is told why with jambonz:error."""
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events, ack_timeout=3.0, max_size=1024)
        try:
            first, _ = await _started_session(control_server, conn)
            await first.send_json({"type": "command", "command": "redirect", "data": ["x" * 2000]})
            lost = await events.next_of(ConnectionLost)
            assert lost.code == 1009
            assert "exceeds limit" in lost.reason
            second = await control_server.next_peer()
            reconnect = await second.recv_json()
            assert reconnect["type"] == "session:reconnect"
            await second.ack(reconnect["msgid"])
            error = await second.recv_json()
        finally:
            await conn.close()
        assert error["type"] == "jambonz:error"
        assert error["data"]["msg"] == "InvalidMessage"
        assert error["data"]["details"].startswith("message too big")
        assert conn.counters()[0] == 1

    async def test_drop_before_session_new_ack_moves_it_to_session_reconnect(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events(), ack_timeout=3.0)
        try:
            await conn.connect()
            first = await control_server.next_peer()
            pending = asyncio.ensure_future(conn.session_new(_session_data()))
            session_new = await first.recv_json()
            await first.conn.close(1001)
            second = await control_server.next_peer()
            reconnect = await second.recv_json()
            assert reconnect["type"] == "session:reconnect"
            await second.ack(reconnect["msgid"], [{"verb": "say", "text": "again"}])
            outcome = await asyncio.wait_for(pending, WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckReceived)
        assert outcome.request_msgid == session_new["msgid"]
        assert outcome.verbs is not None
        assert isinstance(outcome.verbs[0], SayVerb)

    async def test_hook_in_flight_when_the_socket_drops_fails(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events(), ack_timeout=3.0)
        try:
            first, _ = await _started_session(control_server, conn)
            hook = asyncio.ensure_future(conn.verb_hook("/in-flight", _call_info()))
            assert (await first.recv_json())["type"] == "verb:hook"
            await first.conn.close(1011)
            outcome = await asyncio.wait_for(hook, WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckFailed)
        assert outcome.reason == "socket lost"

    async def test_close_1000_from_the_app_is_graceful_no_reconnect(
        self, control_server: AgentServer
    ) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events)
        try:
            first, _ = await _started_session(control_server, conn)
            await first.conn.close(1000, "bye")
            lost = await events.next_of(ConnectionLost)
            assert lost == ConnectionLost(1000, "bye", reconnecting=False)
            await control_server.no_new_peer(within=1.0)  # the first backoff is 0.5 s
            outcome = await asyncio.wait_for(conn.verb_hook("/late", _call_info()), WAIT)
        finally:
            await conn.close()
        assert isinstance(outcome, AckFailed)
        assert not any(isinstance(e, HangupRequired) for e in events.seen)

    async def test_unacked_session_reconnect_requires_hangup(
        self, control_server: AgentServer
    ) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events, ack_timeout=0.3)
        try:
            first, _ = await _started_session(control_server, conn)
            await first.conn.close(1011)
            second = await control_server.next_peer()
            assert (await second.recv_json())["type"] == "session:reconnect"
            hangup = await events.next_of(HangupRequired)
        finally:
            await conn.close()
        assert "session:reconnect" in hangup.reason

    async def test_exhausted_reconnects_require_hangup(self, control_server: AgentServer) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events, max_reconnects=1)
        try:
            first, _ = await _started_session(control_server, conn)
            await first.conn.close(1011)
            second = await control_server.next_peer()
            reconnect = await second.recv_json()
            await second.ack(reconnect["msgid"])
            await events.next_of(Reconnected)
            await second.conn.close(1011)
            hangup = await events.next_of(HangupRequired)
            await control_server.no_new_peer(within=1.0)
        finally:
            await conn.close()
        assert "exhausted" in hangup.reason
        lost = [e for e in events.seen if isinstance(e, ConnectionLost)]
        assert [e.reconnecting for e in lost] == [True, False]


class TestJambonzClose:
    async def test_close_sends_what_is_released_then_1000_and_fails_waiters(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events(), ack_timeout=3.0)
        peer, _ = await _started_session(control_server, conn)
        hook = asyncio.ensure_future(conn.verb_hook("/pending", _call_info()))
        await asyncio.sleep(0)
        conn.call_status(_call_info("completed"), 3)  # held behind nothing: goes out now
        await conn.close()
        outcome = await asyncio.wait_for(hook, WAIT)
        assert isinstance(outcome, AckFailed)
        hook_message = await peer.recv_json()
        status = await peer.recv_json()
        assert hook_message["type"] == "verb:hook"
        assert status["type"] == "call:status"
        assert (await peer.close_code())[0] == 1000
        assert _own_tasks(control_server.url) == []

    async def test_close_is_idempotent_and_concurrent_safe(
        self, control_server: AgentServer
    ) -> None:
        conn = _control(control_server, Events())
        await conn.connect()
        peer = await control_server.next_peer()
        await asyncio.gather(conn.close(), conn.close())
        await conn.close()
        assert (await peer.close_code())[0] == 1000
        assert _own_tasks(control_server.url) == []

    async def test_close_during_reconnect_backoff_stops_everything(
        self, control_server: AgentServer
    ) -> None:
        events: Events[JambonzConnectionEvent] = Events()
        conn = _control(control_server, events)
        first, _ = await _started_session(control_server, conn)
        await first.conn.close(1011)
        await events.next_of(ConnectionLost)
        await conn.close()
        await control_server.no_new_peer(within=1.0)
        assert _own_tasks(control_server.url) == []

    async def test_connect_after_close_is_refused(self, control_server: AgentServer) -> None:
        conn = _control(control_server, Events())
        await conn.close()
        with pytest.raises(LocalError, match="once, before close"):
            await conn.connect()


# --------------------------------------------------------------------------- listen audio


def _pcm(count: int, size: int = FRAME, first: int = 0) -> list[bytes]:
    """Distinct frames: frame i is filled with the 16-bit sample value ``first + i + 1``."""
    return [(first + i + 1).to_bytes(2, "little") * (size // 2) for i in range(count)]


METADATA = json.dumps({"sampleRate": 8000, "mixType": "mono", "callSid": CALL_SID})


@pytest.fixture
async def audio_server(make_server: ServerFactory) -> AgentServer:
    return await make_server(AUDIO)


def _listen(
    server: AgentServer,
    events: Events[Any],
    protocol: la.ListenAudioProtocol | None = None,
    **kwargs: Any,
) -> ListenConnection:
    return ListenConnection(
        server.url, protocol or la.ListenAudioProtocol(), METADATA, on_event=events, **kwargs
    )


async def _closed_by_agent(
    server: AgentServer,
    events: Events[ListenConnectionEvent],
    send: Callable[[Peer], Awaitable[None]],
) -> tuple[ListenClosed, int | None]:
    """A streaming listen socket whose agent, once the metadata is in, ``send``s what must fail
    the connection: the lane's close event, and the close code the worker sent the agent."""
    conn = _listen(server, events, la.ListenAudioProtocol(streaming=True))
    try:
        await conn.connect()
        peer = await server.next_peer()
        await peer.recv()
        await send(peer)
        closed = await events.next_of(ListenClosed)
        code, _ = await peer.close_code()
    finally:
        await conn.close()
    return closed, code


class TestListenFirstFrameRule:
    async def test_metadata_is_the_first_frame_then_audio_in_order(
        self, audio_server: AgentServer
    ) -> None:
        conn = _listen(audio_server, Events())
        frames = _pcm(5)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            assert peer.conn.subprotocol == "audio.jambonz.org"
            for frame in frames:
                conn.send_audio(frame)
                await asyncio.sleep(0)
            received = [await peer.recv() for _ in range(6)]
        finally:
            await conn.close()
        assert received == [METADATA, *frames]

    async def test_server_without_audio_subprotocol_is_a_connect_error(
        self, make_server: ServerFactory
    ) -> None:
        server = await make_server(None)
        conn = _listen(server, Events())
        with pytest.raises(AgentConnectError, match=r"audio\.jambonz\.org") as info:
            await conn.connect()
        assert info.value.kind == "subprotocol"
        await conn.close()

    @pytest.mark.parametrize("url", ["ws://[::1/audio", "wss://agent.example:70000/audio"])
    async def test_a_malformed_url_from_the_app_is_a_connect_error(self, url: str) -> None:
        conn = ListenConnection(url, la.ListenAudioProtocol(), METADATA, username="u", password="p")
        with pytest.raises(AgentConnectError, match="invalid URL") as info:
            await conn.connect()
        assert info.value.kind == "url"
        await conn.close()

    async def test_ws_auth_becomes_basic_auth(self, audio_server: AgentServer) -> None:
        conn = _listen(audio_server, Events(), username="u", password="p")
        try:
            await conn.connect()
        finally:
            await conn.close()
        assert audio_server.requests[0]["Authorization"] == "Basic dTpw"


class TestListenBoundedAudioQueue:
    async def test_a_stalled_writer_keeps_only_the_newest_max_queue_ms(
        self, audio_server: AgentServer
    ) -> None:
        conn = _listen(audio_server, Events(), max_queue_ms=200)
        frames = _pcm(50)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            with _socket_full(conn):
                for frame in frames:
                    conn.send_audio(frame)
                assert conn.queued_ms == pytest.approx(200)
            received = [await peer.recv() for _ in range(11)]
            await peer.nothing_more()
        finally:
            await conn.close()
        assert received == [METADATA, *frames[-10:]]
        assert conn.dropped_frames == 40
        assert conn.dropped_ms == pytest.approx(800)

    async def test_text_jumps_ahead_of_queued_audio(self, audio_server: AgentServer) -> None:
        protocol = la.ListenAudioProtocol(pass_dtmf=True)
        conn = _listen(audio_server, Events(), protocol)
        frames = _pcm(4)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            with _socket_full(conn):
                for frame in frames:
                    conn.send_audio(frame)
                dtmf = protocol.dtmf_message("5", 200)
                assert dtmf is not None
                conn.send_text(dtmf)
            received = [await peer.recv() for _ in range(6)]
        finally:
            await conn.close()
        assert received == [METADATA, dtmf, *frames]


class TestListenIdleLaneWritesAtOnce:
    async def test_a_frame_leaves_in_the_call_that_sent_it(self, audio_server: AgentServer) -> None:
        conn = _listen(audio_server, Events())
        frames = _pcm(3)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            assert await peer.recv() == METADATA
            for frame in frames:
                conn.send_audio(frame)  # no await: the writer task cannot have run
                assert conn.queued_ms == 0
            assert conn.sent_frames == 3
            received = [await peer.recv() for _ in range(3)]
        finally:
            await conn.close()
        assert received == frames

    async def test_a_text_sent_first_still_goes_first(self, audio_server: AgentServer) -> None:
        protocol = la.ListenAudioProtocol(pass_dtmf=True)
        conn = _listen(audio_server, Events(), protocol)
        frames = _pcm(2)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            assert await peer.recv() == METADATA
            dtmf = protocol.dtmf_message("5", 200)
            assert dtmf is not None
            conn.send_text(dtmf)
            for frame in frames:
                conn.send_audio(frame)  # queued behind the text, not written past it
            received = [await peer.recv() for _ in range(3)]
        finally:
            await conn.close()
        assert received == [dtmf, *frames]

    async def test_twilio_timestamps_run_on_through_written_and_queued_media(
        self, twilio_server: AgentServer
    ) -> None:
        conn = _twilio(twilio_server, Events())
        try:
            peer = await _twilio_started(twilio_server, conn)
            conn.send_media(b"\x01" * 160)  # written at once
            with _socket_full(conn):
                conn.send_media(b"\x02" * 160)  # queued
            received = [await peer.recv_json() for _ in range(2)]
        finally:
            await conn.close()
        assert [m["media"]["timestamp"] for m in received] == ["0", "20"]
        assert [m["sequenceNumber"] for m in received] == ["2", "3"]


class TestListenGracefulEnd:
    async def test_close_sends_queued_audio_then_empty_binary_then_1000(
        self, audio_server: AgentServer
    ) -> None:
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events)
        frames = _pcm(2)
        await conn.connect()
        peer = await audio_server.next_peer()
        for frame in frames:
            conn.send_audio(frame)
        await conn.close()
        received = [await peer.recv() for _ in range(4)]
        assert received == [METADATA, *frames, b""]
        assert (await peer.close_code())[0] == 1000
        assert [e for e in events.seen if isinstance(e, ListenClosed)] == [ListenClosed(1000, "")]
        conn.send_audio(frames[0])  # ignored after close
        conn.send_text("{}")
        assert conn.discarded_texts == 1
        await conn.close()  # idempotent
        assert _own_tasks(audio_server.url) == []

    async def test_close_not_graceful_drops_the_queue_and_the_empty_frame(
        self, audio_server: AgentServer
    ) -> None:
        conn = _listen(audio_server, Events())
        await conn.connect()
        peer = await audio_server.next_peer()
        with _socket_full(conn):
            for frame in _pcm(3):
                conn.send_audio(frame)
        await conn.close(graceful=False)
        assert await peer.recv() == METADATA
        await peer.nothing_more()
        assert (await peer.close_code())[0] == 1000


class TestListenAppMessages:
    async def test_play_audio_mark_kill_audio_reach_on_event(
        self, audio_server: AgentServer
    ) -> None:
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events)
        clip = b"\x01\x00\x02\x00"
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            await peer.send_json(
                {
                    "type": "playAudio",
                    "data": {
                        "audioContent": base64.b64encode(clip).decode(),
                        "audioContentType": "raw",
                        "sampleRate": 8000,
                        "id": "p1",
                    },
                }
            )
            await peer.send_json({"type": "mark", "data": {"name": "m1"}})
            await peer.send_json({"type": "killAudio"})
            received = [await events.next() for _ in range(3)]
        finally:
            await conn.close()
        assert received == [
            la.PlayAudio(clip, "raw", 8000, "p1", False),
            la.Mark("m1"),
            la.KillAudio(),
        ]

    async def test_streamed_binary_audio_reaches_on_event(self, audio_server: AgentServer) -> None:
        events: Events[ListenConnectionEvent] = Events()
        protocol = la.ListenAudioProtocol(streaming=True)
        conn = _listen(audio_server, events, protocol)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            await peer.conn.send(b"\x10\x00\x20\x00")
            event = await events.next()
        finally:
            await conn.close()
        assert event == la.AudioReceived(b"\x10\x00\x20\x00")

    async def test_app_closing_the_socket_is_listen_closed(self, audio_server: AgentServer) -> None:
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events)
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            await peer.conn.close(4000, "done listening")
            closed = await events.next_of(ListenClosed)
            assert not conn.connected
            conn.send_audio(_pcm(1)[0])  # ignored, never raises
        finally:
            await conn.close()
        assert closed == ListenClosed(4000, "done listening")
        assert [e for e in events.seen if isinstance(e, ListenClosed)] == [closed]

    async def test_frames_read_before_the_reader_runs_stay_ahead_of_later_ones(
        self, audio_server: AgentServer
    ) -> None:
        """Frames read before the reader hands messages over wait in recv's queue; the reader
        drains them before any later frame (handed over as it is read) can pass them."""
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events, la.ListenAudioProtocol(streaming=True))
        frames = _pcm(30)
        try:
            await conn.connect()
            ws = conn._ws
            assert ws is not None
            # Read from the socket before the reader task has run (as when the agent sends
            # right after the handshake): the bytes of the first frames, as the agent sends them
            # (fewer than recv's queue holds before it stops reading the socket).
            for frame in frames[:10]:
                ws.data_received(Frame(Opcode.BINARY, frame).serialize(mask=False))
            peer = await audio_server.next_peer()
            assert await peer.recv() == METADATA
            for frame in frames[10:]:
                await peer.conn.send(frame)
            received = [await events.next() for _ in frames]
        finally:
            await conn.close()
        assert received == [la.AudioReceived(frame) for frame in frames]

    async def test_a_message_begun_before_the_reader_runs_stays_ahead_of_later_ones(
        self, audio_server: AgentServer
    ) -> None:
        """A message whose first fragment was read before the reader hands messages over is
        finished in recv's queue; a message read after its last fragment, in the same read,
        does not overtake it (nor the messages queued before it)."""
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events, la.ListenAudioProtocol(streaming=True))
        try:
            await conn.connect()
            ws = conn._ws
            assert ws is not None
            ws.data_received(Frame(Opcode.BINARY, b"\x01\x00").serialize(mask=False))
            ws.data_received(Frame(Opcode.BINARY, b"\x02\x00", fin=False).serialize(mask=False))
            peer = await audio_server.next_peer()
            assert await peer.recv() == METADATA  # the reader runs, and waits for the rest
            ws.data_received(
                Frame(Opcode.CONT, b"\x03\x00").serialize(mask=False)
                + Frame(Opcode.BINARY, b"\x04\x00").serialize(mask=False)
            )
            await peer.conn.send(b"\x05\x00")
            received = [await events.next() for _ in range(4)]
            # Those taken, a frame is handed over again in the callback that read it.
            ws.data_received(Frame(Opcode.BINARY, b"\x06\x00").serialize(mask=False))
            handed_over_at_once = events.seen[-1]
        finally:
            await conn.close()
        assert received == [
            la.AudioReceived(b"\x01\x00"),
            la.AudioReceived(b"\x02\x00\x03\x00"),
            la.AudioReceived(b"\x04\x00"),
            la.AudioReceived(b"\x05\x00"),
        ]
        assert handed_over_at_once == la.AudioReceived(b"\x06\x00")

    async def test_fragmented_messages_are_put_together(self, audio_server: AgentServer) -> None:
        """RFC 6455 §5.4: a message in several frames reaches the protocol whole."""
        events: Events[ListenConnectionEvent] = Events()
        conn = _listen(audio_server, events, la.ListenAudioProtocol(streaming=True))
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            await peer.recv()  # the metadata: the reader is running
            await peer.conn.send([b"\x10\x00", b"\x20\x00", b"\x30\x00"])
            await peer.conn.send(['{"type": "mark", ', '"data": {"name": "m1"}}'])
            await peer.conn.send(b"\x40\x00")
            received = [await events.next() for _ in range(3)]
        finally:
            await conn.close()
        assert received == [
            la.AudioReceived(b"\x10\x00\x20\x00\x30\x00"),
            la.Mark("m1"),
            la.AudioReceived(b"\x40\x00"),
        ]

    async def test_a_message_in_too_many_fragments_closes_with_1009(
        self, audio_server: AgentServer
    ) -> None:
        """As websockets' recv does: more than MAX_FRAGMENTS pieces fail the connection (1009),
        whatever their total size (a million one-byte fragments cost far more than a MB)."""
        events: Events[ListenConnectionEvent] = Events()

        async def fragments(peer: Peer) -> None:
            await peer.conn.send([b"\x00\x00"] * (MAX_FRAGMENTS + 10))

        closed, code = await _closed_by_agent(audio_server, events, fragments)
        assert code == 1009
        assert closed.code == 1009
        assert not [e for e in events.seen if isinstance(e, la.AudioReceived)]

    async def test_text_that_is_not_utf8_closes_with_1007(self, audio_server: AgentServer) -> None:
        """RFC 6455 §8.1: invalid UTF-8 in a text message fails the connection (1007)."""
        events: Events[ListenConnectionEvent] = Events()

        async def bad_then_good(peer: Peer) -> None:
            # A bad message, and a good one read with it: nothing after the failure is handed over.
            peer.conn.protocol.send_text(b'{"type": "mark\xff"}')
            peer.conn.protocol.send_text(b'{"type": "mark", "data": {"name": "m1"}}')
            peer.conn.send_data()

        closed, code = await _closed_by_agent(audio_server, events, bad_then_good)
        assert code == 1007
        assert closed.code == 1007
        assert not [e for e in events.seen if isinstance(e, la.Mark)]

    async def test_an_on_event_failure_does_not_stop_the_connection(
        self, audio_server: AgentServer
    ) -> None:
        seen: list[ListenConnectionEvent] = []

        def fragile(event: ListenConnectionEvent) -> None:
            seen.append(event)
            if isinstance(event, la.KillAudio):
                raise RuntimeError("handler bug")

        conn = ListenConnection(
            audio_server.url, la.ListenAudioProtocol(), METADATA, on_event=fragile
        )
        try:
            await conn.connect()
            peer = await audio_server.next_peer()
            await peer.send_json({"type": "killAudio"})
            await peer.send_json({"type": "clearMarks"})
            for _ in range(100):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.01)
        finally:
            await conn.close()
        assert seen[:2] == [la.KillAudio(), la.ClearMarks()]


# --------------------------------------------------------------------------- Twilio


def _stream() -> tw.TwilioStream:
    return tw.TwilioStream("MZ123", "CA456", "AC789", custom_parameters={"lang": "en"})


@pytest.fixture
async def twilio_server(make_server: ServerFactory) -> AgentServer:
    return await make_server(None)


def _twilio(server: AgentServer, events: Events[Any], **kwargs: Any) -> TwilioConnection:
    return TwilioConnection(server.url, _stream(), on_event=events, **kwargs)


async def _twilio_started(server: AgentServer, conn: TwilioConnection) -> Peer:
    await conn.connect()
    peer = await server.next_peer()
    connected = await peer.recv_json()
    start = await peer.recv_json()
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start"
    return peer


class TestTwilioStartRule:
    async def test_connected_then_start_are_the_first_two_messages(
        self, twilio_server: AgentServer
    ) -> None:
        conn = _twilio(twilio_server, Events())
        try:
            await conn.connect()
            peer = await twilio_server.next_peer()
            first = await peer.recv_json()
            second = await peer.recv_json()
        finally:
            await conn.close()
        assert peer.conn.subprotocol is None
        assert first["event"] == "connected"
        assert second["event"] == "start"
        assert second["start"]["streamSid"] == "MZ123"
        assert second["start"]["callSid"] == "CA456"
        assert second["start"]["customParameters"] == {"lang": "en"}


class TestTwilioMedia:
    async def test_media_payload_is_base64_ulaw_both_ways(self, twilio_server: AgentServer) -> None:
        events: Events[TwilioConnectionEvent] = Events()
        conn = _twilio(twilio_server, events)
        ulaw = bytes(range(160))
        try:
            peer = await _twilio_started(twilio_server, conn)
            conn.send_media(ulaw)
            conn.send_media(ulaw[::-1])
            first = await peer.recv_json()
            second = await peer.recv_json()
            await peer.send_json(
                {
                    "event": "media",
                    "streamSid": "MZ123",
                    "media": {"payload": base64.b64encode(ulaw).decode()},
                }
            )
            received = await events.next()
        finally:
            await conn.close()
        assert first["event"] == "media"
        assert base64.b64decode(first["media"]["payload"]) == ulaw
        assert base64.b64decode(second["media"]["payload"]) == ulaw[::-1]
        assert (first["sequenceNumber"], first["media"]["chunk"]) == ("2", "1")
        assert (first["media"]["timestamp"], second["media"]["timestamp"]) == ("0", "20")
        assert received == tw.MediaReceived(ulaw)

    async def test_dropped_media_keeps_timestamps_on_the_call_clock(
        self, twilio_server: AgentServer
    ) -> None:
        conn = _twilio(twilio_server, Events(), max_queue_ms=200)
        try:
            peer = await _twilio_started(twilio_server, conn)
            with _socket_full(conn):
                for i in range(30):
                    conn.send_media(bytes([i]) * 160)
            received = [await peer.recv_json() for _ in range(10)]
            await peer.nothing_more()
        finally:
            await conn.close()
        assert [m["media"]["timestamp"] for m in received] == [str(20 * i) for i in range(20, 30)]
        assert [m["sequenceNumber"] for m in received] == [str(i) for i in range(2, 12)]
        assert conn.dropped_frames == 20

    async def test_dtmf_and_mark_jump_ahead_of_queued_media(
        self, twilio_server: AgentServer
    ) -> None:
        conn = _twilio(twilio_server, Events())
        try:
            peer = await _twilio_started(twilio_server, conn)
            with _socket_full(conn):
                conn.send_media(b"\xff" * 160)
                assert conn.send_dtmf("7")
                assert not conn.send_dtmf("A")
                conn.send_mark("m1")
            received = [await peer.recv_json() for _ in range(3)]
        finally:
            await conn.close()
        assert [m["event"] for m in received] == ["dtmf", "mark", "media"]
        sequence = [int(m["sequenceNumber"]) for m in received]
        assert sequence == sorted(sequence)  # built when sent: wire order stays increasing


class TestTwilioAgentMessages:
    async def test_mark_and_clear_reach_on_event(self, twilio_server: AgentServer) -> None:
        events: Events[TwilioConnectionEvent] = Events()
        conn = _twilio(twilio_server, events)
        try:
            peer = await _twilio_started(twilio_server, conn)
            await peer.send_json({"event": "mark", "streamSid": "MZ123", "mark": {"name": "m1"}})
            await peer.send_json({"event": "clear", "streamSid": "MZ123"})
            await peer.send_json({"event": "clear", "streamSid": "MZ-other"})
            received = [await events.next() for _ in range(3)]
        finally:
            await conn.close()
        assert received[:2] == [tw.MarkRequested("m1"), tw.Clear()]
        assert isinstance(received[2], tw.InvalidTwilioMessage)

    async def test_close_sends_stop_then_1000(self, twilio_server: AgentServer) -> None:
        events: Events[TwilioConnectionEvent] = Events()
        conn = _twilio(twilio_server, events)
        peer = await _twilio_started(twilio_server, conn)
        conn.send_media(b"\x7f" * 160)
        await conn.close()
        media = await peer.recv_json()
        stop = await peer.recv_json()
        assert media["event"] == "media"
        assert stop == {
            "event": "stop",
            "sequenceNumber": "3",
            "streamSid": "MZ123",
            "stop": {"accountSid": "AC789", "callSid": "CA456"},
        }
        assert (await peer.close_code())[0] == 1000
        assert [e for e in events.seen if isinstance(e, TwilioClosed)] == [TwilioClosed(1000, "")]
        assert _own_tasks(twilio_server.url) == []

    async def test_server_closing_is_twilio_closed(self, twilio_server: AgentServer) -> None:
        events: Events[TwilioConnectionEvent] = Events()
        conn = _twilio(twilio_server, events)
        try:
            peer = await _twilio_started(twilio_server, conn)
            await peer.conn.close(1000, "bot done")
            closed = await events.next_of(TwilioClosed)
        finally:
            await conn.close()
        assert closed == TwilioClosed(1000, "bot done")

    async def test_refused_port_is_a_connect_error(self) -> None:
        conn = TwilioConnection(f"ws://127.0.0.1:{_closed_port()}/media", _stream())
        with pytest.raises(AgentConnectError) as info:
            await conn.connect()
        assert info.value.kind == "refused"
        await conn.close()
