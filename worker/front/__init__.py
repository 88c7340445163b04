"""Several media processes behind one SIP address: the front (``front.py``) owns the SIP
sockets and hands each call's messages to the media process that owns its Call-ID
(``shard.py``), over one Unix socket per process (``ipc.py``); ``media.py`` is the media
process's side. See docs/ARCHITECTURE.md, "Processes"."""
