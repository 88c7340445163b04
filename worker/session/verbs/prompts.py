"""jambonz verbs that play to the caller: ``say`` (the synthesizer), ``play`` (audio files from
http(s) or the prompts folder) and ``pause``."""

from __future__ import annotations

from worker.agent.verbs import PauseVerb, PlayVerb, SayVerb
from worker.legs import SAMPLE_RATE
from worker.session.fetch import FetchError
from worker.session.jambonz_driver import JambonzDriver
from worker.session.tts import SynthesisError

FOREVER_ROUNDS = 1000
"""``loop: 0`` / ``"forever"`` (jambonz) is bounded at this many rounds."""


def rounds(loop: int | str) -> int:
    """How many rounds a ``say``/``play`` runs."""
    if loop == "forever" or int(loop) <= 0:
        return FOREVER_ROUNDS
    return int(loop)


async def pause(driver: JambonzDriver, verb: PauseVerb) -> None:
    await driver.session.clock.sleep(verb.length)


async def say(driver: JambonzDriver, verb: SayVerb) -> None:
    session = driver.session
    await session.open_media(verb.early_media)
    synth = verb.synthesizer
    language = synth.language if synth else None
    voice = synth.voice if synth and isinstance(synth.voice, str) else None
    for _ in range(rounds(verb.loop)):
        for text in verb.texts:
            try:
                pcm = await session.services.synthesizer.synthesize(
                    text, language=language, voice=voice, sample_rate=SAMPLE_RATE
                )
            except SynthesisError as exc:
                driver.verb_error(str(exc), verb)
                return
            if not await session.play_pcm(pcm):
                return
            session.transcribe("agent", text)


async def play(driver: JambonzDriver, verb: PlayVerb) -> None:
    session = driver.session
    await session.open_media(verb.early_media)
    started = session.clock.now()
    completed = True
    for _ in range(rounds(verb.loop)):
        if not completed:  # interrupted (barge-in, killAudio): no next round
            break
        for url in verb.urls:
            try:
                pcm = await session.services.fetcher.fetch(url, SAMPLE_RATE)
            except FetchError as exc:
                driver.verb_error(str(exc), verb)
                await driver.hook(
                    verb.action_hook, {"reason": "playFailed", "error": str(exc)}, verb
                )
                return
            if not await session.play_pcm(pcm):
                completed = False
                break
    elapsed = session.clock.now() - started
    await driver.hook(
        verb.action_hook,
        {
            "reason": "playCompleted" if completed else "playInterrupted",
            "playback_seconds": int(elapsed),
            "playback_milliseconds": int(elapsed * 1000),
        },
        verb,
    )
