"""Logging: structured JSON in production, readable lines in a terminal, one logger per call.

``setup_logging`` configures the root once. ``call_logger(call_id)`` returns a ``CallLogger`` that
stamps every record with the call id. The 20 ms media path does not log at all: what happens
there is counted, and the counters are logged once, when the call ends.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class ConsoleFormatter(logging.Formatter):
    """``12:00:00.123 INFO  worker.sip  [call=abc] message key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
        }
        call = extras.pop("call_id", None)
        head = f"{clock}.{int(record.msecs):03d} {record.levelname:<5} {record.name}"
        if call:
            head += f" [call={call}]"
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        line = f"{head} {record.getMessage()}" + (f" {tail}" if tail else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto", stream: Any = None
) -> None:
    """Configure the root logger once for the process (idempotent)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_aispinner", False):
            root.removeHandler(old)
    handler._aispinner = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at info (the ARI client's): only its problems are worth a line.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


class CallLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one call: every record carries its ``call_id``."""

    def __init__(self, logger: logging.Logger, call_id: str) -> None:
        super().__init__(logger, {"call_id": call_id})
        self.call_id = call_id

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = kwargs.get("extra")
        base = dict(self.extra) if self.extra is not None else {}
        kwargs["extra"] = {**base, **extra} if extra else base
        return msg, kwargs


def call_logger(call_id: str, name: str = "worker.call") -> CallLogger:
    return CallLogger(logging.getLogger(name), call_id)


class LogThrottle:
    """Keeps a flood from becoming a flood of log lines: at most ``lines`` per key in each
    ``interval_s``. ``allow(key, now)`` is None for a line to skip, else how many lines of that
    key were skipped since the last one allowed (to log with it). Keys are bounded (oldest
    forgotten first)."""

    def __init__(self, lines: int = 10, interval_s: float = 60.0, max_keys: int = 1024) -> None:
        self.lines = lines
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._state: dict[str, list[float]] = {}  # key -> [window start, lines, skipped]

    def allow(self, key: str, now: float) -> int | None:
        state = self._state.get(key)
        if state is None or now - state[0] >= self.interval_s:
            skipped = int(state[2]) if state is not None else 0
            if state is None and len(self._state) >= self.max_keys:
                self._state.pop(next(iter(self._state)))
            self._state[key] = [now, 1.0, 0.0]
            return skipped
        if state[1] < self.lines:
            state[1] += 1
            skipped = int(state[2])
            state[2] = 0.0
            return skipped
        state[2] += 1
        return None
