"""Webhook endpoints and deliveries through the API. Filled in by the webhooks work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["webhooks"])
