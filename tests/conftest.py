"""Shared fixtures: one PostgreSQL and one Redis per session (real ones when DATABASE_URL /
REDIS_URL are set, embedded otherwise), a fresh database per test from a migrated template,
Redis keys under a unique prefix per test, and the fakes of the Graph API and the model."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from tests.support.fakes import FakeGraph, FakeModel
from tests.support.servers import Postgres, Redis
from tests.support.system import System


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report ends with what its running systems logged last."""
    report = yield
    if report.failed:
        for n, system in enumerate(System.running):
            report.sections.append((f"system {n} logs (last lines)", system.tail_logs(40)))
    return report


# Other tests' processes share these two cores: wall-clock deadlines would only measure that.
settings.register_profile("wa", deadline=None)
settings.load_profile("wa")


# The embedded server's data lives as long as the session: flushing it to disk at every commit
# (and at every CREATE DATABASE, once per test) only costs time. A clean stop (the outage
# tests' `stop_server`) still writes everything; WA_PG_SETTINGS given to the run come after
# these, so they win.
EMBEDDED_PG_SETTINGS = "fsync=off synchronous_commit=off full_page_writes=off"


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres"))
    given = os.environ.get("WA_PG_SETTINGS")
    os.environ["WA_PG_SETTINGS"] = f"{EMBEDDED_PG_SETTINGS} {given or ''}"
    try:
        server.start()  # reads WA_PG_SETTINGS once; restart_server reuses its command
    finally:
        if given is None:
            del os.environ["WA_PG_SETTINGS"]
        else:
            os.environ["WA_PG_SETTINGS"] = given
    yield server
    if server.external:  # an embedded server's folder goes away with the session
        asyncio.run(server.drop_all())
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_admin(redis_server: Redis) -> AsyncIterator[aioredis.Redis]:
    """A client that can do what the state service's user cannot (flush scripts, write keys
    of other types): the embedded server's admin, or REDIS_URL's user."""
    from common import kv

    client = kv.create_client(redis_server.admin_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def template(pg: Postgres) -> str:
    return await pg.create_template()


@pytest.fixture
async def database_url(pg: Postgres, template: str) -> str:
    return await pg.create_database(template)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from common import db

    p = await db.create_pool(database_url, min_size=1, max_size=10)
    yield p
    await p.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"wa:test:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    server = FakeGraph().start()
    yield server
    server.release.set()
    server.stop()


@pytest.fixture
def model() -> Iterator[FakeModel]:
    server = FakeModel().start()
    yield server
    server.stop()


StartSystem = Callable[..., Awaitable[System]]


@pytest.fixture
async def start_system(
    tmp_path: Path,
    database_url: str,
    redis_server: Redis,
    redis_prefix: str,
    graph: FakeGraph,
) -> AsyncIterator[StartSystem]:
    systems: list[System] = []

    async def start(wait: bool = True, **env: str) -> System:
        root = tmp_path / f"system{len(systems)}"
        root.mkdir()
        env.setdefault("WHATSAPP_API_BASE_URL", graph.url)
        # The gateway is ready only after a background check finds the other services up
        # (every GATEWAY_READY_REFRESH_SECONDS, 2 s by default). It starts first, so its first
        # check finds them down and every start waited up to 2 s more for the next one.
        env.setdefault("GATEWAY_READY_REFRESH_SECONDS", "0.5")
        system = System(root, database_url, redis_server.url, redis_prefix, env)
        systems.append(system)
        return await system.start(wait=wait)

    yield start
    for system in systems:
        await system.stop()
