"""The API's request dependencies: the worker's ``ApiContext`` (``Context``) and the caller
(``Caller``: the principal of a JWT from ``Authorization: Bearer`` or ``?token=``; 401 without
one). The routers import them from here, and ``app.py`` imports the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from worker.api.auth import Principal, bearer_or_query_token
from worker.api.context import ApiContext


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx


def principal(
    request: Request,
    token: Annotated[
        str | None, Query(description="a JWT, for clients that cannot set headers")
    ] = None,
) -> Principal:
    """The caller, from ``Authorization: Bearer <JWT>`` (or ``?token=``); 401 without one."""
    return context(request).verifier.verify(bearer_or_query_token(request, token))


Caller = Annotated[Principal, Depends(principal)]
Context = Annotated[ApiContext, Depends(context)]
