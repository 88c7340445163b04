"""The RTP port pool on real loopback sockets, under the worker's production loop (uvloop):
concurrent opens, ports taken by other processes, release and reuse."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import uvloop

from worker.rtp import PortsExhaustedError, RtpEndpoint, RtpPortPool


def _range(size: int) -> int:
    return random.randrange(20000, 32000 - size, 2)  # below Linux's ephemeral ports


class TestRtpPortPoolOnUvloop:
    def test_concurrent_opens_get_distinct_ports(self) -> None:
        """A hundred calls set up at once (a burst of INVITEs) fill a range of a hundred ports:
        no two opens chase the same candidate while one of them waits for the loop (each open
        tries 64 candidates at most)."""

        async def main() -> None:
            base = _range(200)
            pool = RtpPortPool("127.0.0.1", base, base + 200)
            endpoints = await asyncio.gather(*(pool.open() for _ in range(100)))
            try:
                assert len({e.local[1] for e in endpoints}) == 100
                assert len(pool.allocator) == 0
            finally:
                for endpoint in endpoints:
                    pool.close(endpoint)
                    pool.close(endpoint)  # twice: released once
            await asyncio.sleep(0.01)
            assert len(pool.allocator) == 100

        uvloop.run(main())

    def test_skips_a_port_another_process_holds(self) -> None:
        async def main() -> None:
            base = _range(4)
            pool = RtpPortPool("127.0.0.1", base, base + 4)  # two ports: base, base + 2
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
                squatter.bind(("127.0.0.1", base))
                first = await pool.open()
                assert first.local[1] == base + 2
                with pytest.raises(PortsExhaustedError):
                    await pool.open()
                pool.close(first)
                # Back in the pool once the loop has really closed the socket, not before.
                assert pool.allocator.candidates() == [base]
                await asyncio.sleep(0.01)
                assert sorted(pool.allocator.candidates()) == [base, base + 2]
                reopened: RtpEndpoint = await pool.open()
                assert reopened.local[1] == base + 2
                pool.close(reopened)

        uvloop.run(main())
