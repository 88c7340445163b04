"""The worker's one error tree.

``WorkerError`` is the root. ``LocalError`` means this process did something illegal or was
configured wrongly; ``RemoteError`` means a peer (SIP endpoint, agent, Asterisk, API client) sent
something we cannot accept. Remote faults are answered on the wire (SIP 4xx, ``jambonz:error``,
HTTP 4xx) and never escape a single call.
"""


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class LocalError(WorkerError):
    """We did something wrong: a bug, a bad setting, an illegal call on a protocol core."""


class ConfigError(LocalError):
    """A setting is missing or invalid."""


class RemoteError(WorkerError):
    """A peer sent something malformed or illegal."""
