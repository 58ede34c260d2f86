"""The owner's one-shot job (`python -m common.migrate`, compose's `migrate` service and the
Kubernetes Job) against a PostgreSQL that is not accepting connections yet: it waits for it,
within a bound, instead of failing the whole start on its first refusal."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from common import migrate
from devtools.ports import free_port
from tests.support.relay import Relay
from tests.support.servers import Postgres

ROOT = Path(__file__).resolve().parents[2]


def _through(dsn: str, port: int) -> str:
    """`dsn` by way of 127.0.0.1:`port`."""
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    return urlunsplit(("postgresql", f"{user}127.0.0.1:{port}", parts.path, "", ""))


def _upstream(dsn: str) -> tuple[str, int] | str:
    """Where `dsn`'s server listens: a host and port, or a Unix socket's path."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


async def _job(dsn: str, run_dir: Path, *args: str) -> asyncio.subprocess.Process:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("DATABASE_URL") and k not in ("WA_SCALE", "REDIS_URL")
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "common.migrate",
        *args,
        env={**env, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn, "RUN_DIR": str(run_dir)},
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )


async def _lines_until(job: asyncio.subprocess.Process, text: str) -> list[str]:
    """The job's log lines up to the first that holds `text` (all of them if none does)."""
    assert job.stderr is not None
    lines = []
    while line := (await asyncio.wait_for(job.stderr.readline(), 60)).decode():
        lines.append(line)
        if text in line:
            break
    return lines


async def test_the_job_waits_for_a_server_that_starts_after_it(
    pg: Postgres, tmp_path: Path
) -> None:
    dsn = await pg.create_database(None)
    port = free_port()
    job = await _job(_through(dsn, port), tmp_path)
    try:
        # Nothing listens yet: the job is refused, says so, and tries again.
        waiting = await _lines_until(job, "waiting for PostgreSQL to accept connections")
        assert "waiting for PostgreSQL" in waiting[-1], waiting
        await asyncio.sleep(1.0)
        assert job.returncode is None
        async with Relay(port, _upstream(dsn)):
            rest = await _lines_until(job, "\0")
            assert await asyncio.wait_for(job.wait(), 60) == 0, rest
    finally:
        if job.returncode is None:
            job.kill()
            await job.wait()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    finally:
        await conn.close()
    assert applied == {p.name for p in migrate.pending_files()}


async def test_the_job_gives_up_on_a_server_that_never_comes_in_one_line(
    pg: Postgres, tmp_path: Path
) -> None:
    dsn = await pg.create_database(None)
    job = await _job(_through(dsn, free_port()), tmp_path, "--server-wait", "1.5")
    lines = await _lines_until(job, "\0")
    assert await asyncio.wait_for(job.wait(), 60) == 1
    assert "Traceback" not in "".join(lines)
    assert "PostgreSQL did not accept a connection within 1.5 s" in lines[-1], lines
