"""G.711 µ-law (PCMU) and A-law (PCMA) encoding and decoding through numpy lookup tables.

The tables are computed at import from the algorithm CPython's ``audioop`` uses (14-bit µ-law and
13-bit A-law, with audioop's clip), so the results are bit-exact with ``audioop`` for every input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 8000
SAMPLES_PER_FRAME = 160  # 20 ms
PT_PCMU = 0
PT_PCMA = 8

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # largest 14-bit magnitude before the bias
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])

_Table = npt.NDArray[np.generic]


def _all_int16_by_uint16_index() -> npt.NDArray[np.int32]:
    """Every int16 value, placed at the index of its uint16 bit pattern."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)


def _ulaw_encode_table() -> _Table:
    # audioop: st_14linear2ulaw(sample >> 2)
    pcm = _all_int16_by_uint16_index() >> 2
    negative = pcm < 0
    mask = np.where(negative, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude, side="left")
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F)
    # Past the last segment (only the clipped magnitude reaches it) audioop returns 0x7F ^ mask.
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_table() -> _Table:
    # audioop: st_ulaw2linear16
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype("<i2")


def _alaw_encode_table() -> _Table:
    # audioop: st_linear2alaw(sample >> 3)
    pcm = _all_int16_by_uint16_index() >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    magnitude = np.where(negative, -pcm - 1, pcm)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude, side="left")
    shift = np.where(segment < 2, 1, segment)
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)  # unreachable for 13-bit input; kept as in audioop
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_table() -> _Table:
    # audioop: st_alaw2linear16
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    segment = (a & 0x70) >> 4
    t = np.where(segment == 0, t + 8, (t + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, t, -t).astype("<i2")


_ULAW_ENCODE = _ulaw_encode_table()
_ULAW_DECODE = _ulaw_decode_table()
_ALAW_ENCODE = _alaw_encode_table()
_ALAW_DECODE = _alaw_decode_table()


def ulaw_encode(pcm: bytes) -> bytes:
    """Encode 16-bit PCM to µ-law, one byte per sample; a trailing odd byte is ignored."""
    return _ULAW_ENCODE.take(np.frombuffer(pcm, dtype="<u2", count=len(pcm) >> 1)).tobytes()


def ulaw_decode(data: bytes) -> bytes:
    """Decode µ-law to 16-bit PCM."""
    return _ULAW_DECODE.take(np.frombuffer(data, dtype=np.uint8)).tobytes()


def alaw_encode(pcm: bytes) -> bytes:
    """Encode 16-bit PCM to A-law, one byte per sample; a trailing odd byte is ignored."""
    return _ALAW_ENCODE.take(np.frombuffer(pcm, dtype="<u2", count=len(pcm) >> 1)).tobytes()


def alaw_decode(data: bytes) -> bytes:
    """Decode A-law to 16-bit PCM."""
    return _ALAW_DECODE.take(np.frombuffer(data, dtype=np.uint8)).tobytes()


@dataclass(frozen=True, slots=True)
class AudioCodec:
    """An RTP audio codec: its encoding name, payload type, functions between its payload and
    16-bit little-endian PCM at ``clock_rate``. G.711 here; linear 16 kHz in ``media.l16``."""

    name: str
    payload_type: int
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]
    clock_rate: int = SAMPLE_RATE


PCMU = AudioCodec("PCMU", PT_PCMU, ulaw_encode, ulaw_decode)
PCMA = AudioCodec("PCMA", PT_PCMA, alaw_encode, alaw_decode)
_BY_PAYLOAD_TYPE = {PT_PCMU: PCMU, PT_PCMA: PCMA}
_BY_NAME = {"PCMU": PCMU, "PCMA": PCMA}


def codec_for_payload_type(payload_type: int) -> AudioCodec | None:
    """The G.711 codec of a static RTP payload type (0 or 8), or None."""
    return _BY_PAYLOAD_TYPE.get(payload_type)


def codec_for_name(name: str) -> AudioCodec | None:
    """The G.711 codec of an SDP encoding name (``PCMU``/``PCMA``, any case), or None."""
    return _BY_NAME.get(name.upper())
