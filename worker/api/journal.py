"""The telephony REST endpoints of the seed (journal, call detail, audio, call events, placing
a call). Filled in by the journal work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["telephony"])
