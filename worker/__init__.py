"""The aispinner telephony media worker: everything with I/O (SIP, ARI, agents, sessions, API)."""

__version__ = "0.1.0"
