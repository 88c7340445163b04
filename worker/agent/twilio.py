"""Twilio Media Streams, sans-I/O, with the worker in Twilio's place (a bidirectional
``<Connect><Stream>``): the messages Twilio sends to the agent's server and what that server may
send back.

Rules (PROTOCOLS.md §3 and §9, Twilio's websocket-messages page, Pipecat's
``TwilioFrameSerializer``):

1. Text JSON frames only. ``connected`` first, then ``start`` (``start.streamSid`` and
   ``start.callSid`` are what stock bots check), then ``media``/``dtmf``/``mark``, then ``stop``.
2. Counters are strings: ``sequenceNumber`` (``"1"`` on ``start``, +1 per message after it;
   ``connected`` has none), ``media.chunk`` (from ``"1"``) and ``media.timestamp`` (ms since
   stream start). Only the ``mediaFormat`` numbers are numbers. Audio is base64 µ-law 8 kHz mono.
3. ``dtmf`` carries one of 0-9, ``*``, ``#`` (track ``inbound_track``); other keys cannot be sent.
4. A ``mark`` is echoed back (``mark``) when the audio before it has played, or at once if nothing
   is buffered; ``clear`` flushes buffered audio and every outstanding mark is echoed. (The
   playout buffer does that; this class builds the echo.)
5. From the server: ``media`` (payload: base64 µ-law, no WAV header), ``mark`` and ``clear``, each
   with our ``streamSid``. Anything else (binary frames, bad JSON or base64, unknown events, a
   missing or foreign ``streamSid``) is an :class:`InvalidTwilioMessage`; ``receive`` never
   raises.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from worker.errors import LocalError

__all__ = [
    "TWILIO_DTMF_DIGITS",
    "Clear",
    "InvalidTwilioMessage",
    "MarkRequested",
    "MediaReceived",
    "TwilioEvent",
    "TwilioStream",
]

TWILIO_DTMF_DIGITS = frozenset("0123456789*#")
SAMPLE_RATE = 8000
_TRACKS = frozenset({"inbound", "outbound"})
_CONTENT_ECHO_LIMIT = 512


@dataclass(frozen=True, slots=True)
class MediaReceived:
    """Agent audio: µ-law 8 kHz bytes, to be buffered and played in order."""

    ulaw: bytes


@dataclass(frozen=True, slots=True)
class MarkRequested:
    """The agent placed a mark after the audio sent so far; echo it with :meth:`TwilioStream.mark`
    once that audio has played (or was cleared)."""

    name: str


@dataclass(frozen=True, slots=True)
class Clear:
    """Drop all buffered agent audio (barge-in) and echo every outstanding mark."""


@dataclass(frozen=True, slots=True)
class InvalidTwilioMessage:
    """Something from the agent we cannot use; logged by the session."""

    reason: str
    content: str


TwilioEvent: TypeAlias = MediaReceived | MarkRequested | Clear | InvalidTwilioMessage


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _looks_like_wav(audio: bytes) -> bool:
    return len(audio) >= 12 and audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"


class TwilioStream:
    """One Media Stream, without the socket."""

    def __init__(
        self,
        stream_sid: str,
        call_sid: str,
        account_sid: str,
        custom_parameters: Mapping[str, str] | None = None,
        tracks: Sequence[str] = ("inbound",),
    ) -> None:
        if not stream_sid or not call_sid or not account_sid:
            raise LocalError("stream_sid, call_sid and account_sid must be non-empty")
        if not tracks or any(t not in _TRACKS for t in tracks):
            raise LocalError(f"tracks must be among {sorted(_TRACKS)}")
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters or {})
        self.tracks = list(tracks)
        self._connected = False
        self._started = False
        self._stopped = False
        self._sequence = 0
        self._chunk = 0
        self._samples_sent = 0
        self.invalid_messages = 0

    # ------------------------------------------------------------------ outgoing

    def _next_sequence(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise LocalError(f"{what} before start")
        if self._stopped:
            raise LocalError(f"{what} after stop")

    def connected(self) -> str:
        """The first message: ``{"event":"connected","protocol":"Call","version":"1.0.0"}``."""
        if self._connected:
            raise LocalError("connected already sent")
        self._connected = True
        return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self) -> str:
        """The ``start`` message (``sequenceNumber`` ``"1"``), after :meth:`connected`."""
        if not self._connected:
            raise LocalError("start before connected")
        if self._started:
            raise LocalError("start already sent")
        self._started = True
        return _dumps(
            {
                "event": "start",
                "sequenceNumber": self._next_sequence(),
                "start": {
                    "streamSid": self.stream_sid,
                    "accountSid": self.account_sid,
                    "callSid": self.call_sid,
                    "tracks": self.tracks,
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {
                        "encoding": "audio/x-mulaw",
                        "sampleRate": SAMPLE_RATE,
                        "channels": 1,
                    },
                },
                "streamSid": self.stream_sid,
            }
        )

    def media(self, ulaw: bytes, *, timestamp_ms: int | None = None, track: str = "inbound") -> str:
        """Caller audio (µ-law 8 kHz). ``timestamp`` defaults to the stream position: the audio sent
        before this chunk, in ms."""
        self._require_started("media")
        if track not in self.tracks:
            raise LocalError(f"track {track!r} is not in this stream's tracks")
        if timestamp_ms is None:
            timestamp_ms = self._samples_sent * 1000 // SAMPLE_RATE
        self._samples_sent += len(ulaw)
        self._chunk += 1
        return _dumps(
            {
                "event": "media",
                "sequenceNumber": self._next_sequence(),
                "media": {
                    "track": track,
                    "chunk": str(self._chunk),
                    "timestamp": str(timestamp_ms),
                    "payload": base64.b64encode(ulaw).decode("ascii"),
                },
                "streamSid": self.stream_sid,
            }
        )

    def dtmf(self, digit: str) -> str | None:
        """A caller DTMF key, or ``None`` for keys Twilio cannot carry (A-D)."""
        self._require_started("dtmf")
        if len(digit) != 1 or digit not in TWILIO_DTMF_DIGITS:
            return None
        return _dumps(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_sequence(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    def mark(self, name: str) -> str:
        """Echo a mark: the audio before it has played, or was cleared."""
        self._require_started("mark")
        return _dumps(
            {
                "event": "mark",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    def stop(self) -> str:
        """The last message: the stream (call) ended."""
        self._require_started("stop")
        self._stopped = True
        return _dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next_sequence(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )

    # ------------------------------------------------------------------ incoming

    def receive(self, data: str | bytes, now: float) -> list[TwilioEvent]:
        """Parse one frame from the agent's server. Never raises."""
        if isinstance(data, bytes | bytearray | memoryview):
            text = bytes(data)[:_CONTENT_ECHO_LIMIT].decode("utf-8", "replace")
            return self._invalid("binary frames are not part of Twilio Media Streams", text)
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return self._invalid("invalid JSON", data)
        return self._receive_json(obj, data)

    def _invalid(self, reason: str, content: str) -> list[TwilioEvent]:
        self.invalid_messages += 1
        text = content[:_CONTENT_ECHO_LIMIT].encode("utf-8", "replace").decode("utf-8")
        return [InvalidTwilioMessage(reason, text)]

    def _receive_json(self, obj: Any, text: str) -> list[TwilioEvent]:
        if not isinstance(obj, dict):
            return self._invalid("message must be a JSON object", text)
        event = obj.get("event")
        if event not in ("media", "mark", "clear"):
            return self._invalid(f"unknown event {event!r}", text)
        stream_sid = obj.get("streamSid")
        if stream_sid is None:
            return self._invalid("streamSid missing", text)
        if stream_sid != self.stream_sid:
            return self._invalid("streamSid does not match this stream", text)
        if event == "clear":
            return [Clear()]
        body = obj.get(event)
        if not isinstance(body, dict):
            return self._invalid(f"{event} needs a {event} object", text)
        if event == "mark":
            name = body.get("name")
            if not isinstance(name, str) or not name:
                return self._invalid("mark needs mark.name", text)
            return [MarkRequested(name)]
        payload = body.get("payload")
        if not isinstance(payload, str):
            return self._invalid("media needs media.payload (base64)", text)
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            return self._invalid("media payload is not valid base64", text)
        if _looks_like_wav(ulaw):
            return self._invalid("media payload has a WAV header; send raw µ-law", text)
        return [MediaReceived(ulaw)] if ulaw else []


def stream_for_call(
    call_sid: str, custom_parameters: Mapping[str, str] | None = None
) -> TwilioStream:
    """The Media Stream of one call: a fresh ``MZ…`` stream sid, the ``CA…`` call sid derived
    from the worker's call sid, and the account sid from ``custom_parameters`` (else zeros)."""
    parameters = dict(custom_parameters or {})
    return TwilioStream(
        stream_sid="MZ" + uuid.uuid4().hex,
        call_sid="CA" + call_sid.replace("-", ""),
        account_sid=parameters.get("account_sid", "AC" + "0" * 32),
        custom_parameters=parameters,
    )
