"""The jambonz ``dial`` verb: place outbound legs through a trunk and bridge one to the caller.

Every phone target is dialled at once, as jambonz does; the first to answer wins and the others
are cancelled. Early media (183 with SDP: ringback, carrier announcements) from the first target
that sends it reaches the caller as soon as it flows, with a 183 to an unanswered caller first.
Once a target answers (the caller is answered too, if not yet), audio flows both ways until
either side hangs up or ``timeLimit`` passes. The ``actionHook`` gets ``dial_call_status``,
``dial_sip_status`` and the durations.
"""

from __future__ import annotations

import asyncio
from typing import Any

from worker.agent.verbs import DialTarget, DialVerb
from worker.errors import WorkerError
from worker.legs import CallFailedError, Leg, LegEnd, LegWatch
from worker.session.clock import wait_for
from worker.session.jambonz_driver import JambonzDriver
from worker.session.session import CallSession

DEFAULT_RING_TIMEOUT_S = 60
_FAILED = {"busy": "busy", "no-answer": "no-answer"}


async def dial(driver: JambonzDriver, verb: DialVerb) -> None:
    session = driver.session
    place = session.services.place_call
    targets = [
        (target.trunk or driver.route.trunk, target)
        for target in verb.target
        if target.type == "phone" and target.number is not None
    ]
    if place is None or not targets or any(trunk is None for trunk, _ in targets):
        error = "dial needs phone targets and a trunk (route.trunk or target.trunk)"
        driver.verb_error(error, verb)
        await driver.hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
        return
    if not verb.answer_on_bridge:
        await session.answer()
    started = session.clock.now()
    ring_timeout = float(verb.timeout or DEFAULT_RING_TIMEOUT_S)
    legs: list[tuple[Leg, LegWatch]] = []
    try:
        for trunk, target in targets:
            leg = await _place(driver, verb, trunk or "", target, ring_timeout)
            if leg is not None:
                watch = LegWatch()
                leg.attach(watch)
                legs.append((leg, watch))
        if not legs:
            await driver.hook(verb.action_hook, {"dial_call_status": "failed"}, verb)
            return
        try:
            winner = await _first_answer(session, legs)
        except CallFailedError as exc:
            status = _FAILED.get(exc.end.cause, "failed")
            await driver.hook(
                verb.action_hook,
                {"dial_call_status": status, "dial_sip_status": exc.end.sip_status or 0},
                verb,
            )
            return
        _other, watch = winner
        await session.answer()
        answered = session.clock.now()
        limit = float(verb.time_limit) if verb.time_limit else None
        try:
            await wait_for(session.clock, asyncio.shield(watch.ended), limit)
        except TimeoutError:
            session.log.info("dial time limit reached", extra={"seconds": limit})
    finally:
        session.bridge_to(None)
        for leg, watch in legs:
            if not watch.ended.done():
                leg.hangup("bridge-ended" if watch.answered.done() else "cancelled")
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


async def _place(
    driver: JambonzDriver, verb: DialVerb, trunk: str, target: DialTarget, ring_timeout: float
) -> Leg | None:
    session = driver.session
    assert session.services.place_call is not None
    assert target.number is not None
    try:
        return await session.services.place_call(
            trunk,
            target.number,
            from_user=verb.caller_id or session.leg.info.from_user,
            ring_timeout_s=ring_timeout,
            near=session.leg,
        )
    except WorkerError as exc:
        driver.verb_error(str(exc), verb)
        return None


async def _first_answer(
    session: CallSession, legs: list[tuple[Leg, LegWatch]]
) -> tuple[Leg, LegWatch]:
    """The first leg to answer (the others are cancelled at once); the first one with early
    media is bridged meanwhile. Raises the first leg's ``CallFailedError``
    when none answers."""
    early: Leg | None = None
    while True:
        live = [(leg, watch) for leg, watch in legs if not watch.ended.done()]
        answered = [(leg, w) for leg, w in legs if w.answered.done() and not w.answered.exception()]
        if answered:
            leg, watch = answered[0]
            session.bridge_to(leg)
            for other, _other_watch in live:
                if other is not leg:
                    other.hangup("cancelled")  # the first answer wins
            return leg, watch
        if not live:
            ends = [w.ended.result() for _, w in legs]
            raise CallFailedError(_most_telling(ends))
        if early is None:
            with_media = [leg for leg, w in live if w.media.done() and not w.media.cancelled()]
            if with_media:
                early = with_media[0]
                session.bridge_to(early)
                await session.open_media(early_media=True)  # a 183 for an unanswered caller
                continue
        waiting: set[asyncio.Future[Any]] = set()
        for _, watch in live:
            waiting.update((watch.answered, watch.ended))
            if early is None:
                waiting.add(watch.media)
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)


def _most_telling(ends: list[LegEnd]) -> LegEnd:
    """What to report when every target failed: a busy one, else the first."""
    return next((end for end in ends if end.cause == "busy"), ends[0])
