"""db/schema.sql is what the migrations build; an applied migration cannot change unnoticed."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest

from common import migrate, roles, tls
from devtools import schema
from devtools.servers import Postgres

ROOT = Path(__file__).resolve().parents[2]


async def test_the_migrations_build_what_db_schema_sql_says(pg: Postgres) -> None:
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn)
    built = await asyncio.to_thread(schema.dump, dsn)
    assert built == schema.SNAPSHOT.read_text(), (
        "db/schema.sql is not what db/migrations build: run `make schema` and commit it"
    )


def _copy_migrations(to: Path) -> Path:
    to.mkdir()
    for path in migrate.pending_files():
        shutil.copy(path, to / path.name)
    return to


async def _checksums(dsn: str) -> dict[str, str | None]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    finally:
        await conn.close()
    return {r["version"]: r["checksum"] for r in rows}


async def test_an_applied_migration_that_was_edited_is_refused(
    pg: Postgres, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path / "migrations")
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn, directory)
    # A comment is enough: the file is no longer the one that was applied.
    edited = directory / "0002_functions.sql"
    edited.write_text(edited.read_text() + "\n-- tidied up\n")
    with pytest.raises(migrate.MigrationChanged, match=r"0002_functions\.sql"):
        await migrate.migrate(dsn, directory)
    # Restored, it is accepted again.
    shutil.copy(migrate.MIGRATIONS / edited.name, edited)
    assert await migrate.migrate(dsn, directory) == []


async def test_a_database_migrated_before_checksums_gets_them_on_its_first_run(
    pg: Postgres,
) -> None:
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        # The runner's table as the previous release left it.
        await conn.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
    finally:
        await conn.close()
    assert await migrate.migrate(dsn) == []
    recorded = await _checksums(dsn)
    assert recorded == {p.name: migrate.checksum(p) for p in migrate.pending_files()}


async def test_the_state_service_will_not_start_on_an_edited_migration(
    pg: Postgres, tmp_path: Path
) -> None:
    dsn = await pg.create_database(None)
    tls.create(tmp_path)  # so that the migration check is what stops it
    await migrate.migrate(dsn)
    urls = await roles.provision(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        # What the database recorded when 0001 was applied differs from today's file.
        await conn.execute(
            "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = $1",
            "0001_schema.sql",
        )
    finally:
        await conn.close()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": dsn,  # the owner's, for the migration job
        "STATE_DATABASE_URL": urls["state"],  # the state service checks with its own role
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: the migration check comes first
        "GRPC_TLS_DIR": str(tmp_path),
    }
    for argv in (["-m", "services.state"], ["-m", "common.migrate"]):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, *argv],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        lines = [orjson.loads(line) for line in done.stderr.splitlines() if line.strip()]
        (critical,) = [line for line in lines if line["level"] == "CRITICAL"]
        assert "0001_schema.sql" in critical["msg"], critical
