"""Drive the real SIPp (Debian ``sip-tester``) from tests: loopback only, explicit ports, a
bounded run time, trace files read back for failure reasons, and the process always reaped."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SIPP_SHARE = Path("/usr/share/sip-tester")


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both UDP and TCP right now (even, so RTP+1 fits too)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port % 2 or port > 65000:
            continue
        try:
            for k in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, k) as probe:
                    probe.bind((host, port))
                with socket.socket(socket.AF_INET, k) as probe:
                    probe.bind((host, port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")


@dataclass
class SippResult:
    returncode: int
    stdout: str
    stderr: str
    errors: str
    messages: str
    stats: str = ""

    def explain(self) -> str:
        return (
            f"sipp exited {self.returncode}\n--- stderr\n{self.stderr[-3000:]}\n"
            f"--- errors\n{self.errors[-3000:]}\n--- messages\n{self.messages[-6000:]}"
        )


@dataclass
class Sipp:
    """One SIPp process. ``args`` are extra arguments (scenario, -m, -r, ...)."""

    workdir: Path
    remote: str | None
    args: list[str]
    port: int = field(default_factory=free_port)
    media_port: int = field(default_factory=free_port)
    timeout_s: float = 60.0
    process: asyncio.subprocess.Process | None = None

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
            "-cp", str(free_port(socket.SOCK_DGRAM)),
            "-bind_local",
            "-nostdin",
            "-p", str(self.port),
            "-mp", str(self.media_port),
            "-timeout", f"{int(self.timeout_s)}s",
            "-timeout_error",
            "-trace_err", "-error_file", str(self.workdir / "errors.log"),
            "-trace_msg", "-message_file", str(self.workdir / "messages.log"),
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

    async def wait(self) -> SippResult:
        assert self.process is not None
        try:
            out, err = await asyncio.wait_for(self.process.communicate(), self.timeout_s + 15)
        except TimeoutError:
            self.kill()
            out, err = await self.process.communicate()
        return SippResult(
            returncode=self.process.returncode if self.process.returncode is not None else -1,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            errors=_read(self.workdir / "errors.log"),
            messages=_read(self.workdir / "messages.log"),
        )

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def run(self) -> SippResult:
        await self.start()
        return await self.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
