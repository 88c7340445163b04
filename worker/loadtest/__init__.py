"""``aispinner-worker loadtest``: load the worker (or any SIP address) with SIPp callers and a few
probe phones, bridged to an external echo agent, and measure it from outside.

Modules: ``marker`` (the timing marker in the probes' audio, pure), ``rtpstats`` (what a probe
counts of the RTP it receives, pure), ``procs`` (CPU and memory of a process tree from /proc),
``sipp`` (the SIPp bulk callers: scenario, their RTP capture with DTMF, the command),
``echo_agent`` (the agent process), ``probe`` (the probe phones' process), ``analysis`` (the
figures from what was collected, pure), ``report`` (JSON, PNG plots, markdown) and ``run``
(the orchestration).
"""
