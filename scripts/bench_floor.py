#!/usr/bin/env python3
"""Benchmark: the floor of a call's CPU per 20 ms, what any implementation of the worker's I/O
shape pays on this machine, whatever its language: one RTP packet received and one sent (UDP,
172 bytes), one frame to the agent and one back (TCP, 650 and 1,290 bytes: a 20 ms WebSocket
frame of L16 at 16 kHz each way), and 20 ms of the stereo MP3 (LAME, the recorder's settings).

Each part runs in a loop of system calls (or ``lameenc.Encoder.encode`` calls) on loopback
sockets, and is charged the process's CPU time (user + system, ``getrusage``) per operation.
On loopback the sender's system call also runs the receiver's half of the network stack, so
the sends carry what a real NIC would take off the host. Not in it: waking up for each event
(``epoll_wait``, a context switch), and every instruction of the worker's own logic.

Prints µs per call per 20 ms for each part, their sum, and that sum against the issue's CPU
target (0.35 % of a core per call: 70 µs per 20 ms). ``--json PATH`` also writes the figures.

Run: ``.venv/bin/python scripts/bench_floor.py [--operations 20000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from media.recorder import BATCH_MS, stereo_encoder

FRAME_MS = 20
TARGET_PERCENT = 0.35
RTP_BYTES = 172
TO_AGENT_BYTES = 650
FROM_AGENT_BYTES = 1290
BATCH = 100


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _charged(operations: int, step: Callable[[], object], between: Callable[[], None]) -> float:
    """µs of CPU per ``step``; ``between`` (not charged) runs after each batch of steps."""
    spent = 0.0
    for _ in range(operations // BATCH):
        start = _cpu_s()
        for _ in range(BATCH):
            step()
        spent += _cpu_s() - start
        between()
    return spent / (operations // BATCH * BATCH) * 1e6


def udp(operations: int) -> tuple[float, float]:
    """µs per sendto and per recvfrom of one RTP packet on loopback."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
    ):
        receiver.bind(("127.0.0.1", 0))
        address = receiver.getsockname()
        packet = bytes(RTP_BYTES)

        def drain() -> None:
            for _ in range(BATCH):
                receiver.recvfrom(2048)

        send = _charged(operations, lambda: sender.sendto(packet, address), drain)

        def fill() -> None:
            for _ in range(BATCH):
                sender.sendto(packet, address)

        fill()
        receive = _charged(operations, lambda: receiver.recvfrom(2048), fill)
        drain()
    return send, receive


def tcp(operations: int) -> tuple[float, float]:
    """µs per send of a frame to the agent, and per receive of the agent's frame (its send
    charged to the other end, as the agent's own)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with (
            socket.create_connection(listener.getsockname()) as worker,
            listener.accept()[0] as agent,
        ):
            for end in (worker, agent):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            to_agent = bytes(TO_AGENT_BYTES)
            from_agent = bytes(FROM_AGENT_BYTES)

            def agent_reads() -> None:
                need = TO_AGENT_BYTES * BATCH
                while need:
                    need -= len(agent.recv(need))

            send = _charged(operations, lambda: worker.send(to_agent), agent_reads)

            def agent_writes() -> None:
                for _ in range(BATCH):
                    agent.sendall(from_agent)

            def read_one() -> None:
                need = FROM_AGENT_BYTES
                while need:
                    need -= len(worker.recv(need))

            agent_writes()
            receive = _charged(operations, read_one, agent_writes)
            for _ in range(BATCH):
                read_one()
    return send, receive


def mp3(frames: int) -> float:
    """µs of LAME per 20 ms of stereo 8 kHz, set up as ``media.recorder.StereoMp3Recorder``
    sets it up, and given ``BATCH_MS`` at a time as it is."""
    encoder = stereo_encoder(8000)
    per_batch = BATCH_MS // FRAME_MS
    rng = np.random.default_rng(1)
    samples = 2 * 8000 * BATCH_MS // 1000
    batch = rng.normal(0, 3000, samples).clip(-32768, 32767).astype("<i2").tobytes()
    batches = max(1, frames // per_batch)
    start = _cpu_s()
    for _ in range(batches):
        encoder.encode(batch)
    spent = _cpu_s() - start
    encoder.flush()
    return spent / (batches * per_batch) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=20000, help="of each kind (20000)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.operations < BATCH:
        parser.error(f"--operations must be at least {BATCH}")
    udp_send, udp_receive = udp(args.operations)
    tcp_send, tcp_receive = tcp(args.operations)
    lame = mp3(args.operations)
    parts = {
        "rtp_sendto_us": udp_send,
        "rtp_recvfrom_us": udp_receive,
        "agent_send_us": tcp_send,
        "agent_receive_us": tcp_receive,
        "mp3_encode_us": lame,
    }
    total = sum(parts.values())
    budget_us = TARGET_PERCENT / 100 * FRAME_MS * 1000
    print(f"Per call per {FRAME_MS} ms, CPU ({args.operations} operations of each kind):")
    for name, value in parts.items():
        print(f"  {name[:-3]:<18} {value:6.2f} µs")
    print(
        f"  {'floor':<18} {total:6.2f} µs = {total / (FRAME_MS * 10):.3f} % of a core"
        f" ({total / budget_us:.0%} of the target's {budget_us:.0f} µs)"
    )
    if args.json:
        floor_us = round(total, 3)
        result = {
            "operations": args.operations,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            **{k: round(v, 3) for k, v in parts.items()},
            "floor_us": floor_us,
            # From the figure written beside it, so the two agree to the last digit.
            "floor_percent_of_core": round(floor_us / (FRAME_MS * 10), 4),
            "target_us": budget_us,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
