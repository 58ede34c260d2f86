"""Applies db/migrations/*.sql in order, once each, under an advisory lock."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg

MIGRATIONS = Path(__file__).resolve().parent.parent / "db" / "migrations"
# Any constant works; it only has to be the same for every starter.
LOCK_KEY = 0x57A_6E7

log = logging.getLogger(__name__)


def pending_files(directory: Path = MIGRATIONS) -> list[Path]:
    return sorted(directory.glob("*.sql"))


async def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Returns the names of the migrations this call applied."""
    conn = await asyncpg.connect(dsn, timeout=10)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    text PRIMARY KEY,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for path in pending_files(directory):
                if path.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", path.name
                    )
                log.info("applied migration", extra={"migration": path.name})
                applied.append(path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()
    return applied


def main() -> None:
    from . import config, logs

    settings = config.Settings.from_env()
    logs.setup("migrate", settings.log_level)
    asyncio.run(migrate(settings.require_database()))


if __name__ == "__main__":
    main()
