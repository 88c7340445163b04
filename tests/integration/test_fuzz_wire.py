"""The over-the-wire fuzz smoke (issue 11): a few thousand mutated SIP datagrams, from the
fuzz corpus of real messages, sent at a running user agent while a SIPp call streams audio
through it: the call finishes with its audio and the user agent still answers afterwards."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from tests.fuzz.mutate import mutate, seeds
from tests.integration.test_sip_sipp import (
    PCAP_AUDIO_PACKETS,
    WAIT,
    assert_audio_arrived,
    assert_ok,
    running,
    sipp,
)

pytestmark = pytest.mark.sipp

DATAGRAMS = 3000


class TestMutatedDatagramsBesideALiveCall:
    async def test_live_call_survives(self, tmp_path: Path) -> None:
        rng = random.Random(20261205)
        pool = seeds()
        async with running(tmp_path) as worker:
            live = sipp(tmp_path, "live", worker.target, "-sn", "uac_pcap", "-s", "echo",
                        "-m", "1", timeout_s=40)  # fmt: skip
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            senders[0].bind(("127.0.0.2", 0))
            senders[1].bind(("127.0.0.1", 0))
            target = ("127.0.0.1", worker.ua.port)
            sent = 0
            try:
                async with live:
                    call = await worker.next_call()
                    await asyncio.wait_for(call.answered, WAIT)
                    while sent < DATAGRAMS:
                        for _ in range(50):
                            data = mutate(rng.choice(pool), rng, pool=pool)
                            senders[sent % 2].sendto(data[:60000], target)
                            sent += 1
                        await asyncio.sleep(0.01)
                    result = await live.wait()
                assert_ok(result)
                await asyncio.wait_for(call.ended, WAIT)
                assert call.end is not None
                assert call.end.cause == "remote-bye"
                assert_audio_arrived(call, PCAP_AUDIO_PACKETS)
                await asyncio.sleep(2.0)  # the blasting sources' rate buckets refill
                options = sipp(tmp_path, "after", worker.target, "-sf",
                               str(Path(__file__).parent / "scenarios" / "uac_options.xml"),
                               "-m", "1", timeout_s=10)  # fmt: skip
                assert_ok(await options.run())
            finally:
                for sender in senders:
                    sender.close()
        assert sent == DATAGRAMS
        counters = worker.ua.counters
        assert counters.malformed_answered + counters.malformed_dropped > 100
