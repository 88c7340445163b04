"""The schema: numbered SQL files in ``migrations/`` (``0001_init.sql`` ...), each applied once,
in order, in its own transaction, recorded in ``schema_migrations``. Workers starting at the same
time take a PostgreSQL advisory lock first, so exactly one applies what is missing and the others
find it done.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Any

log = logging.getLogger("worker.store")

MIGRATION_LOCK = 0x61697370  # "aisp": the advisory lock key every worker agrees on
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped, in order."""
    found = []
    for entry in resources.files("worker.store.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match is not None:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n: {versions}")
    return found


async def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations on ``conn`` (an asyncpg connection); returns the versions
    applied by this call."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("migration applied", extra={"migration": name})
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
