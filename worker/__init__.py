"""The aispinner telephony media worker: everything with I/O. SIP (``sip``), RTP endpoints
(``rtp``), the leg seam (``legs``), agent protocols (``agent``), call sessions (``session``),
events (``events``), settings, logging and the command line."""

__version__ = "0.1.0"
