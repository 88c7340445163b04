"""The FastAPI application: error handling (every error is ``{"detail": "..."}`` with 401, 403,
404, 409, 413 or 422, never a stack trace), the request size limit, authentication
dependencies, ``/healthz``, ``/metrics`` (Prometheus, without authentication: for a scrape on
a private address), and the routers: ``journal`` (the telephony REST endpoints), ``hub``
(realtime WebSocket, SSE, per-call observer) and ``webhooks``.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import __version__
from worker.api import hub, journal, webhooks
from worker.api.auth import AuthError, ForbiddenError
from worker.api.context import ApiContext
from worker.metrics import CONTENT_TYPE, process_metrics


class BodyLimit:
    """413 for a request body over ``limit`` bytes, whether the request says so up front
    (``Content-Length``) or streams it (chunked, no length): the body is counted as the
    application reads it, and the read that goes past the limit fails with 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        detail = f"request body over {limit} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="aispinner-worker",
        version=__version__,
        description="Telephony journal, call audio, realtime events and webhooks of a worker.",
    )
    app.state.context = ctx
    limit = ctx.settings.api.max_request_bytes

    app.add_middleware(BodyLimit, limit=limit)

    @app.exception_handler(AuthError)
    async def unauthorized(request: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(ForbiddenError)
    async def forbidden(request: Request, exc: ForbiddenError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Liveness and the database: 200 with ``database: true`` when PostgreSQL answers."""
        try:
            async with ctx.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            database = True
        except Exception:
            database = False
        return {"status": "ok", "database": database, "worker_id": ctx.worker_id}

    render = ctx.metrics if ctx.metrics is not None else process_metrics().render

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        """The worker's Prometheus metrics (text format 0.0.4; the README lists them). No
        token: serve the API on a private address, or scrape the metrics server instead."""
        body = render()
        if inspect.isawaitable(body):
            body = await body
        return Response(content=body, media_type=CONTENT_TYPE)

    app.include_router(journal.router)
    app.include_router(hub.router)
    app.include_router(webhooks.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                hub.stream_event_schemas()
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = tuple(error.get("loc", ()))
        where = ".".join(str(p) for p in loc if p not in ("body", "query", "path"))
        if not where and loc == ("body",):
            where = "body"  # no body, or not a JSON object
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"
