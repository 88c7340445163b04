"""What the API's handlers reach: settings, the token verifier, the database pool, the hub,
the worker's way to place a call, and what ``GET /metrics`` serves. Built once by the worker
(``worker.app``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from worker.api.auth import TokenVerifier
from worker.api.hub import Hub
from worker.config import Settings
from worker.metrics import Render

PlaceCall = Callable[[str, str, str | None, str | None], Awaitable[str]]
"""(number, trunk, route match or None, caller id or None) → the new call's call_id."""


@dataclass
class ApiContext:
    settings: Settings
    verifier: TokenVerifier
    pool: Any
    """asyncpg pool of the journal's database."""
    hub: Hub
    place_call: PlaceCall | None = None
    worker_id: str = "worker"
    metrics: Render | None = None
    """The exposition ``GET /metrics`` serves (sync or async); None: this process's
    ``process_metrics().render``. A front of several media processes gives a function that
    merges theirs (``worker.metrics.merge_expositions``)."""
