"""The socket-free parts of worker/agent/connection.py: the duration-bounded audio queue, the
jambonz retry fragment (``#rc=N&rp=...``) and URL redaction for logs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.agent.connection import (
    DEFAULT_CONNECT_RETRIES,
    AgentConnectError,
    AudioQueue,
    RetryPolicy,
    parse_retry_fragment,
    redact_url,
)
from worker.errors import LocalError

FRAME_20MS = b"\x00" * 320  # 20 ms of L16 at 8 kHz: 16 bytes per ms


class TestAudioQueueDropsOldest:
    def test_within_the_bound_nothing_is_dropped(self) -> None:
        queue = AudioQueue(max_ms=100, bytes_per_ms=16)
        for _ in range(5):
            queue.push(FRAME_20MS)
        assert len(queue) == 5
        assert queue.queued_ms == pytest.approx(100)
        assert queue.dropped_frames == 0

    def test_over_the_bound_the_oldest_frames_go_and_are_counted(self) -> None:
        queue = AudioQueue(max_ms=100, bytes_per_ms=16)
        frames = [bytes([i]) * 320 for i in range(8)]
        for frame in frames:
            queue.push(frame)
        assert [queue.pop()[0] for _ in range(len(queue))] == frames[3:]
        assert queue.dropped_frames == 3
        assert queue.dropped_ms == pytest.approx(60)
        assert queue.queued_ms == 0

    def test_a_single_frame_larger_than_the_bound_is_kept(self) -> None:
        queue = AudioQueue(max_ms=10, bytes_per_ms=16)
        queue.push(FRAME_20MS)
        assert len(queue) == 1
        queue.push(FRAME_20MS)
        assert len(queue) == 1
        assert queue.dropped_frames == 1

    def test_offsets_count_dropped_audio(self) -> None:
        queue = AudioQueue(max_ms=40, bytes_per_ms=16)
        for _ in range(5):
            queue.push(FRAME_20MS)
        assert [queue.pop()[1] for _ in range(len(queue))] == [3 * 320, 4 * 320]

    def test_clear_is_not_a_drop(self) -> None:
        queue = AudioQueue(max_ms=100, bytes_per_ms=16)
        queue.push(FRAME_20MS)
        queue.push(FRAME_20MS)
        assert queue.clear() == 2
        assert (len(queue), queue.queued_ms, queue.dropped_frames) == (0, 0, 0)

    def test_pop_on_empty_raises_index_error(self) -> None:
        with pytest.raises(IndexError):
            AudioQueue(max_ms=100, bytes_per_ms=16).pop()

    def test_bounds_must_be_positive(self) -> None:
        with pytest.raises(LocalError):
            AudioQueue(max_ms=0, bytes_per_ms=16)

    @given(st.lists(st.integers(min_value=1, max_value=2000), max_size=200))
    def test_queued_audio_never_exceeds_the_bound_plus_one_frame(self, sizes: list[int]) -> None:
        queue = AudioQueue(max_ms=100, bytes_per_ms=16)
        pushed = 0
        for size in sizes:
            queue.push(b"\x00" * size)
            pushed += size
            assert queue.queued_ms <= 100 or len(queue) == 1
        kept = sum(len(queue.pop()[0]) for _ in range(len(queue)))
        assert kept + queue.dropped_bytes == pushed


class TestJambonzRetryFragment:
    def test_no_fragment_keeps_the_defaults(self) -> None:
        url, policy = parse_retry_fragment("wss://agent.example/ws")
        assert url == "wss://agent.example/ws"
        assert policy == RetryPolicy(DEFAULT_CONNECT_RETRIES, frozenset({"ct"}))

    def test_rc_and_rp_are_read_and_the_fragment_removed(self) -> None:
        url, policy = parse_retry_fragment("wss://agent.example/ws?x=1#rc=3&rp=ct,5xx")
        assert url == "wss://agent.example/ws?x=1"
        assert policy == RetryPolicy(3, frozenset({"ct", "5xx"}))

    def test_rc_is_capped_at_5_and_unknown_rp_ignored(self) -> None:
        _, policy = parse_retry_fragment("ws://h/#rc=9&rp=bogus,4xx")
        assert policy == RetryPolicy(5, frozenset({"4xx"}))

    def test_unreadable_values_keep_defaults(self) -> None:
        _, policy = parse_retry_fragment("ws://h/#rc=many&rp=bogus")
        assert policy == RetryPolicy()

    @pytest.mark.parametrize(
        ("kind", "status", "retry_on", "allowed"),
        [
            ("refused", None, {"ct"}, True),
            ("reset", None, {"ct"}, True),
            ("timeout", None, {"ct"}, True),
            ("timeout", None, {"rt"}, True),
            ("refused", None, {"5xx"}, False),
            ("status", 503, {"ct"}, False),
            ("status", 503, {"5xx"}, True),
            ("status", 404, {"4xx"}, True),
            ("status", 404, {"5xx"}, False),
            ("subprotocol", None, {"ct"}, False),
            ("subprotocol", None, {"all"}, True),
            ("url", None, {"all"}, False),
        ],
    )
    def test_which_errors_are_retried(
        self, kind: str, status: int | None, retry_on: set[str], allowed: bool
    ) -> None:
        error = AgentConnectError("ws://h/", kind, "x", status)  # type: ignore[arg-type]
        assert RetryPolicy(1, frozenset(retry_on)).allows(error) is allowed


class TestRedactUrl:
    def test_credentials_query_and_fragment_are_removed(self) -> None:
        shown = redact_url("wss://user:pw@agent.example:8443/ws?token=abc#rc=2")
        assert shown == "wss://agent.example:8443/ws"

    def test_ipv6_host_keeps_its_brackets(self) -> None:
        assert redact_url("ws://[::1]:9000/a") == "ws://[::1]:9000/a"

    @pytest.mark.parametrize("url", ["ws://[::1/a", "ws://agent.example:99999/a"])
    def test_a_malformed_url_is_shown_as_invalid_without_raising(self, url: str) -> None:
        assert redact_url(url) == "<invalid URL>"
