"""jambonz verbs that act on the call itself: ``answer``, ``hangup``, ``sip:decline``,
``dtmf``, ``tag``, ``redirect`` and ``config``."""

from __future__ import annotations

from worker.agent.verbs import (
    AnswerVerb,
    ConfigVerb,
    DtmfVerb,
    HangupVerb,
    RedirectVerb,
    SipDeclineVerb,
    TagVerb,
)
from worker.session.jambonz_driver import JambonzDriver
from worker.session.session import event_for_status

MAX_DIGIT_MS = 8000
"""One RFC 4733 event holds at most ~8 s (its 16-bit duration at 8 kHz)."""
PAUSE_DIGIT_S = 0.5
"""What ``w`` in a ``dtmf`` verb waits."""


async def answer(driver: JambonzDriver, verb: AnswerVerb) -> None:
    await driver.session.answer()


async def hangup(driver: JambonzDriver, verb: HangupVerb) -> None:
    driver.session.hangup("agent-hangup", 480)


async def decline(driver: JambonzDriver, verb: SipDeclineVerb) -> None:
    session = driver.session
    if session.answered:
        driver.verb_error("sip:decline on an answered call", verb)
        return
    session.feed(event_for_status(verb.status), verb.status, verb.reason)
    session.hangup("declined", verb.status, verb.reason)


async def dtmf(driver: JambonzDriver, verb: DtmfVerb) -> None:
    await send_digits(driver, verb.dtmf, verb.duration)


async def send_digits(driver: JambonzDriver, digits: str, duration_ms: int) -> None:
    """Send ``digits`` one after another, each for ``duration_ms`` (``w`` waits half a second);
    the next digit starts once the previous one has been sent."""
    session = driver.session
    for digit in digits:
        if digit in ("w", "W"):
            await session.clock.sleep(PAUSE_DIGIT_S)
            continue
        duration = min(duration_ms, MAX_DIGIT_MS)
        session.leg.send_dtmf(digit, duration)
        await session.clock.sleep(duration / 1000 + 0.1)


async def tag(driver: JambonzDriver, verb: TagVerb) -> None:
    driver.customer_data = dict(verb.data)


async def redirect(driver: JambonzDriver, verb: RedirectVerb) -> None:
    await driver.hook(verb.action_hook, {}, verb)


async def config(driver: JambonzDriver, verb: ConfigVerb) -> None:
    driver.apply_config(verb.to_wire())
