"""The sweepers of several state replicas against one real PostgreSQL and Redis: one sweep per
interval for the whole cluster, not one per replica, and a replica that dies holding the turn
to sweep delays the next sweep by no more than the interval a single replica has."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.state import store, sweeper
from services.state.dispatcher import Dispatcher
from services.state.locks import Locks
from services.state.sweeper import Sweeper
from tests.integration.test_dispatcher import Agent, Dlq
from tests.integration.test_state_replicas import redis_client
from tests.support.inbound import inbound
from tests.support.servers import Redis


class Recording(Sweeper):
    """A sweeper that records when each of its sweeps starts (on the loop's clock)."""

    def __init__(
        self,
        *args: object,
        starts: list[tuple[str, float]],
        enough: asyncio.Event,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.starts = starts
        self.enough = enough

    async def sweep_once(self) -> list[int]:
        self.starts.append((self.locks.instance, asyncio.get_running_loop().time()))
        if len(self.starts) >= 4:
            self.enough.set()
        return await super().sweep_once()


@contextlib.asynccontextmanager
async def running(*sweepers: Sweeper) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in sweepers]
    try:
        yield
    finally:
        for s in sweepers:
            s.stop()
        await asyncio.gather(*tasks)


async def test_two_replicas_sweep_once_per_interval_between_them(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    starts: list[tuple[str, float]] = []
    enough = asyncio.Event()
    async with redis_client(redis_server.url) as client:
        replicas = []
        for _ in range(2):
            locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
            dispatcher = Dispatcher(pool, locks, Agent(expect=0), Dlq())
            replicas.append(
                Recording(
                    pool, locks, dispatcher, Dlq(), stuck_timeout=8.0, starts=starts, enough=enough
                )
            )
        token = replicas[0].token_ms / 1000
        assert replicas[0].interval == 2.0 and token == 1.0
        async with running(*replicas):
            async with asyncio.timeout(30):
                await enough.wait()
        for r in replicas:
            await r.dispatcher.close(0.0)
    # Both start at once and both would sweep at once: one did. Each sweep came at least a
    # token's lifetime after the one before, whichever replica ran it (a little slack: Redis
    # and this loop keep time each their own way).
    times = [t for _, t in starts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= token * 0.9, starts


async def test_a_replica_that_dies_holding_the_turn_to_sweep_delays_no_recovery(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Work is recoverable at once here (not after the usual grace of a few seconds).
    monkeypatch.setattr(sweeper, "UNSTARTED_GRACE_SECONDS", 0.0)
    async with redis_client(redis_server.url) as client:
        dead_locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        dead = Sweeper(pool, dead_locks, None, Dlq(), stuck_timeout=8.0)  # type: ignore[arg-type]
        ((item,), _) = await store.ingest(pool, [inbound("wamid.SW1")], [], "c1", "")
        conversation = item.conversation_id
        # The dying replica held the conversation's lease, and took the turn to sweep just
        # before it was killed: no heartbeat of it is left (as 5 s after a SIGKILL).
        assert await dead_locks.acquire(conversation) is not None
        assert await dead.heartbeat_and_take_turn() is None
        await client.delete(dead_locks.heartbeat_key(dead_locks.instance))

        agent = Agent(expect=1)
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        dispatcher = Dispatcher(pool, locks, agent, Dlq())
        # It waits for the dead replica's turn to expire (at most one interval after it was
        # taken), sweeps, breaks the dead holder's lease and drives the conversation.
        survivor = Sweeper(pool, locks, dispatcher, Dlq(), stuck_timeout=8.0)
        async with running(survivor):
            async with asyncio.timeout(30):
                await agent.done.wait()
        await dispatcher.close(0.0)
    assert agent.replied == ["wamid.SW1"]


class TakenAfterTheLook(Locks):
    """Locks whose first look at a conversation's holder finds none, and right after which
    `other` (another replica) takes it: as when a stopping replica's hand-back, or the
    releasing holder's own look for work, comes just after the sweeper's look."""

    def __init__(self, *args: Any, other: Locks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.other = other
        self.taken = False

    async def holders(self, conversation_ids: list[int]) -> list[str | None]:
        owners = await super().holders(conversation_ids)
        for conversation_id, owner in zip(conversation_ids, owners, strict=True):
            if owner is None and not self.taken:
                self.taken = await self.other.acquire(conversation_id) is not None
        return owners


async def test_a_conversation_taken_just_after_the_sweeper_found_it_free_is_not_recovered(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "UNSTARTED_GRACE_SECONDS", 0.0)
    async with redis_client(redis_server.url) as client:
        ((item,), _) = await store.ingest(pool, [inbound("wamid.SW2")], [], "c1", "")
        other = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        locks = TakenAfterTheLook(client, ttl_seconds=30, prefix=redis_prefix, other=other)
        dispatcher = Dispatcher(pool, locks, Agent(expect=0), Dlq())
        sweeping = Sweeper(pool, locks, dispatcher, Dlq(), stuck_timeout=8.0)
        assert await sweeping.sweep_once() == []
        assert locks.taken and not dispatcher.driving(item.conversation_id)
        await dispatcher.close(0.0)
