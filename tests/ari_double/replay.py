"""Replaying a recording against the double, the way the recorder drove Asterisk: the same
websocket connects, drops and closes, the same REST calls (ids of the recording mapped to the
double's), the SIP side's actions (a caller dialing in, talking, pressing a key, hanging up; the
callee's answer, busy or silence), and a UDP listener as ``external_host``. It collects every
difference: per REST line (status, reason, error message, JSON keys and values), per refused
websocket handshake, in the event sequence, and the RTP the listener received.

Ids, names, Call-IDs and ports differ between a recording and a replay: ``Tokens`` learns the
correspondence where a value first appears and substitutes it everywhere after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from media.g711 import ulaw_encode
from media.rtp import RtpSender
from tests.ari_double import recordings
from tests.ari_double.phone import Phone
from tests.ari_double.server import AriDouble

JsonObject = dict[str, Any]
RECORDED_LISTENER = "127.0.0.1:40000"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000\Z")
TIME_KEYS = frozenset({"timestamp", "creationtime", "startup_time", "last_reload_time"})
SYNC_TIMEOUT_S = 5.0


class Tokens:
    """Recorded value → replayed value, for identifiers."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def learn(self, recorded: str, actual: str, where: str) -> None:
        if recorded == "" or actual == "":
            if recorded != actual:
                raise MismatchError(f"{where}: recorded {recorded!r}, double {actual!r}")
            return
        known = self.values.get(recorded)
        if known is None:
            for other, value in self.values.items():
                if value == actual:
                    raise MismatchError(
                        f"{where}: {recorded!r} and {other!r} both became {actual!r}"
                    )
            self.values[recorded] = actual
            self._pattern = None
        elif known != actual:
            raise MismatchError(f"{where}: {recorded!r} was {known!r} so far, now {actual!r}")

    def get(self, recorded: str) -> str | None:
        return self.values.get(recorded)

    def sub(self, text: str) -> str:
        """``text`` with every known recorded identifier replaced (whole tokens only)."""
        if not self.values:
            return text
        if self._pattern is None:
            alternatives = "|".join(
                re.escape(v) for v in sorted(self.values, key=len, reverse=True)
            )
            self._pattern = re.compile(rf"(?<![\w.])(?:{alternatives})(?![\w.])")
        return self._pattern.sub(lambda m: self.values[m.group(0)], text)


class MismatchError(AssertionError):
    pass


def compare(recorded: Any, actual: Any, tokens: Tokens, where: str = "$") -> None:
    """Same structure, same keys in the same order, same values except identifiers (learnt),
    timestamps (format checked) and RTP statistics (not comparable)."""
    if isinstance(recorded, dict):
        if not isinstance(actual, dict):
            raise MismatchError(f"{where}: recorded an object, double sent {actual!r}")
        if list(recorded) != list(actual):
            raise MismatchError(f"{where}: keys {list(recorded)} recorded, double {list(actual)}")
        is_channel = "protocol_id" in recorded
        for key, value in recorded.items():
            here = f"{where}.{key}"
            other = actual[key]
            if key in TIME_KEYS:
                if not (isinstance(other, str) and TIMESTAMP.match(other)):
                    raise MismatchError(f"{here}: {other!r} is not an Asterisk timestamp")
            elif isinstance(value, str) and (
                key in ("id", "UNICASTRTP_LOCAL_PORT")
                or (is_channel and key in ("name", "protocol_id"))
            ):
                tokens.learn(value, _str(other, here), here)
            elif key == "value" and str(recorded.get("variable", "")).startswith("RTPAUDIOQOS"):
                _str(other, here)
            else:
                compare(value, other, tokens, here)
    elif isinstance(recorded, list):
        if not isinstance(actual, list) or len(actual) != len(recorded):
            raise MismatchError(f"{where}: recorded {recorded!r}, double {actual!r}")
        for index, (value, other) in enumerate(
            zip(recorded, _aligned(recorded, actual, tokens), strict=True)
        ):
            compare(value, other, tokens, f"{where}[{index}]")
    elif isinstance(recorded, str):
        expected = tokens.sub(recorded)
        if expected != actual:
            raise MismatchError(
                f"{where}: expected {expected!r} (recorded {recorded!r}), double {actual!r}"
            )
    elif recorded != actual or type(recorded) is not type(actual):
        raise MismatchError(f"{where}: recorded {recorded!r}, double {actual!r}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MismatchError(f"{where}: {value!r} is not a string")
    return value


def _aligned(recorded: list[Any], actual: list[Any], tokens: Tokens) -> list[Any]:
    """Asterisk lists channels and bridges in hash order: put ``actual`` in the recorded order
    when every recorded element is known by its (mapped) id."""

    def key(item: Any) -> str | None:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            return str(item["id"])
        return item if isinstance(item, str) else None

    wanted = []
    for item in recorded:
        recorded_key = key(item)
        mapped = tokens.get(recorded_key) if recorded_key is not None else None
        if mapped is None:
            return actual
        wanted.append(mapped)
    by_key = {key(item): item for item in actual}
    if set(by_key) != set(wanted):
        return actual
    return [by_key[k] for k in wanted]


class Listener(asyncio.DatagramProtocol):
    """The recorder's UDP listener behind externalMedia (``external_host``)."""

    def __init__(self) -> None:
        self.packets: list[tuple[float, bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.packets.append((asyncio.get_running_loop().time(), data, (str(addr[0]), int(addr[1]))))

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, ("127.0.0.1", port))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def tone(seconds: float, frequency: float = 440.0, amplitude: int = 8000) -> bytes:
    """8 kHz 16-bit little-endian PCM of a sine."""
    n = np.arange(round(seconds * 8000))
    return (amplitude * np.sin(2 * np.pi * frequency * n / 8000)).astype("<i2").tobytes()


@dataclass
class LineResult:
    line: JsonObject
    problem: str | None = None


@dataclass
class ReplayResult:
    name: str
    rest: dict[int, LineResult] = field(default_factory=dict)
    """By line index in the recording."""
    handshakes: dict[int, LineResult] = field(default_factory=dict)
    recorded_events: list[tuple[str, JsonObject]] = field(default_factory=list)
    events: list[tuple[str, JsonObject]] = field(default_factory=list)
    """What the double(s) sent, labels renamed to the recording's."""
    event_problems: list[str] = field(default_factory=list)
    rtp: list[tuple[float, bytes, tuple[str, int]]] = field(default_factory=list)
    em_ports: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Anything else that went wrong while replaying."""


def _dial_plan_from(lines: list[JsonObject]) -> tuple[str, bool]:
    for line in lines:
        if line["dir"] == "note" and line.get("kind") == "sipp_start" and line["label"] == "callee":
            cmd = line["cmd"]
            if "uas_busy" in cmd:
                return "busy", False
            if "uas_noanswer" in cmd:
                return "noanswer", False
            return "answer", "-rtp_echo" in cmd
    return "unreachable", False


class Replayer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lines = recordings.load(name)
        self.result = ReplayResult(name)
        self.tokens = Tokens()
        self.listener = Listener()
        self.double: AriDouble | None = None
        self.session: aiohttp.ClientSession | None = None
        self.sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.all_sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.labels: dict[str, str] = {}
        """The double's socket label → the recording's, for the current double."""
        self.finished: list[tuple[str, JsonObject]] = []
        self.callers: list[Phone] = []
        self.hung_up: set[str] = set()
        self.recorded_events = [
            (line["ws"], line["event"]) for line in self.lines if line["dir"] == "event"
        ]
        self.result.recorded_events = self.recorded_events
        self.compared = 0
        self.outcome, self.echo = _dial_plan_from(self.lines)
        self.windows = [(line["t"], line["t_resp"]) for line in self.lines if line["dir"] == "rest"]

    # -- the double(s) -----------------------------------------------------------------------
    @property
    def actual_events(self) -> list[tuple[str, JsonObject]]:
        current = []
        if self.double is not None:
            current = [
                (self.labels.get(label, label), event) for label, event in self.double.events
            ]
        return self.finished + current

    async def _start_double(self, memory: bool) -> None:
        self.double = AriDouble(sorcery_memory=memory, local_dialplan_delay_s=0.05)
        await self.double.start()
        self.double.on_dial("4155550123", self.outcome, ring_s=0.05, echo=self.echo)  # type: ignore[arg-type]
        self.labels = {}

    async def _stop_double(self) -> None:
        for ws in self.all_sockets:
            await ws.close()
        self.sockets.clear()
        self.all_sockets.clear()
        for reader in self.readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self.readers.clear()
        if self.double is not None:
            await self.double.settle()
            self.finished = self.actual_events
            self.result.em_ports.extend(self._em_ports())
            await self.double.stop()
            self.double = None

    def _em_ports(self) -> list[int]:
        assert self.double is not None
        return [em.local[1] for em in self.double.core.media.values()]

    # -- running -------------------------------------------------------------------------------
    async def run(self) -> ReplayResult:
        await self.listener.open()
        self.tokens.learn(RECORDED_LISTENER, f"127.0.0.1:{self.listener.port}", "listener")
        first_phase = next((line for line in self.lines if line.get("kind") == "phase"), None)
        memory = bool(first_phase and first_phase.get("sorcery_conf"))
        self.session = aiohttp.ClientSession()
        try:
            await self._start_double(memory)
            for index, line in sorted(enumerate(self.lines), key=lambda item: item[1]["t"]):
                await self._step(index, line)
            await self._sync(len(self.recorded_events), final=True)
        except MismatchError as exc:
            self.result.problems.append(str(exc))
        finally:
            await self._stop_double()
            await self.session.close()
            self.listener.close()
        self.result.events = self.finished
        self.result.rtp = list(self.listener.packets)
        if len(self.result.events) != len(self.recorded_events):
            self.result.event_problems.append(
                f"{len(self.recorded_events)} events recorded, the double sent "
                f"{len(self.result.events)}"
            )
        return self.result

    async def _step(self, index: int, line: JsonObject) -> None:
        kind = line["dir"]
        if kind == "event":
            await self._maybe_far_end_action(line)
            return
        await self._sync(self._events_before(line["t"]))
        if kind == "rest":
            self.result.rest[index] = LineResult(line, await self._rest(line))
        elif kind == "ws":
            await self._ws(index, line)
        elif kind == "note":
            await self._note(line)

    def _events_before(self, t: float) -> int:
        return sum(1 for line in self.lines if line["dir"] == "event" and line["t"] < t)

    async def _sync(self, count: int, *, final: bool = False) -> None:
        """Wait until the double has sent ``count`` events, comparing them as they come."""
        await _until(lambda: len(self.actual_events) >= count, 2.0 if final else SYNC_TIMEOUT_S)
        if final:
            await asyncio.sleep(0.1)  # anything more than recorded would arrive now
        actual = self.actual_events
        upto = min(count, len(actual))
        for position in range(self.compared, upto):
            recorded_label, recorded = self.recorded_events[position]
            label, event = actual[position]
            where = f"event #{position} ({recorded['type']})"
            try:
                if label != recorded_label:
                    raise MismatchError(f"{where}: on {label}, recorded on {recorded_label}")
                compare(recorded, event, self.tokens, where)
            except MismatchError as exc:
                self.result.event_problems.append(str(exc))
        self.compared = max(self.compared, upto)
        if len(actual) < count:
            self.result.event_problems.append(
                f"waited for {count} events, the double had sent {len(actual)}"
            )
            self.compared = count

    # -- REST ----------------------------------------------------------------------------------
    async def _rest(self, line: JsonObject) -> str | None:
        assert self.double is not None
        assert self.session is not None
        query = {key: self.tokens.sub(value) for key, value in line["query"].items()}
        if query.get("timeout") == "5":
            query["timeout"] = "1"  # noanswer/unreachable: the same, faster
        headers = {}
        if "auth" not in line:
            headers["Authorization"] = aiohttp.encode_basic_auth("worker", "worker")
        elif line["auth"] is not None:
            user, _, password = line["auth"].partition(":")
            headers["Authorization"] = aiohttp.encode_basic_auth(user, password)
        url = self.double.url + self.tokens.sub(line["path"])
        async with self.session.request(
            line["method"], url, params=query, json=line["body"], headers=headers
        ) as response:
            text = await response.text()
            status, reason = response.status, response.reason
            content_type = response.headers.get("Content-Type")
            location = response.headers.get("Location")
            authenticate = response.headers.get("WWW-Authenticate")
        problem = None
        try:
            if (status, reason) != (line["status"], line["reason"]):
                raise MismatchError(
                    f"{status} {reason} {text}: recorded {line['status']} {line['reason']}"
                )
            if line["response"] is None:
                if text or content_type not in (None, "application/octet-stream"):
                    raise MismatchError(f"recorded no body, double sent {content_type} {text!r}")
            else:
                compare(line["response"], json.loads(text), self.tokens)
                if content_type != "application/json":
                    raise MismatchError(f"Content-Type {content_type}")
            recorded_headers = line["response_headers"]
            if "Location" in recorded_headers:
                compare(recorded_headers["Location"], location, self.tokens, "Location")
            if "WWW-Authenticate" in recorded_headers:
                compare(
                    recorded_headers["WWW-Authenticate"],
                    authenticate,
                    self.tokens,
                    "WWW-Authenticate",
                )
        except MismatchError as exc:
            problem = str(exc)
        if line["path"].endswith("/addChannel") and status == 204:
            await self._talk_across(line)
        return problem

    async def _talk_across(self, line: JsonObject) -> None:
        """Once a phone and an externalMedia channel share a bridge, audio as recorded: the
        caller plays 30 ms packets, or the listener sends a 20 ms tone the callee echoes."""
        assert self.double is not None
        bridge_id = self.tokens.sub(line["path"]).split("/")[-2]
        bridge = self.double.bridges.get(bridge_id)
        if bridge is None:
            return
        phones = [m for m in bridge.members if m.phone is not None]
        media = [m for m in bridge.members if m.em is not None]
        if len(phones) != 1 or len(media) != 1:
            return
        phone, em = phones[0].phone, media[0].em
        assert phone is not None
        assert em is not None
        before = len(self.listener.packets)
        if phones[0].kind == "sip-in":
            await phone.send_audio(tone(0.3), ptime_ms=30)
            expected = 10 if em.format_name != "slin16" else 15
        else:
            sender = RtpSender(0, 0x1234ABCD, timestamp=0)
            audio = tone(0.2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for n in range(10):
                await asyncio.sleep(max(0.0, start + n * 0.02 - loop.time()))
                self.listener.send(
                    sender.build(ulaw_encode(audio[n * 320 : (n + 1) * 320]), 160), em.local[1]
                )
            expected = 10
        await _until(lambda: len(self.listener.packets) - before >= expected, 2.0)

    # -- websockets ----------------------------------------------------------------------------
    async def _ws(self, index: int, line: JsonObject) -> None:
        assert self.double is not None
        assert self.session is not None
        label, action = line["ws"], line["action"]
        if action == "connect":
            url = line["url"].replace("ws://127.0.0.1:8088", self.double.url.replace("http", "ws"))
            if line["ok"]:
                labels_before = len(self.double.ws_labels)
                ws = await self.session.ws_connect(url)
                self.sockets[label] = ws
                self.all_sockets.append(ws)
                double = self.double
                await _until(lambda: len(double.ws_labels) > labels_before, 1.0)
                self.labels[self.double.ws_labels[-1]] = label
                self.readers.append(asyncio.get_running_loop().create_task(_read(ws)))
                return
            self.result.handshakes[index] = LineResult(line, await self._refused(url, line))
        elif action == "close":
            if label in self.sockets:
                await self.sockets.pop(label).close()
        elif action == "abort":
            await self.double.drop_websockets()
            if label in self.sockets:
                del self.sockets[label]

    async def _refused(self, url: str, line: JsonObject) -> str | None:
        """A handshake the recording saw refused: the same status, body and headers."""
        assert self.session is not None
        handshake = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        http_url = url.replace("ws://", "http://")
        async with self.session.get(http_url, headers=handshake) as response:
            status = response.status
            body = await response.text() if status != 101 else ""
            content_type = response.headers.get("Content-Type")
            authenticate = response.headers.get("WWW-Authenticate")
        recorded = line["headers"]
        problems = []
        if status != line["status"]:
            problems.append(f"status {status}, recorded {line['status']}")
        if body != line["body"]:
            problems.append(f"body {body!r}, recorded {line['body']!r}")
        if content_type != recorded["Content-type"]:
            problems.append(f"Content-Type {content_type}, recorded {recorded['Content-type']}")
        if authenticate != recorded.get("WWW-Authenticate"):
            problems.append(f"WWW-Authenticate {authenticate!r}")
        return "; ".join(problems) or None

    # -- the SIP side and Asterisk restarts --------------------------------------------------------
    async def _note(self, line: JsonObject) -> None:
        kind = line.get("kind")
        if kind == "sipp_start" and line["label"] == "caller":
            assert self.double is not None
            exten = re.search(r"-s (\S+)", line["cmd"])
            assert exten is not None
            self.callers.append(await self.double.call_in(exten.group(1)))
        elif kind == "sipp_exit" and line["label"] == "caller":
            for phone in self.callers:
                if not phone.ended.is_set():
                    await phone.hang_up()  # its BYE, if the app has not hung up first
        elif kind == "asterisk_stop":
            await self._stop_double()
        elif kind == "asterisk_start":
            phase = next(
                (n for n in self.lines if n.get("kind") == "phase" and n["t"] >= line["t"]), None
            )
            await self._start_double(bool(phase and phase.get("sorcery_conf")))

    async def _maybe_far_end_action(self, line: JsonObject) -> None:
        """A caller's key press or BYE: events no REST call caused."""
        event = line["event"]
        if any(start <= line["t"] <= end for start, end in self.windows):
            return
        channel = event.get("channel") or {}
        if not str(channel.get("name", "")).startswith("PJSIP/"):
            return
        quality = event["type"] == "ChannelVarset" and str(event["variable"]).startswith(
            "RTPAUDIOQOS"
        )
        bye = event["type"] == "ChannelHangupRequest" and "cause" not in event
        dtmf = event["type"] == "ChannelDtmfReceived"
        if not (quality or bye or dtmf):
            return
        await self._sync(self._events_before(line["t"]))
        actual = self.tokens.get(channel["id"])
        if actual is None or self.double is None:
            return
        phone = self.double.phone(actual)
        if dtmf:
            phone.press(event["digit"], event["duration_ms"])
        elif actual not in self.hung_up:
            self.hung_up.add(actual)
            await phone.hang_up()


async def _until(condition: Callable[[], bool], limit_s: float) -> None:
    """Poll ``condition`` every 5 ms for at most ``limit_s`` seconds."""
    for _ in range(int(limit_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)


async def _read(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


def replay(name: str) -> ReplayResult:
    """Replay one recording on a fresh double in a new event loop."""
    return asyncio.run(Replayer(name).run())
