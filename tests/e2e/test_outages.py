"""PostgreSQL and Redis stopped and restarted during traffic: no acknowledged message is lost,
none is replied to twice. These tests own their servers (embedded, so they can stop them),
whatever DATABASE_URL / REDIS_URL say."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import conversations as cv
from tests.support.fakes import FakeGraph
from tests.support.servers import Postgres, Redis
from tests.support.system import SECRET, System, readiness

pytestmark = pytest.mark.e2e


@pytest.fixture
async def own(tmp_path: Path, graph: FakeGraph) -> AsyncIterator[tuple[System, Postgres, Redis]]:
    pg = Postgres(tmp_path / "pg-root", embedded_only=True)
    redis = Redis(tmp_path / "redis-root", embedded_only=True)
    (tmp_path / "pg-root").mkdir()
    (tmp_path / "redis-root").mkdir()
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(redis.start)
    template = await pg.create_template()
    dsn = await pg.create_database(template)
    (tmp_path / "system").mkdir()
    system = System(
        tmp_path / "system",
        dsn,
        redis.url,
        "wa:outage:",
        {"WHATSAPP_API_BASE_URL": graph.url, "STUCK_TIMEOUT_SECONDS": "10"},
    )
    await system.start()
    graph.webhook = (f"{system.url}/webhook", SECRET)
    try:
        yield system, pg, redis
    finally:
        await system.stop()
        pg.stop()
        redis.stop()


async def _traffic(
    system: System, seconds: float, conversations: int = 8
) -> tuple[list[str], list[int]]:
    base = int(time.time())
    ids: list[str] = []
    codes: list[int] = []
    deadline = time.monotonic() + seconds

    async def converse(conv: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            message_id, doc = cv.message_doc(conv, n, base)
            first = await system.post(doc)
            codes.append(first.status_code)
            if first.status_code != 200:
                await system.deliver(doc)  # Meta retries until it gets a 200
            ids.append(message_id)
            n += 1
            await asyncio.sleep(0.2)

    await asyncio.gather(*(converse(c) for c in range(conversations)))
    return ids, codes


async def test_postgres_outage_loses_nothing_and_duplicates_nothing(
    own: tuple[System, Postgres, Redis], graph: FakeGraph
) -> None:
    system, pg, _ = own
    traffic = asyncio.create_task(_traffic(system, seconds=7))
    await asyncio.sleep(2)
    await asyncio.to_thread(pg.stop_server)
    # Without PostgreSQL a gateway cannot store a delivery: not ready for one either.
    for _ in range(50):
        ingest = await system.http.get(f"{system.url}/readyz?for=ingest")
        if ingest.status_code == 503:
            break
        await asyncio.sleep(0.1)
    assert ingest.status_code == 503 and "postgres" in ingest.json()["reason"], ingest.text
    await asyncio.to_thread(pg.restart_server)
    ids, codes = await traffic
    assert 503 in codes, "deliveries during the outage were refused, so Meta retries them"
    await system.wait_status(ids, {"replied"}, timeout=90)
    await asyncio.sleep(1)
    replies = cv.replies_per_message(graph)
    assert {m: replies[m] for m in ids if replies[m] != 1} == {}


async def test_redis_outage_keeps_acknowledging_and_resumes_by_itself(
    own: tuple[System, Postgres, Redis], graph: FakeGraph
) -> None:
    system, _, redis = own
    traffic = asyncio.create_task(_traffic(system, seconds=7))
    await asyncio.sleep(2)
    await asyncio.to_thread(redis.stop_server)
    _, ready = await readiness(system, lambda status, _: status == 503, timeout=10)
    redis_state = next(c for c in ready["components"] if c["name"] == "redis")
    assert not redis_state["healthy"] and "paused" in redis_state["detail"]
    # What routes deliveries to a gateway (a load balancer's check, Kubernetes' readiness)
    # still finds it ready: it stores them.
    ingest = await system.http.get(f"{system.url}/readyz?for=ingest")
    assert ingest.status_code == 200, ingest.text
    assert {c["name"] for c in ingest.json()["components"]} == {"postgres", "state"}
    await asyncio.sleep(1.5)
    await asyncio.to_thread(redis.restart_server)
    ids, codes = await traffic
    assert set(codes) == {200}, "PostgreSQL is the durable store: acks never needed Redis"
    await system.wait_status(ids, {"replied"}, timeout=90)
    await asyncio.sleep(1)
    replies = cv.replies_per_message(graph)
    assert {m: replies[m] for m in ids if replies[m] != 1} == {}
    await readiness(system, lambda status, _: status == 200)
