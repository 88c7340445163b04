"""The SIP side of one PJSIP channel, what SIPp did in the recordings: the caller of an inbound
call or the callee of an originate. It talks (``send_audio``), presses keys, hangs up, and
records what it heard, the DTMF the app sent it and how the call ended."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

DTMF_DIGITS = frozenset("0123456789ABCD*#")
BYTES_PER_MS = 16  # 8 kHz, 16-bit
MIX_RESYNC_S = 0.1
"""A source silent for longer than this starts again at the end of what was heard."""


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
        self._cursors: dict[str, tuple[int, float]] = {}

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
    def hear(self, pcm: bytes, source: str = "") -> None:
        """A frame from ``source`` (a channel of the bridge). Several sources are mixed as a
        mixing bridge does: each stream is laid at its own running position in ``heard``
        (re-anchored at the end of ``heard`` after a pause) and summed with the others."""
        if self.ended.is_set():
            return
        now = asyncio.get_running_loop().time()
        cursor, last = self._cursors.get(source, (None, 0.0))
        if cursor is None or now - last > MIX_RESYNC_S:
            cursor = len(self.heard)
        end = cursor + len(pcm)
        if end > len(self.heard):
            self.heard += bytes(end - len(self.heard))
        mixed = np.frombuffer(self.heard, dtype="<i2", count=len(pcm) // 2, offset=cursor)
        added = mixed.astype(np.int32) + np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
        self.heard[cursor : cursor + len(pcm) // 2 * 2] = (
            np.clip(added, -32768, 32767).astype("<i2").tobytes()
        )
        self._cursors[source] = (end, now)
        if self.echo:
            asyncio.get_running_loop().call_soon(self._line.phone_audio, self.channel_id, pcm)

    def end(self, cause: int | None) -> None:
        if not self.ended.is_set():
            self.hangup_cause = cause
            self.ringing = False
            self.ended.set()
