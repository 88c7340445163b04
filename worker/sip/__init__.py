"""The worker's SIP stack. Sans-I/O cores (no sockets, no event loop, no clock reads; time is
a ``now`` parameter, deadlines come out of ``next_timeout()`` and go in to ``handle_timeout``):

- ``message``: the RFC 3261 parser and serializer, typed header values, TCP stream framing.
- ``transaction``: client and server transactions (RFC 3261 §17, RFC 6026) and their timers.
- ``dialog``: dialog state and in-dialog requests (RFC 3261 §12).
- ``auth``: Digest authentication, client and server (RFC 7616, RFC 2617, RFC 3261 §22).
- ``sdp``: SDP and the offer/answer model for one audio stream (RFC 4566, RFC 3264, RFC 5761).
- ``limits``: per-source token buckets for admission.
- ``core``: the user agent's rules (admission, INVITE, CANCEL, BYE, re-INVITE/UPDATE, INFO,
  REGISTER, digest retries) on top of the transaction layer.

The asyncio side, which does I/O: ``transport`` (UDP and TCP sockets), ``ua`` (the adapter
that runs the core on the loop, with RTP ports, name resolution and timers) and ``leg``
(``SipLeg``, one call as a ``worker.legs.Leg``).
"""
