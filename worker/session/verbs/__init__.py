"""The jambonz verb handlers, grouped by family, and the table ``JambonzDriver`` dispatches
through: one handler per verb type. ``commands`` handles the app's live commands."""

from __future__ import annotations

from collections.abc import Mapping

from worker.agent.verbs import (
    AnswerVerb,
    ConfigVerb,
    DialVerb,
    DtmfVerb,
    GatherVerb,
    HangupVerb,
    ListenVerb,
    PauseVerb,
    PlayVerb,
    RedirectVerb,
    SayVerb,
    SipDeclineVerb,
    TagVerb,
    Verb,
)
from worker.session.jambonz_driver import VerbHandler
from worker.session.verbs import calls, dial, gather, listen, prompts
from worker.session.verbs.commands import handle_command

VERB_HANDLERS: Mapping[type[Verb], VerbHandler] = {
    AnswerVerb: calls.answer,
    HangupVerb: calls.hangup,
    SipDeclineVerb: calls.decline,
    DtmfVerb: calls.dtmf,
    TagVerb: calls.tag,
    RedirectVerb: calls.redirect,
    ConfigVerb: calls.config,
    PauseVerb: prompts.pause,
    SayVerb: prompts.say,
    PlayVerb: prompts.play,
    GatherVerb: gather.gather,
    ListenVerb: listen.listen,
    DialVerb: dial.dial,
}

__all__ = ["VERB_HANDLERS", "handle_command"]
