"""The worker's Prometheus metrics: every metric's definition in one place, on a registry each
process owns (``WorkerMetrics``), its text exposition (``WorkerMetrics.render``), the merge of
several processes' expositions (``merge_expositions``) and a small scrape server
(``MetricsServer``) for when the API is off.

Two kinds of figure:

1. What happens at call or tick rate is counted as it happens, with ``prometheus_client``'s
   ``Counter`` and ``Histogram``: call setups, failures and hangups by cause, each media tick's
   duration, skipped ticks, each call's jitter at its end.
2. What the media path already counts per packet or per frame is read at scrape time by one
   custom collector, so the 20 ms path pays nothing more for it: RTP packets, loss, late
   packets and concealment (from each live call's leg), the recorder's time, the agent audio
   queues and their drops, the event backlog (the outbox writer's memory and its disk spool).
   A live call's figures are read from it; an ended call's are added to totals once, when it
   ends, so the counters never go down.

One ``WorkerMetrics`` per process: ``process_metrics()`` (a forked child gets a fresh one on
first use, never its parent's). Components take ``metrics=None`` to mean that one; tests pass
their own. ``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is not used:
it cannot run custom collectors (so every figure of kind 2 would become an mmap write on the
packet path), wants the variable set before the import, a directory wiped between runs and
``mark_process_dead`` for its gauges. A parent that runs several worker processes instead
collects each child's ``render()`` and serves ``merge_expositions``, which labels every sample
with its ``process``; ``sum``/``max`` in PromQL then aggregate.

Everything here runs on the event loop's thread (``render`` reads live objects without locks):
serve it from an ``async def`` handler or ``MetricsServer``, never from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Metric,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from worker import gcpause, priority

__all__ = [
    "CALL_CAUSES",
    "CONTENT_TYPE",
    "AudioLane",
    "CallFigures",
    "EventBacklog",
    "LiveCall",
    "MetricsServer",
    "WorkerMetrics",
    "cause_label",
    "merge_expositions",
    "process_metrics",
]

log = logging.getLogger("worker.metrics")

# ``*_created`` series are OpenMetrics timestamps; in the 0.0.4 text format they are only noise.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text exposition format ``render`` writes (``prometheus_client.generate_latest``)."""
PREFIX = "aispinner_"
DIRECTIONS = ("inbound", "outbound")
FAILED_STATUSES = frozenset({"failed", "busy", "no-answer"})
"""A call's final status when it was never answered (``worker.session.status``)."""
CALL_CAUSES = frozenset(
    {
        # the far end and the network (``LegEnd`` causes of the SIP and ARI legs)
        "remote-bye",
        "cancelled",
        "busy",
        "no-answer",
        "rejected",
        "failed",
        "unallocated",
        "congestion",
        "timeout",
        "transport-error",
        "auth-failed",
        "unresolvable",
        "dialog-gone",
        "dialog-timeout",
        "ack-timeout",
        "bad-sdp",
        "no-media-port",
        "rtp-timeout",
        "media-unsendable",
        "media-lost",
        "session-limit",
        "ari-error",
        # the worker
        "local-hangup",
        "shutdown",
        "worker-error",
        "handler-error",
        "no-handler",
        "no-route",
        "no-agent",
        # the agent, through the session
        "agent-hangup",
        "agent-finished",
        "agent-failed",
        "agent-lost",
        "agent-unreachable",
        "declined",
        "bridge-ended",
    }
)
"""The ``cause`` label's values (``SessionResult.cause`` / ``call.done``); any other token is
counted as ``other``, so the label set stays bounded whatever a peer sends."""

TICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)
"""Seconds; the tick's budget is 0.02 (every call's 20 ms of media in one tick)."""
JITTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5)


def cause_label(cause: str | None) -> str:
    """``cause`` when it is a known token, else ``other`` (``unknown`` for none)."""
    if cause is None:
        return "unknown"
    return cause if cause in CALL_CAUSES else "other"


# --------------------------------------------------------------------------- what is read


@dataclass(frozen=True, slots=True)
class CallFigures:
    """What one call's media path has counted so far: its leg's RTP (received, sent, lost,
    late, concealed, the RFC 3550 interarrival jitter now) and the recorder's time and frames."""

    packets_in: int = 0
    packets_out: int = 0
    lost: int = 0
    late: int = 0
    concealed_s: float = 0.0
    jitter_s: float = 0.0
    recorder_s: float = 0.0
    recorder_frames: int = 0


class LiveCall(Protocol):
    """A running call (``CallSession``)."""

    def metric_figures(self) -> CallFigures: ...


class AudioLane(Protocol):
    """An agent socket's bounded audio queue (``worker.agent.connection``'s audio lanes)."""

    @property
    def queued_ms(self) -> float: ...

    @property
    def dropped_frames(self) -> int: ...

    @property
    def dropped_ms(self) -> float: ...


class SpoolSize(Protocol):
    """The outbox's on-disk spool (``worker.store.spool.Spool``)."""

    @property
    def dropped(self) -> int: ...

    def __len__(self) -> int: ...


class EventBacklog(Protocol):
    """An outbox writer (``worker.store.outbox.OutboxWriter``)."""

    @property
    def spool(self) -> SpoolSize: ...

    @property
    def events_written(self) -> int: ...

    @property
    def database_ok(self) -> bool: ...

    @property
    def pending(self) -> int: ...


# --------------------------------------------------------------------------- the registry


class WorkerMetrics:
    """One process's metrics on its own ``CollectorRegistry`` (never the global one).

    Counted as it happens: ``call_setups``, ``call_failures``, ``call_hangups`` (through
    ``call_started`` / ``call_ended``), ``tick_duration``, ``ticks_skipped`` (the pacer),
    ``rtp_jitter``. Read at scrape time: the calls between ``call_started`` and
    ``call_ended``, the agent audio lanes between ``lane_opened`` and ``lane_closed``, and the
    outbox writers between ``track_event_backlog`` and ``untrack_event_backlog``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        """``process``: also the standard ``process_*`` figures (CPU, memory, open files)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.call_setups = Counter(
            f"{PREFIX}call_setups",
            "Calls that reached a session (an admitted inbound call, an outbound call placed).",
            ["direction"],
            registry=r,
        )
        self.call_failures = Counter(
            f"{PREFIX}call_failures",
            "Calls that ended without being answered (failed, busy, no-answer), by cause.",
            ["direction", "cause"],
            registry=r,
        )
        self.call_hangups = Counter(
            f"{PREFIX}call_hangups",
            "Answered calls that ended, by what ended them.",
            ["direction", "cause"],
            registry=r,
        )
        self.tick_duration = Histogram(
            f"{PREFIX}media_tick_duration_seconds",
            "Time one 20 ms media tick took for every call it drove.",
            buckets=TICK_BUCKETS,
            registry=r,
        )
        self.ticks_skipped = Counter(
            f"{PREFIX}media_ticks_skipped",
            "Media ticks skipped because the event loop stalled past the pacer's catch-up.",
            registry=r,
        )
        self.rtp_jitter = Histogram(
            f"{PREFIX}rtp_jitter_seconds",
            "Each ended call's RTP interarrival jitter (RFC 3550) of the caller's stream.",
            buckets=JITTER_BUCKETS,
            registry=r,
        )
        for direction in DIRECTIONS:
            self.call_setups.labels(direction)
        self._calls: set[LiveCall] = set()
        self._ended = _Totals()
        self._lanes: weakref.WeakSet[AudioLane] = weakref.WeakSet()
        self._lanes_dropped_frames = 0
        self._lanes_dropped_ms = 0.0
        self._writers: set[EventBacklog] = set()
        r.register(_ScrapeCollector(self))
        if process:
            ProcessCollector(registry=r)

    # -- calls ---------------------------------------------------------------------------------
    def call_started(self, call: LiveCall, direction: str) -> None:
        self._calls.add(call)
        self.call_setups.labels(direction).inc()

    def call_ended(
        self, call: LiveCall, direction: str, status: str | None, cause: str | None
    ) -> None:
        """The call is over: its figures go to the totals (once), and it is counted as a
        failure (never answered) or a hangup by ``cause``; ``status`` None (a call cancelled
        before it had a result) counts only its figures."""
        if call not in self._calls:
            return
        self._calls.discard(call)
        figures = _read(call)
        self._ended.add(figures)
        if figures.packets_in:
            self.rtp_jitter.observe(figures.jitter_s)
        if status is None:
            return
        counter = self.call_failures if status in FAILED_STATUSES else self.call_hangups
        counter.labels(direction, cause_label(cause)).inc()

    # -- agent audio lanes ---------------------------------------------------------------------
    def lane_opened(self, lane: AudioLane) -> None:
        self._lanes.add(lane)

    def lane_closed(self, lane: AudioLane) -> None:
        """The lane is closed: what it dropped goes to the totals (once)."""
        if lane in self._lanes:
            self._lanes.discard(lane)
            self._lanes_dropped_frames += lane.dropped_frames
            self._lanes_dropped_ms += lane.dropped_ms

    # -- the event backlog ---------------------------------------------------------------------
    def track_event_backlog(self, writer: EventBacklog) -> None:
        self._writers.add(writer)

    def untrack_event_backlog(self, writer: EventBacklog) -> None:
        self._writers.discard(writer)

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition (format 0.0.4), for ``GET /metrics`` (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

    def collect_scrape(self) -> Iterator[Metric]:
        """The figures read at scrape time (see the module docstring)."""
        live = [_read(call) for call in self._calls]
        totals = _Totals()
        totals.add(self._ended)
        for figures in live:
            totals.add(figures)
        yield _gauge("calls_active", "Calls with a running session.", len(live))
        yield _counter(
            "rtp_received_packets", "RTP packets received on calls' legs.", totals.packets_in
        )
        yield _counter("rtp_sent_packets", "RTP packets sent on calls' legs.", totals.packets_out)
        yield _counter(
            "rtp_lost_packets",
            "RTP packets not there when their turn to play came (skipped by the jitter buffer).",
            totals.lost,
        )
        yield _counter(
            "rtp_late_packets",
            "RTP packets dropped because their place had already been played or concealed.",
            totals.late,
        )
        yield _counter(
            "rtp_concealed_seconds",
            "Caller audio the jitter buffer had to conceal (lost or late packets).",
            totals.concealed_s,
        )
        yield _gauge(
            "rtp_jitter_max_seconds",
            "The largest RTP interarrival jitter among running calls.",
            max((figures.jitter_s for figures in live), default=0.0),
        )
        yield _counter(
            "recorder_encode_seconds",
            "Time spent writing recordings (MP3 encoding and file writes).",
            totals.recorder_s,
        )
        yield _counter(
            "recorder_frames", "20 ms stereo frames written to recordings.", totals.recorder_frames
        )
        lanes = list(self._lanes)
        yield _gauge(
            "agent_audio_sockets", "Agent audio sockets open (listen, Twilio).", len(lanes)
        )
        yield _gauge(
            "agent_audio_queued_seconds",
            "Caller audio waiting in agent sockets' send queues.",
            sum(lane.queued_ms for lane in lanes) / 1000,
        )
        yield _counter(
            "agent_audio_dropped_frames",
            "Caller audio frames dropped because an agent socket could not keep up.",
            self._lanes_dropped_frames + sum(lane.dropped_frames for lane in lanes),
        )
        yield _counter(
            "agent_audio_dropped_seconds",
            "Caller audio dropped because an agent socket could not keep up.",
            (self._lanes_dropped_ms + sum(lane.dropped_ms for lane in lanes)) / 1000,
        )
        writers = list(self._writers)
        if writers:
            yield _gauge(
                "outbox_pending_events",
                "Events in memory waiting for the outbox writer.",
                sum(writer.pending for writer in writers),
            )
            yield _gauge(
                "event_spool_events",
                "Events on disk waiting for PostgreSQL to answer again.",
                sum(len(writer.spool) for writer in writers),
            )
            yield _counter(
                "event_spool_dropped_events",
                "Events dropped because the spool was full.",
                sum(writer.spool.dropped for writer in writers),
            )
            yield _counter(
                "outbox_written_events",
                "Events written to the outbox.",
                sum(writer.events_written for writer in writers),
            )
            yield _gauge(
                "outbox_database_up",
                "1 when the outbox writer's last write reached PostgreSQL, else 0.",
                1 if all(writer.database_ok for writer in writers) else 0,
            )
        yield from _gc_families()
        yield _gauge(
            "realtime_priority",
            "The SCHED_RR priority this process runs at (realtime_priority); 0: the normal"
            " scheduler, as asked or because the kernel refused (see the log).",
            priority.current(),
        )


def _gc_families() -> Iterator[Metric]:
    """Garbage collector pauses by generation (``worker.gcpause``)."""
    collections = CounterMetricFamily(
        PREFIX + "gc_collections",
        "Garbage collections, by generation (2: full).",
        labels=["generation"],
    )
    paused = CounterMetricFamily(
        PREFIX + "gc_pause_seconds",
        "Time the process stood still in garbage collections, by generation.",
        labels=["generation"],
    )
    longest = GaugeMetricFamily(
        PREFIX + "gc_longest_pause_seconds",
        "The longest garbage collection pause so far, by generation.",
        labels=["generation"],
    )
    for index, generation in enumerate(gcpause.pauses().generations):
        collections.add_metric([str(index)], generation.collections)
        paused.add_metric([str(index)], generation.seconds)
        longest.add_metric([str(index)], generation.longest_s)
    yield collections
    yield paused
    yield longest


class _Totals:
    """Mutable sums of ``CallFigures`` (ended calls, then a scrape's view)."""

    __slots__ = (
        "concealed_s",
        "late",
        "lost",
        "packets_in",
        "packets_out",
        "recorder_frames",
        "recorder_s",
    )

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_out = 0
        self.lost = 0
        self.late = 0
        self.concealed_s = 0.0
        self.recorder_s = 0.0
        self.recorder_frames = 0

    def add(self, figures: CallFigures | _Totals) -> None:
        self.packets_in += figures.packets_in
        self.packets_out += figures.packets_out
        self.lost += figures.lost
        self.late += figures.late
        self.concealed_s += figures.concealed_s
        self.recorder_s += figures.recorder_s
        self.recorder_frames += figures.recorder_frames


def _read(call: LiveCall) -> CallFigures:
    """A call's figures; one that cannot be read counts as nothing (logged), never failing a
    scrape or the end of a call."""
    try:
        return call.metric_figures()
    except Exception:
        log.exception("call figures unreadable")
        return CallFigures()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


class _ScrapeCollector:
    """The figures ``WorkerMetrics`` reads at scrape time, as one ``prometheus_client``
    collector."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect_scrape()

    def describe(self) -> Iterable[Metric]:
        return list(self._metrics.collect_scrape())


# --------------------------------------------------------------------------- per process

_process: WorkerMetrics | None = None


def process_metrics() -> WorkerMetrics:
    """This process's ``WorkerMetrics`` (made on first use; a forked child makes its own)."""
    global _process
    if _process is None:
        _process = WorkerMetrics()
    return _process


def _forget_after_fork() -> None:
    global _process
    _process = None


os.register_at_fork(after_in_child=_forget_after_fork)


def merge_expositions(parts: Mapping[str, str | bytes], label: str = "process") -> bytes:
    """Several processes' expositions (``render()``) as one: each family once (the first
    process's HELP and TYPE), every sample labelled ``label`` = its key in ``parts``."""
    families: dict[str, Metric] = {}
    for key, text in parts.items():
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, label: key}))
    return generate_latest(_Families(families.values()))


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


# --------------------------------------------------------------------------- the scrape server

Render = Callable[[], bytes] | Callable[[], Awaitable[bytes]]
READ_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8192


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on ``host``:``port``, in the running event loop (no
    thread, so ``render`` may read live objects): for a worker whose API is off, or a parent
    serving its children's merged figures (``render`` may be async). One request per
    connection; other paths get 404, other methods 405. No authentication: bind it to a
    private address the scraper reaches."""

    def __init__(self, render: Render, host: str = "127.0.0.1", port: int = 9464) -> None:
        self._render = render
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (``port`` is then the real one, also for 0); raises ``OSError``."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), READ_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            writer.write(await self._respond(head))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics request failed")
            with contextlib.suppress(ConnectionError):
                writer.write(_response(500, b"metrics failed\n"))
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response(404, b"not found: try /metrics\n")
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
        body = self._render()
        if inspect.isawaitable(body):
            body = await body
        assert isinstance(body, bytes)
        return _response(200, body, CONTENT_TYPE, head_only=method == b"HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    reason = _REASONS.get(status, "Internal Server Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode() + extra
    return head + b"\r\n" + (b"" if head_only else body)
