"""EspeakSynthesizer against the real espeak-ng binary, and the byte-bounded PcmCache."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.errors import LocalError
from worker.session.tts import EspeakSynthesizer, PcmCache, SynthesisError, Synthesizer


@pytest.fixture(scope="module", autouse=True)
def _espeak_installed() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install espeak-ng")


def _rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2)))


class _CountingExec:
    """Wraps asyncio.create_subprocess_exec to count the processes started."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._real = asyncio.create_subprocess_exec

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        self.calls.append(args)
        return await self._real(*args, **kwargs)


class TestEspeakSynthesis:
    def test_is_a_synthesizer(self) -> None:
        synth: Synthesizer = EspeakSynthesizer()
        assert isinstance(synth, EspeakSynthesizer)

    @pytest.mark.parametrize("rate", [8000, 16000])
    async def test_speech_is_pcm_of_plausible_duration(self, rate: int) -> None:
        synth = EspeakSynthesizer()
        pcm = await synth.synthesize("Hello world", language=None, voice=None, sample_rate=rate)
        assert len(pcm) % 2 == 0
        seconds = len(pcm) / 2 / rate
        assert 0.4 < seconds < 3.0
        assert _rms(pcm) > 300  # speech, not silence

    async def test_rates_give_the_same_duration(self) -> None:
        synth = EspeakSynthesizer()
        narrow = await synth.synthesize(
            "Testing one two", language=None, voice=None, sample_rate=8000
        )
        wide = await synth.synthesize(
            "Testing one two", language=None, voice=None, sample_rate=16000
        )
        assert abs(len(wide) / 32000 - len(narrow) / 16000) < 0.01

    async def test_longer_text_takes_longer(self) -> None:
        synth = EspeakSynthesizer()
        short = await synth.synthesize("Hi", language=None, voice=None, sample_rate=8000)
        long = await synth.synthesize(
            "Hello, this is a much longer sentence for the speech synthesizer to read out.",
            language=None,
            voice=None,
            sample_rate=8000,
        )
        assert len(long) > 3 * len(short)

    async def test_text_starting_with_a_dash_is_spoken_not_parsed(self) -> None:
        synth = EspeakSynthesizer()
        pcm = await synth.synthesize("--help", language=None, voice=None, sample_rate=8000)
        assert len(pcm) / 16000 > 0.2
        assert _rms(pcm) > 300

    async def test_language_selects_the_voice(self) -> None:
        synth = EspeakSynthesizer()
        assert synth.resolve_voice(language="en-US", voice=None) == "en-us"
        assert synth.resolve_voice(language="en-US", voice="de") == "de"
        assert synth.resolve_voice(language=None, voice=None) == "en-us"
        english = await synth.synthesize(
            "Guten Tag", language="en-US", voice=None, sample_rate=8000
        )
        german = await synth.synthesize("Guten Tag", language="de", voice=None, sample_rate=8000)
        assert english != german
        variant = await synth.synthesize("Hello", language=None, voice="en-us+f3", sample_rate=8000)
        assert len(variant) > 0

    async def test_text_too_long_is_rejected(self) -> None:
        synth = EspeakSynthesizer(max_text_chars=50)
        with pytest.raises(SynthesisError, match="longer than the 50 allowed"):
            await synth.synthesize("a" * 51, language=None, voice=None, sample_rate=8000)

    @pytest.mark.parametrize("text", ["", "   \n", "nul\x00byte"])
    async def test_empty_or_nul_text_is_rejected(self, text: str) -> None:
        with pytest.raises(SynthesisError):
            await EspeakSynthesizer().synthesize(text, language=None, voice=None, sample_rate=8000)

    async def test_unknown_voice_is_a_synthesis_error(self) -> None:
        synth = EspeakSynthesizer()
        with pytest.raises(SynthesisError, match="voice does not exist") as info:
            await synth.synthesize("Hello", language=None, voice="xx-nosuch", sample_rate=8000)
        assert isinstance(info.value, LocalError)

    @pytest.mark.parametrize("voice", ["-w/tmp/x", "../../etc/passwd", "en us", "a" * 80])
    async def test_unsafe_voice_names_never_reach_espeak(
        self, voice: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        counting = _CountingExec()
        monkeypatch.setattr("worker.session.tts.asyncio.create_subprocess_exec", counting)
        with pytest.raises(SynthesisError, match="invalid espeak-ng voice name"):
            await EspeakSynthesizer().synthesize(
                "Hello", language=None, voice=voice, sample_rate=8000
            )
        assert counting.calls == []

    async def test_bad_sample_rate_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="sample_rate"):
            await EspeakSynthesizer().synthesize("Hi", language=None, voice=None, sample_rate=0)

    async def test_missing_binary_is_a_synthesis_error(self, tmp_path: Path) -> None:
        synth = EspeakSynthesizer(binary=str(tmp_path / "no-such-espeak"))
        with pytest.raises(SynthesisError, match="cannot run"):
            await synth.synthesize("Hello", language=None, voice=None, sample_rate=8000)

    async def test_slow_synthesizer_times_out_and_is_killed(self, tmp_path: Path) -> None:
        pid_file = tmp_path / "pid"
        script = tmp_path / "slow-espeak"
        script.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\nexec sleep 30\n')
        script.chmod(0o755)
        synth = EspeakSynthesizer(binary=str(script), timeout=0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(SynthesisError, match=r"took longer than 0\.5 s"):
            await synth.synthesize("Hello", language=None, voice=None, sample_rate=8000)
        assert loop.time() - started < 5.0
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(pid, 0)

    async def test_output_that_is_not_audio_is_a_synthesis_error(self, tmp_path: Path) -> None:
        script = tmp_path / "fake-espeak"
        script.write_text("#!/bin/sh\necho 'this is not a wav file'\n")
        script.chmod(0o755)
        synth = EspeakSynthesizer(binary=str(script))
        with pytest.raises(SynthesisError, match="not usable audio"):
            await synth.synthesize("Hello", language=None, voice=None, sample_rate=8000)


class TestEspeakCache:
    async def test_cache_hit_returns_identical_bytes_without_a_second_process(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        counting = _CountingExec()
        monkeypatch.setattr("worker.session.tts.asyncio.create_subprocess_exec", counting)
        synth = EspeakSynthesizer()
        first = await synth.synthesize("Cache me", language="en-US", voice=None, sample_rate=8000)
        second = await synth.synthesize("Cache me", language="en-US", voice=None, sample_rate=8000)
        assert second is first
        assert len(counting.calls) == 1
        assert counting.calls[0] == ("espeak-ng", "--stdout", "-v", "en-us", "--", "Cache me")
        assert (synth.cache.hits, synth.cache.misses) == (1, 1)

    async def test_key_includes_rate_voice_and_language(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        counting = _CountingExec()
        monkeypatch.setattr("worker.session.tts.asyncio.create_subprocess_exec", counting)
        synth = EspeakSynthesizer()
        await synth.synthesize("Key", language=None, voice=None, sample_rate=8000)
        await synth.synthesize("Key", language=None, voice=None, sample_rate=16000)
        await synth.synthesize("Key", language=None, voice="en-gb", sample_rate=8000)
        await synth.synthesize("Key", language="de", voice=None, sample_rate=8000)
        await synth.synthesize("Key", language=None, voice=None, sample_rate=8000)
        assert len(counting.calls) == 4

    async def test_cache_stays_within_its_byte_budget(self) -> None:
        synth = EspeakSynthesizer(cache_max_bytes=40_000)
        for word in ["one", "two", "three", "four", "five", "six"]:
            await synth.synthesize(word, language=None, voice=None, sample_rate=16000)
            assert synth.cache.total_bytes <= 40_000
        assert 0 < len(synth.cache) < 6

    async def test_failures_are_not_cached(self, monkeypatch: pytest.MonkeyPatch) -> None:
        counting = _CountingExec()
        monkeypatch.setattr("worker.session.tts.asyncio.create_subprocess_exec", counting)
        synth = EspeakSynthesizer()
        for _ in range(2):
            with pytest.raises(SynthesisError):
                await synth.synthesize("Hi", language=None, voice="xx-nosuch", sample_rate=8000)
        assert len(counting.calls) == 2
        assert len(synth.cache) == 0


class TestPcmCache:
    def test_least_recently_used_is_evicted_first(self) -> None:
        cache: PcmCache[str] = PcmCache(max_bytes=10)
        cache.put("a", b"aaaa")
        cache.put("b", b"bbbb")
        assert cache.get("a") == b"aaaa"  # a is now the most recent
        cache.put("c", b"cccc")
        assert "b" not in cache
        assert cache.get("a") == b"aaaa"
        assert cache.get("c") == b"cccc"
        assert cache.total_bytes == 8

    def test_value_larger_than_budget_is_not_stored(self) -> None:
        cache: PcmCache[str] = PcmCache(max_bytes=4)
        cache.put("a", b"aa")
        cache.put("big", b"x" * 5)
        assert "big" not in cache
        assert cache.get("a") == b"aa"

    def test_replacing_a_key_updates_the_total(self) -> None:
        cache: PcmCache[str] = PcmCache(max_bytes=100)
        cache.put("a", b"x" * 10)
        cache.put("a", b"y" * 30)
        assert cache.total_bytes == 30
        assert len(cache) == 1
        cache.put("a", b"z" * 200)  # too big now: the old value is dropped too
        assert cache.total_bytes == 0
        assert "a" not in cache

    def test_counts_hits_and_misses_and_clears(self) -> None:
        cache: PcmCache[int] = PcmCache(max_bytes=100)
        assert cache.get(1) is None
        cache.put(1, b"1")
        assert cache.get(1) == b"1"
        assert (cache.hits, cache.misses) == (1, 1)
        cache.clear()
        assert (len(cache), cache.total_bytes) == (0, 0)

    def test_negative_budget_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="max_bytes"):
            PcmCache[str](max_bytes=-1)
