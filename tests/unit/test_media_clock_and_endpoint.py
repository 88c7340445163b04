"""The process-wide media pacer (a callback removed during a tick is not called) and the RTP
endpoint's symmetric-RTP latch (RFC 3264 §8.3.1 moves). No sockets: datagrams are handed to the
endpoint directly."""

from __future__ import annotations

import asyncio
import itertools
import time

from media.rtp import RtpPacket
from worker.pacer import MediaPacer
from worker.rtp import RtpEndpoint

FIRST = ("192.0.2.10", 40000)
MOVED = ("192.0.2.20", 42000)
NAT = ("198.51.100.7", 61000)


class TestMediaPacerRemoval:
    async def test_callback_removed_by_an_earlier_one_is_not_ticked(self) -> None:
        """A call ended by an earlier callback of the same tick is not ticked after it."""
        pacer = MediaPacer(asyncio.get_running_loop())
        seen: list[str] = []

        def first(now: float) -> None:
            seen.append("first")
            pacer.remove("second")

        pacer.add("first", first)
        pacer.add("second", lambda now: seen.append("second"))
        await asyncio.sleep(0.05)
        pacer.close()
        assert "second" not in seen


def latched(endpoint: RtpEndpoint) -> tuple[str, int] | None:
    """Read afresh: after ``assert endpoint.latched is None`` mypy would keep it None."""
    return endpoint.latched


def rtp(seq: int) -> bytes:
    return RtpPacket(8, seq, seq * 160, 0x1234, b"\xd5" * 160).serialize()


class Receiver:
    def __init__(self) -> None:
        self.got: list[RtpPacket] = []
        self.rtcp: list[bytes] = []

    def rtp_received(self, packet: RtpPacket, now: float) -> None:
        self.got.append(packet)

    def rtcp_received(self, data: bytes, now: float) -> None:
        self.rtcp.append(data)


class TestRtpEndpointLatch:
    """Symmetric RTP that cannot be hijacked (issue 11 #6): only the host the SDP names latches;
    another source only with ``nat_latch``, after a few packets in a row."""

    def endpoint(self, nat_latch: bool = False) -> tuple[RtpEndpoint, list[RtpPacket]]:
        receiver = Receiver()
        endpoint = RtpEndpoint(asyncio.get_running_loop(), nat_latch=nat_latch)
        endpoint.attach(receiver)
        return endpoint, receiver.got

    async def test_only_the_sdp_host_latches(self) -> None:
        endpoint, got = self.endpoint()
        endpoint.set_remote(FIRST)
        endpoint.datagram_received(rtp(1), NAT)  # someone racing to the port
        endpoint.datagram_received(rtp(2), (FIRST[0], FIRST[1] + 2))  # the peer, another port
        endpoint.datagram_received(rtp(3), NAT)
        assert endpoint.latched == (FIRST[0], FIRST[1] + 2)
        assert [p.sequence for p in got] == [2]
        assert endpoint.endpoint_counters.foreign_source == 2

    async def test_nothing_is_taken_before_the_sdp_is_known(self) -> None:
        endpoint, got = self.endpoint()
        endpoint.datagram_received(rtp(1), FIRST)
        assert latched(endpoint) is None
        assert got == []
        endpoint.set_remote(FIRST)
        endpoint.datagram_received(rtp(2), FIRST)
        assert latched(endpoint) == FIRST

    async def test_nat_latch_after_three_packets_in_a_row(self) -> None:
        endpoint, got = self.endpoint(nat_latch=True)
        endpoint.set_remote(FIRST)  # a private address behind the caller's NAT
        endpoint.datagram_received(rtp(1), NAT)
        endpoint.datagram_received(rtp(2), MOVED)  # another source breaks the run
        endpoint.datagram_received(rtp(3), NAT)
        endpoint.datagram_received(rtp(4), NAT)
        assert latched(endpoint) is None
        endpoint.datagram_received(rtp(5), NAT)
        assert endpoint.latched == NAT
        assert [p.sequence for p in got] == [5]
        endpoint.datagram_received(rtp(6), MOVED)
        assert endpoint.endpoint_counters.foreign_source == 1

    async def test_same_address_again_keeps_the_latch(self) -> None:
        endpoint, _ = self.endpoint()
        endpoint.set_remote(FIRST)
        endpoint.datagram_received(rtp(1), FIRST)
        endpoint.set_remote(FIRST)  # a re-INVITE for hold or resume, same address
        assert endpoint.latched == FIRST

    async def test_rfc3264_section8_3_1_move_relearns_the_source(self) -> None:
        endpoint, got = self.endpoint()
        endpoint.set_remote(FIRST)
        endpoint.datagram_received(rtp(1), FIRST)
        endpoint.set_remote(MOVED)
        assert endpoint.latched is None
        assert endpoint.remote == MOVED
        endpoint.datagram_received(rtp(2), FIRST)  # in flight from the former source
        assert endpoint.latched is None  # taken, but it cannot win the latch back
        endpoint.datagram_received(rtp(3), MOVED)
        assert latched(endpoint) == MOVED
        endpoint.datagram_received(rtp(4), FIRST)
        assert [p.sequence for p in got] == [1, 2, 3]
        assert endpoint.endpoint_counters.foreign_source == 1


class TestMediaPacerAlign:
    """``align``: a call moves to the first slot at or after the moment its work becomes
    possible; the one interval the move changes is shortened, never stretched."""

    async def test_moves_to_the_slot_after_due_and_keeps_20_ms_from_there(self) -> None:
        loop = asyncio.get_running_loop()
        pacer = MediaPacer(loop, slots=10)
        seen: list[float] = []
        moved: list[bool] = []

        def tick(now: float) -> None:
            seen.append(now)
            if len(seen) == 2:
                # the call's frames fall due 7.3 ms after this tick: slot +8 ms from here
                off = [pacer.misaligned("call", now + 0.0073), pacer.misaligned("call", now)]
                assert off == [True, False]
                moved.append(pacer.align("call", now + 0.0073, now))
                moved.append(pacer.align("call", now + 0.0073, now))  # already there
                assert not pacer.misaligned("call", now + 0.0073)

        pacer.add("call", tick)
        try:
            await asyncio.sleep(0.15)
        finally:
            pacer.close()
        assert moved == [True, False]
        steps = [round(b - a, 9) for a, b in itertools.pairwise(seen)]
        assert steps[0] == 0.020
        assert steps[1] == 0.008  # shortened once
        assert all(step == 0.020 for step in steps[2:]), steps
        assert len(steps) >= 5

    async def test_work_due_later_than_the_slot_waits_for_it_not_an_extra_tick(self) -> None:
        """The next frame falls due 1.1 ms after the call's next tick would come: the call
        moves to the slot after it and its next tick is there, 22 ms on, not 2 ms on (which
        would tick with no frame and send an extra one)."""
        loop = asyncio.get_running_loop()
        pacer = MediaPacer(loop, slots=10)
        for n in range(10):
            pacer.add(n, lambda now: None)  # every slot's timer runs
        seen: list[float] = []

        def tick(now: float) -> None:
            seen.append(now)
            if len(seen) == 2:
                assert pacer.align("call", now + 0.0211, now)

        pacer.add("call", tick)
        try:
            await asyncio.sleep(0.15)
        finally:
            pacer.close()
        steps = [round(b - a, 9) for a, b in itertools.pairwise(seen)]
        assert steps[:2] == [0.020, 0.022]
        assert all(step == 0.020 for step in steps[2:]), steps

    async def test_removed_while_waiting_to_join_is_never_ticked(self) -> None:
        loop = asyncio.get_running_loop()
        pacer = MediaPacer(loop, slots=10)
        for n in range(10):
            pacer.add(n, lambda now: None)  # the slot moved to has a timer: the call waits
        seen: list[float] = []

        def tick(now: float) -> None:
            seen.append(now)
            pacer.align("call", now + 0.0211, now)
            pacer.remove("call")

        pacer.add("call", tick)
        try:
            await asyncio.sleep(0.08)
        finally:
            pacer.close()
        assert len(seen) == 1
        assert pacer.slot_of("call") is None

    async def test_due_just_before_the_current_slot_moves_nowhere(self) -> None:
        pacer = MediaPacer(asyncio.get_running_loop(), slots=10)
        seen: list[float] = []
        result: list[bool] = []

        def tick(now: float) -> None:
            seen.append(now)
            if len(seen) == 1:
                result.append(pacer.align("call", now - 0.0005 + 0.020, now))

        pacer.add("call", tick)
        try:
            await asyncio.sleep(0.07)
        finally:
            pacer.close()
        assert result == [False]
        assert all(round(b - a, 9) == 0.020 for a, b in itertools.pairwise(seen))

    async def test_within_the_tolerance_after_due_the_key_stays(self) -> None:
        loop = asyncio.get_running_loop()
        pacer = MediaPacer(loop, slots=10)
        results: list[bool] = []

        def tick(now: float) -> None:
            if not results:
                results.append(pacer.align("call", now - 0.003, now, tolerance=0.004))
                results.append(pacer.align("call", now - 0.005, now, tolerance=0.004))

        pacer.add("call", tick)
        try:
            await asyncio.sleep(0.03)
        finally:
            pacer.close()
        assert results == [False, True]  # 3 ms after its moment: stays; 5 ms: moves

    async def test_an_unknown_key_is_not_moved(self) -> None:
        loop = asyncio.get_running_loop()
        pacer = MediaPacer(loop)
        assert not pacer.align("nobody", loop.time(), loop.time())

    async def test_added_after_another_key_runs_in_its_slot_right_after_it(self) -> None:
        pacer = MediaPacer(asyncio.get_running_loop(), slots=10)
        order: list[str] = []
        for n in range(5):
            pacer.add(n, lambda now: None)
        pacer.add("in", lambda now: order.append("in"))
        pacer.add("other", lambda now: order.append("other"))
        pacer.add("out", lambda now: order.append("out"), after="in")
        try:
            assert pacer.slot_of("out") == pacer.slot_of("in") != pacer.slot_of("other")
            await asyncio.sleep(0.03)
        finally:
            pacer.close()
        assert order.index("out") == order.index("in") + 1


class TestMediaPacerSlots:
    """The 20 ms cut into slots, each with its own timer: calls spread evenly, each ticked on
    its slot's absolute deadlines every 20 ms, slots 2 ms apart."""

    async def test_calls_spread_evenly_over_the_slots(self) -> None:
        pacer = MediaPacer(asyncio.get_running_loop(), slots=10)
        try:
            for n in range(25):
                pacer.add(n, lambda now: None)
            counts = [0] * 10
            for n in range(25):
                slot = pacer.slot_of(n)
                assert slot is not None
                counts[slot] += 1
            assert sorted(counts) == [2] * 5 + [3] * 5
            pacer.remove(3)
            assert pacer.slot_of(3) is None
            assert len(pacer) == 24
        finally:
            pacer.close()

    async def test_each_call_every_20_ms_and_the_slots_2_ms_apart(self) -> None:
        pacer = MediaPacer(asyncio.get_running_loop(), slots=10)
        times: dict[int, list[float]] = {n: [] for n in range(10)}
        for n in range(10):
            pacer.add(n, times[n].append)
        try:
            await asyncio.sleep(0.12)
        finally:
            pacer.close()
        for n, seen in times.items():
            assert len(seen) >= 4, (n, seen)
            steps = [b - a for a, b in itertools.pairwise(seen)]
            assert all(abs(step - 0.020) < 1e-9 for step in steps), steps
        phases = sorted(times[n][0] for n in range(10))
        gaps = [b - a for a, b in itertools.pairwise(phases)]
        assert all(abs(gap - 0.002) < 1e-9 for gap in gaps), gaps

    async def test_a_slow_slot_does_not_delay_another_slots_deadlines(self) -> None:
        """One slot's stall is skipped and counted; the other slot keeps its own phase."""
        pacer = MediaPacer(asyncio.get_running_loop(), max_catch_up=1, slots=2)
        slow: list[float] = []
        fast: list[float] = []

        def stall(now: float) -> None:
            slow.append(now)
            if len(slow) == 2:
                time.sleep(0.1)

        pacer.add("slow", stall)
        pacer.add("fast", fast.append)
        try:
            await asyncio.sleep(0.2)
        finally:
            pacer.close()
        assert pacer.skipped >= 3
        assert len(slow) >= 4
        origin = fast[0]
        assert all(abs(((t - origin) / 0.020) - round((t - origin) / 0.020)) < 1e-6 for t in fast)
        assert all(abs(((t - slow[0]) / 0.020) - round((t - slow[0]) / 0.020)) < 1e-6 for t in slow)
        assert abs(abs(slow[0] - origin) % 0.020 - 0.010) < 1e-9
