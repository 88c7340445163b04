"""Which media process owns a call: a pure function of its Call-ID.

``shard_of(call_id, n)`` is CRC-32 of the Call-ID's bytes modulo ``n``: every message of a
dialog (requests, responses, retransmissions, a BYE an hour later) reaches the same process
with no table in the front, so the front keeps no per-call state and a replaced process
owns exactly the calls its predecessor owned (it answers their in-dialog requests 481).
A process placing a call picks a Call-ID that falls on itself (``owned_call_id``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from worker.sip.message import generate_call_id


def shard_of(call_id: str, processes: int) -> int:
    """The index (0 .. processes-1) of the process that owns ``call_id``."""
    return zlib.crc32(call_id.encode("utf-8", "surrogateescape")) % processes


def owned_call_id(
    index: int,
    processes: int,
    host: str | None = None,
    make: Callable[[str | None], str] = generate_call_id,
) -> str:
    """A new random Call-ID that ``shard_of`` gives to ``index`` (about ``processes`` draws)."""
    if not 0 <= index < processes:
        raise ValueError(f"index {index} is not in 0..{processes - 1}")
    while True:
        call_id = make(host)
        if shard_of(call_id, processes) == index:
            return call_id
