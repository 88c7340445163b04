"""``aispinner-worker run`` with two media processes behind one SIP address (worker/front),
driven by SIPp over UDP and TCP: calls spread over both processes; a media process killed
with SIGKILL loses only its own calls and is started again; SIGTERM drains, with one process
too (new INVITEs get 503, live calls finish, then everything exits 0); a malformed request
(a bad CSeq) gets its 400 from the front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ari_double import AriDouble
from tests.ari_double.phone import Phone
from tests.e2e.harness import SCENARIOS, best_match, pattern, samples
from tests.privileges import may_realtime
from tests.sipp import Sipp, SippResult, free_port
from worker.ari.route import call_key
from worker.front.shard import shard_of

WAIT = 20.0
ARI_USER, ARI_PASSWORD = "aispinner", "secret"
API_SECRET = "test-processes-secret-long-enough-for-hs256"


class FrontProcess:
    """``aispinner-worker run`` with ``processes = 2``, an echo route, events to JSONL; with
    ``asterisk`` (an ARI URL) it takes that Asterisk's calls too."""

    def __init__(
        self,
        folder: Path,
        processes: int = 2,
        asterisk: str | None = None,
        database_url: str | None = None,
    ) -> None:
        """``database_url``: the journal there, and the API (JWT secret ``API_SECRET``)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.processes = processes
        self.sip_port = free_port()
        self.metrics_port = free_port()
        self.api_port = free_port()
        rtp = free_port(span=200)
        ari = (
            f'ingress = ["sip", "ari"]\n[ari]\nurl = "{asterisk}"\nusername = "{ARI_USER}"\n'
            f'password = "{ARI_PASSWORD}"\nreconnect_max_s = 1.0\n'
            if asterisk
            else ""
        )
        store = (
            f'store = true\ndatabase_url = "{database_url}"\n'
            if database_url
            else "store = false\n"
        )
        api = (
            f'[api]\nport = {self.api_port}\njwt_secret = "{API_SECRET}"\n' if database_url else ""
        )
        self.config = folder / "worker.toml"
        self.config.write_text(
            f'data_dir = "{folder / "data"}"\n'
            + store
            + f"processes = {processes}\ndrain_grace_s = 15.0\n"
            + ari
            + api
            + '[log]\nformat = "json"\n'
            f'[sip]\nhost = "127.0.0.1"\nport = {self.sip_port}\n'
            f'[rtp]\nhost = "127.0.0.1"\nport_min = {rtp}\nport_max = {rtp + 199}\n'
            f'[metrics]\nenabled = true\nhost = "127.0.0.1"\nport = {self.metrics_port}\n'
            '[[routes]]\nmatch = "*"\naction = "echo"\nrecord = false\n',
            encoding="utf-8",
        )
        self.log_path = folder / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_for("front listening" if self.processes > 1 else "sip user agent listening")

    def launch(self) -> None:
        """Start it without waiting for it to be ready."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AISPINNER_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "--config", str(self.config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for(self, message: str, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            found = [line for line in self.lines() if line.get("msg") == message]
            if len(found) >= count:
                return found[count - 1]
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {message!r} in the log: {self.tail()}")
            time.sleep(0.05)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def pids(self) -> list[int]:
        pids = self.wait_for("front listening")["pids"]
        assert isinstance(pids, list)
        return [int(p) for p in pids]

    def done_by_process(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for index in (0, 1):
            path = self.folder / "data" / f"events.{index}.jsonl"
            events = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            out[index] = [e for e in events if e["type"] == "call.done"]
        return out

    async def until_done(self, calls: int) -> dict[int, list[dict[str, Any]]]:
        """``done_by_process`` once ``calls`` calls have their ``call.done`` written."""
        deadline = time.monotonic() + WAIT
        while sum(map(len, (done := self.done_by_process()).values())) < calls:
            assert time.monotonic() < deadline, done
            await asyncio.sleep(0.1)
        return done

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.asynccontextmanager
async def front(folder: Path, asterisk: str | None = None) -> AsyncIterator[FrontProcess]:
    process = FrontProcess(folder, asterisk=asterisk)
    await asyncio.to_thread(process.start)
    try:
        yield process
    finally:
        code = await asyncio.to_thread(process.stop)
        assert code == 0, process.tail()
        # the media processes end with the front
        for pid in _children_of(process):
            assert not _alive(pid), f"media process {pid} outlived the front"


def _children_of(process: FrontProcess) -> list[int]:
    pids: list[int] = []
    for line in process.lines():
        if line.get("msg") == "front listening":
            pids += [int(p) for p in line["pids"]]
        if line.get("msg") == "media process ready" and "pid" in line:
            pids.append(int(line["pid"]))
    return pids


def _policy(pid: int) -> tuple[int, int]:
    """A process's scheduling policy (without SCHED_RESET_ON_FORK) and real-time priority."""
    policy = os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK
    return policy, os.sched_getparam(pid).sched_priority


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by anyone) counts as gone
    with contextlib.suppress(OSError):
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    return False


def talkers(folder: Path, port: int, calls: int, duration_ms: int, *extra: str) -> Sipp:
    return Sipp(
        workdir=folder,
        remote=f"127.0.0.1:{port}",
        args=["-sf", str(SCENARIOS / "uac_talk_bye.xml"), "-s", "echo", "-m", str(calls),
              "-l", str(calls), "-r", str(calls), "-d", str(duration_ms), *extra],
        timeout_s=30.0,
        trace_msg=False,
    )  # fmt: skip


async def run(sipp: Sipp) -> SippResult:
    await sipp.start()
    return await sipp.wait()


def invite(port: int, call_id: str, local_port: int, *, cseq: str = "1 INVITE") -> bytes:
    lines = [
        f"INVITE sip:echo@127.0.0.1:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK-{call_id}",
        "Max-Forwards: 70",
        f"From: <sip:t@127.0.0.1:{local_port}>;tag=a1",
        f"To: <sip:echo@127.0.0.1:{port}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq}",
        f"Contact: <sip:t@127.0.0.1:{local_port}>",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def first_final(sock: socket.socket) -> str:
    """The status line of the first non-100 response on ``sock``."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        data = sock.recv(65535).decode(errors="replace")
        status = data.split("\r\n", 1)[0]
        if not status.startswith("SIP/2.0 100"):
            return status
    raise AssertionError("no final response")


class TestOneSipAddressTwoMediaProcesses:
    async def test_calls_over_udp_and_tcp_spread_over_both(self, tmp_path: Path) -> None:
        async with front(tmp_path / "w") as worker:
            udp = await run(talkers(tmp_path / "udp", worker.sip_port, 12, 800))
            tcp = await run(talkers(tmp_path / "tcp", worker.sip_port, 4, 800, "-t", "t1"))
            assert udp.returncode == 0, udp.explain()
            assert tcp.returncode == 0, tcp.explain()
            assert udp.stat("SuccessfulCall") == 12
            assert tcp.stat("SuccessfulCall") == 4
            done = await worker.until_done(16)
        assert all(len(calls) >= 1 for calls in done.values()), done  # 2 * 2**-16 to fail
        assert all(e["status"] == "completed" for calls in done.values() for e in calls)

    async def test_the_front_serves_every_processs_metrics_labelled_by_process(
        self, tmp_path: Path
    ) -> None:
        async with front(tmp_path / "w") as worker:
            calls = await run(talkers(tmp_path / "c", worker.sip_port, 8, 300))
            assert calls.returncode == 0, calls.explain()
            await worker.until_done(8)
            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
            done = worker.done_by_process()
        assert response.status_code == 200
        setups: dict[str, float] = {}
        seen: set[str] = set()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                seen.add(sample.labels.get("process", ""))
                if sample.name == "aispinner_call_setups_total":
                    process = sample.labels["process"]
                    setups[process] = setups.get(process, 0.0) + sample.value
        assert seen >= {"front", "0", "1"}
        # each media process counts the calls it carried, as its events file says
        assert setups.get("0", 0.0) == len(done[0])
        assert setups.get("1", 0.0) == len(done[1])
        assert setups.get("0", 0.0) + setups.get("1", 0.0) == 8

    async def test_the_front_and_the_media_processes_run_at_real_time_priority(
        self, tmp_path: Path
    ) -> None:
        async with front(tmp_path / "w") as worker:
            assert worker.process is not None
            pids = [worker.process.pid, *worker.pids()]
            policies = {pid: _policy(pid) for pid in pids}
            granted = [x for x in worker.lines() if x.get("msg") == "real-time priority"]
            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
        reported = {
            sample.labels["process"]: sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
            if sample.name == "aispinner_realtime_priority"
        }
        expected = 10 if may_realtime(10) else 0  # the default, if the runner may grant it
        assert reported == {"front": expected, "0": expected, "1": expected}
        if expected:
            assert policies == dict.fromkeys(pids, (os.SCHED_RR, 10))
            assert sorted(int(x["pid"]) for x in granted) == sorted(pids)
        else:
            assert policies == dict.fromkeys(pids, (os.SCHED_OTHER, 0))

    async def test_a_killed_media_process_loses_only_its_calls_and_is_replaced(
        self, tmp_path: Path
    ) -> None:
        async with front(tmp_path / "w") as worker:
            first, second = worker.pids()
            calls = talkers(tmp_path / "long", worker.sip_port, 12, 4000)
            await calls.start()
            await asyncio.sleep(2.0)  # every call answered and talking
            os.kill(first, signal.SIGKILL)
            result = await calls.wait()
            restarted = await asyncio.to_thread(worker.wait_for, "media process ready", 3)
            assert restarted["index"] == 0
            assert int(restarted["pid"]) not in (first, second)
            assert _policy(int(restarted["pid"])) == _policy(second)
            survivors = worker.done_by_process()[1]
            # the other process's calls went on to the end; the killed one's did not
            assert result.stat("SuccessfulCall") == len(survivors)
            assert 1 <= len(survivors) <= 11
            assert result.stat("FailedCall") == 12 - len(survivors)
            assert _alive(second)
            after = await run(talkers(tmp_path / "after", worker.sip_port, 6, 300))
            assert after.returncode == 0, after.explain()
            assert after.stat("SuccessfulCall") == 6

    @pytest.mark.parametrize("processes", [1, 2])
    async def test_sigterm_refuses_new_calls_and_lets_live_ones_finish(
        self, tmp_path: Path, processes: int
    ) -> None:
        worker = FrontProcess(tmp_path / "w", processes)
        await asyncio.to_thread(worker.start)
        try:
            calls = talkers(tmp_path / "live", worker.sip_port, 4, 4000)
            await calls.start()
            await asyncio.sleep(2.0)  # SIPp places the 4 calls within the first second
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait_for, "draining: no new calls", processes)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                local = sock.getsockname()[1]
                for n in range(4):  # Call-IDs for both processes, most likely
                    sock.sendto(
                        invite(worker.sip_port, f"late-{n}", local), ("127.0.0.1", worker.sip_port)
                    )
                    assert first_final(sock).startswith("SIP/2.0 503"), n
            result = await calls.wait()
            assert result.returncode == 0, result.explain()
            assert result.stat("SuccessfulCall") == 4
            code = await asyncio.to_thread(worker.process.wait, WAIT)
        finally:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        assert code == 0, worker.tail()
        for pid in worker.pids() if processes > 1 else []:
            assert not _alive(pid)

    async def test_a_malformed_request_gets_400_from_the_front(self, tmp_path: Path) -> None:
        async with front(tmp_path / "w") as worker:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                local = sock.getsockname()[1]
                message = invite(worker.sip_port, "x", local, cseq="one INVITE")
                sock.sendto(message, ("127.0.0.1", worker.sip_port))
                assert first_final(sock).startswith("SIP/2.0 400")
                sock.sendto(b"\x00\x01garbage", ("127.0.0.1", worker.sip_port))
                # unanswerable: dropped; the front still serves
                ok = await run(talkers(tmp_path / "ok", worker.sip_port, 2, 300))
            assert ok.returncode == 0, ok.explain()

    async def test_a_request_that_comes_while_the_media_processes_start_is_answered(
        self, tmp_path: Path
    ) -> None:
        """The front's SIP socket opens before its media processes are ready; what comes
        meanwhile is held and handed over, so one OPTIONS sent once (never retransmitted) gets
        its answer."""
        worker = FrontProcess(tmp_path / "w")
        await asyncio.to_thread(worker.launch)
        try:
            await asyncio.to_thread(_until_bound, worker.sip_port)
            assert not [x for x in worker.lines() if x.get("msg") == "front listening"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                local = sock.getsockname()[1]
                sock.sendto(options(worker.sip_port, local), ("127.0.0.1", worker.sip_port))
                sock.settimeout(WAIT)
                status = sock.recv(65535).decode(errors="replace").split("\r\n", 1)[0]
            assert status == "SIP/2.0 200 OK"
            handed = worker.wait_for("messages held until the media process was ready")
            assert handed["handed_over"] == 1
        finally:
            assert await asyncio.to_thread(worker.stop) == 0, worker.tail()


class TestAsteriskCallsOverTwoMediaProcesses:
    """PROTOCOLS.md §4-5 behind the front: the Stasis application's one events connection is
    the front's, and each call through Asterisk (the ARI test double) is carried by the media
    process its channel id falls on: its events reach that process, which makes its REST calls
    and carries its ExternalMedia RTP."""

    async def _calls_on_both(self, asterisk: AriDouble, least: int) -> list[Phone]:
        """Inbound calls until each process has at least ``least`` (bounded)."""
        phones: list[Phone] = []
        while min(Counter(_owner(p) for p in phones).get(i, 0) for i in (0, 1)) < least:
            assert len(phones) < 40, "the channel ids do not spread"
            phones.append(await asterisk.call_in("echo"))
        return phones

    async def test_each_call_is_carried_by_the_process_it_falls_on(self, tmp_path: Path) -> None:
        async with (
            AriDouble(username=ARI_USER, password=ARI_PASSWORD) as asterisk,
            front(tmp_path / "w", asterisk.url) as worker,
        ):
            await asyncio.to_thread(worker.wait_for, "connected to Asterisk's events")
            phones = await self._calls_on_both(asterisk, 2)
            spoken = [pattern(1.2, seed=n) for n in range(len(phones))]
            await asyncio.gather(*(p.send_audio(s) for p, s in zip(phones, spoken, strict=True)))
            await asyncio.sleep(0.3)
            for phone in phones:
                await phone.hang_up()
            done = await worker.until_done(len(phones))
            await _until(lambda: _nothing_left(asterisk), "Asterisk is left clean")
        owners = Counter(_owner(p) for p in phones)
        assert {i: len(calls) for i, calls in done.items()} == {0: owners[0], 1: owners[1]}
        assert all(e["status"] == "completed" for calls in done.values() for e in calls)
        for phone, said in zip(phones, spoken, strict=True):  # each call's echo came back
            match = best_match(samples(bytes(phone.heard)), samples(said)[2000:7000])
            assert match.score > 0.9, (phone.channel_id, match)

    async def test_a_killed_media_process_loses_only_its_asterisk_calls(
        self, tmp_path: Path
    ) -> None:
        """Its calls' channels and bridges are cleaned out of Asterisk by the process started
        in its place (a resync of the calls that fall on it); the other process's calls go on."""
        async with (
            AriDouble(username=ARI_USER, password=ARI_PASSWORD) as asterisk,
            front(tmp_path / "w", asterisk.url) as worker,
        ):
            await asyncio.to_thread(worker.wait_for, "connected to Asterisk's events")
            first, second = worker.pids()
            phones = await self._calls_on_both(asterisk, 1)
            await _until(lambda: all(p.answered for p in phones), "every call is answered")
            os.kill(second, signal.SIGKILL)
            restarted = await asyncio.to_thread(worker.wait_for, "media process ready", 3)
            assert restarted["index"] == 1
            lost = [p for p in phones if _owner(p) == 1]
            kept = [p for p in phones if _owner(p) == 0]
            await _until(lambda: all(p.ended.is_set() for p in lost), "the lost calls end")
            await _until(
                lambda: not [b for b in asterisk.bridges if _owner_of(b) == 1],
                "their bridges are destroyed",
            )
            assert not any(p.ended.is_set() for p in kept)
            said = pattern(1.0, seed=11)
            await kept[0].send_audio(said)
            await asyncio.sleep(0.3)
            heard = samples(bytes(kept[0].heard))
            for phone in kept:
                await phone.hang_up()
            done = await worker.until_done(len(kept))
            assert _alive(first)
        assert len(done[0]) == len(kept)
        assert done[1] == []
        assert best_match(heard, samples(said)[2000:6000]).score > 0.9

    async def test_calls_placed_through_the_api_go_out_from_each_process_in_turn(
        self, tmp_path: Path, database_url: str
    ) -> None:
        """``POST /telephony/calls`` through an Asterisk trunk is handed to the media processes
        in turn; each originates with a channel id that falls on itself, so the call's events
        come back to it (before, only process 0 had a Stasis application)."""
        async with AriDouble(username=ARI_USER, password=ARI_PASSWORD) as asterisk:
            asterisk.on_dial("4155550123", "answer")
            worker = FrontProcess(tmp_path / "w", asterisk=asterisk.url, database_url=database_url)
            await asyncio.to_thread(worker.start)
            try:
                await asyncio.to_thread(worker.wait_for, "connected to Asterisk's events")
                claims = {"uid": "tester", "workspaces": [1], "exp": time.time() + 600}
                bearer = {"Authorization": f"Bearer {jwt.encode(claims, API_SECRET, 'HS256')}"}
                placed = []
                async with httpx.AsyncClient(timeout=WAIT) as client:
                    for _ in range(2):
                        response = await client.post(
                            f"http://127.0.0.1:{worker.api_port}/telephony/calls",
                            json={"number": "4155550123", "trunk": "sippuas", "route": "*"},
                            headers=bearer,
                        )
                        assert response.status_code == 201, response.text
                        placed.append(response.json()["call_id"])
                originates = [
                    r.query["channelId"]
                    for r in asterisk.requests
                    if r.method == "POST" and r.path.endswith("/channels")
                ]
                assert sorted(_owner_of(channel) for channel in originates) == [0, 1]
                callees = [asterisk.phone(channel) for channel in originates]
                await _until(lambda: all(p.answered for p in callees), "both callees answer")
                said = pattern(1.0, seed=12)
                await asyncio.gather(*(p.send_audio(said) for p in callees))
                await asyncio.sleep(0.3)
                for callee in callees:
                    await callee.hang_up()
                done = await worker.until_done(2)
            finally:
                assert await asyncio.to_thread(worker.stop) == 0, worker.tail()
        assert [len(done[0]), len(done[1])] == [1, 1]
        assert sorted(e["call_id"] for calls in done.values() for e in calls) == sorted(placed)
        assert all(e["status"] == "completed" for calls in done.values() for e in calls)
        for callee in callees:
            assert best_match(samples(bytes(callee.heard)), samples(said)[2000:6000]).score > 0.9


def _owner(phone: Phone) -> int:
    return _owner_of(phone.channel_id)


def _owner_of(resource_id: str) -> int:
    return shard_of(call_key(resource_id), 2)


def _nothing_left(asterisk: AriDouble) -> bool:
    media = [c for c in asterisk.channels.values() if c.name.startswith("UnicastRTP/")]
    return not asterisk.bridges and not media


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        await asyncio.sleep(0.02)


def _until_bound(port: int) -> None:
    """Until something has bound UDP ``port`` on 127.0.0.1 (bounded)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.005)
    raise AssertionError(f"nothing bound UDP {port}")


def options(port: int, local_port: int) -> bytes:
    lines = [
        f"OPTIONS sip:echo@127.0.0.1:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK-early",
        "Max-Forwards: 70",
        f"From: <sip:t@127.0.0.1:{local_port}>;tag=a1",
        f"To: <sip:echo@127.0.0.1:{port}>",
        "Call-ID: early-options",
        "CSeq: 1 OPTIONS",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
