"""The PJSIP objects behind ``/asterisk/config/dynamic`` and PJSIP dialing: pjsip.conf objects
(read-only, Asterisk's ``config`` wizard) and, when the memory wizard is mapped
(``sorcery_memory=True``, the sorcery.conf of the recording's phase 2 plus ``registration``),
objects created, merged and deleted at runtime. Errors follow ``res/ari/resource_asterisk.c``.

Attribute lists (names, order, default values) are copied from the recordings: ``endpoint`` and
``identify`` from pjsip.conf's ``trunk``, ``auth`` and ``aor`` from the objects created in memory;
``registration`` takes the attribute names documented for res_pjsip_outbound_registration.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.ari_double import recordings
from tests.ari_double.errors import AriError, not_modelled

CONFIG_CLASS = "res_pjsip"
MODELLED_TYPES = ("endpoint", "aor", "auth", "identify", "registration")
# Registered in Asterisk's res_pjsip sorcery instance, but not modelled by the double.
UNMODELLED_TYPES = (
    "contact",
    "domain_alias",
    "transport",
    "global",
    "system",
    "outbound-publish",
    "inbound-publication",
    "asterisk-publication",
    "resource_list",
    "phoneprov",
)
SIPP_UAS_CONTACT = "sip:127.0.0.1:15180"

REGISTRATION_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("server_uri", ""),
    ("client_uri", ""),
    ("contact_user", ""),
    ("transport", ""),
    ("outbound_auth", ""),
    ("expiration", "3600"),
    ("retry_interval", "60"),
    ("forbidden_retry_interval", "0"),
    ("fatal_retry_interval", "0"),
    ("max_retries", "10"),
    ("auth_rejection_permanent", "true"),
    ("line", "false"),
    ("endpoint", ""),
    ("support_path", "false"),
    ("support_outbound", "false"),
    ("contact_header_params", ""),
    ("outbound_proxy", ""),
)

# Asterisk's defaults for the attributes pjsip.conf's ``trunk`` (the recorded endpoint
# template) sets itself, so that a fresh object starts from defaults, not from trunk's settings.
_FRESH_OVERRIDES: dict[str, dict[str, str]] = {
    "endpoint": {
        "context": "default",
        "transport": "",
        "allow": "(nothing)",
        "aors": "",
        "outbound_auth": "",
        "direct_media": "true",
        "rtp_symmetric": "false",
        "force_rport": "true",
        "rewrite_contact": "false",
        "media_address": "",
        "bind_rtp_to_media_address": "false",
        "ice_support": "false",
    },
    "identify": {"match": "", "endpoint": ""},
    "auth": {"username": "", "password": ""},
    "aor": {"contact": "", "qualify_frequency": "0"},
    "registration": {},
}
# Attributes Asterisk accepts that do not show in an object's attribute list.
_WRITE_ONLY = {"endpoint": frozenset({"disallow", "type"})}
_CODECS = frozenset(
    [
        "ulaw",
        "alaw",
        "gsm",
        "g722",
        "g726",
        "g726aal2",
        "adpcm",
        "slin",
        "slin12",
        "slin16",
        "slin24",
        "slin32",
        "slin44",
        "slin48",
        "slin96",
        "slin192",
        "lpc10",
        "g729",
        "speex",
        "speex16",
        "speex32",
        "ilbc",
        "g719",
        "opus",
        "siren7",
        "siren14",
        "testlaw",
        "h261",
        "h263",
        "h263p",
        "h264",
        "h265",
        "mpeg4",
        "vp8",
        "vp9",
        "red",
        "t140",
        "jpeg",
        "png",
    ]
)
_BOOL_TRUE = frozenset({"yes", "true", "y", "t", "1", "on"})
_BOOL_FALSE = frozenset({"no", "false", "n", "f", "0", "off"})
_INTEGER = re.compile(r"\d+\Z")
_FLOAT_FIELDS = frozenset({"qualify_timeout"})
_FREE_NUMERIC = frozenset({"tos_audio", "tos_video"})


def _template(object_type: str) -> tuple[tuple[str, str], ...]:
    if object_type == "registration":
        return REGISTRATION_DEFAULTS
    return recordings.pjsip_attributes()[object_type]


def fresh_values(object_type: str) -> dict[str, str]:
    values = dict(_template(object_type))
    values.update(_FRESH_OVERRIDES[object_type])
    return values


@dataclass(slots=True)
class SorceryObject:
    object_type: str
    id: str
    values: dict[str, str]
    from_config: bool

    def attribute_list(self) -> list[dict[str, str]]:
        return [{"attribute": name, "value": value} for name, value in self.values.items()]


class FieldValidationError(ValueError):
    pass


def _codecs(value: str) -> list[str]:
    inner = value.strip("()")
    return [] if value == "(nothing)" or not inner else inner.split("|")


def _apply(object_type: str, values: dict[str, str], fields: Sequence[tuple[str, str]]) -> None:
    template = dict(_template(object_type))
    extras = _WRITE_ONLY.get(object_type, frozenset({"type"}))
    for name, value in fields:
        if name == "type":
            if value != object_type:
                raise FieldValidationError(name)
            continue
        if name not in template and name not in extras:
            raise FieldValidationError(name)
        if object_type == "endpoint" and name in ("allow", "disallow"):
            values["allow"] = _codec_update(values["allow"], name, value)
            continue
        if object_type == "identify" and name == "match":
            values[name] = _match(value)
            continue
        values[name] = _normalise(name, template[name], value)


def _codec_update(current: str, name: str, value: str) -> str:
    codecs = _codecs(current)
    for codec in (c.strip() for c in value.split(",") if c.strip()):
        if codec != "all" and codec not in _CODECS:
            raise FieldValidationError(name)
        if name == "disallow":
            codecs = [] if codec == "all" else [c for c in codecs if c != codec]
        elif codec == "all":
            codecs = codecs + sorted(c for c in ("ulaw", "alaw") if c not in codecs)
        elif codec not in codecs:
            codecs.append(codec)  # allow is additive: allow=ulaw on (ulaw|alaw) leaves both
    return f"({'|'.join(codecs)})" if codecs else "(nothing)"


def _match(value: str) -> str:
    rendered = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise FieldValidationError("match") from exc
        rendered.append(f"{network.network_address}/{network.netmask}")
    return ",".join(rendered)


def _normalise(name: str, default: str, value: str) -> str:
    if default in ("true", "false"):
        lowered = value.lower()
        if lowered in _BOOL_TRUE:
            return "true"
        if lowered in _BOOL_FALSE:
            return "false"
        raise FieldValidationError(name)
    if name in _FLOAT_FIELDS:
        try:
            return f"{float(value):.6f}"
        except ValueError as exc:
            raise FieldValidationError(name) from exc
    if _INTEGER.match(default) and name not in _FREE_NUMERIC:
        if not _INTEGER.match(value):
            raise FieldValidationError(name)
        return str(int(value))
    return value


class Sorcery:
    """The PJSIP objects of one Asterisk: the first of ``endpoints`` is the inbound trunk
    (identified by IP, no AOR, ``offline``), the others have an AOR with a contact (SIPp's UAS)
    and are ``online`` and dialable."""

    def __init__(self, *, memory: bool, endpoints: Iterable[str]) -> None:
        self.memory = memory
        self._objects: dict[tuple[str, str], SorceryObject] = {}
        names = list(endpoints)
        if not names:
            raise ValueError("at least one pjsip.conf endpoint (the inbound trunk) is needed")
        self.inbound_endpoint = names[0]
        endpoint_template = dict(_template("endpoint"))
        for index, name in enumerate(names):
            values = dict(endpoint_template)
            if index == 0:
                identify = dict(_template("identify"))
                identify["endpoint"] = name
                self._put(SorceryObject("identify", name, identify, from_config=True))
            else:
                values["aors"] = name
                aor = fresh_values("aor")
                aor["contact"] = SIPP_UAS_CONTACT
                self._put(SorceryObject("aor", name, aor, from_config=True))
            self._put(SorceryObject("endpoint", name, values, from_config=True))

    def _put(self, obj: SorceryObject) -> None:
        self._objects[(obj.object_type, obj.id)] = obj

    def get(self, object_type: str, object_id: str) -> SorceryObject | None:
        return self._objects.get((object_type, object_id))

    # -- /asterisk/config/dynamic ----------------------------------------------------------------
    @staticmethod
    def _check_class_and_type(config_class: str, object_type: str) -> None:
        if config_class != CONFIG_CLASS:
            raise AriError(404, "Not Found", f"configClass '{config_class}' not found")
        if object_type in UNMODELLED_TYPES:
            raise not_modelled(f"sorcery objectType '{object_type}'")
        if object_type not in MODELLED_TYPES:
            raise AriError(404, "Not Found", f"objectType '{object_type}' not found")

    def _find(self, config_class: str, object_type: str, object_id: str) -> SorceryObject:
        self._check_class_and_type(config_class, object_type)
        obj = self.get(object_type, object_id)
        if obj is None:
            raise AriError(404, "Not Found", f"Object with id '{object_id}' not found")
        return obj

    def get_object(
        self, config_class: str, object_type: str, object_id: str
    ) -> list[dict[str, str]]:
        return self._find(config_class, object_type, object_id).attribute_list()

    def update_object(
        self, config_class: str, object_type: str, object_id: str, body: Any
    ) -> list[dict[str, str]]:
        self._check_class_and_type(config_class, object_type)
        existing = self.get(object_type, object_id)
        created = existing is None
        fields_json = body.get("fields") if isinstance(body, dict) else None
        if fields_json is None and not created:
            raise AriError(
                400, "Bad request", f"Fields must be provided to update object '{object_id}'"
            )
        values = fresh_values(object_type) if existing is None else dict(existing.values)
        if existing is not None and values.get("callerid") == "<unknown>":
            # Recorded: updating an endpoint turns its callerid "<unknown>" into "unknown".
            values["callerid"] = "unknown"
        try:
            _apply(object_type, values, _fields(fields_json))
        except FieldValidationError:
            action = "Creation" if created else "Update"
            raise AriError(
                400,
                "Bad request",
                f"{action} of object '{object_id}' failed field value validation",
            ) from None
        if existing is None:
            if not self.memory:
                raise AriError(
                    403, "Forbidden", f"Cannot create sorcery objects of type '{object_type}'"
                )
            obj = SorceryObject(object_type, object_id, values, from_config=False)
            self._put(obj)
            return obj.attribute_list()
        if existing.from_config:
            raise AriError(
                403, "Forbidden", f"Cannot update sorcery objects of type '{object_type}'"
            )
        existing.values = values
        return existing.attribute_list()

    def delete_object(self, config_class: str, object_type: str, object_id: str) -> None:
        obj = self._find(config_class, object_type, object_id)
        if obj.from_config:
            raise AriError(403, "Forbidden", f"Could not delete object with id '{object_id}'")
        del self._objects[(object_type, object_id)]

    # -- endpoints and dialing -------------------------------------------------------------------
    def endpoint_names(self) -> list[str]:
        return [obj.id for (kind, _), obj in self._objects.items() if kind == "endpoint"]

    def has_endpoint(self, name: str) -> bool:
        return self.get("endpoint", name) is not None

    def endpoint_online(self, name: str) -> bool:
        """An AOR of the endpoint has a contact (what makes the recorded endpoints ``online``
        and PJSIP/<number>@<endpoint> dialable)."""
        endpoint = self.get("endpoint", name)
        if endpoint is None:
            return False
        for aor_name in (a.strip() for a in endpoint.values.get("aors", "").split(",")):
            aor = self.get("aor", aor_name) if aor_name else None
            if aor is not None and aor.values.get("contact"):
                return True
        return False

    def endpoint_context(self, name: str) -> str:
        endpoint = self.get("endpoint", name)
        return endpoint.values.get("context", "default") if endpoint else "default"


def _fields(fields_json: Any) -> list[tuple[str, str]]:
    # Asterisk reads ``fields`` as an array of {"attribute", "value"} strings; anything else in an
    # entry fails validation here (Asterisk would pass NULL names on and crash or ignore them).
    if not isinstance(fields_json, list):
        return []
    fields = []
    for item in fields_json:
        if not isinstance(item, dict):
            raise FieldValidationError("fields")
        name, value = item.get("attribute"), item.get("value")
        if not isinstance(name, str) or not isinstance(value, str):
            raise FieldValidationError("fields")
        fields.append((name, value))
    return fields
