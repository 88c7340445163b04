"""Speech synthesis for the ``say`` verb: the pluggable ``Synthesizer`` interface and
``EspeakSynthesizer``, which runs the ``espeak-ng`` binary and caches the PCM it produces.

Also home of ``PcmCache``, the byte-bounded LRU that both synthesis and prompt fetching use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from media.prompts import PromptDecodeError, decode_audio_file
from worker.errors import LocalError

__all__ = [
    "EspeakSynthesizer",
    "PcmCache",
    "SynthesisError",
    "Synthesizer",
]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

# espeak-ng voice names: "en-us", "de", "en-us+f3", "gmw/en-GB-x-rp", "mb-en1".
_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+/-]{0,63}")


class SynthesisError(LocalError):
    """Speech could not be produced: bad text or voice, synthesizer missing, failed or too slow."""


class Synthesizer(Protocol):
    """Turns text into speech; what the ``say`` verb plays."""

    async def synthesize(
        self, text: str, *, language: str | None, voice: str | None, sample_rate: int
    ) -> bytes:
        """Return ``text`` spoken as mono s16le PCM at ``sample_rate``.

        ``voice`` and ``language`` are the verb's (or the application defaults'), either may be
        ``None``. Raises ``SynthesisError``.
        """
        ...


class PcmCache(Generic[K]):
    """An LRU map of keys to PCM ``bytes``, bounded by the total size of its values.

    A value larger than the whole budget is not stored. Not thread-safe; use from one event loop.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[K, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> bytes | None:
        """The value for ``key`` (now the most recently used), or ``None``."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: bytes) -> None:
        """Store ``value``, evicting the least recently used entries to stay within budget."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.total_bytes -= len(old)
        if len(value) > self.max_bytes:
            return
        self._entries[key] = value
        self.total_bytes += len(value)
        while self.total_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.total_bytes -= len(evicted)

    def clear(self) -> None:
        self._entries.clear()
        self.total_bytes = 0


class EspeakSynthesizer:
    """``Synthesizer`` backed by the Debian ``espeak-ng`` binary.

    Runs ``espeak-ng --stdout -v <voice> -- <text>`` as a subprocess (no shell; ``--`` so text
    starting with ``-`` is spoken, not parsed as an option), decodes and resamples the WAV it
    writes with ``media.prompts.decode_audio_file`` in a worker thread, and caches the PCM keyed
    by ``(text, voice, language, sample_rate)``.

    The voice is ``voice`` if given, else ``language`` lower-cased (``"en-US"`` → ``"en-us"``,
    an espeak voice name), else ``default_voice``.
    """

    def __init__(
        self,
        *,
        binary: str = "espeak-ng",
        default_voice: str = "en-us",
        max_text_chars: int = 2000,
        timeout: float = 15.0,
        cache_max_bytes: int = 32 * 1024 * 1024,
        max_concurrency: int = 4,
    ) -> None:
        if max_text_chars <= 0 or timeout <= 0 or max_concurrency <= 0:
            raise ValueError("max_text_chars, timeout and max_concurrency must be positive")
        self.binary = binary
        self.default_voice = default_voice
        self.max_text_chars = max_text_chars
        self.timeout = timeout
        self.cache: PcmCache[tuple[str, str | None, str | None, int]] = PcmCache(cache_max_bytes)
        self._slots = asyncio.Semaphore(max_concurrency)

    async def synthesize(
        self, text: str, *, language: str | None, voice: str | None, sample_rate: int
    ) -> bytes:
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, not {sample_rate!r}")
        key = (text, voice, language, sample_rate)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if not text.strip():
            raise SynthesisError("nothing to say: the text is empty")
        if len(text) > self.max_text_chars:
            raise SynthesisError(
                f"text is {len(text)} characters, longer than the {self.max_text_chars} allowed"
            )
        if "\x00" in text:
            raise SynthesisError("text contains a NUL character")
        espeak_voice = self.resolve_voice(language=language, voice=voice)
        async with self._slots:
            wav = await self._run(espeak_voice, text)
        try:
            # espeak-ng's duration is bounded by max_text_chars, so no extra length cap here.
            pcm = await asyncio.to_thread(decode_audio_file, wav, sample_rate)
        except PromptDecodeError as exc:
            raise SynthesisError(f"espeak-ng output is not usable audio: {exc}") from exc
        self.cache.put(key, pcm)
        log.debug("espeak-ng: %d chars, voice %s -> %d bytes", len(text), espeak_voice, len(pcm))
        return pcm

    def resolve_voice(self, *, language: str | None, voice: str | None) -> str:
        """The espeak-ng voice name for a request; ``SynthesisError`` if it is not a safe name."""
        if voice:
            chosen = voice
        elif language:
            chosen = language.lower()
        else:
            chosen = self.default_voice
        if not _VOICE_NAME.fullmatch(chosen) or ".." in chosen:
            raise SynthesisError(f"invalid espeak-ng voice name {chosen!r}")
        return chosen

    async def _run(self, voice: str, text: str) -> bytes:
        """Run espeak-ng once; return the WAV it wrote to stdout."""
        argv = [self.binary, "--stdout", "-v", voice, "--", text]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise SynthesisError(f"cannot run {self.binary!r}: {exc}") from exc
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            raise SynthesisError(
                f"{self.binary} took longer than {self.timeout} s (voice {voice!r})"
            ) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            reason = stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise SynthesisError(f"{self.binary} failed for voice {voice!r}: {reason}")
        if not stdout:
            raise SynthesisError(f"{self.binary} produced no audio for voice {voice!r}")
        return stdout
