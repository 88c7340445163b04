"""The load test's orchestration: start every process (the echo agent, the worker unless
``--target``, the probe phones, SIPp), ramp to the load, sample the worker once a second, stop
everything, and hand what was collected to ``analysis`` and ``report``.

Every process it starts is its child, in a session of its own (a Ctrl-C reaches only this
process, which then stops them in order) and asked to receive SIGTERM if this process dies
(``PR_SET_PDEATHSIG``). On the way out, whatever happened, each one still running is sent
SIGTERM, then SIGKILL, by its PID; so are the worker's media processes seen while sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from worker.errors import ConfigError
from worker.loadtest import analysis, report
from worker.loadtest import sipp as bulk
from worker.loadtest.probe import local_address_for
from worker.loadtest.procs import TreeMeter, TreeSample, read_stat, scheduling

PROTOCOLS = ("jambonz", "twilio")
READY_TIMEOUT_S = 60.0
AGENT_READY_TIMEOUT_S = 15.0
PROBE_ANSWER_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 15.0
DRAIN_GRACE_S = 2.0
SLACK_S = 90.0
"""How much longer than planned the load may take before it is stopped."""
OUTPUTS = (
    "results.json",
    "report.md",
    "worker.log",
    "agent.log",
    "probe.log",
    "agent_markers.jsonl",
    "agent_summary.json",
    "probe.json",
    *report.PLOTS.values(),
)


@dataclass
class Options:
    calls: int = 100
    rate: float = 10.0
    hold: float = 30.0
    processes: int = 0
    target: str | None = None
    out: Path = Path("loadtest-results")
    record: bool = True
    protocol: str = "jambonz"
    probes: int = 4
    number: str = "loadtest"
    agent_host: str = "127.0.0.1"
    agent_port: int = 0
    worker_pid: int | None = None
    keep: bool = False
    quiet: bool = False
    settings: tuple[tuple[str, str], ...] = ()
    """Worker settings to override (``rtp.jitter_min_ms``, ``20``), given to the worker it
    starts as ``AISPINNER_RTP__JITTER_MIN_MS=20``: to compare settings under one load."""

    def check(self) -> None:
        if self.calls < 1:
            raise ConfigError("--calls must be at least 1")
        if self.rate <= 0 or self.hold <= 0:
            raise ConfigError("--rate and --hold must be positive")
        if not 0 <= self.probes <= self.calls:
            raise ConfigError("--probes must be between 0 and --calls")
        if self.processes < 0:
            raise ConfigError("--processes must be 0 (one per core) or more")
        if self.settings and self.target is not None:
            raise ConfigError("--set changes the worker this tool starts: not with --target")
        for key, _ in self.settings:
            if not key or not all(part.isidentifier() for part in key.split(".")):
                raise ConfigError(
                    f"--set {key!r}: give SECTION.KEY=VALUE, e.g. rtp.jitter_min_ms=20"
                )
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}")
        if self.target is not None:
            host, colon, port = self.target.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ConfigError("--target must be HOST:PORT")
        if self.worker_pid is not None and read_stat(self.worker_pid) is None:
            raise ConfigError(f"--worker-pid {self.worker_pid}: no such process")

    @property
    def process_count(self) -> int:
        return self.processes or os.cpu_count() or 1

    def command(self) -> str:
        words = [
            "aispinner-worker", "loadtest",
            "--calls", str(self.calls), "--rate", f"{self.rate:g}", "--hold", f"{self.hold:g}",
            "--probes", str(self.probes), "--protocol", self.protocol, "--out", str(self.out),
        ]  # fmt: skip
        if self.target:
            words += ["--target", self.target]
        else:
            words += ["--processes", str(self.processes)]
        if self.worker_pid:
            words += ["--worker-pid", str(self.worker_pid)]
        if not self.record:
            words.append("--no-record")
        return shlex.join(words)


@dataclass(frozen=True)
class Plan:
    """When things happen: SIPp's calls start ``1/rate`` apart and each lasts ``call_s`` (the ramp
    plus the hold), so every call is up for ``hold`` seconds, then they end as they started."""

    bulk: int
    ramp_s: float
    call_s: float
    total_s: float

    @classmethod
    def of(cls, options: Options) -> Plan:
        bulk_calls = options.calls - options.probes
        ramp = bulk_calls / options.rate
        call_s = ramp + options.hold
        return cls(bulk_calls, ramp, call_s, ramp + call_s)


# -- the processes ------------------------------------------------------------------------------

_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    start_ticks: int | None
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None


class Children:
    """Every process the load test started, stopped by PID on the way out."""

    def __init__(self) -> None:
        self.items: list[Child] = []
        self.meters: list[TreeMeter] = []

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: Path | None = None,
        stderr: Path | None = None,
        pipe_stdout: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        logs: list[IO[bytes]] = []
        out: Any = asyncio.subprocess.DEVNULL
        err: Any = asyncio.subprocess.DEVNULL
        if pipe_stdout:
            out = asyncio.subprocess.PIPE
        elif stdout is not None:
            out = stdout.open("ab")
            logs.append(out)
        if stderr is not None:
            err = asyncio.subprocess.STDOUT if stderr == stdout else stderr.open("ab")
            if err is not asyncio.subprocess.STDOUT:
                logs.append(err)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError:
            for log in logs:
                log.close()
            raise
        stat = read_stat(process.pid)
        child = Child(name, process, None if stat is None else stat.start_ticks, logs)
        self.items.append(child)
        return child

    async def stop(self, child: Child, grace_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit code."""
        if child.running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        for log in child.logs:
            log.close()
        child.logs.clear()
        code = child.process.returncode
        return -1 if code is None else code

    async def stop_all(self) -> None:
        for child in reversed(self.items):
            with contextlib.suppress(Exception):
                await self.stop(child, 5.0)

    def kill_all_now(self) -> list[int]:
        """Synchronously SIGKILL every started process still alive (the same process: PID and
        start time), and the worker's media processes seen while sampling; the PIDs killed."""
        killed = []
        for child in self.items:
            stat = read_stat(child.pid)
            if stat is None or stat.start_ticks != child.start_ticks or stat.ppid != os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
        for meter in self.meters:
            if meter.root in {c.pid for c in self.items}:
                killed += meter.kill_survivors()
        return killed

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for child in self.items:
            out.setdefault(child.name, []).append(child.pid)
        for meter in self.meters:
            names = [c.name for c in self.items if c.pid == meter.root]
            if names:
                out[names[0]] = sorted(set(out[names[0]]) | set(meter.seen))
        return out


# -- helpers ---------------------------------------------------------------------------------------


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (SIP takes both): the kernel's pick for
    UDP, tried for TCP, another pick when TCP has it (a connection's local port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind((host, port))
            except OSError:
                continue
        return port
    raise ConfigError(f"no port free for both UDP and TCP on {host}")


def _rtp_range(span: int) -> int:
    """The first port of ``span`` free even-aligned UDP ports below the ephemeral range."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - span, 2)
        if all(_udp_free(base + i) for i in range(0, span, max(1, span // 16))):
            return base
    raise ConfigError(f"no free range of {span} RTP ports between 20000 and 32000")


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _worker_line(options: Options, target: str, scheduling: dict[str, int] | None) -> str:
    """The report's "Worker:": what the tool started, and the schedulers it ran under."""
    if scheduling is None:
        return f"at {target}, not started by the tool"
    recording = "recording" if options.record else "not recording"
    ran = ", ".join(f"{n} × {name}" for name, n in scheduling.items())
    return (
        f"started by the tool, {options.process_count} media processes ({recording};"
        f" scheduling: {ran or 'not read, the worker had gone'})"
    )


def worker_config(
    options: Options, work: Path, *, sip_port: int, rtp_min: int, rtp_max: int, agent_url: str
) -> str:
    """The worker's TOML for the run: loopback, JSON logs, no store, the rate limiter out of the
    way (it would measure itself, not the worker), room for every call in every process, and
    routes to the echo agent (one per probe, so the agent can tell the probes' calls apart
    whatever the protocol, then one for the bulk)."""
    processes = options.process_count
    routes = []
    for i in range(options.probes):
        routes.append(
            f'[[routes]]\nmatch = "{options.number}-probe-{i}"\naction = "agent"\n'
            f'agent_url = "{agent_url}probe/{i}"\nprotocol = "{options.protocol}"\n'
            f"record = {str(options.record).lower()}\n"
        )
    routes.append(
        f'[[routes]]\nmatch = "{options.number}*"\naction = "agent"\nagent_url = "{agent_url}"\n'
        f'protocol = "{options.protocol}"\nrecord = {str(options.record).lower()}\n'
    )
    return f"""# Written by aispinner-worker loadtest for one run.
data_dir = "{work / "data"}"
store = false
processes = {processes}
drain_grace_s = {DRAIN_GRACE_S}

[log]
level = "info"
format = "json"

[sip]
host = "127.0.0.1"
port = {sip_port}
max_calls = {options.calls * processes + 100}
rate_limit_per_second = 100000
rate_limit_burst = 100000

[rtp]
host = "127.0.0.1"
port_min = {rtp_min}
port_max = {rtp_max}

""" + "\n".join(routes)


def log_records(path: Path, message: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines whose ``msg`` is ``message``."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("msg") == message:
            out.append(record)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    out.append(value)
    return out


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class ProbeState:
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    up: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    markers_sent: int = 0
    echoes: int = 0


async def _read_probe(child: Child, state: ProbeState) -> None:
    stream = child.process.stdout
    assert stream is not None
    while line := await stream.readline():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "answered":
                state.up = int(event["up"])
                state.failed = int(event["failed"])
                state.failures = list(event.get("failures") or [])
                state.answered.set()
            elif event.get("event") in ("progress", "done"):
                state.up = int(event["up"])
                state.markers_sent = int(event.get("markers_sent", state.markers_sent))
                state.echoes = int(event.get("echoes", state.echoes))
    state.answered.set()
    state.up = 0


class Run:
    def __init__(self, options: Options, children: Children, say: Callable[[str], None]) -> None:
        self.options = options
        self.children = children
        self.say = say
        self.plan = Plan.of(options)
        self.out = options.out
        self.work = Path(tempfile.mkdtemp(prefix="aispinner-loadtest-"))
        self.notes: list[str] = []
        self.timeline: list[dict[str, Any]] = []
        self.idle: dict[str, Any] | None = None

    async def execute(self) -> dict[str, Any]:
        options, plan, out = self.options, self.plan, self.out
        sipp_binary = shutil.which("sipp")
        if plan.bulk and sipp_binary is None:
            raise ConfigError("sipp is not installed: run `make setup` (it installs sip-tester)")
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        agent, agent_url = await self._start_agent()
        worker: Child | None = None
        if options.target is None:
            worker, target = await self._start_worker(agent_url)
            worker_root: int | None = worker.pid
        else:
            target = options.target
            worker_root = options.worker_pid
            self.notes.append(
                f"the tool did not start the worker: it loaded {target}"
                + (
                    f" and measured process {worker_root} and its descendants"
                    if worker_root
                    else "; CPU and memory are not measured (--worker-pid PID measures a"
                    " process and its descendants)"
                )
            )
            self.notes.append(
                "loss at the worker and DTMF at the worker come from the worker's log: n/a here"
            )
        meters = {
            "worker": TreeMeter(worker_root) if worker_root else None,
            "agent": TreeMeter(agent.pid),
        }
        self.children.meters += [m for m in meters.values() if m is not None]
        await self._idle(meters["worker"])

        host, _, port = target.rpartition(":")
        target_address = (socket.gethostbyname(host.strip("[]")), int(port))
        local_ip = local_address_for(target_address)
        probe_state = ProbeState()
        probe: Child | None = None
        reader: asyncio.Task[None] | None = None
        t0 = time.monotonic()
        if options.probes:
            probe_seconds = plan.total_s + 1.0
            argv = [
                sys.executable, "-m", "worker.loadtest.probe",
                "--target", f"{target_address[0]}:{target_address[1]}",
                "--calls", str(options.probes), "--number", options.number,
                "--seconds", f"{probe_seconds:.3f}", "--local-ip", local_ip,
                "--out", str(out / "probe.json"),
            ]  # fmt: skip
            probe = await self.children.start(
                "probe", argv, pipe_stdout=True, stderr=out / "probe.log"
            )
            meters["probe"] = TreeMeter(probe.pid)
            reader = asyncio.create_task(_read_probe(probe, probe_state))
            try:
                await asyncio.wait_for(probe_state.answered.wait(), PROBE_ANSWER_TIMEOUT_S)
            except TimeoutError:
                self.notes.append("the probes were not answered in time")
            self.say(
                f"probes: {probe_state.up} of {options.probes} answered"
                + (f" ({'; '.join(probe_state.failures)})" if probe_state.failures else "")
            )
        sipp_child: Child | None = None
        sipp_dir = out / "sipp"
        if plan.bulk:
            assert sipp_binary is not None
            sipp_child = await self._start_sipp(sipp_binary, target, local_ip, sipp_dir)
            meters["sipp"] = TreeMeter(sipp_child.pid)
        self.say(
            f"load: {plan.bulk} SIPp calls at {options.rate:g}/s (ramp {plan.ramp_s:.1f} s,"
            f" each {plan.call_s:.1f} s) + {options.probes} probes, about"
            f" {plan.total_s:.0f} s"
        )
        await self._sample_until_done(t0, meters, sipp_child, probe, probe_state, sipp_dir)
        worker_scheduling = scheduling(worker.pid) if worker is not None else None

        # -- collect ----------------------------------------------------------------------------
        sipp_stats: dict[str, Any] | None = None
        setup_ms: list[float] = []
        if sipp_child is not None:
            code = await self.children.stop(sipp_child)
            now = bulk.read_stats(sipp_dir / "stats.csv")
            sipp_stats = {
                "exit_code": code,
                "successful": now.successful if now else 0,
                "failed": now.failed if now else 0,
                "started": now.started if now else 0,
            }
            setup_ms += bulk.response_times_ms(sipp_dir)
            if code != 0:
                errors = _tail(sipp_dir / "errors.log", 300)
                self.notes.append(f"SIPp exited {code}: see sipp/errors.log ({errors!r})")
        probes: list[dict[str, Any]] = []
        if probe is not None:
            code = await self.children.stop(probe, STOP_TIMEOUT_S)
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader, 5.0)
            result = _read_json(out / "probe.json")
            if isinstance(result, dict):
                probes = list(result.get("calls") or [])
            else:
                self.notes.append(f"the probes wrote no results (exit {code}): see probe.log")
            setup_ms += [float(c["setup_ms"]) for c in probes if c.get("setup_ms") is not None]
            kernel = sum(int(c["received"]["kernel_timestamps"]) for c in probes)
            packets = sum(int(c["received"]["packets"]) for c in probes)
            if packets and kernel < packets:
                self.notes.append(
                    "some probe arrivals were timed by the probe's own clock reads, not the"
                    f" kernel's ({kernel} of {packets} packets had kernel timestamps)"
                )
        call_records = None
        if worker is not None:
            code = await self.children.stop(worker, DRAIN_GRACE_S + STOP_TIMEOUT_S)
            if code != 0:
                self.notes.append(f"the worker exited {code}: see worker.log")
            call_records = log_records(out / "worker.log", "call ended")
        await self.children.stop(agent)
        agent_summary = _read_json(out / "agent_summary.json")
        results = analysis.summarize(
            options={"calls": options.calls, "probes": options.probes},
            timeline=self.timeline,
            idle=self.idle,
            sipp=sipp_stats,
            setup_ms=setup_ms,
            probes=probes,
            probes_ran=probe is not None,
            agent_markers=_read_jsonl(out / "agent_markers.jsonl"),
            agent=agent_summary if isinstance(agent_summary, dict) else None,
            call_records=call_records,
            digits_per_call=bulk.digits_pressed(plan.call_s),
        )
        held = [s for s in results["timeline"] if s["hold"]]
        results["harness_cpu_percent"] = {
            name: analysis._round(
                analysis._mean(
                    [
                        s[f"{name}_cpu_percent"]
                        for s in held
                        if s.get(f"{name}_cpu_percent") is not None
                    ]
                )
            )
            for name in ("agent", "sipp", "probe")
        }
        results["run"] = {
            "started_at": started_at,
            "command": options.command(),
            "target": target,
            "worker": _worker_line(options, target, worker_scheduling),
            "worker_started": worker is not None,
            "scheduling": worker_scheduling,
            "processes": options.process_count if worker is not None else None,
            "protocol": options.protocol,
            "calls": options.calls,
            "probes": options.probes,
            "rate": options.rate,
            "hold": options.hold,
            "call_seconds": round(plan.call_s, 2),
            "planned_seconds": round(plan.total_s, 2),
            "sipp": sipp_stats,
            "pids": self.children.pids(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }
        self.notes.append(
            "latency is measured from outside: a marker tone's send at the probe phone, its"
            " receipt at the agent process, its echo's receipt at the probe (system-wide"
            " monotonic clock); it includes the worker's jitter buffer, resampling, queues and"
            " the 20 ms tick"
        )
        results["notes"] = self.notes
        report.write_json(results, out)
        plots = report.write_plots(results, out)
        report.write_markdown(results, plots, out)
        return results

    async def _start_agent(self) -> tuple[Child, str]:
        options, out = self.options, self.out
        argv = [
            sys.executable, "-m", "worker.loadtest.echo_agent",
            "--host", options.agent_host, "--port", str(options.agent_port),
            "--markers", str(out / "agent_markers.jsonl"),
            "--summary", str(out / "agent_summary.json"),
        ]  # fmt: skip
        agent = await self.children.start("agent", argv, pipe_stdout=True, stderr=out / "agent.log")
        assert agent.process.stdout is not None
        try:
            line = await asyncio.wait_for(agent.process.stdout.readline(), AGENT_READY_TIMEOUT_S)
            url = str(json.loads(line)["url"])
        except (TimeoutError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"the echo agent did not start: {_tail(out / 'agent.log', 1500)}"
            ) from exc
        self.say(f"echo agent: {url} ({options.protocol})")
        return agent, url

    async def _start_worker(self, agent_url: str) -> tuple[Child, str]:
        options, out = self.options, self.out
        processes = options.process_count
        span = 2 * (options.calls + 20) * processes
        rtp_min = _rtp_range(span)
        sip_port = _free_port()
        config = self.work / "worker.toml"
        config.write_text(
            worker_config(
                options,
                self.work,
                sip_port=sip_port,
                rtp_min=rtp_min,
                rtp_max=rtp_min + span - 1,
                agent_url=agent_url,
            ),
            encoding="utf-8",
        )
        shutil.copy(config, out / "worker.toml")
        exe = shutil.which("aispinner-worker", path=str(Path(sys.executable).parent))
        command = [exe] if exe else [sys.executable, "-m", "worker.cli"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")}
        for key, value in self.options.settings:
            env["AISPINNER_" + key.replace(".", "__").upper()] = value
        log = out / "worker.log"
        worker = await self.children.start(
            "worker",
            [*command, "--config", str(config), "run"],
            stdout=log,
            stderr=log,
            cwd=self.work,
            env=env,
        )
        ready = "front listening" if processes > 1 else "sip user agent listening"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not log_records(log, ready):
            if not worker.running or time.monotonic() > deadline:
                raise ConfigError(f"the worker did not start:\n{_tail(log)}")
            await asyncio.sleep(0.1)
        self.say(f"worker: 127.0.0.1:{sip_port}, {processes} media processes, pid {worker.pid}")
        return worker, f"127.0.0.1:{sip_port}"

    async def _idle(self, meter: TreeMeter | None) -> None:
        if meter is None:
            return
        meter.sample(time.monotonic())
        await asyncio.sleep(1.0)
        sample = meter.sample(time.monotonic())
        if sample is not None:
            self.idle = {"worker_cpu_percent": sample.cpu_percent, "worker_pss_kb": sample.pss_kb}

    async def _start_sipp(self, binary: str, target: str, local_ip: str, folder: Path) -> Child:
        options, plan = self.options, self.plan
        bulk.prepare(folder, self.work / "bulk.pcap", plan.call_s + 2.0)
        argv = bulk.command(
            binary,
            target,
            folder,
            local_ip=local_ip,
            number=options.number,
            calls=plan.bulk,
            rate=options.rate,
            call_ms=round(plan.call_s * 1000),
            ports=(_free_port(local_ip), _free_port(local_ip), _free_port()),
            timeout_s=round(plan.total_s + SLACK_S),
        )
        return await self.children.start(
            "sipp",
            argv,
            stdout=folder / "screen.log",
            stderr=folder / "stderr.log",
            cwd=folder,
            env={**os.environ, "TERM": "dumb"},
        )

    async def _sample_until_done(
        self,
        t0: float,
        meters: dict[str, TreeMeter | None],
        sipp_child: Child | None,
        probe: Child | None,
        probe_state: ProbeState,
        sipp_dir: Path,
    ) -> None:
        deadline = t0 + self.plan.total_s + SLACK_S
        for meter in meters.values():
            if meter is not None and meter is not meters["worker"]:
                meter.sample(time.monotonic())
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, t0 + tick - time.monotonic()))
            now = time.monotonic()
            samples: dict[str, TreeSample | None] = {
                name: None if meter is None else meter.sample(now) for name, meter in meters.items()
            }
            stats = bulk.read_stats(sipp_dir / "stats.csv") if sipp_child is not None else None
            sipp_up = stats.current if stats and sipp_child and sipp_child.running else 0
            worker = samples.get("worker")
            entry: dict[str, Any] = {
                "t": now - t0,
                "at": now,
                "calls": sipp_up + probe_state.up,
                "sipp_calls": sipp_up,
                "probe_calls": probe_state.up,
                "sipp_successful": stats.successful if stats else 0,
                "sipp_failed": stats.failed if stats else 0,
                "worker_cpu_percent": _r(worker.cpu_percent) if worker else None,
                "worker_pss_kb": worker.pss_kb if worker else None,
                "worker_rss_kb": worker.rss_kb if worker else None,
                "worker_processes": worker.processes if worker else None,
            }
            for name in ("agent", "sipp", "probe"):
                sample = samples.get(name)
                entry[f"{name}_cpu_percent"] = _r(sample.cpu_percent) if sample else None
            self.timeline.append(entry)
            self._progress(entry, probe_state)
            sipp_done = sipp_child is None or not sipp_child.running
            probe_done = probe is None or not probe.running
            if sipp_done and probe_done:
                return
            if now > deadline:
                self.notes.append(
                    f"the load was stopped {SLACK_S:.0f} s after its planned end: what was"
                    " still running is counted as failed"
                )
                return

    def _progress(self, entry: dict[str, Any], probe_state: ProbeState) -> None:
        cpu = entry["worker_cpu_percent"]
        pss = entry["worker_pss_kb"]
        worker = (
            f"worker CPU {cpu:5.1f} %, PSS {pss / 1024:6.1f} MiB"
            if cpu is not None and pss is not None
            else "worker not measured"
        )
        agent = entry.get("agent_cpu_percent")
        self.say(
            f"[{entry['t']:5.0f} s] calls {entry['calls']:4d}/{self.options.calls}"
            f" (SIPp {entry['sipp_calls']} up, {entry['sipp_successful']} done,"
            f" {entry['sipp_failed']} failed; probes {probe_state.up},"
            f" echoes {probe_state.echoes}/{probe_state.markers_sent}) | {worker}"
            + (f" | agent CPU {agent:.0f} %" if agent is not None else "")
        )


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _clear(out: Path) -> None:
    for name in OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / "sipp", ignore_errors=True)


async def _main(run: Run) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run.execute()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await run.children.stop_all()


def run_loadtest(options: Options, say: Callable[[str], None] | None = None) -> int:
    """The ``loadtest`` command: 0 when every call succeeded, 1 when some failed, 2 for a
    mistake in the options or what the run needs. The outputs are in ``options.out``."""
    options.check()
    speak = say or (lambda line: print(line, flush=True))
    if options.quiet:
        speak = lambda line: None  # noqa: E731
    options.out.mkdir(parents=True, exist_ok=True)
    _clear(options.out)
    children = Children()
    run = Run(options, children, speak)
    try:
        results = asyncio.run(_main(run))
    finally:
        killed = children.kill_all_now()
        if killed:
            print(f"loadtest: killed {killed} on the way out", file=sys.stderr)
        if options.keep:
            print(f"loadtest: kept the worker's data in {run.work}", file=sys.stderr)
        else:
            shutil.rmtree(run.work, ignore_errors=True)
    for name, value in report.headline(results):
        speak(f"  {name}: {value}")
    speak(f"results: {options.out / 'results.json'}, report: {options.out / 'report.md'}")
    return 0 if results["calls"]["failed"] == 0 else 1
