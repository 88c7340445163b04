"""Per-call sessions: the glue that runs a call's verbs against its media (speech synthesis,
prompt fetching, playout) and its agent connection."""
