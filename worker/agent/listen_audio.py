"""The jambonz ``listen``/``stream`` audio protocol (``audio.jambonz.org``, FreeSWITCH
``mod_audio_fork``), sans-I/O, with the worker in the module's place: the first text frame, the
caller audio it sends, the text events it sends, and what it accepts back from the app.

Rules (PROTOCOLS.md §2, jambonz ``listen.js`` and ``mod_audio_fork/lws_glue.cpp``):

1. Right after connect exactly one text frame goes out: ``{sampleRate, mixType, ...callInfo,
   ...metadata}`` with camelCase call info (``callSid``, ``sbcCallid``, ...).
2. Audio to the app is binary, raw L16 little-endian at ``sampleRate``: ``mono`` (caller only),
   ``mixed`` (both directions summed, saturating) or ``stereo`` (caller left, agent right,
   interleaved). A graceful end sends a zero-length binary frame before the close.
3. DTMF goes out (only with ``passDtmf``) as ``{"event":"dtmf","dtmf":"5","duration":"1600"}``: both
   values are **strings** and ``duration`` is in 8 kHz RTP timestamp units, because that is what
   jambonz forwards from FreeSWITCH's DTMF event headers (1600 = 200 ms).
4. From the app: binary L16 at ``bidirectionalAudio.sampleRate`` only when streaming is on (else
   counted and ignored; an odd trailing byte is kept for the next frame); ``playAudio`` only when
   bidirectional audio is on and streaming is off; ``killAudio``, ``mark`` (at most 30 outstanding),
   ``clearMarks``, ``disconnect``, ``transcription``; ``transfer``, ``error`` and ``json`` are
   passed through. Anything else is an :class:`InvalidAudioMessage`; ``receive`` never raises.
5. ``playAudio.sampleRate`` matters only for ``raw`` audio and must be a JSON number the module
   knows (8000, 16000, 24000, 32000, 48000, 64000). Anything else, including the string
   ``"16000"`` the jambonz docs show, silently becomes 16000, as in the module (cJSON ``valueint``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np

from worker.agent.jambonz import camel_case_keys
from worker.agent.verbs import DTMF_DIGITS, ListenVerb
from worker.errors import LocalError

__all__ = [
    "MAX_OUTSTANDING_MARKS",
    "SUBPROTOCOL",
    "AppEvent",
    "AudioReceived",
    "ClearMarks",
    "Disconnect",
    "InvalidAudioMessage",
    "KillAudio",
    "ListenAudioProtocol",
    "ListenEvent",
    "Mark",
    "PlayAudio",
    "Transcription",
    "interleave_stereo",
    "metadata_message",
    "mix_saturating",
]

SUBPROTOCOL = "audio.jambonz.org"
MAX_OUTSTANDING_MARKS = 30
PLAY_AUDIO_SAMPLE_RATES = frozenset({8000, 16000, 24000, 32000, 48000, 64000})
PLAY_AUDIO_DEFAULT_SAMPLE_RATE = 16000
_CONTENT_ECHO_LIMIT = 512

MixType: TypeAlias = Literal["mono", "mixed", "stereo"]


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class AudioReceived:
    """Streamed L16 LE audio from the app (an even number of bytes) at the return sample rate."""

    audio: bytes


@dataclass(frozen=True, slots=True)
class PlayAudio:
    """``playAudio``: play a clip. ``content_type`` ``raw`` is L16 LE at ``sample_rate``; ``wav``
    (``wave`` on the wire is the same) carries its own header and ``sample_rate`` is ``None``.
    ``queue_play``: queue behind current clips (up to 10) instead of replacing them."""

    audio: bytes
    content_type: Literal["raw", "wav"]
    sample_rate: int | None
    play_id: str | int | float | None
    queue_play: bool


@dataclass(frozen=True, slots=True)
class KillAudio:
    """``killAudio``: stop playback, flush streamed audio; pending marks come back ``cleared``."""


@dataclass(frozen=True, slots=True)
class Mark:
    """``mark``: attach ``name`` to the next streamed audio; report it with :meth:`mark_event`."""

    name: str


@dataclass(frozen=True, slots=True)
class ClearMarks:
    """``clearMarks``: forget outstanding marks without sending events."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """``disconnect``: the app ends the listen verb. ``data`` is the optional payload."""

    data: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Transcription:
    """``transcription`` from the agent: who said what. ``role`` as the agent named it (``user``,
    ``assistant``, ...), ``None`` if absent; ``payload`` is the message as received."""

    role: str | None
    text: str
    is_final: bool
    payload: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class AppEvent:
    """``transfer``, ``error`` or ``json``: forwarded as-is (jambonz raises FreeSWITCH events)."""

    kind: Literal["transfer", "error", "json"]
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class InvalidAudioMessage:
    """Something from the app we cannot use; the session logs it (nothing is sent back)."""

    reason: str
    content: str


ListenEvent: TypeAlias = (
    AudioReceived
    | PlayAudio
    | KillAudio
    | Mark
    | ClearMarks
    | Disconnect
    | Transcription
    | AppEvent
    | InvalidAudioMessage
)


# --------------------------------------------------------------------------- helpers


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def metadata_message(
    sample_rate: int,
    mix_type: MixType,
    call_info: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """The first text frame: ``{sampleRate, mixType, ...callInfo (camelCase), ...metadata}``.
    Later keys win, as with JavaScript's object spread."""
    obj: dict[str, Any] = {"sampleRate": sample_rate, "mixType": mix_type}
    obj.update(camel_case_keys(call_info))
    obj.update(metadata or {})
    return _dumps(obj)


def _samples(pcm: bytes, what: str) -> np.ndarray[Any, np.dtype[np.int16]]:
    if len(pcm) % 2:
        raise LocalError(f"{what}: L16 audio must have an even number of bytes")
    return np.frombuffer(pcm, dtype="<i2")


def _pad(a: np.ndarray[Any, np.dtype[np.int16]], n: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    if len(a) == n:
        return a
    out = np.zeros(n, dtype="<i2")
    out[: len(a)] = a
    return out


def interleave_stereo(left: bytes, right: bytes) -> bytes:
    """Two mono L16 LE frames -> one stereo frame (L R L R ...); the shorter one is padded with
    silence."""
    a, b = _samples(left, "left"), _samples(right, "right")
    n = max(len(a), len(b))
    out = np.empty(2 * n, dtype="<i2")
    out[0::2] = _pad(a, n)
    out[1::2] = _pad(b, n)
    return bytes(out.tobytes())


def mix_saturating(a_pcm: bytes, b_pcm: bytes) -> bytes:
    """Sum two mono L16 LE frames sample by sample, clipped to int16; the shorter one is padded."""
    a, b = _samples(a_pcm, "first"), _samples(b_pcm, "second")
    n = max(len(a), len(b))
    total = _pad(a, n).astype(np.int32) + _pad(b, n).astype(np.int32)
    return bytes(np.clip(total, -32768, 32767).astype("<i2").tobytes())


def _text_of(payload: Mapping[str, Any]) -> str | None:
    for key in ("text", "message", "transcript", "content", "utterance"):
        value = payload.get(key)
        if isinstance(value, str):
            return value
    alternatives = payload.get("alternatives")
    if isinstance(alternatives, list) and alternatives and isinstance(alternatives[0], dict):
        value = alternatives[0].get("transcript")
        if isinstance(value, str):
            return value
    return None


def _role_of(payload: Mapping[str, Any]) -> str | None:
    for key in ("role", "speaker", "participant", "source"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _is_final_of(payload: Mapping[str, Any]) -> bool:
    for key in ("is_final", "isFinal", "final"):
        value = payload.get(key)
        if isinstance(value, bool):
            return value
    return True


# --------------------------------------------------------------------------- the protocol


class ListenAudioProtocol:
    """One ``listen``/``stream`` audio socket, without the socket."""

    def __init__(
        self,
        *,
        sample_rate: int = 8000,
        mix_type: MixType = "mono",
        bidirectional_enabled: bool = True,
        streaming: bool = False,
        return_sample_rate: int | None = None,
        pass_dtmf: bool = False,
        max_marks: int = MAX_OUTSTANDING_MARKS,
    ) -> None:
        if mix_type not in ("mono", "mixed", "stereo"):
            raise LocalError(f"unknown mixType {mix_type!r}")
        self.sample_rate = sample_rate
        self.mix_type = mix_type
        self.bidirectional_enabled = bidirectional_enabled
        self.streaming = bidirectional_enabled and streaming
        self.return_sample_rate = return_sample_rate or sample_rate
        self.pass_dtmf = pass_dtmf
        self.max_marks = max_marks
        self._carry = b""
        self._marks: list[str] = []
        self.ignored_binary_frames = 0
        self.invalid_messages = 0

    @classmethod
    def from_verb(cls, verb: ListenVerb) -> ListenAudioProtocol:
        """Configured from a parsed ``listen``/``stream`` verb."""
        return cls(
            sample_rate=verb.sample_rate,
            mix_type=verb.mix_type,
            bidirectional_enabled=verb.bidirectional_enabled,
            streaming=verb.bidirectional_streaming,
            return_sample_rate=verb.return_sample_rate,
            pass_dtmf=verb.pass_dtmf,
        )

    @property
    def outstanding_marks(self) -> tuple[str, ...]:
        """Marks received and not yet reported (oldest first)."""
        return tuple(self._marks)

    # ------------------------------------------------------------------ outgoing

    def metadata_message(
        self, call_info: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> str:
        """The first text frame, with this socket's sample rate and mix type."""
        return metadata_message(self.sample_rate, self.mix_type, call_info, metadata)

    def audio_frame(self, caller: bytes, agent: bytes | None = None) -> bytes:
        """The binary frame for one stretch of call audio (L16 LE at ``sample_rate``): the caller
        alone (``mono``), caller + agent summed (``mixed``) or interleaved (``stereo``)."""
        if self.mix_type == "mono":
            _samples(caller, "caller")
            return bytes(caller)
        other = agent if agent is not None else b""
        if self.mix_type == "mixed":
            return mix_saturating(caller, other)
        return interleave_stereo(caller, other)

    @staticmethod
    def end_of_audio() -> bytes:
        """The zero-length binary frame sent before a graceful close."""
        return b""

    def dtmf_message(self, digit: str, duration_ms: float) -> str | None:
        """The DTMF text frame, or ``None`` when ``passDtmf`` is off. ``duration`` is sent as a
        string in 8 kHz timestamp units (ms x 8), like jambonz."""
        if not self.pass_dtmf:
            return None
        if len(digit) != 1 or digit not in DTMF_DIGITS:
            raise LocalError(f"not a DTMF digit: {digit!r}")
        if duration_ms < 0:
            raise LocalError("DTMF duration must not be negative")
        return _dumps(
            {"event": "dtmf", "dtmf": digit.upper(), "duration": str(round(duration_ms * 8))}
        )

    def mark_event(self, name: str, event: Literal["playout", "cleared"]) -> str:
        """Report a mark reached (``playout``) or dropped (``cleared``); it is no longer
        outstanding."""
        if event not in ("playout", "cleared"):
            raise LocalError(f"unknown mark event {event!r}")
        if name in self._marks:
            self._marks.remove(name)
        return _dumps({"type": "mark", "data": {"name": name, "event": event}})

    def play_done(
        self, play_id: str | int | float | None = None, results: Mapping[str, Any] | None = None
    ) -> str:
        """``playDone`` after a ``playAudio`` clip finished (non-streaming mode)."""
        data: dict[str, Any] = dict(results or {})
        if play_id is not None:
            data["id"] = play_id
        return _dumps({"type": "playDone", "data": data})

    # ------------------------------------------------------------------ incoming

    def receive(self, data: str | bytes, now: float) -> list[ListenEvent]:
        """Parse one frame from the app. Never raises."""
        if isinstance(data, bytes | bytearray | memoryview):
            return self._receive_binary(bytes(data))
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return self._invalid("invalid JSON", data)
        return self._receive_json(obj, data)

    def _invalid(self, reason: str, content: str) -> list[ListenEvent]:
        self.invalid_messages += 1
        text = content[:_CONTENT_ECHO_LIMIT].encode("utf-8", "replace").decode("utf-8")
        return [InvalidAudioMessage(reason, text)]

    def _receive_binary(self, data: bytes) -> list[ListenEvent]:
        if not self.streaming:
            self.ignored_binary_frames += 1
            return []
        audio = self._carry + data
        if len(audio) % 2:
            self._carry = audio[-1:]
            audio = audio[:-1]
        else:
            self._carry = b""
        return [AudioReceived(audio)] if audio else []

    def _receive_json(self, obj: Any, text: str) -> list[ListenEvent]:
        if not isinstance(obj, dict):
            return self._invalid("message must be a JSON object", text)
        kind = obj.get("type")
        if not isinstance(kind, str):
            return self._invalid("type property not supplied", text)
        payload = obj.get("data")
        if kind == "playAudio":
            return self._receive_play_audio(payload, text)
        if kind == "killAudio":
            return [KillAudio()]
        if kind == "mark":
            name = payload.get("name") if isinstance(payload, dict) else None
            if not isinstance(name, str) or not name:
                return self._invalid("mark needs data.name", text)
            if len(self._marks) >= self.max_marks:
                return self._invalid(f"too many outstanding marks (max {self.max_marks})", text)
            self._marks.append(name)
            return [Mark(name)]
        if kind == "clearMarks":
            self._marks.clear()
            return [ClearMarks()]
        if kind == "disconnect":
            return [Disconnect(payload if isinstance(payload, dict) else None)]
        if kind == "transcription":
            return self._receive_transcription(obj, payload, text)
        if kind == "transfer":
            return [AppEvent("transfer", payload if isinstance(payload, dict) else {})]
        if kind == "error":
            return [AppEvent("error", payload if isinstance(payload, dict) else {})]
        if kind == "json":
            return [AppEvent("json", obj)]
        return self._invalid(f"unsupported msg type {kind}", text)

    def _receive_transcription(
        self, obj: dict[str, Any], payload: Any, text: str
    ) -> list[ListenEvent]:
        # Agents differ: {"type":"transcription","data":{"role","text"}}, or the fields at the top
        # level, or "speaker"/"transcript", or an STT-style "alternatives" list. Look in data first.
        sources: list[Mapping[str, Any]] = [payload, obj] if isinstance(payload, dict) else [obj]
        words = next((t for s in sources if (t := _text_of(s)) is not None), None)
        if words is None:
            return self._invalid("transcription without text", text)
        role = next((r for s in sources if (r := _role_of(s)) is not None), None)
        return [Transcription(role, words, all(_is_final_of(s) for s in sources), obj)]

    def _receive_play_audio(self, payload: Any, text: str) -> list[ListenEvent]:
        if not self.bidirectional_enabled or self.streaming:
            return self._invalid(
                "playAudio needs bidirectionalAudio enabled and streaming off", text
            )
        if not isinstance(payload, dict):
            return self._invalid("playAudio needs a data object", text)
        content = payload.get("audioContent")
        if not isinstance(content, str) or not content:
            return self._invalid("playAudio needs data.audioContent (base64)", text)
        try:
            audio = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            return self._invalid("playAudio audioContent is not valid base64", text)
        kind = payload.get("audioContentType")
        sample_rate: int | None
        content_type: Literal["raw", "wav"]
        if kind == "raw":
            content_type = "raw"
            sample_rate = _play_audio_rate(payload.get("sampleRate"))
            if len(audio) % 2:
                return self._invalid("playAudio raw audio must have an even number of bytes", text)
        elif kind in ("wav", "wave"):
            content_type = "wav"
            sample_rate = None
        else:
            return self._invalid("playAudio audioContentType must be raw, wav or wave", text)
        play_id = payload.get("id")
        if play_id is not None and (
            isinstance(play_id, bool) or not isinstance(play_id, str | int | float)
        ):
            return self._invalid("playAudio id must be a string or a number", text)
        queue_play = payload.get("queuePlay", False)
        if not isinstance(queue_play, bool):
            return self._invalid("playAudio queuePlay must be a boolean", text)
        return [PlayAudio(audio, content_type, sample_rate, play_id, queue_play)]


def _play_audio_rate(value: Any) -> int:
    """mod_audio_fork reads ``sampleRate`` with cJSON ``valueint``: a string or anything it does not
    know becomes 16000."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return PLAY_AUDIO_DEFAULT_SAMPLE_RATE
    try:
        rate = int(value)
    except (OverflowError, ValueError):
        return PLAY_AUDIO_DEFAULT_SAMPLE_RATE
    return rate if rate in PLAY_AUDIO_SAMPLE_RATES else PLAY_AUDIO_DEFAULT_SAMPLE_RATE
