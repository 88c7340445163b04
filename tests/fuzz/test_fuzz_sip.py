"""Fuzzing the SIP stack with mutations of real messages (SIPp captures, Asterisk-form
messages): the parser and the TCP framer raise nothing but their own errors, and the user
agent's core, fed every mutant, never raises, answers only the source, and keeps no state for
what it refuses."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.mutate import FUZZ, mutations, seeds
from tests.sip_pair import A_ADDRESS, settings_for
from worker.errors import LocalError
from worker.sip.core import IncomingCall, UserAgentCore
from worker.sip.message import SipMessageError, StreamFramer, parse
from worker.sip.transaction import Transport


class TestRfc3261Section7ParserUnderMutation:
    @FUZZ
    @given(mutations())
    def test_parse_raises_only_its_own_errors(self, data: bytes) -> None:
        with contextlib.suppress(SipMessageError):
            parse(data)

    @FUZZ
    @given(st.lists(mutations(), min_size=1, max_size=4), st.integers(1, 97))
    def test_tcp_framing_in_any_chunks(self, messages: list[bytes], chunk: int) -> None:
        framer = StreamFramer(max_body_size=4096)
        stream = b"".join(messages)
        try:
            for i in range(0, len(stream), chunk):
                framer.feed(stream[i : i + chunk])
        except (SipMessageError, LocalError):
            pass  # a lost framing is raised; the transport closes the connection

    def test_every_seed_is_real(self) -> None:
        assert len(seeds()) >= 30


def core_for(tmp: Path) -> UserAgentCore:
    settings = settings_for(tmp, "b", sip={"rate_limit_per_second": 1e6, "rate_limit_burst": 10**6})
    return UserAgentCore(settings)


class TestUserAgentCoreUnderMutation:
    @FUZZ
    @given(st.lists(mutations(), min_size=1, max_size=6))
    def test_core_never_raises_and_answers_only_the_source(self, messages: list[bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            core = core_for(Path(tmp))
            now = 1000.0
            for data in messages:
                try:
                    message = parse(data)
                except SipMessageError as exc:
                    core.parse_error(exc, A_ADDRESS, Transport.UDP, now)
                else:
                    core.receive(message, A_ADDRESS, Transport.UDP, now)
                for event in core.events():
                    if isinstance(event, IncomingCall):
                        core.media_opened(event.call, 6000, now)
                for out in core.data_to_send():
                    if out.data.startswith(b"SIP/2.0 "):  # a response: only to the source
                        assert out.destination == A_ADDRESS
                now += 0.1
            for _ in range(5):  # the timers fire cleanly too
                now += 40.0
                core.handle_timeout(now)
                core.data_to_send()
            core.close(now)
            assert core.events() is not None
