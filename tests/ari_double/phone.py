"""The SIP side of one PJSIP channel, what SIPp did in the recordings: the caller of an inbound
call or the callee of an originate. It talks (``send_audio``), presses keys, hangs up, and
records what it heard, the DTMF the app sent it and how the call ended."""

from __future__ import annotations

import asyncio
from typing import Protocol

DTMF_DIGITS = frozenset("0123456789ABCD*#")
BYTES_PER_MS = 16  # 8 kHz, 16-bit


class PhoneLine(Protocol):
    """What a phone asks of the simulated Asterisk."""

    def phone_audio(self, channel_id: str, pcm: bytes) -> None: ...

    def phone_dtmf(self, channel_id: str, digit: str, duration_ms: int) -> None: ...

    async def phone_hangup(self, channel_id: str) -> None: ...


class Phone:
    def __init__(self, line: PhoneLine, channel_id: str, *, echo: bool = False) -> None:
        self.channel_id = channel_id
        self.echo = echo
        """Send back whatever is heard, like SIPp's ``-rtp_echo``."""
        self.heard = bytearray()
        """8 kHz 16-bit little-endian PCM of what this phone heard."""
        self.dtmf_sent: list[str] = []
        """Digits the app sent with ``POST /channels/{id}/dtmf``, one per character."""
        self.answered = False
        self.ringing = False
        self.progress = False
        self.ended = asyncio.Event()
        self.hangup_reason: str | None = None
        """``reason`` or ``reason_code`` of the app's ``DELETE /channels/{id}``, if it hung up."""
        self.hangup_cause: int | None = None
        """The Q.850 cause the far end was given (the BYE's Reason), when Asterisk hung up."""
        self.stasis_failed = False
        """Stasis() failed (no app connected), so Asterisk hung the call up at once."""
        self._line = line

    async def send_audio(self, pcm: bytes, *, ptime_ms: int = 20, realtime: bool = True) -> None:
        """Talk: ``pcm`` (8 kHz 16-bit LE mono) in packets of ``ptime_ms``, paced in real time
        unless ``realtime`` is False. Goes to the other channels of the bridge, if any."""
        if ptime_ms <= 0:
            raise ValueError("ptime_ms must be positive")
        frame = ptime_ms * BYTES_PER_MS
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, offset in enumerate(range(0, len(pcm), frame)):
            if realtime:
                delay = start + index * ptime_ms / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % 8 == 7:
                await asyncio.sleep(0)
            if self.ended.is_set():
                return
            self._line.phone_audio(self.channel_id, pcm[offset : offset + frame])
        await asyncio.sleep(0)

    def press(self, digit: str, duration_ms: int = 280) -> None:
        """An RFC 4733 digit: Asterisk reports it once, at its end (``duration_ms`` later)."""
        if digit not in DTMF_DIGITS or len(digit) != 1:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        self._line.phone_dtmf(self.channel_id, digit, duration_ms)

    async def hang_up(self) -> None:
        """BYE (CANCEL before the answer): Asterisk's events for it are sent when this returns."""
        await self._line.phone_hangup(self.channel_id)

    # -- called by the double --------------------------------------------------------------------
    def hear(self, pcm: bytes) -> None:
        if self.ended.is_set():
            return
        self.heard += pcm
        if self.echo:
            asyncio.get_running_loop().call_soon(self._line.phone_audio, self.channel_id, pcm)

    def end(self, cause: int | None) -> None:
        if not self.ended.is_set():
            self.hangup_cause = cause
            self.ringing = False
            self.ended.set()
