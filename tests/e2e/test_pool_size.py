"""DATABASE_POOL_SIZE bounds each service process's PostgreSQL connections, whatever the load:
replicas share a service's connections instead of multiplying them (devtools/replicas.py), and
an operator can bound them for the replicas of compose or Kubernetes. Seen from PostgreSQL
(pg_stat_activity, by the application name each service's connections carry)."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from tests.conftest import StartSystem
from tests.support import conversations as cv

CONVERSATIONS = 40
PER_CONVERSATION = 2


async def sample_backends(pool: asyncpg.Pool, peak: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rows = await pool.fetch(
            "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity"
            # (this system's database: a server shared with another test worker runs its
            # system's services under the same names)
            " WHERE application_name LIKE 'wa-%' AND datname = current_database() GROUP BY 1"
        )
        for r in rows:
            peak[r["name"]] = max(peak.get(r["name"], 0), r["n"])
        await asyncio.sleep(0.01)


async def test_no_service_opens_more_connections_than_its_pool_size(
    start_system: StartSystem,
) -> None:
    system = await start_system(wait=False, DATABASE_POOL_SIZE="2")
    await system.wait_ready(timeout=120)  # four processes starting on two busy cores
    db = await system.db()
    peak: dict[str, int] = {}
    stop = asyncio.Event()
    sampling = asyncio.create_task(sample_backends(db, peak, stop))
    base = int(time.time())
    ids: list[str] = []

    async def converse(conv: int) -> None:
        for n in range(PER_CONVERSATION):
            message_id, doc = cv.message_doc(conv, n, base)
            ids.append(message_id)
            await system.deliver(doc, timeout=60)

    try:
        # Forty conversations at once: alone, the state and agent services would open up to
        # 20 connections each for them.
        await asyncio.gather(*(converse(c) for c in range(CONVERSATIONS)))
        await system.wait_status(ids, {"replied"}, timeout=120)
    finally:
        stop.set()
        await sampling
    assert {"wa-state", "wa-agent"} <= peak.keys()
    assert {name: n for name, n in peak.items() if n > 2} == {}, peak
