"""ARI error responses: the status, HTTP reason phrase and message Asterisk's resource code
answers with (``{"message": ...}``, or ``{"error": "Allocation failed"}`` from
``ast_ari_response_alloc_failed``), and the double's own 501 for what it does not model."""

from __future__ import annotations

from typing import Any


class AriError(Exception):
    """An error response; ``key`` is ``message`` except for Asterisk's allocation failure."""

    def __init__(self, status: int, reason: str, message: str, key: str = "message") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.key = key

    def body(self) -> dict[str, Any]:
        return {self.key: self.message}


def allocation_failed() -> AriError:
    """``ast_ari_response_alloc_failed``: what an originate to an unknown endpoint gets."""
    return AriError(500, "Internal Server Error", "Allocation failed", key="error")


def internal_error() -> AriError:
    """What externalMedia answers for an unknown format or a duplicate channelId."""
    return AriError(
        500,
        "Internal Server Error",
        "An internal error prevented this request from being handled",
    )


def channel_not_found() -> AriError:
    return AriError(404, "Not Found", "Channel not found")


def not_modelled(what: str) -> AriError:
    """Something real Asterisk does that the double does not: refused rather than faked."""
    return AriError(501, "Not Implemented", f"ARI test double: {what} is not modelled")
