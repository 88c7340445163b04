"""An Asterisk 22 ARI test double, faithful to the recorded traffic in ``tests/data/ari``:
REST (Swagger-checked), the events websocket, externalMedia RTP and SIP phones on the other
side. ``AriDouble`` is the entry point; see ``server.py``."""

from tests.ari_double.dialing import DialPlan
from tests.ari_double.model import Bridge, Channel
from tests.ari_double.phone import Phone
from tests.ari_double.rtp import MediaStats, RtpRecord
from tests.ari_double.server import AriDouble, RestCall

__all__ = [
    "AriDouble",
    "Bridge",
    "Channel",
    "DialPlan",
    "MediaStats",
    "Phone",
    "RestCall",
    "RtpRecord",
]
