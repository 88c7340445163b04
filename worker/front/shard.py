"""Which media process owns a call: a pure function of its Call-ID.

``shard_of(call_id, n)`` is CRC-32 of the Call-ID's bytes modulo ``n``: every message of a
dialog (requests, responses, retransmissions, a BYE an hour later) reaches the same process
with no table in the front, so the front keeps no per-call state and a replaced process
owns exactly the calls its predecessor owned (it answers their in-dialog requests 481).
A process placing a call picks a Call-ID that falls on itself (``owned_call_id``).

Asterisk calls are spread the same way, by the call's key (``worker.ari.route.call_key``: the
channel id, for the channel and for the bridge and ExternalMedia channel named after it):
``owns_ari_id`` says whether a channel or bridge id falls on a process, and a process
originating a call picks a channel id that falls on itself (``owned_channel_id``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from worker.ari.route import call_key, random_channel_id
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


def owns_ari_id(index: int, processes: int, resource_id: str) -> bool:
    """Whether the Asterisk channel or bridge ``resource_id`` falls on process ``index``."""
    return shard_of(call_key(resource_id), processes) == index


def owned_channel_id(index: int, processes: int) -> str:
    """A new random channel id (``aispinner-<hex>``) that falls on process ``index``."""
    if not 0 <= index < processes:
        raise ValueError(f"index {index} is not in 0..{processes - 1}")
    while True:
        channel_id = random_channel_id()
        if shard_of(channel_id, processes) == index:
            return channel_id
