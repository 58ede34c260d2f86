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


async def pending(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = (
            {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if exists
            else set()
        )
    finally:
        await conn.close()
    return [p.name for p in pending_files(directory) if p.name not in done]


def main(argv: list[str] | None = None) -> int:
    """`python -m common.migrate [--check]`: apply, or (--check) exit 1 when any is pending."""
    import argparse

    from . import config, logs

    parser = argparse.ArgumentParser(prog="migrate")
    parser.add_argument("--check", action="store_true", help="exit 1 if migrations are pending")
    args = parser.parse_args(argv)
    settings = config.Base.from_env()
    logs.setup("migrate", settings.log_level)
    if args.check:
        missing = asyncio.run(pending(settings.require_database()))
        if missing:
            log.warning("pending migrations", extra={"pending": missing})
        return 1 if missing else 0
    asyncio.run(migrate(settings.require_database()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
