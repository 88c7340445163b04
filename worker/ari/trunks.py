"""SIP trunks pushed into Asterisk at runtime: each ``[ari.trunks.<name>]`` becomes PJSIP auth,
aor, endpoint, identify and (when it registers) registration objects, written with
``PUT /asterisk/config/dynamic/{class}/{type}/{id}`` in dependency order and deleted in the
reverse order (PROTOCOLS.md §5.1).

Asterisk needs ``sorcery.conf`` to map these types to a writable wizard (the rendered
``dialplan/sorcery.conf`` maps them to ``memory``); without it every PUT is refused with 403.
A PUT on an existing object merges its fields, so pushing again updates a trunk; ``disallow``
comes before ``allow`` so the codec list is replaced, not added to. Asterisk's 400 does not say
which attribute it refused ("failed field value validation"), so the pusher finds it by putting
the fields one at a time, and reports it by name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from worker.ari.client import AriClient, AriError, AriNotFoundError
from worker.config import AriTrunkSettings

log = logging.getLogger("worker.ari.trunks")

PJSIP = "res_pjsip"
REGISTRATION = "res_pjsip"  # the instance (sorcery.conf section: res_pjsip_outbound_registration)


@dataclass(frozen=True, slots=True)
class ConfigObject:
    """One dynamic-config object: where it goes and its fields, in order."""

    config_class: str
    object_type: str
    id: str
    fields: tuple[tuple[str, str], ...]


class TrunkPushError(AriError):
    """Asterisk refused a trunk's object; ``attribute`` names the field, when it was found."""

    def __init__(self, trunk: str, obj: ConfigObject, cause: AriError, attribute: str | None):
        method, path = cause.method, cause.path
        what = f"trunk {trunk!r}: {obj.object_type} {obj.id!r}"
        if attribute is not None:
            value = dict(obj.fields).get(attribute, "")
            what += f": attribute {attribute}={value!r}"
        super().__init__(method, path, cause.status, f"{what}: {cause.message}")
        self.trunk = trunk
        self.object = obj
        self.attribute = attribute


def trunk_objects(name: str, trunk: AriTrunkSettings) -> list[ConfigObject]:
    """The PJSIP objects of one trunk, in the order they must be created."""
    scheme_params = ";transport=tcp" if trunk.transport == "tcp" else ""
    server = f"sip:{trunk.host}:{trunk.port}{scheme_params}"
    transport = f"transport-{trunk.transport}"
    objects: list[ConfigObject] = []
    auth_id = f"{name}-auth"
    has_auth = trunk.username is not None
    if has_auth:
        objects.append(
            ConfigObject(
                PJSIP,
                "auth",
                auth_id,
                (
                    ("auth_type", "userpass"),
                    ("username", trunk.username or ""),
                    ("password", trunk.password or ""),
                ),
            )
        )
    objects.append(ConfigObject(PJSIP, "aor", name, (("contact", server),)))
    endpoint: list[tuple[str, str]] = [
        ("transport", transport),
        ("context", trunk.context),
        ("disallow", "all"),
        ("allow", ",".join(trunk.codecs)),
        ("aors", name),
        ("direct_media", "no"),
        ("rtp_symmetric", "yes"),
        ("force_rport", "yes"),
        ("rewrite_contact", "yes"),
        ("ice_support", "no"),
        ("dtmf_mode", "rfc4733"),
    ]
    if has_auth:
        endpoint.append(("outbound_auth", auth_id))
    if trunk.from_user:
        endpoint.append(("from_user", trunk.from_user))
    if trunk.from_domain:
        endpoint.append(("from_domain", trunk.from_domain))
    objects.append(ConfigObject(PJSIP, "endpoint", name, tuple(endpoint)))
    match = ",".join(trunk.match) if trunk.match else trunk.host
    objects.append(ConfigObject(PJSIP, "identify", name, (("endpoint", name), ("match", match))))
    if trunk.registration:
        user = trunk.username or trunk.from_user or name
        registration: list[tuple[str, str]] = [
            ("transport", transport),
            ("server_uri", server),
            ("client_uri", f"sip:{user}@{trunk.host}:{trunk.port}"),
            ("contact_user", user),
            ("expiration", str(trunk.registration_expires_s)),
            ("retry_interval", "60"),
        ]
        if has_auth:
            registration.append(("outbound_auth", auth_id))
        objects.append(ConfigObject(REGISTRATION, "registration", name, tuple(registration)))
    return objects


async def push_trunk(client: AriClient, name: str, trunk: AriTrunkSettings) -> None:
    """Create or update one trunk's objects; ``TrunkPushError`` for the first one refused."""
    for obj in trunk_objects(name, trunk):
        try:
            await client.config_put(obj.config_class, obj.object_type, obj.id, obj.fields)
        except AriError as exc:
            attribute = None
            if exc.status == 400 and obj.fields:
                attribute = await _refused_attribute(client, obj)
            raise TrunkPushError(name, obj, exc, attribute) from exc


async def delete_trunk(client: AriClient, name: str, trunk: AriTrunkSettings) -> None:
    """Delete one trunk's objects, dependents first; objects already gone are fine."""
    for obj in reversed(trunk_objects(name, trunk)):
        with contextlib.suppress(AriNotFoundError):
            await client.config_delete(obj.config_class, obj.object_type, obj.id)


async def push_trunks(client: AriClient, trunks: Mapping[str, AriTrunkSettings]) -> list[str]:
    """Push every configured trunk; a refused one is logged (naming the attribute) and the
    others still go. Returns the names pushed."""
    pushed: list[str] = []
    for name, trunk in trunks.items():
        try:
            await push_trunk(client, name, trunk)
        except AriError as exc:
            log.error("Asterisk refused a trunk", extra={"trunk": name, "error": str(exc)})
            continue
        log.info("trunk pushed to Asterisk", extra={"trunk": name, "host": trunk.host})
        pushed.append(name)
    return pushed


async def _refused_attribute(client: AriClient, obj: ConfigObject) -> str | None:
    """Which field Asterisk refuses: put them one at a time (an object this creates is
    deleted again)."""
    try:
        await client.config_get(obj.config_class, obj.object_type, obj.id)
        existed = True
    except AriError:
        existed = False
    refused = None
    for attribute, value in obj.fields:
        try:
            await client.config_put(obj.config_class, obj.object_type, obj.id, [(attribute, value)])
        except AriError as exc:
            if exc.status == 400:
                refused = attribute
                break
            return None
    if not existed:
        with contextlib.suppress(AriError):
            await client.config_delete(obj.config_class, obj.object_type, obj.id)
    return refused
