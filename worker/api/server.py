"""``ApiServer``: uvicorn serving the API inside the worker's event loop (no second process,
no thread): ``start`` binds and returns once it listens (``port`` is then the real one, also
when ``api.port`` is 0); ``close`` stops it, closing its WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("worker.api")
# uvicorn logs each WebSocket's request line, query string (tokens) included, at info.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class ApiServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws_ping_interval=None,  # the hub pings as the seed says, with JSON messages
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        # The worker owns SIGINT/SIGTERM (its loop's handlers drain calls first): uvicorn must
        # not replace them while it serves.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self.port = port

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (a taken port: OSError)
                raise OSError(f"the API did not start on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                self.port = int(sock.getsockname()[1])
        log.info("API listening", extra={"host": self.host, "port": self.port})

    async def _serve(self) -> None:
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise OSError(f"cannot listen on {self.host}:{self.port}") from exc

    async def close(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 5)
        self._task = None
