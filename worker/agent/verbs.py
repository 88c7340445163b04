"""The jambonz verbs this worker executes, as frozen pydantic models, and ``parse_verbs`` that
turns an app's JSON verb array (flat ``{"verb": "say", ...}`` or keyed ``{"say": {...}}``) into
them.

Rules, from jambonz-feature-server (``normalize-jambones.js``, ``tasks/task.js::validate``):

* A verb document is a JSON array of objects. An object with a ``verb`` key is the flat form; an
  object with exactly one key is the keyed form (``{"hangup": {}}``). Anything else is an error.
  (jambonz tests "one key" first, so ``{"verb": "hangup"}`` alone would be read as a verb named
  ``verb``; we read it as the flat form, which is what every app means.)
* Property types are checked the way jambonz checks them (``typeof``): ``"5"`` is not a number and
  ``1`` is not a boolean. Numbers written as ``5.0`` are accepted where an integer is expected.
* Unknown properties are ignored (jambonz rejects them; we stay forward compatible), but a known
  property with the wrong type is an error, and so is an unknown verb.
* camelCase JSON names map to snake_case attributes (``actionHook`` -> ``action_hook``).
* ``stream`` is an alias of ``listen``: both parse to :class:`ListenVerb`, whose ``verb`` keeps
  the name the app used.

Errors are :class:`VerbError` (a :class:`~worker.errors.RemoteError`) naming the verb's index in the
array, the verb and the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from worker.errors import RemoteError

__all__ = [
    "VERB_MODELS",
    "AnswerVerb",
    "BargeInConfig",
    "BidirectionalAudio",
    "ConfigListen",
    "ConfigVerb",
    "DialTarget",
    "DialVerb",
    "DtmfVerb",
    "GatherVerb",
    "HangupVerb",
    "Hook",
    "ListenVerb",
    "PauseVerb",
    "PlayVerb",
    "Recognizer",
    "RedirectVerb",
    "SayVerb",
    "SipDeclineVerb",
    "Synthesizer",
    "TagVerb",
    "Verb",
    "VerbError",
    "WebhookSpec",
    "WsAuth",
    "hook_url",
    "parse_verb",
    "parse_verbs",
]


class VerbError(RemoteError):
    """The app sent a verb document we cannot execute.

    ``index`` is the verb's position in the array (``None`` when the array itself is wrong),
    ``verb`` its name when known, ``field`` the dotted path of the bad property (camelCase, as the
    app wrote it; ``None`` for whole-verb problems) and ``reason`` what is wrong.
    """

    def __init__(
        self,
        reason: str,
        *,
        index: int | None = None,
        verb: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.index = index
        self.verb = verb
        self.field = field
        where = "verbs" if index is None else f"verbs[{index}]"
        if verb is not None:
            where += f" ({verb})"
        if field is not None:
            where += f": {field}"
        super().__init__(f"{where}: {reason}")


def _integral_number(value: Any) -> Any:
    """Let ``5.0`` through where jambonz expects a number used as an integer; reject booleans."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral_number)]
"""An integer written as a JSON number (``5`` or ``5.0``); strings and booleans are rejected."""

DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
"""Characters a DTMF digit string may hold (RFC 4733 events 0-15)."""


class _Model(BaseModel):
    model_config = ConfigDict(
        strict=True,
        frozen=True,
        extra="ignore",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
    )


class WebhookSpec(_Model):
    """A hook given as an object: ``{"url", "method", "username", "password"}``."""

    url: str = Field(min_length=1)
    method: Literal["GET", "POST"] = "POST"
    username: str | None = None
    password: str | None = None


Hook: TypeAlias = str | WebhookSpec
"""An ``actionHook``/``eventHook``: a URL (often relative: ``"/gather-done"``) or a hook object."""


def hook_url(hook: Hook) -> str:
    """The hook string jambonz puts in ``verb:hook`` messages (``hook.url || hook``)."""
    return hook.url if isinstance(hook, WebhookSpec) else hook


class Synthesizer(_Model):
    """Text-to-speech settings (``say``, ``config``). Vendor-specific extras are ignored."""

    vendor: str | None = None
    language: str | None = None
    voice: str | dict[str, Any] | None = None
    label: str | None = None
    engine: str | None = None
    gender: str | None = None
    options: dict[str, Any] | None = None


class Recognizer(_Model):
    """Speech-to-text settings (``gather``, ``config``). Vendor-specific extras are ignored."""

    vendor: str | None = None
    language: str | None = None
    label: str | None = None
    hints: list[str | dict[str, Any]] | None = None
    alt_languages: list[str] | None = None


class _Verb(_Model):
    id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The verb in jambonz's flat JSON form (camelCase, ``None`` fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class AnswerVerb(_Verb):
    """``answer``: answer the call (200 OK)."""

    verb: Literal["answer"] = "answer"


class HangupVerb(_Verb):
    """``hangup``: end the call, optionally with extra SIP headers on the BYE/final response."""

    verb: Literal["hangup"] = "hangup"
    headers: dict[str, str] = Field(default_factory=dict)


class PauseVerb(_Verb):
    """``pause``: wait ``length`` seconds."""

    verb: Literal["pause"] = "pause"
    length: float = Field(ge=0)


class PlayVerb(_Verb):
    """``play``: play one audio URL or a list of them, ``loop`` times (``0``/``"forever"``:
    forever)."""

    verb: Literal["play"] = "play"
    url: str | list[str]
    loop: JsonInt | Literal["forever"] = 1
    early_media: bool = False
    timeout_secs: float | None = Field(default=None, ge=0)
    seek_offset: float | None = Field(default=None, ge=0)
    action_hook: Hook | None = None

    @field_validator("url")
    @classmethod
    def _urls_present(cls, url: str | list[str]) -> str | list[str]:
        urls = [url] if isinstance(url, str) else url
        if not urls or any(not u for u in urls):
            raise ValueError("must be a non-empty string or a non-empty list of them")
        return url

    @property
    def urls(self) -> list[str]:
        """The URLs to play, always as a list."""
        return [self.url] if isinstance(self.url, str) else list(self.url)


class SayVerb(_Verb):
    """``say``: speak text (a string or a list of strings) with the default or given
    synthesizer."""

    verb: Literal["say"] = "say"
    text: str | list[str]
    synthesizer: Synthesizer | None = None
    loop: JsonInt | Literal["forever"] = 1
    early_media: bool = False
    disable_tts_cache: bool | None = None

    @property
    def texts(self) -> list[str]:
        """The text to speak, always as a list."""
        return [self.text] if isinstance(self.text, str) else list(self.text)


class GatherVerb(_Verb):
    """``gather``: collect digits and/or speech, maybe playing a nested ``say``/``play`` prompt.

    Results go to ``actionHook`` as ``digits`` / ``speech`` (the names the jambonz SDK reads).
    ``None`` means "use the platform default".
    """

    verb: Literal["gather"] = "gather"
    input: list[Literal["digits", "speech"]] = Field(
        default_factory=lambda: list[Literal["digits", "speech"]](["digits"]), min_length=1
    )
    num_digits: JsonInt | None = Field(default=None, ge=1)
    min_digits: JsonInt | None = Field(default=None, ge=1)
    max_digits: JsonInt | None = Field(default=None, ge=1)
    finish_on_key: str | None = None
    timeout: float | None = Field(default=None, ge=0)
    inter_digit_timeout: float | None = Field(default=None, ge=0)
    action_hook: Hook | None = None
    partial_result_hook: Hook | None = None
    say: SayVerb | None = None
    play: PlayVerb | None = None
    bargein: bool | None = None
    dtmf_bargein: bool | None = None
    listen_during_prompt: bool | None = None
    recognizer: Recognizer | None = None

    @field_validator("finish_on_key")
    @classmethod
    def _one_key(cls, key: str | None) -> str | None:
        if key is not None and (len(key) != 1 or key not in DTMF_DIGITS):
            raise ValueError("must be one DTMF key (0-9, *, #, A-D)")
        return key

    @model_validator(mode="after")
    def _digit_bounds(self) -> GatherVerb:
        if (
            self.min_digits is not None
            and self.max_digits is not None
            and self.min_digits > self.max_digits
        ):
            raise ValueError("minDigits must not exceed maxDigits")
        return self


class BidirectionalAudio(_Model):
    """``listen.bidirectionalAudio``: may the app send audio back, and how.

    ``enabled`` (default true) allows JSON ``playAudio``; ``streaming`` (default false) allows raw
    binary L16 frames at ``sampleRate`` instead.
    """

    enabled: bool = True
    streaming: bool = False
    sample_rate: JsonInt | None = Field(default=None, gt=0)


class WsAuth(_Model):
    """``listen.wsAuth``: HTTP basic auth for the audio socket."""

    username: str
    password: str


ListenSampleRate: TypeAlias = Literal[8000, 16000, 24000, 32000, 48000, 64000]
"""Rates the jambonz audio fork accepts (docs list 8/16/24/48/64 kHz; the module also parses 32)."""

_AUDIO_URL_SCHEMES = ("ws://", "wss://", "http://", "https://")


class _ListenOptions(_Model):
    mix_type: Literal["mono", "mixed", "stereo"] = "mono"
    sample_rate: Annotated[ListenSampleRate, BeforeValidator(_integral_number)] = 8000
    bidirectional_audio: BidirectionalAudio = Field(default_factory=BidirectionalAudio)
    pass_dtmf: bool = False
    finish_on_key: str | None = None
    max_length: float | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)
    ws_auth: WsAuth | None = None
    action_hook: Hook | None = None
    play_beep: bool = False
    early_media: bool = False
    disable_bidirectional_audio: bool | None = None
    transcribe: dict[str, Any] | None = None

    @property
    def bidirectional_enabled(self) -> bool:
        """May the app send audio back? (``disableBidirectionalAudio`` is the old spelling.)"""
        if self.disable_bidirectional_audio:
            return False
        return self.bidirectional_audio.enabled

    @property
    def bidirectional_streaming(self) -> bool:
        """Does the app stream raw binary audio back? (Only with bidirectional audio enabled.)"""
        return self.bidirectional_enabled and self.bidirectional_audio.streaming

    @property
    def return_sample_rate(self) -> int:
        """Rate of the audio the app sends back: ``bidirectionalAudio.sampleRate``, else
        ``sampleRate``."""
        return self.bidirectional_audio.sample_rate or self.sample_rate


def _check_audio_url(url: str) -> str:
    if not url.startswith(_AUDIO_URL_SCHEMES):
        raise ValueError("must be a ws://, wss://, http:// or https:// URL")
    return url


class ListenVerb(_Verb, _ListenOptions):
    """``listen`` (alias ``stream``): fork the call audio to a WebSocket (``audio.jambonz.org``)."""

    verb: Literal["listen", "stream"] = "listen"
    url: str

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str) -> str:
        return _check_audio_url(url)


class DialTarget(_Model):
    """One ``dial`` target: ``phone`` (``number``, optional ``trunk``), ``sip`` (``sipUri``),
    ``user`` (``name``) or ``teams`` (``number``)."""

    type: Literal["phone", "sip", "user", "teams"]
    number: str | None = None
    sip_uri: str | None = None
    name: str | None = None
    trunk: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    auth: WsAuth | None = None

    @model_validator(mode="after")
    def _address_present(self) -> DialTarget:
        needed = {"phone": "number", "teams": "number", "sip": "sip_uri", "user": "name"}[self.type]
        if not getattr(self, needed):
            raise ValueError(f"a {self.type} target needs {to_camel(needed)}")
        return self


class DialVerb(_Verb):
    """``dial``: place an outbound leg to one of ``target`` and bridge it to the caller."""

    verb: Literal["dial"] = "dial"
    target: list[DialTarget] = Field(min_length=1)
    caller_id: str | None = None
    caller_name: str | None = None
    timeout: JsonInt | None = Field(default=None, gt=0)
    time_limit: JsonInt | None = Field(default=None, gt=0)
    answer_on_bridge: bool = False
    action_hook: Hook | None = None
    confirm_hook: Hook | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    listen: ListenVerb | None = None
    dial_music: str | None = None


class DtmfVerb(_Verb):
    """``dtmf``: send DTMF digits (``w`` = 500 ms pause) of ``duration`` ms each."""

    verb: Literal["dtmf"] = "dtmf"
    dtmf: str = Field(min_length=1)
    duration: JsonInt = Field(default=500, gt=0)

    @field_validator("dtmf")
    @classmethod
    def _digits_valid(cls, dtmf: str) -> str:
        bad = sorted({c for c in dtmf if c not in DTMF_DIGITS and c not in "wW"})
        if bad:
            raise ValueError(f"holds characters that are not DTMF digits: {''.join(bad)!r}")
        return dtmf


class TagVerb(_Verb):
    """``tag``: attach ``data`` to the call; it comes back as ``customerData`` in later hooks."""

    verb: Literal["tag"] = "tag"
    data: dict[str, Any]


class SipDeclineVerb(_Verb):
    """``sip:decline``: reject an unanswered call with a SIP final status."""

    verb: Literal["sip:decline"] = "sip:decline"
    status: JsonInt = Field(ge=400, le=699)
    reason: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class RedirectVerb(_Verb):
    """``redirect``: fetch a new verb document from ``actionHook``."""

    verb: Literal["redirect"] = "redirect"
    action_hook: Hook


class BargeInConfig(_Model):
    """``config.bargeIn``: a background gather that interrupts prompts."""

    enable: bool
    sticky: bool | None = None
    action_hook: Hook | None = None
    partial_result_hook: Hook | None = None
    input: list[Literal["digits", "speech"]] | None = None
    min_bargein_word_count: JsonInt | None = Field(default=None, ge=0)
    finish_on_key: str | None = None
    num_digits: JsonInt | None = Field(default=None, ge=1)
    min_digits: JsonInt | None = Field(default=None, ge=1)
    max_digits: JsonInt | None = Field(default=None, ge=1)
    inter_digit_timeout: float | None = Field(default=None, ge=0)


class ConfigListen(_ListenOptions):
    """``config.listen``: start (``enable: true``, needs ``url``) or stop a background listen."""

    enable: bool
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        return None if url is None else _check_audio_url(url)

    @model_validator(mode="after")
    def _url_when_enabled(self) -> ConfigListen:
        if self.enable and not self.url:
            raise ValueError("url is required when enable is true")
        return self


class ConfigVerb(_Verb):
    """``config``: session-wide settings (event notifications, barge-in, speech vendors, background
    listen)."""

    verb: Literal["config"] = "config"
    notify_events: bool | None = None
    barge_in: BargeInConfig | None = None
    synthesizer: Synthesizer | None = None
    recognizer: Recognizer | None = None
    listen: ConfigListen | None = None
    reset: str | list[str] | None = None
    on_hold_music: str | None = None
    sip_request_within_dialog_hook: Hook | None = None


Verb: TypeAlias = (
    AnswerVerb
    | HangupVerb
    | PauseVerb
    | PlayVerb
    | SayVerb
    | GatherVerb
    | ListenVerb
    | DialVerb
    | DtmfVerb
    | TagVerb
    | SipDeclineVerb
    | RedirectVerb
    | ConfigVerb
)
"""Any verb the worker supports."""

VERB_MODELS: Mapping[str, type[Verb]] = {
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
"""Verb name (as the app writes it) -> model."""

# Names pydantic puts into error locations for the members of a union; they are not fields.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})
_MODEL_NAMES = frozenset(
    name
    for name, value in list(globals().items())
    if isinstance(value, type) and issubclass(value, BaseModel)
)


def _is_union_tag(part: str) -> bool:
    return (
        part in _UNION_TAGS
        or part in _MODEL_NAMES
        or "[" in part
        or part.startswith(("function-", "literal", "lax-or-strict", "json-or-python"))
    )


def _describe(error: ValidationError) -> tuple[str | None, str]:
    """(dotted camelCase field path or None, message) for the first problem pydantic found."""
    first = error.errors()[0]
    parts: list[str] = []
    for part in first["loc"]:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"  # a model's location always starts with a field name
        elif not _is_union_tag(part):
            parts.append(part)
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return (".".join(parts) or None), message


def _normalise(raw: Any, index: int | None) -> tuple[str, dict[str, Any]]:
    """Turn one array element into (verb name, properties) from either accepted shape."""
    if not isinstance(raw, dict):
        raise VerbError("each verb must be a JSON object", index=index)
    if "verb" in raw:
        name = raw["verb"]
        if not isinstance(name, str) or not name:
            raise VerbError("verb must be a non-empty string", index=index, field="verb")
        return name, {k: v for k, v in raw.items() if k != "verb"}
    if len(raw) == 1:
        ((name, body),) = raw.items()
        if not isinstance(body, dict):
            raise VerbError(
                f"the properties of {name!r} must be a JSON object", index=index, verb=name
            )
        return name, {k: v for k, v in body.items() if k != "verb"}
    raise VerbError("a verb needs a 'verb' property or exactly one key naming it", index=index)


def parse_verb(raw: Any, index: int | None = None) -> Verb:
    """Parse one verb in either shape; ``index`` only labels errors."""
    name, body = _normalise(raw, index)
    model = VERB_MODELS.get(name)
    if model is None:
        raise VerbError(f"unknown verb {name!r}", index=index, verb=name)
    try:
        return model.model_validate({**body, "verb": name})
    except ValidationError as exc:
        field, message = _describe(exc)
        raise VerbError(message, index=index, verb=name, field=field) from None


def parse_verbs(raw: Any) -> list[Verb]:
    """Parse a jambonz verb document (a JSON array) into verb models; :class:`VerbError` if not."""
    if not isinstance(raw, list):
        raise VerbError("a verb document must be a JSON array")
    return [parse_verb(item, index) for index, item in enumerate(raw)]
