"""Applies db/migrations/*.sql in order, once each, under an advisory lock, and refuses to
start on a database where an applied migration's file has changed since (its SHA-256 is
recorded with it): the database would not be what the files say."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from pathlib import Path

import asyncpg

from . import retry
from .config import ConfigError

MIGRATIONS = Path(__file__).resolve().parent.parent / "db" / "migrations"
# Any constant works; it only has to be the same for every starter.
LOCK_KEY = 0x57A_6E7
# Held by the owner's job from its first migration to its last grant (roles.migrate_and_provision),
# shared by a service waiting for the schema (`--wait`): the migrations are committed one by one
# before the grants on their new tables are, and a service let in between would be refused them.
PROVISION_LOCK_KEY = 0x57A_6E8

log = logging.getLogger(__name__)


class MigrationChanged(ConfigError):
    """An applied migration's file is not the one that was applied."""


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pending_files(directory: Path = MIGRATIONS) -> list[Path]:
    return sorted(directory.glob("*.sql"))


async def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Returns the names of the migrations this call applied."""
    conn = await asyncpg.connect(dsn, timeout=10)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            # The runner's own table; `checksum` came later, so older databases get the column
            # here and their checksums on this first run.
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    text PRIMARY KEY,
                       applied_at timestamptz NOT NULL DEFAULT now());
                   ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text"""
            )
            done = await _verified(conn, directory)
            for path in pending_files(directory):
                if path.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                        path.name,
                        checksum(path),
                    )
                log.info("applied migration", extra={"migration": path.name})
                applied.append(path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()
    return applied


async def _verified(conn: asyncpg.Connection, directory: Path, *, record: bool = True) -> set[str]:
    """The applied migrations' names, once each file present is checked against its recorded
    checksum (and, `record`ing, the checksum recorded where there is none yet)."""
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    files = {p.name: p for p in pending_files(directory)}
    for row in rows:
        path = files.get(row["version"])
        if path is None:
            continue  # applied by a newer release: not this runner's to judge
        actual = checksum(path)
        if row["checksum"] is None:
            if not record:
                continue
            await conn.execute(
                "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                row["version"],
                actual,
            )
        elif row["checksum"] != actual:
            raise MigrationChanged(
                f"migration {row['version']} was changed after it was applied "
                f"(sha256 {row['checksum'][:12]} applied, {actual[:12]} now): restore the file "
                "and put the change in a new migration"
            )
    return {r["version"] for r in rows}


BEING_APPLIED = "(being applied, and the services' privileges with them)"


async def pending(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """The migrations not applied yet (BEING_APPLIED while the owner's job migrates and grants;
    its lock ends with the connection, so a job that dies holds nobody up)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock_shared($1)", PROVISION_LOCK_KEY):
            return [BEING_APPLIED]
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = (
            {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if exists
            else set()
        )
    finally:
        await conn.close()
    return [p.name for p in pending_files(directory) if p.name not in done]


async def require_current(dsn: str, directory: Path = MIGRATIONS) -> None:
    """For a service connected as its own role, which cannot migrate: refuses (ConfigError)
    when a migration is pending or an applied one's file has changed since."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = await _verified(conn, directory, record=False) if exists else set()
    finally:
        await conn.close()
    missing = [p.name for p in pending_files(directory) if p.name not in done]
    if missing:
        raise ConfigError(
            f"{len(missing)} migration(s) pending ({', '.join(missing)}): the owner applies "
            "them first (wa migrate, or python -m common.migrate, with DATABASE_URL)"
        )


WAIT_POLL_SECONDS = 2.0
# How long the owner's job (`python -m common.migrate`) waits for PostgreSQL to accept a
# connection: compose starts it once the server's healthcheck passes, and Kubernetes as soon as
# it is scheduled, but a server that is still starting, restarting or failing over refuses for
# a while, and the job runs once (compose does not restart it, and every service waits for it).
SERVER_WAIT_SECONDS = 60.0
# What a server that is not there yet answers: nothing listening (or no route yet), "the
# database system is starting up", a connection closed by a server that is shutting down.
_NOT_YET = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


async def wait_for_server(dsn: str, seconds: float) -> None:
    """Returns once PostgreSQL accepts a connection at `dsn`; raises the last refusal after
    `seconds`. A refusal of the login itself (a wrong password) is raised at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    attempt = 0
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=max(1.0, min(10.0, deadline - loop.time())))
        except _NOT_YET as exc:
            attempt += 1
            left = deadline - loop.time()
            if left <= 0:
                raise
            if attempt == 1:
                log.info(
                    "waiting for PostgreSQL to accept connections",
                    extra={"error": f"{type(exc).__name__}: {exc}", "seconds": seconds},
                )
            await asyncio.sleep(min(left, retry.full_jitter(attempt, 0.25, 2.0)))
        else:
            await conn.close()
            return


async def wait_current(dsn: str, seconds: float, directory: Path = MIGRATIONS) -> list[str]:
    """Waits up to `seconds` for every migration to be applied (by the owner, elsewhere);
    returns the ones still pending then (none: the schema is current). A connection refused,
    or a role not provisioned yet, counts as pending: on a first install the owner's job
    creates the roles too."""
    deadline = asyncio.get_running_loop().time() + seconds
    attempt = 0
    while True:
        try:
            missing = await pending(dsn, directory)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            missing = [f"(cannot read them: {type(exc).__name__})"]
        if not missing:
            return []
        attempt += 1
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return missing
        if attempt == 1 or attempt % 15 == 0:
            log.info("waiting for migrations", extra={"pending": missing})
        await asyncio.sleep(min(left, WAIT_POLL_SECONDS * (0.5 + random.random())))


def main(argv: list[str] | None = None) -> int:
    """`python -m common.migrate [--check | --wait SECONDS]`: apply and provision the services'
    roles (what compose's and Kubernetes' job runs, once PostgreSQL accepts connections: up to
    `--server-wait` seconds); or (--check) exit 1 when any is pending; or (--wait)
    wait for the owner to apply them, exit 1 if still pending after SECONDS (a Kubernetes
    init container's, with the service's own URL: `--url-from STATE_DATABASE_URL`)."""
    import argparse
    import os

    from . import logs, roles

    parser = argparse.ArgumentParser(prog="migrate")
    parser.add_argument("--check", action="store_true", help="exit 1 if migrations are pending")
    parser.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait until none is pending, at most this"
    )
    parser.add_argument(
        "--server-wait",
        type=float,
        default=SERVER_WAIT_SECONDS,
        metavar="SECONDS",
        help="applying: wait this long at most for PostgreSQL to accept connections",
    )
    parser.add_argument(
        "--url-from",
        metavar="VARIABLE",
        help="with --wait: the variable holding the database URL (default DATABASE_URL)",
    )
    args = parser.parse_args(argv)
    if args.wait is not None:
        logs.setup("migrate", os.environ.get("LOG_LEVEL", "INFO"))
        variable = args.url_from or "DATABASE_URL"
        dsn = os.environ.get(variable, "")
        if not dsn:
            raise ConfigError(f"{variable} is not set")
        missing = asyncio.run(wait_current(dsn, args.wait))
        if missing:
            log.error("migrations still pending", extra={"pending": missing})
        return 1 if missing else 0
    settings = roles.RoleSettings.from_env()
    logs.setup("migrate", settings.log_level)
    if args.check:
        missing = asyncio.run(pending(settings.require_database()))
        if missing:
            log.warning("pending migrations", extra={"pending": missing})
        return 1 if missing else 0
    dsn = settings.require_database()
    # (`wa migrate`, an operator's command, passes 0: a server that is down is said at once.)
    if args.server_wait > 0:
        try:
            asyncio.run(wait_for_server(dsn, args.server_wait))
        except _NOT_YET as exc:
            log.error(
                "PostgreSQL did not accept a connection within %g s: %s: %s",
                args.server_wait,
                type(exc).__name__,
                exc,
            )
            return 1
        except asyncpg.PostgresError as exc:
            log.error("PostgreSQL refused the owner's login: %s: %s", type(exc).__name__, exc)
            return 1
    asyncio.run(roles.migrate_and_provision(settings))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except ConfigError as exc:
        # A bad setting or an edited migration: one CRITICAL line, exit 2, like the services.
        from . import logs

        logs.setup("migrate", "INFO")
        log.critical("configuration error: %s", exc)
        code = 2
    raise SystemExit(code)
