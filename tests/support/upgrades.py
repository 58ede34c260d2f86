"""Databases as an earlier release left them, for tests of an upgrade in place."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from common import migrate
from tests.support.servers import Postgres


async def migrated_before(pg: Postgres, folder: Path, first_new: str) -> str:
    """A new database with the migrations before `first_new` (a file name's prefix, "0031")
    applied, and no later one; returns its DSN. `migrate.migrate(dsn)` then upgrades it."""
    await asyncio.to_thread(_copy_before, folder, first_new)
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn, folder)
    return dsn


def _copy_before(folder: Path, first_new: str) -> None:
    folder.mkdir()
    for path in migrate.pending_files():
        if path.name < first_new:
            shutil.copy(path, folder / path.name)
