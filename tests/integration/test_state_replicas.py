"""Two state replicas' dispatchers against one real PostgreSQL and Redis: a message ingested by
the replica that does not hold its conversation is driven by the holder, and a replica that
stops finishes its turn and hands the rest back, neither waiting for a sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from common import kv
from services.state import handback, machine, store
from services.state.dispatcher import Dispatcher
from services.state.locks import Locks
from services.state.ports import TurnResult
from tests.integration.test_dispatcher import Dlq
from tests.support.inbound import inbound
from tests.support.servers import Redis


class Agent:
    """Answers every turn after `delay`; records which replica asked, and when turns overlap."""

    def __init__(self, log: list[tuple[str, str]], replica: str, delay: float = 0.0) -> None:
        self.log = log
        self.replica = replica
        self.delay = delay
        self.started = asyncio.Event()

    async def reply(self, item: store.WorkItem, token: int) -> TurnResult:
        self.started.set()
        await asyncio.sleep(self.delay)
        self.log.append((self.replica, item.message_id))
        return TurnResult(outcome="replied", reply_text="ok")


class HookedPool:
    """The real pool; once the holder finds its queue empty (and before it releases the
    lease), `when_empty` runs: the other replica's ingest lands then."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.when_empty: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        row = await self.pool.fetchrow(query, *args, **kwargs)
        # A turn's finish looks for the next message in the same statement (wa_finish_turn).
        looked = query in (store.Q["start_turn"], store.Q["finish_turn"])
        if looked and row["outcome"] == "none" and self.when_empty:
            hook, self.when_empty = self.when_empty, None
            await hook()
        return row


class Watched(Locks):
    """Locks that say when an acquire found the conversation held by someone else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contended = asyncio.Event()

    async def acquire(self, conversation_id: int) -> Any:
        lease = await super().acquire(conversation_id)
        if lease is None:
            self.contended.set()
        return lease


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = kv.create_client(url)
    try:
        yield client
    finally:
        await client.aclose()


async def replied(pool: asyncpg.Pool, ids: list[str], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            statuses = await pool.fetch(
                "SELECT status FROM processed_webhook_messages WHERE message_id = ANY($1)", ids
            )
            if len(statuses) == len(ids) and {r["status"] for r in statuses} == {"replied"}:
                return
            await asyncio.sleep(0.02)


@dataclasses.dataclass
class Pair:
    """Two replicas' dispatchers: `holder` drives the conversation (its pool is `hooked`),
    `other` acts while the holder holds it."""

    hooked: HookedPool
    holder: Dispatcher
    other: Dispatcher
    other_locks: Watched
    turns: list[tuple[str, str]]

    async def race(
        self, conversation: int, by_the_other: Callable[[], Awaitable[None]], ids: list[str]
    ) -> None:
        """The holder drives the conversation; once it finds no message left, and before it
        releases the lease, `by_the_other` makes one wait on the other replica, which is
        notified and finds the lease taken. Every message of `ids` is answered by the holder,
        none left to the sweeper (3 s of grace + up to 15 s of interval)."""

        async def hook() -> None:
            await by_the_other()
            self.other.notify(conversation)
            async with asyncio.timeout(5):
                await self.other_locks.contended.wait()

        self.hooked.when_empty = hook
        self.holder.notify(conversation)
        await replied(self.hooked.pool, ids, timeout=3)
        assert self.hooked.when_empty is None  # the race was staged
        assert self.turns == [("holder", i) for i in ids]


@contextlib.asynccontextmanager
async def two_replicas(pool: asyncpg.Pool, redis_url: str, prefix: str) -> AsyncIterator[Pair]:
    turns: list[tuple[str, str]] = []
    hooked = HookedPool(pool)
    async with redis_client(redis_url) as client:
        holder = Dispatcher(
            hooked,  # type: ignore[arg-type]
            Locks(client, ttl_seconds=30, prefix=prefix),
            Agent(turns, "holder"),
            Dlq(),
        )
        other_locks = Watched(client, ttl_seconds=30, prefix=prefix)
        other = Dispatcher(pool, other_locks, Agent(turns, "other"), Dlq())
        try:
            yield Pair(hooked, holder, other, other_locks, turns)
        finally:
            await holder.close()
            await other.close()


async def test_a_message_ingested_by_the_replica_without_the_lease_is_driven_by_the_holder(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    async with two_replicas(pool, redis_server.url, redis_prefix) as r:
        ((first,), _) = await store.ingest(pool, [inbound("wamid.H1")], [], "c1", "")
        conversation = first.conversation_id

        async def ingested_by_the_other_replica() -> None:
            await store.ingest(pool, [inbound("wamid.H2")], [], "c2", "")

        await r.race(conversation, ingested_by_the_other_replica, ["wamid.H1", "wamid.H2"])


async def test_a_message_redriven_by_the_replica_without_the_lease_is_driven_by_the_holder(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """As above, with an operator's redrive instead of an ingest: it reaches the replica that
    does not hold the conversation. Unlike an ingest, a redrive takes no lock on the
    conversation row, so a lease kept in PostgreSQL alone would have to cover it another way
    (docs/benchmarks.md, "What a lease in PostgreSQL alone would save")."""
    async with two_replicas(pool, redis_server.url, redis_prefix) as r:
        ((first, failed), _) = await store.ingest(
            pool, [inbound("wamid.R1"), inbound("wamid.R2")], [], "c1", ""
        )
        conversation = first.conversation_id
        assert failed.conversation_id == conversation
        # R2's turn failed earlier; an operator redrives it while the holder answers R1.
        await store.transition(pool, "wamid.R2", machine.PROCESSING, "turn started")
        await store.transition(pool, "wamid.R2", machine.FAILED, "ModelError: test")

        async def redriven_by_the_other_replica() -> None:
            await store.transition(
                pool,
                "wamid.R2",
                machine.RECEIVED,
                machine.OPERATOR_REDRIVE,
                sources=store.REDRIVABLE,
            )

        await r.race(conversation, redriven_by_the_other_replica, ["wamid.R1", "wamid.R2"])


async def test_a_stopping_replica_finishes_its_turn_and_hands_the_rest_to_another(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    turns: list[tuple[str, str]] = []
    async with redis_client(redis_server.url) as client:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        stopping_agent = Agent(turns, "stopping", delay=0.3)
        stopping = Dispatcher(pool, locks, stopping_agent, Dlq())
        staying_locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        staying = Dispatcher(pool, staying_locks, Agent(turns, "staying"), Dlq())
        listener = handback.Listener(client, redis_prefix, staying_locks.instance, staying.notify)
        listening = asyncio.create_task(listener.run())
        try:
            async with asyncio.timeout(5):
                await listener.subscribed.wait()
            ids = [f"wamid.S{n}" for n in range(3)]
            base = 1_700_000_000
            ingested, _ = await store.ingest(
                pool, [inbound(m, ts=base + n) for n, m in enumerate(ids)], [], "c", ""
            )
            conversation = ingested[0].conversation_id
            stopping.notify(conversation)
            async with asyncio.timeout(5):
                await stopping_agent.started.wait()

            # SIGTERM: the turn in flight (0.3 s) has 5 s to finish; the rest goes back.
            leaving = await stopping.close(grace=5.0)
            assert leaving == {conversation}
            assert await locks.holder(conversation) is None  # its lease is released
            assert turns == [("stopping", "wamid.S0")]  # finished, not cut off
            assert await handback.hand_back(
                pool, client, redis_prefix, locks.instance, leaving
            ) == [conversation]
            await replied(pool, ids, timeout=3)
            assert turns == [
                ("stopping", "wamid.S0"),
                ("staying", "wamid.S1"),
                ("staying", "wamid.S2"),
            ]
            # Nothing waits any more: a second hand-back names nothing.
            assert await handback.hand_back(pool, client, redis_prefix, "x", leaving) == []
        finally:
            listener.stop()
            await listening
            await staying.close()
