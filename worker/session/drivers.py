"""Which ``AgentDriver`` runs a session: by the route's action and agent protocol."""

from __future__ import annotations

from worker.session.echo_driver import EchoDriver
from worker.session.jambonz_driver import JambonzDriver
from worker.session.session import AgentDriver, CallSession
from worker.session.twilio_driver import TwilioDriver
from worker.session.verbs import VERB_HANDLERS, handle_command


def driver_for(session: CallSession) -> AgentDriver:
    route = session.route
    if route.action == "echo":
        return EchoDriver(session)
    if route.protocol == "twilio":
        return TwilioDriver(session)
    return JambonzDriver(session, VERB_HANDLERS, handle_command)
