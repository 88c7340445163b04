"""The jambonz ``dial`` verb: place an outbound leg through a trunk and bridge it to the caller.

The far leg is bridged from the start: its early media (183 with SDP: ringback, carrier
announcements) reaches the caller as soon as it flows, with a 183 to an unanswered caller
first, as jambonz does. Once the far end answers (the caller is answered too, if not yet),
audio flows both ways until either side hangs up or ``timeLimit`` passes. The ``actionHook``
gets ``dial_call_status``, ``dial_sip_status`` and the durations.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.agent.verbs import DialVerb
from worker.errors import WorkerError
from worker.legs import CallFailedError, LegWatch
from worker.session.clock import wait_for
from worker.session.jambonz_driver import JambonzDriver

DEFAULT_RING_TIMEOUT_S = 60


async def dial(driver: JambonzDriver, verb: DialVerb) -> None:
    session = driver.session
    place = session.services.place_call
    target = verb.target[0]
    trunk = target.trunk or driver.route.trunk
    if place is None or trunk is None or target.number is None:
        driver.verb_error(
            "dial needs a phone target and a trunk (route.trunk or target.trunk)", verb
        )
        await driver.hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
        return
    if not verb.answer_on_bridge:
        await session.answer()
    started = session.clock.now()
    try:
        other = await place(
            trunk,
            target.number,
            from_user=verb.caller_id or session.leg.info.from_user,
            ring_timeout_s=float(verb.timeout or DEFAULT_RING_TIMEOUT_S),
        )
    except WorkerError as exc:
        driver.verb_error(str(exc), verb)
        await driver.hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
        return
    watch = LegWatch()
    other.attach(watch)
    session.bridge_to(other)
    try:
        try:
            first: set[asyncio.Future[Any]] = {watch.media, watch.ended}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if watch.media.done() and not watch.media.cancelled():
                await session.open_media(early_media=True)  # a 183 for an unanswered caller
            await watch.answered
        except CallFailedError as exc:
            status = {"busy": "busy", "no-answer": "no-answer"}.get(exc.end.cause, "failed")
            await driver.hook(
                verb.action_hook,
                {"dial_call_status": status, "dial_sip_status": exc.end.sip_status or 0},
                verb,
            )
            return
        await session.answer()
        answered = session.clock.now()
        limit = float(verb.time_limit) if verb.time_limit else None
        try:
            await wait_for(session.clock, asyncio.shield(watch.ended), limit)
        except TimeoutError:
            session.log.info("dial time limit reached", extra={"seconds": limit})
    finally:
        session.bridge_to(None)
        if not watch.ended.done():
            other.hangup("bridge-ended" if watch.answered.done() else "cancelled")
    await driver.hook(
        verb.action_hook,
        {
            "dial_call_status": "completed",
            "dial_sip_status": 200,
            "dial_call_duration": int(session.clock.now() - answered),
            "duration": int(session.clock.now() - started),
        },
        verb,
    )
