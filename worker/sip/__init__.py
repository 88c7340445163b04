"""Sans-I/O SIP for the worker: no sockets, no event loop, no clock reads.

- ``message``: the RFC 3261 parser and serializer, typed header values, TCP stream framing.
- ``transaction``: client and server transactions (RFC 3261 §17, RFC 6026) and their timers.
- ``dialog``: dialog state and in-dialog requests (RFC 3261 §12).
- ``auth``: Digest authentication, client and server (RFC 7616, RFC 2617, RFC 3261 §22).
- ``sdp``: SDP and the offer/answer model for one audio stream (RFC 4566, RFC 3264).

Time-dependent objects take ``now`` (seconds) and expose ``next_timeout()`` and
``handle_timeout(now)``; the asyncio transport and the user agent sit on top.
"""
