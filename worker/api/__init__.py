"""The HTTP API (FastAPI, served in the worker's event loop by uvicorn): the telephony REST
endpoints of the seeds, the realtime hub WebSocket, the SSE stream and the per-call observer.
``app.create_app`` builds it from an ``ApiContext``; ``server.ApiServer`` runs it."""
