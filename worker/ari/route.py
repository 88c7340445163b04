"""Which call an ARI event is about, as a string every process can compute from the event alone:
the id of the resource it is routed by (``subject``), and the call that resource belongs to
(``call_key``).

A call's resources in Asterisk are its channel and, for a call whose audio comes to the worker,
a mixing bridge and an ExternalMedia channel whose ids are the channel's with ``-bridge`` and
``-media`` added (``AriLeg``): so every event of one call has one key, and a Stasis application
spread over several processes (``worker/front/ari_relay.py``) sends them all to the process
that owns it, with no table.
"""

from __future__ import annotations

import uuid

from worker.ari.models import (
    AriEvent,
    BridgeDestroyed,
    Channel,
    ChannelEnteredBridge,
    ChannelLeftBridge,
    Dial,
)

BRIDGE_SUFFIX = "-bridge"
MEDIA_SUFFIX = "-media"


def subject(event: AriEvent) -> str | None:
    """The id the event is routed by: a ``Dial``'s peer (the channel being dialled), a bridge
    event's bridge, else the event's channel; None for an event that names neither."""
    if isinstance(event, Dial):
        return event.peer.id
    if isinstance(event, BridgeDestroyed | ChannelEnteredBridge | ChannelLeftBridge):
        return event.bridge.id
    channel = getattr(event, "channel", None)
    return channel.id if isinstance(channel, Channel) else None


def random_channel_id() -> str:
    """A new id for a channel the worker originates: ``aispinner-<32 hex digits>``."""
    return f"aispinner-{uuid.uuid4().hex}"


def bridge_name(channel_id: str) -> str:
    """The name a call's bridge is created with (``GET /bridges`` shows it): ``call-<id>``."""
    return f"call-{channel_id}"


def call_key(resource_id: str) -> str:
    """The channel id of the call a channel or bridge id belongs to."""
    for suffix in (BRIDGE_SUFFIX, MEDIA_SUFFIX):
        if resource_id.endswith(suffix):
            return resource_id[: -len(suffix)]
    return resource_id
