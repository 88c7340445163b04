"""Agent protocols, sans-I/O: jambonz verbs, the ``ws.jambonz.org`` control protocol, the
``audio.jambonz.org`` listen/stream audio protocol and Twilio Media Streams (worker = client).

Nothing here opens a socket or reads a clock: feed frames in with ``receive(data, now)``, take
events out, and send the texts these classes build. The connection manager that owns the
websockets lives beside them.
"""
