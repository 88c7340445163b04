"""Drive the real SIPp (Debian ``sip-tester``) from tests and benches: loopback only, explicit
ports, a bounded run time, trace files read back for failure reasons, and the process always
reaped (``async with Sipp(...)`` kills it on the way out, whatever happened)."""

from __future__ import annotations

import asyncio
import csv
import os
import random
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SIPP_SHARE = Path("/usr/share/sip-tester")
SCENARIOS = Path(__file__).parent / "integration" / "scenarios"


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind((host, port))
        except OSError:
            return False
    return True


FREE_PORTS = range(61000, 64800)
"""Where ``free_port`` looks: above the kernel's ephemeral range (32768-60999 here, which any
``bind(0)`` or outgoing connection may take at any moment), so the kernel never hands these
ports out on its own; clear of the worker's and the load test's RTP ranges (20000-32000) and of
Asterisk's default one (10000-19999, which the worker refuses to overlap), with room for a
test's 200-port RTP range below 65000."""


_next: list[int] = []
"""Where ``free_port`` looks next (empty until the first call, which starts at random)."""


def free_port(host: str = "127.0.0.1", *, span: int = 2) -> int:
    """An even port that is free for both UDP and TCP right now, with the ``span - 1`` ports
    above it free too (2: RTP and RTCP; 4: SIPp's ``-rtp_echo``, which also takes port + 2; a
    worker's RTP range: its size).

    Only "right now": nothing holds it until the caller binds it. It comes from ``FREE_PORTS``,
    where the kernel never hands out ports on its own, so only another explicit bind could take
    it in between (a port from the ephemeral range was once taken by another socket first:
    "Address already in use" in CI). The spans are handed out in turn from a random start, as
    the kernel hands out its ephemeral ports, so the ports one test asks for before binding any
    of them never meet (drawn at random, a worker's metrics port once fell inside its own RTP
    range, both picked here: "address already in use" in CI), and a span comes back only after
    the whole range has gone round."""
    span += span % 2  # keep every start even
    if not _next:
        _next.append(random.randrange(FREE_PORTS.start, FREE_PORTS.stop, 2))
    for _ in range(len(FREE_PORTS) // 2):
        port = _next[0]
        if port + span > FREE_PORTS.stop:
            port = FREE_PORTS.start
        _next[0] = port + span
        if all(_bindable(host, p) for p in range(port, port + span)):
            return port
    raise RuntimeError("no free port found")


def _bound(port: int) -> bool | None:
    """Whether a UDP socket is bound to ``port`` or a TCP one listens on it, read from
    ``/proc/net`` so that looking never binds the port (None where there is no ``/proc``)."""
    try:
        tables = [(Path(f"/proc/net/{name}").read_text(), name) for name in ("udp", "tcp")]
    except OSError:
        return None
    for text, name in tables:
        for line in text.splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and (name == "udp" or state == "0A"):
                return True
    return False


def port_in_use(port: int, kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class SippResult:
    returncode: int
    stdout: str
    stderr: str
    errors: str
    messages: str
    stats: dict[str, str] = field(default_factory=dict)
    """The last row of SIPp's ``-trace_stat`` file (column name -> value)."""

    def explain(self) -> str:
        return (
            f"sipp exited {self.returncode}\n--- stdout\n{self.stdout[-2500:]}\n"
            f"--- stderr\n{self.stderr[-3000:]}\n"
            f"--- errors\n{self.errors[-3000:]}\n--- messages\n{self.messages[-6000:]}"
        )

    def stat(self, name: str) -> int:
        """A cumulative counter of the stats file, e.g. ``stat("SuccessfulCall")``."""
        return int(self.stats[f"{name}(C)"])

    def received(self, start_line: str) -> list[str]:
        """The messages SIPp received whose first line starts with ``start_line``."""
        return [m for m in _traced(self.messages, "received") if m.startswith(start_line)]

    def sent(self, start_line: str) -> list[str]:
        """The messages SIPp sent whose first line starts with ``start_line``."""
        return [m for m in _traced(self.messages, "sent") if m.startswith(start_line)]


@dataclass
class Sipp:
    """One SIPp process. ``args`` are extra arguments (scenario, -m, -r, ...).

    ``timeout_s`` bounds the whole run (SIPp's ``-timeout``, then a kill 15 s later);
    ``trace_msg`` logs every message (turn it off for load, it costs SIPp a lot)."""

    workdir: Path
    remote: str | None
    args: list[str]
    port: int = field(default_factory=free_port)
    media_port: int = field(default_factory=lambda: free_port(span=4))
    timeout_s: float = 60.0
    trace_msg: bool = True
    process: asyncio.subprocess.Process | None = None
    result: SippResult | None = None

    def command(self) -> list[str]:
        sipp = shutil.which("sipp")
        if sipp is None:
            raise RuntimeError("sipp is not installed: run `make test`, it installs sip-tester")
        cmd = [
            sipp,
            *([self.remote] if self.remote else []),
            "-i", "127.0.0.1",
            "-mi", "127.0.0.1",
            "-ci", "127.0.0.1",
            "-cp", str(free_port()),
            "-bind_local",
            "-nostdin",
            "-p", str(self.port),
            "-mp", str(self.media_port),
            "-timeout", f"{int(self.timeout_s)}s",
            "-timeout_error",
            "-trace_err", "-error_file", str(self.workdir / "errors.log"),
            "-trace_stat", "-stf", str(self.workdir / "stats.csv"), "-fd", "1",
            *(["-trace_msg", "-message_file", str(self.workdir / "messages.log")]
              if self.trace_msg else []),
            *self.args,
        ]  # fmt: skip
        return cmd

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pcap = self.workdir / "pcap"
        if not pcap.exists():
            pcap.symlink_to(SIPP_SHARE)
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "TERM": "dumb"},
        )

    async def ready(self, timeout_s: float = 5.0) -> None:
        """Wait until SIPp listens on its SIP port (for scenarios where SIPp is the server)."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._listening():
            if self.process.returncode is not None or loop.time() > deadline:
                self.kill()
                result = await self.wait()
                raise RuntimeError(f"SIPp did not start listening\n{result.explain()}")
            await asyncio.sleep(0.02)

    def _listening(self) -> bool:
        bound = _bound(self.port)
        if bound is not None:
            return bound
        # No /proc: probe by binding, which can (rarely) make SIPp's own bind fail.
        return port_in_use(self.port) or port_in_use(self.port, socket.SOCK_STREAM)

    async def wait(self) -> SippResult:
        assert self.process is not None
        if self.result is not None:
            return self.result
        try:
            out, err = await asyncio.wait_for(self.process.communicate(), self.timeout_s + 15)
        except TimeoutError:
            self.kill()
            out, err = await self.process.communicate()
        self.result = SippResult(
            returncode=self.process.returncode if self.process.returncode is not None else -1,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            errors=_read(self.workdir / "errors.log"),
            messages=_read(self.workdir / "messages.log"),
            stats=_last_stats(self.workdir / "stats.csv"),
        )
        return self.result

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def run(self) -> SippResult:
        async with self:  # killed and reaped even if the wait is cancelled
            return await self.wait()

    async def __aenter__(self) -> Sipp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            self.kill()
            await self.process.communicate()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _last_stats(path: Path) -> dict[str, str]:
    text = _read(path)
    rows = list(csv.reader(text.splitlines(), delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def _traced(log: str, direction: str) -> list[str]:
    """Split SIPp's ``-trace_msg`` log into the messages it ``sent`` or ``received``."""
    out: list[str] = []
    for block in log.split("\n-----------------------------------------------"):
        lines = block.split("\n")
        # lines[0]: the timestamp; lines[1]: "UDP message sent (535 bytes):"
        if len(lines) < 3 or f"message {direction}" not in lines[1]:
            continue
        out.append("\n".join(lines[2:]).replace("\r", "").strip("\n") + "\n")
    return out
