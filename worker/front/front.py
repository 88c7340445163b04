"""The front: one process that owns the SIP address and the durable side, and supervises the
media processes that carry the calls (``aispinner-worker run`` with ``processes`` > 1).

Why this shape: a call's 20 ms path (its RTP sockets, jitter buffer, agent socket, recorder)
must never cross a process boundary, and a host must keep one SIP address for its trunks.
So the front only moves signalling: each SIP message it receives goes, whole, to the media
process that owns its Call-ID (``shard.py``: a pure function, so the front keeps no state per
call and survives nothing it has to rebuild), and each message a media process sends is put
on the wire by the front from the same address. RTP goes straight between the phone and the
media process: each process has its own slice of the RTP port range. Calls through Asterisk
are spread the same way: the front holds the Stasis application's one events connection and
hands each event to the process that owns the call it names (``ari_relay.py``); that process
makes the REST calls and carries the ExternalMedia RTP itself.

The front also runs the private PostgreSQL (when there is no ``database_url``), the hub, the
API, webhooks and the upstream push (``Backend(role="front")``); the media processes write
their events to the same database. ``POST /telephony/calls`` is passed to a media process in
turn. A malformed message gets its 400 from the front, statelessly.

Supervision: a media process that exits (a crash, a SIGKILL) loses only its own calls; it is
started again with the same index (after 0.5 s, doubling to 30 s while it keeps failing
within 10 s), so it owns the same Call-IDs and answers their in-dialog requests 481. Until it
is ready (at start-up too: the SIP socket opens first, so a taken address fails at once), its
messages (and ARI events) are held, up to ``HELD_MAX`` and ``HELD_MAX_AGE_S``, and handed over
in order when it is; older ones are dropped and counted (the peer has retransmitted them by
then; an Asterisk call still ringing is found again by the process's resync). SIGTERM or SIGINT
drains: every media process stops taking calls (503), lets live calls end within
``drain_grace_s``, hangs up the rest and flushes; the front keeps carrying their signalling
until the last one exits, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker import gcpause, priority
from worker.ari.client import AriAuthError
from worker.backend import Backend, BackendError
from worker.config import Settings
from worker.errors import ConfigError, RemoteError, WorkerError
from worker.events.bus import EventBus
from worker.front.ari_relay import AriRelay
from worker.front.channel import Channel
from worker.front.ipc import AriFrame, ControlFrame, Frame, SipFrame, encode_control, encode_sip
from worker.front.shard import shard_of
from worker.legs import Address
from worker.metrics import MetricsServer, merge_expositions, process_metrics
from worker.sip.message import Message, SipMessageError, error_response, generate_tag
from worker.sip.transaction import Transport
from worker.sip.transport import SipTransport

log = logging.getLogger("worker.front")

READY_TIMEOUT_S = 60.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 10.0
"""A process that ran this long before exiting restarts after RESTART_MIN_S again."""
KILL_AFTER_S = 10.0
"""After the drain grace, how long the front waits for a media process before SIGKILL."""
MIN_PORTS_PER_PROCESS = 8
HELD_MAX = 1000
"""Messages held for a media process that is not ready yet (beyond: the oldest dropped)."""
HELD_MAX_AGE_S = 4.0
"""A held message older than this when its process becomes ready is dropped: its sender has
retransmitted it, or given up (an INVITE answered then would ring nobody)."""
METRICS_TIMEOUT_S = 2.0


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1


class FrontError(WorkerError):
    """The front cannot start; the message names the setting to change."""


def process_count(settings: Settings) -> int:
    return settings.processes or os.cpu_count() or 1


def media_settings(
    settings: Settings, index: int, processes: int, database_url: str | None
) -> Settings:
    """Media process ``index``'s settings: its slice of the RTP ports (even-aligned), its share
    of ``sip.max_calls`` and of the per-source rate limit, the front's database, no API."""
    rtp = settings.rtp
    first = rtp.port_min + (rtp.port_min % 2)
    pairs = (rtp.port_max - first + 1) // 2
    per = pairs // processes
    if per * 2 < MIN_PORTS_PER_PROCESS:
        raise ConfigError(
            f"rtp.port_min..port_max ({rtp.port_min}-{rtp.port_max}) is too small for"
            f" {processes} processes: give each at least {MIN_PORTS_PER_PROCESS} ports, or set"
            " processes lower"
        )
    low = first + index * per * 2
    high = low + per * 2 - 1
    sip = settings.sip
    return settings.model_copy(
        update={
            "rtp": rtp.model_copy(update={"port_min": low, "port_max": high}),
            "sip": sip.model_copy(
                update={
                    "max_calls": max(1, math.ceil(sip.max_calls / processes)),
                    "rate_limit_per_second": sip.rate_limit_per_second / processes,
                    "rate_limit_burst": max(1, math.ceil(sip.rate_limit_burst / processes)),
                }
            ),
            "database_url": database_url if settings.store else settings.database_url,
            "api": settings.api.model_copy(update={"enabled": False}),
            "processes": 1,
        }
    )


@dataclass(eq=False)
class MediaChild:
    """One supervised media process."""

    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Future[None] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_MIN_S
    dropped: int = 0
    held: deque[tuple[float, bytes]] = field(default_factory=lambda: deque(maxlen=HELD_MAX))
    """SIP frames that came while it was not ready, with when they came."""
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def up(self) -> bool:
        return self.channel is not None and not self.channel.closed and self.ready is not None \
            and self.ready.done() and not self.ready.cancelled() \
            and self.ready.exception() is None  # fmt: skip


class Front:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes = process_count(settings)
        self.children = [MediaChild(i) for i in range(self.processes)]
        self.backend: Backend | None = None
        self.transport: SipTransport | None = None
        self.database_url: str | None = settings.database_url
        self._stopping = False
        self._supervisors: set[asyncio.Task[None]] = set()
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_call = 0
        self._turn = 0
        self.routed = 0
        self.clock = time.monotonic  # when held messages came (tests set it)
        self.malformed = 0
        self.metrics_server: MetricsServer | None = None
        self.ari: AriRelay | None = None

    # -- start -------------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.processes):
            media_settings(settings, index, self.processes, None)  # fail early on a bad split
        if settings.store:
            base = settings.worker_id or f"{socket.gethostname()}:{settings.sip.port}"
            self.backend = Backend(
                settings, EventBus(), base, role="front", metrics=self.render_metrics
            )
            try:
                await self.backend.start(self.place_call)
            except BackendError as exc:
                await self.close()
                raise FrontError(str(exc)) from exc
            self.database_url = self.backend.url
        sip = settings.sip
        self.transport = SipTransport.from_settings(sip, self._route, self._malformed)
        try:
            await self.transport.start()
        except OSError as exc:
            await self.close()
            raise FrontError(
                f"cannot listen for SIP on {sip.host}:{sip.port} ({exc.strerror or exc}): "
                "set sip.host / sip.port (AISPINNER_SIP__HOST / AISPINNER_SIP__PORT) "
                "to a free address"
            ) from exc
        if "ari" in settings.ingress:
            self.ari = AriRelay(settings.ari, self.processes, self._send_ari, self._announce_ari)
            try:
                await self.ari.start()
            except AriAuthError as exc:
                await self.close()
                raise FrontError(exc.advice(settings.ari.url)) from exc
        metrics = settings.metrics
        if metrics.enabled:
            server = MetricsServer(self.render_metrics, metrics.host, metrics.port)
            try:
                await server.start()
            except OSError as exc:
                await self.close()
                raise FrontError(
                    f"cannot serve metrics on {metrics.host}:{metrics.port}"
                    f" ({exc.strerror or exc}): set metrics.host / metrics.port"
                    " (AISPINNER_METRICS__PORT) to a free address, or metrics.enabled = false"
                ) from exc
            self.metrics_server = server
        try:
            await asyncio.gather(*(self._spawn(child) for child in self.children))
        except FrontError:
            await self.close()
            raise
        for child in self.children:
            task = asyncio.get_running_loop().create_task(self._supervise(child))
            self._supervisors.add(task)
            task.add_done_callback(self._supervisors.discard)
        gcpause.settle()
        log.info(
            "front listening",
            extra={
                "host": sip.host,
                "port": self.transport.port,
                "processes": self.processes,
                "pids": [c.process.pid for c in self.children if c.process is not None],
            },
        )

    def stopping(self) -> bool:
        return self._stopping

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.port

    async def _spawn(self, child: MediaChild) -> None:
        """Start media process ``child.index`` and wait for its ``ready``."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker.front.media",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        child.exited = asyncio.Event()
        child.started_at = time.monotonic()
        child.ready = loop.create_future()
        child.channel = Channel(
            ours, lambda frame: self._from_child(child, frame), lambda: self._child_lost(child)
        )
        child.channel.start()
        settings = media_settings(self.settings, child.index, self.processes, self.database_url)
        child.channel.send(
            encode_control(
                {
                    "op": "settings",
                    "index": child.index,
                    "processes": self.processes,
                    "grace_s": self.settings.drain_grace_s,
                    "settings": settings.model_dump(mode="json"),
                }
            )
        )
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), READY_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            raise FrontError(f"media process {child.index} did not start: {exc}") from exc
        except RuntimeError as exc:
            raise FrontError(f"media process {child.index} did not start: {exc}") from exc

    async def _supervise(self, child: MediaChild) -> None:
        while True:
            process = child.process
            assert process is not None
            code = await process.wait()
            if child.channel is not None:
                child.channel.close()
            child.exited.set()
            if self._stopping:
                return
            ran = time.monotonic() - child.started_at
            child.backoff_s = RESTART_MIN_S if ran >= STABLE_S else min(
                RESTART_MAX_S, child.backoff_s * 2
            )  # fmt: skip
            child.restarts += 1
            log.error(
                "media process exited; its calls are lost; starting it again",
                extra={
                    "index": child.index,
                    "pid": process.pid,
                    "exit_code": code,
                    "ran_s": round(ran, 1),
                    "restart_in_s": child.backoff_s,
                },
            )
            await asyncio.sleep(child.backoff_s)
            if self.stopping():
                return
            try:
                await self._spawn(child)
            except (FrontError, OSError) as exc:
                log.error("media process restart failed", extra={"index": child.index,
                                                                  "error": str(exc)})  # fmt: skip

    # -- signalling ---------------------------------------------------------------------------
    def _route(self, message: Message, source: Address, transport: Transport) -> None:
        child = self.children[shard_of(message.call_id, self.processes)]
        self._send_to(child, encode_sip(transport, source, message.raw))

    def _send_ari(self, index: int, frame: bytes) -> None:
        self._send_to(self.children[index], frame)

    def _send_to(self, child: MediaChild, frame: bytes) -> None:
        """A frame for ``child``: now, or held until it is ready (in order, bounded)."""
        channel = child.channel
        if channel is None or channel.closed or child.ready is None or not child.ready.done():
            if len(child.held) == HELD_MAX:
                child.dropped += 1  # the oldest goes
            child.held.append((self.clock(), frame))
            return
        self.routed += 1
        channel.send(frame)

    def _hand_over(self, child: MediaChild) -> None:
        """What came while ``child`` was not ready, in order, now that it is."""
        channel = child.channel
        if channel is None:
            return
        oldest = self.clock() - HELD_MAX_AGE_S
        handed = stale = 0
        while child.held:
            at, frame = child.held.popleft()
            if at < oldest:
                stale += 1
                continue
            handed += 1
            channel.send(frame)
        self.routed += handed
        child.dropped += stale
        if handed or stale:
            log.info(
                "messages held until the media process was ready",
                extra={
                    "index": child.index,
                    "handed_over": handed,
                    "too_old": stale,
                    "dropped": child.dropped,  # too old, and beyond HELD_MAX, since it started
                },
            )

    def _announce_ari(self, up: bool) -> None:
        """Asterisk's events connection came (the trunks pushed) or went: every running media
        process is told (on ``up`` it resyncs its calls)."""
        for child in self.children:
            if child.up:
                assert child.channel is not None
                child.channel.send(encode_control({"op": "ari", "up": up}))

    def _malformed(self, error: SipMessageError, source: Address, transport: Transport) -> None:
        self.malformed += 1
        response = error_response(error, to_tag=generate_tag())
        if response is not None and self.transport is not None:
            self.transport.send(response.serialize(), source, transport)

    def _from_child(self, child: MediaChild, frame: Frame) -> None:
        if isinstance(frame, SipFrame):
            if self.transport is not None:
                self.transport.send(frame.data, frame.peer, frame.transport)
        elif isinstance(frame, AriFrame):
            log.warning("ARI frame from a media process ignored", extra={"index": child.index})
        else:
            self._control(child, frame)

    def _control(self, child: MediaChild, frame: ControlFrame) -> None:
        if frame.op == "ready":
            if child.ready is not None and not child.ready.done():
                child.ready.set_result(None)
                self._hand_over(child)
                if self.ari is not None and self.ari.up and child.channel is not None:
                    child.channel.send(encode_control({"op": "ari", "up": True}))
        elif frame.op == "failed":
            if child.ready is not None and not child.ready.done():
                child.ready.set_exception(RuntimeError(str(frame.message.get("error"))))
        elif frame.op in ("called", "metrics"):
            waiter = self._calls.pop(_int(frame.message.get("id")), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame.message)
        else:
            log.warning("unknown control message", extra={"op": frame.op, "index": child.index})

    def _child_lost(self, child: MediaChild) -> None:
        if child.ready is not None and not child.ready.done():
            child.ready.set_exception(ConnectionError("it closed its socket"))

    # -- placing a call (the API) ---------------------------------------------------------------
    async def place_call(
        self, number: str, trunk: str, route: str | None, from_user: str | None
    ) -> str:
        """Hand an outbound call to a running media process (in turn); its call id."""
        live = [c for c in self.children if c.up]
        if not live:
            raise RemoteError("no media process is running")
        child = live[self._turn % len(live)]
        self._turn += 1
        self._next_call += 1
        key = self._next_call
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[key] = waiter
        assert child.channel is not None
        child.channel.send(
            encode_control(
                {
                    "op": "call",
                    "id": key,
                    "number": number,
                    "trunk": trunk,
                    "route": route,
                    "from_user": from_user,
                }
            )
        )
        try:
            reply = await asyncio.wait_for(waiter, 120.0)
        finally:
            self._calls.pop(key, None)
        if "call_id" in reply:
            return str(reply["call_id"])
        error = str(reply.get("error", "the call could not be placed"))
        if reply.get("kind") == "config":
            raise ConfigError(error)
        raise RemoteError(error)

    # -- metrics --------------------------------------------------------------------------------
    async def render_metrics(self) -> bytes:
        """Every process's metrics in one exposition, each sample labelled ``process``
        (``front``, ``0``, ``1`` ...); a media process that does not answer within
        ``METRICS_TIMEOUT_S`` is left out of this scrape."""
        asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        loop = asyncio.get_running_loop()
        for child in self.children:
            if child.up and child.channel is not None:
                self._next_call += 1
                asked[child.index] = self._calls[self._next_call] = loop.create_future()
                child.channel.send(encode_control({"op": "metrics", "id": self._next_call}))
        parts: dict[str, str | bytes] = {"front": process_metrics().render()}
        if asked:
            await asyncio.wait(asked.values(), timeout=METRICS_TIMEOUT_S)
        for index, future in asked.items():
            if future.done():
                parts[str(index)] = str(future.result().get("text", ""))
            else:
                future.cancel()
        for key in [k for k, f in self._calls.items() if f.done()]:
            self._calls.pop(key, None)
        return merge_expositions(parts)

    # -- stop -----------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop taking calls everywhere, wait for the media processes to finish theirs."""
        self._stopping = True
        grace = self.settings.drain_grace_s
        for child in self.children:
            if child.channel is not None and not child.channel.closed:
                child.channel.send(encode_control({"op": "drain", "grace_s": grace}))
        waits = [c.exited.wait() for c in self.children if c.process is not None]
        if waits:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits],
                timeout=grace + SHUTDOWN_EXTRA_S + KILL_AFTER_S,
            )
            for pending in late:
                pending.cancel()
        for child in self.children:
            process = child.process
            if process is not None and process.returncode is None:
                log.error("media process did not finish: killed", extra={"index": child.index})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    def terminate(self) -> None:
        """SIGTERM to every media process (a draining one then ends its calls at once)."""
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()

    async def close(self) -> None:
        self._stopping = True
        for child in self.children:
            process = child.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            if child.channel is not None:
                child.channel.close()
        for task in list(self._supervisors):
            task.cancel()
        if self._supervisors:
            await asyncio.gather(*self._supervisors, return_exceptions=True)
        if self.ari is not None:  # after the media processes: their calls' events to the end
            await self.ari.close()
        if self.transport is not None:
            await self.transport.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.backend is not None:
            await self.backend.close()


SHUTDOWN_EXTRA_S = 5.0
"""What a media process needs after the grace: hang up, tell agents, flush (its own bound)."""


async def serve(settings: Settings, stop: asyncio.Event, now: asyncio.Event) -> None:
    """The front until ``stop``; then drain (``now``: a second signal, ends the calls at once:
    each media process gets SIGTERM, which cuts its drain short)."""
    priority.to_realtime(settings.realtime_priority)  # signalling is not starved by media
    front = Front(settings)
    await front.start()
    try:
        await stop.wait()
        log.info("draining", extra={"grace_s": settings.drain_grace_s})
        drain = asyncio.ensure_future(front.drain())
        cut = asyncio.ensure_future(now.wait())
        await asyncio.wait({drain, cut}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            front.terminate()
            await drain
        cut.cancel()
    finally:
        await front.close()
