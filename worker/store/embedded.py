"""A private PostgreSQL for a worker started without ``database_url``: the ``pgserver`` wheel's
PostgreSQL 16, its data in ``data_dir/postgres``, listening on a Unix socket only, stopped when
the worker stops (``close``).

pgserver runs blocking commands (initdb takes about 1.5 s the first time, a start 0.15 s), so
they run in a thread. As root it creates a ``pgserver`` system user to run the server, chowns the
data folder to it and makes the folder's parents readable (``chmod g+rx,o+rx``), as PostgreSQL
will not run as root.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("worker.store")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "postgres"
        self._server: Any = None

    async def start(self) -> str:
        """Start (or attach to) the server; returns its connection URI."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.to_thread(_get_server, self.path)
        uri = str(self._server.get_uri())
        log.info("private PostgreSQL running", extra={"data": str(self.path)})
        return uri

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.cleanup)


def _get_server(path: Path) -> Any:
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (it is, on a server) and uses /tmp.
        warnings.simplefilter("ignore")
        import pgserver

        return pgserver.get_server(path, cleanup_mode="stop")  # type: ignore[attr-defined]
