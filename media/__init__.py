"""Pure audio and RTP for the worker: no sockets, no event loop, no clock reads.

Conventions shared by every module here:
- PCM is ``bytes`` of signed 16-bit little-endian mono samples (stereo: interleaved L, R).
- Time is a parameter: functions that need it take ``now`` (seconds, float, monotonic).
- Bad input never raises out of the per-packet path: it is rejected and counted.
"""
