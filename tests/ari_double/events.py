"""ARI events as Asterisk 22.10.1 sends them: each event's key order is taken from the
recordings (an event whose key set was never recorded cannot be built), the timestamp format,
and the Q.850 cause texts of ``ChannelDestroyed``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tests.ari_double import recordings

JsonObject = dict[str, Any]

ASTERISK_ID = recordings.asterisk_id()
_ENVELOPE = frozenset({"type", "timestamp", "asterisk_id", "application"})

# main/channel.c's causes[] (the texts ast_cause2str gives); others are "Unknown".
CAUSE_TEXTS: Mapping[int, str] = {
    1: "Unallocated (unassigned) number",
    3: "No route to destination",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "User alerting, no answer",
    21: "Call Rejected",
    22: "Number changed",
    26: "Answered elsewhere",
    27: "Destination out of order",
    28: "Invalid number format",
    31: "Normal, unspecified",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    41: "Temporary failure",
    58: "Bearer capability not available",
    127: "Interworking, unspecified",
}


def cause_text(cause: int) -> str:
    return CAUSE_TEXTS.get(cause, "Unknown")


def timestamp(when: float | None = None) -> str:
    """``2026-11-21T09:44:49.311+0000``: UTC, milliseconds, ``+0000``."""
    moment = datetime.fromtimestamp(time.time() if when is None else when, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


class UnrecordedEventShapeError(LookupError):
    """The double tried to build an event whose key set no recording shows."""


def key_order(event_type: str, keys: Iterable[str]) -> tuple[str, ...]:
    """The recorded key order of ``event_type`` with exactly these keys."""
    wanted = set(keys)
    for order in recordings.event_key_orders().get(event_type, ()):
        if set(order) == wanted:
            return order
    raise UnrecordedEventShapeError(f"{event_type} with keys {sorted(wanted)} was never recorded")


@dataclass(frozen=True, slots=True)
class Event:
    """One event as it happens: sent to each of ``apps`` with its own ``application``."""

    type: str
    fields: Mapping[str, Any]
    timestamp: str
    apps: tuple[str, ...]

    def render(self, application: str) -> JsonObject:
        values: JsonObject = {
            **self.fields,
            "type": self.type,
            "timestamp": self.timestamp,
            "asterisk_id": ASTERISK_ID,
            "application": application,
        }
        return {key: values[key] for key in key_order(self.type, values)}


def make(event_type: str, apps: Iterable[str], **fields: Any) -> Event:
    """An event of a recorded shape (checked now, so a wrong shape fails where it is built)."""
    key_order(event_type, _ENVELOPE | set(fields))
    return Event(event_type, fields, timestamp(), tuple(sorted(set(apps))))
