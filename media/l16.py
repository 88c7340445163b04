"""Linear 16-bit PCM at 16 kHz on RTP as Asterisk sends and takes it for ExternalMedia
``format=slin16``: network (big-endian) byte order, payload type 118 (Asterisk's private static
mapping, ``main/rtp_engine.c``), 640-byte payloads per 20 ms. Encoding and decoding are a byte
swap to and from the little-endian PCM the rest of ``media`` uses.
"""

from __future__ import annotations

import numpy as np

from media.g711 import AudioCodec

PT_SLIN16 = 118
CLOCK_RATE = 16000


def swap16(pcm: bytes) -> bytes:
    """16-bit samples with their bytes swapped (big-endian ⇄ little-endian); an odd trailing
    byte is dropped."""
    usable = len(pcm) & ~1
    return np.frombuffer(pcm, dtype=np.uint16, count=usable >> 1).byteswap().tobytes()


SLIN16 = AudioCodec("L16", PT_SLIN16, swap16, swap16, clock_rate=CLOCK_RATE)
