"""Call events: the models (one discriminated union on ``type``, the shapes of
``shared/seeds/realtime-events-websocket.txt``) and the in-process bus with its JSONL sink.
"""

from worker.events.bus import EventBus, EventLog, JsonlSink, Subscriber, Subscription
from worker.events.models import (
    CallDoneEvent,
    CallDtmfEvent,
    CallInterruptionEvent,
    CallStartedEvent,
    CallStatusEvent,
    CallTranscriptEvent,
    CallVoicemailDetectedEvent,
    Event,
    JournalEntry,
    JournalNewEvent,
    parse_event,
)

__all__ = [
    "CallDoneEvent",
    "CallDtmfEvent",
    "CallInterruptionEvent",
    "CallStartedEvent",
    "CallStatusEvent",
    "CallTranscriptEvent",
    "CallVoicemailDetectedEvent",
    "Event",
    "EventBus",
    "EventLog",
    "JournalEntry",
    "JournalNewEvent",
    "JsonlSink",
    "Subscriber",
    "Subscription",
    "parse_event",
]
