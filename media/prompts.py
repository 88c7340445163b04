"""Decoding of prompt audio files (WAV, MP3, OGG, and FLAC, AAC, MP4/M4A, WebM) to mono 16-bit PCM
at the call's sample rate, through PyAV and its resampler."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import av
import numpy as np

__all__ = ["ALLOWED_DEMUXERS", "PromptDecodeError", "decode_audio_file"]

# FFmpeg demuxers a prompt may use. The input is opened by Python and handed over as a stream, and
# only these demuxers are allowed, so FFmpeg never follows a URL or a playlist found in the data.
ALLOWED_DEMUXERS = "wav,mp3,ogg,flac,aac,mov,matroska"
_DEFAULT_MAX_SECONDS = 600.0


class PromptDecodeError(ValueError):
    """The input is not audio we can decode (unreadable, not a media file, no audio stream)."""


def decode_audio_file(
    source: str | os.PathLike[str] | bytes,
    sample_rate: int,
    *,
    max_seconds: float = _DEFAULT_MAX_SECONDS,
) -> bytes:
    """Decode ``source`` (a path, or the file's bytes) to mono s16le PCM at ``sample_rate``.

    Multichannel audio is averaged to mono. Raises ``PromptDecodeError`` if the input cannot be
    read or holds no audio, or decodes to more than ``max_seconds``; ``ValueError`` for a bad
    ``sample_rate``.
    """
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, not {sample_rate!r}")
    label = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    max_bytes = int(max_seconds * sample_rate) * 2
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), label, sample_rate, max_bytes, max_seconds)
    try:
        with open(label, "rb") as stream:
            return _decode(stream, label, sample_rate, max_bytes, max_seconds)
    except OSError as exc:
        raise PromptDecodeError(f"{label}: cannot read ({exc.strerror or exc})") from exc


def _decode(
    stream: BinaryIO, label: str, sample_rate: int, max_bytes: int, max_seconds: float
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        with av.open(stream, mode="r", options={"format_whitelist": ALLOWED_DEMUXERS}) as container:
            if not container.streams.audio:
                raise PromptDecodeError(f"{label}: no audio stream")
            audio = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            for frame in container.decode(audio):
                for out in resampler.resample(frame):
                    size += _append(chunks, out)
                if size > max_bytes:
                    raise PromptDecodeError(f"{label}: longer than {max_seconds} s")
            for out in resampler.resample(None):
                size += _append(chunks, out)
    except PromptDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise PromptDecodeError(f"{label}: cannot decode audio ({exc})") from exc
    if size == 0:
        raise PromptDecodeError(f"{label}: no audio samples")
    if size > max_bytes:
        raise PromptDecodeError(f"{label}: longer than {max_seconds} s")
    return b"".join(chunks)


def _append(chunks: list[bytes], frame: av.AudioFrame) -> int:
    """Add one resampled frame's samples (packed s16 mono) to ``chunks``; return their size."""
    data = np.ascontiguousarray(frame.to_ndarray(), dtype="<i2").reshape(-1).tobytes()
    chunks.append(data)
    return len(data)
