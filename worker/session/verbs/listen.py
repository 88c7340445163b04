"""The jambonz ``listen`` / ``stream`` verb: the call's audio to a second WebSocket
(``audio.jambonz.org``) and, with ``bidirectionalAudio``, the agent's audio back (streamed, or
``playAudio`` clips), marks, ``killAudio``, ``disconnect``, ``maxLength``, ``finishOnKey`` and
transcripts; the verb's ``actionHook`` when it ends."""

from __future__ import annotations

import asyncio
from typing import Any

from media.prompts import PromptDecodeError, decode_audio_file
from media.resample import Resampler
from worker.agent import listen_audio as la
from worker.agent.connection import (
    AgentConnectError,
    ListenClosed,
    ListenConnection,
    ListenConnectionEvent,
)
from worker.agent.verbs import ListenVerb
from worker.legs import SAMPLE_RATE
from worker.session.clock import wait_for
from worker.session.jambonz_driver import ActiveListen, JambonzDriver
from worker.session.pipeline import AgentSink


async def listen(driver: JambonzDriver, verb: ListenVerb) -> None:
    session = driver.session
    await session.open_media(verb.early_media)
    protocol = la.ListenAudioProtocol.from_verb(verb)
    metadata = protocol.metadata_message(driver.call_info(), verb.metadata)
    done = asyncio.Event()
    result: dict[str, Any] = {}
    return_rate = verb.return_sample_rate
    pipeline = session.pipeline

    def on_event(event: ListenConnectionEvent) -> None:
        if isinstance(event, la.AudioReceived):
            pipeline.agent_audio(event.audio, return_rate, session.clock.now())
        elif isinstance(event, la.PlayAudio):
            session.spawn(_play_audio(driver, event, protocol))
        elif isinstance(event, la.KillAudio):
            session.clear_agent_audio()
        elif isinstance(event, la.Mark):
            try:
                pipeline.mark(event.name)
            except ValueError as exc:
                driver.invalid_from_agent(f"bad mark: {exc}")
        elif isinstance(event, la.ClearMarks):
            pipeline.playout.forget_marks()
        elif isinstance(event, la.Disconnect):
            result["reason"] = "disconnect"
            done.set()
        elif isinstance(event, la.Transcription):
            session.transcribe(event.role or "agent", event.text)
        elif isinstance(event, ListenClosed):
            result.setdefault("reason", "socket-closed")
            done.set()
        elif isinstance(event, la.InvalidAudioMessage):
            driver.invalid_from_agent(event.reason)

    auth = verb.ws_auth
    connection = ListenConnection(
        verb.url,
        protocol,
        metadata,
        username=auth.username if auth else None,
        password=auth.password if auth else None,
        on_event=on_event,
        logger=session.log,
        metrics=session.metrics,
    )
    try:
        await connection.connect()
    except AgentConnectError as exc:
        driver.verb_error(str(exc), verb)
        await driver.hook(verb.action_hook, {"reason": "connect-failed", "error": str(exc)}, verb)
        return
    active = ActiveListen(connection, protocol)
    driver.listen = active
    combine = protocol.audio_frame if protocol.mix_type != "mono" else None
    pipeline.sink = AgentSink(connection.send_audio, protocol.sample_rate, combine)
    started = session.clock.now()
    digits: list[str] = []
    finish = set(verb.finish_on_key or "")

    def on_digit(digit: str) -> None:
        if digit in finish:
            digits.append(digit)
            result["reason"] = "finishOnKey"
            done.set()

    with session.dtmf_listener(on_digit):
        try:
            await wait_for(session.clock, done.wait(), verb.max_length)
        except TimeoutError:
            result["reason"] = "maxLength"
        finally:
            pipeline.sink = None
            if driver.listen is active:
                driver.listen = None
                await connection.close(graceful=True)
                driver.listen_done(active)
    elapsed = int(session.clock.now() - started)
    await driver.hook(
        verb.action_hook, {"digits": "".join(digits), "dialCallDuration": elapsed}, verb
    )


async def _play_audio(
    driver: JambonzDriver, event: la.PlayAudio, protocol: la.ListenAudioProtocol
) -> None:
    """A ``playAudio`` clip: decoded to 8 kHz, played (after what is queued, or replacing it),
    then ``playDone`` to the agent."""
    session = driver.session
    try:
        if event.content_type == "raw":
            pcm = event.audio
            rate = event.sample_rate or la.PLAY_AUDIO_DEFAULT_SAMPLE_RATE
            if rate != SAMPLE_RATE:
                resampler = Resampler(rate, SAMPLE_RATE)
                pcm = resampler.process(pcm) + resampler.flush()
        else:
            pcm = await asyncio.to_thread(decode_audio_file, event.audio, SAMPLE_RATE)
    except PromptDecodeError as exc:
        driver.invalid_from_agent(f"playAudio undecodable: {exc}")
        return
    if not event.queue_play:
        session.clear_agent_audio()
    await session.play_pcm(pcm)
    listen = driver.listen
    if listen is not None and listen.protocol is protocol:
        listen.connection.send_text(protocol.play_done(event.play_id, {}))
