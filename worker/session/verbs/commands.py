"""jambonz commands (live call control from the app, PROTOCOLS.md §1.6): ``redirect``,
``call:status``, ``listen:status`` / ``stream:status``, ``mute:status``, ``dtmf``,
``sip:request`` and ``config``."""

from __future__ import annotations

from worker.agent.jambonz import (
    CallStatusCommand,
    Command,
    ConfigCommand,
    DtmfCommand,
    ListenStatusCommand,
    MuteStatusCommand,
    RedirectCommand,
    RedirectHookCommand,
    SipRequestCommand,
)
from worker.session.jambonz_driver import JambonzDriver
from worker.session.verbs.calls import send_digits


def handle_command(driver: JambonzDriver, command: Command) -> None:
    session = driver.session
    pipeline = session.pipeline
    if isinstance(command, RedirectCommand):
        driver.replace_verbs(command.verbs, command.queue_command)
    elif isinstance(command, RedirectHookCommand):
        driver.command_error("redirect", "redirect to a new application URL is not supported")
    elif isinstance(command, CallStatusCommand):
        # jambonz: "completed" hangs up; "no-answer" rejects an unanswered call (503 inbound,
        # CANCEL outbound) and means nothing once the call is answered.
        if command.call_status == "no-answer" and session.answered:
            driver.command_error("call:status", "no-answer applies only to an unanswered call")
        else:
            session.hangup("agent-hangup", 503 if command.call_status == "no-answer" else 480)
    elif isinstance(command, ListenStatusCommand):
        if pipeline.sink is not None:
            pipeline.sink.paused = command.status == "pause"
    elif isinstance(command, MuteStatusCommand):
        pipeline.muted = command.mute
    elif isinstance(command, DtmfCommand):  # one or more keys, paced like the dtmf verb
        session.spawn(send_digits(driver, command.digit, command.duration))
    elif isinstance(command, SipRequestCommand):
        sent = session.leg.send_request(
            command.method, command.content_type, command.content, command.headers
        )
        if not sent:
            driver.command_error("sip:request", "no SIP dialog to send the request in")
    elif isinstance(command, ConfigCommand):
        driver.apply_config(command.config.to_wire())
