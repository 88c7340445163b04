"""The jambonz ``gather`` verb: collect DTMF digits (``numDigits``/``minDigits``/``maxDigits``,
``finishOnKey``, ``timeout``, ``interDigitTimeout``), with a nested ``say`` or ``play`` prompt
that the first key press interrupts. Speech input needs a recognizer; none is built in."""

from __future__ import annotations

import asyncio

from worker.agent.verbs import GatherVerb, SayVerb
from worker.session.clock import wait_for
from worker.session.jambonz_driver import JambonzDriver
from worker.session.verbs.prompts import play, say

DEFAULT_TIMEOUT_S = 5.0


async def gather(driver: JambonzDriver, verb: GatherVerb) -> None:
    session = driver.session
    if "speech" in verb.input:
        driver.verb_error("speech input needs a recognizer; none is configured", verb)
        if "digits" not in verb.input:
            await driver.hook(verb.action_hook, {"reason": "error", "error": "no recognizer"}, verb)
            return
    await session.answer()
    digits: list[str] = []
    keys: asyncio.Queue[str] = asyncio.Queue()
    prompt_task: asyncio.Task[None] | None = None
    first: asyncio.Task[str] | None = None
    loop = asyncio.get_running_loop()
    with session.dtmf_listener(keys.put_nowait):
        try:
            prompt = verb.say or verb.play
            if prompt is not None:
                prompt_task = loop.create_task(
                    say(driver, prompt) if isinstance(prompt, SayVerb) else play(driver, prompt)
                )
            max_digits = verb.num_digits or verb.max_digits or 99
            finish = verb.finish_on_key
            timeout = DEFAULT_TIMEOUT_S if verb.timeout is None else verb.timeout
            inter = verb.inter_digit_timeout or timeout
            reason = "timeout"
            pending: str | None = None
            if prompt_task is not None:
                first = loop.create_task(keys.get())
                await asyncio.wait({prompt_task, first}, return_when=asyncio.FIRST_COMPLETED)
                if first.done():
                    prompt_task.cancel()  # DTMF barge-in
                    pending = first.result()
                else:
                    first.cancel()
            while True:
                if pending is None:
                    try:
                        pending = await wait_for(
                            session.clock, keys.get(), inter if digits else timeout
                        )
                    except TimeoutError:
                        break
                digit, pending = pending, None
                if finish and digit == finish:
                    reason = "dtmfDetected"
                    break
                digits.append(digit)
                if len(digits) >= max_digits:
                    reason = "dtmfDetected"
                    break
            # Enough digits when the timer fired: they are the result (numDigits needs all).
            needed = verb.num_digits or verb.min_digits or 1
            if reason == "timeout" and digits and len(digits) >= needed:
                reason = "dtmfDetected"
        finally:
            for task in (first, prompt_task):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
    await driver.hook(verb.action_hook, {"digits": "".join(digits), "reason": reason}, verb)
