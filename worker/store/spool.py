"""A bounded on-disk spool of events, for while PostgreSQL is unreachable: JSON Lines appended
(and flushed) in arrival order, read back whole and in order when the database returns, then
emptied. A worker restarted meanwhile finds the spool and replays it too.

Bounded by ``max_events``: past it, ``append`` refuses (returns False) and the caller counts the
event as dropped; a spool is never silently truncated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from worker.events.models import parse_event
from worker.store.journal import Pending

log = logging.getLogger("worker.store")


class Spool:
    def __init__(self, path: Path, max_events: int) -> None:
        self.path = path
        self.max_events = max_events
        self.dropped = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._count = self._lines()

    def __len__(self) -> int:
        return self._count

    def append(self, events: list[Pending]) -> int:
        """Append what fits; returns how many were kept (the rest are counted as dropped)."""
        room = max(0, self.max_events - self._count)
        kept = events[:room]
        if kept:
            with self.path.open("a", encoding="utf-8") as out:
                for uid, event in kept:
                    out.write(json.dumps({"uid": uid, "event": event.to_dict()}) + "\n")
                out.flush()
            self._count += len(kept)
        lost = len(events) - len(kept)
        if lost:
            self.dropped += lost
            log.error("event spool full: events dropped", extra={"dropped": lost})
        return len(kept)

    def read(self) -> list[Pending]:
        """Every spooled event, in order (a line that does not parse is logged and skipped)."""
        if not self.path.exists():
            return []
        events: list[Pending] = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                events.append((str(record["uid"]), parse_event(record["event"])))
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "unreadable spool line skipped", extra={"line": number, "error": str(exc)}
                )
        return events

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._count = 0

    def _lines(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as data:
            return sum(1 for line in data if line.strip())
