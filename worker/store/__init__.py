"""PostgreSQL: the call journal and the event outbox (``schema.py`` applies the numbered
migrations, ``embedded.py`` runs a private server when no ``database_url`` is set,
``outbox.py`` writes each event with its journal change, ``spool.py`` keeps events on disk while
the database is unreachable)."""
