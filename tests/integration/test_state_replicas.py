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


async def driving(pool: asyncpg.Pool, dispatcher: Dispatcher, agent: Agent, ids: list[str]) -> int:
    """Ingests `ids` from one customer, a second apart, has `dispatcher` drive them, and
    returns their conversation once `agent` has started the first turn."""
    base = 1_700_000_000
    ingested, _ = await store.ingest(
        pool, [inbound(m, ts=base + n) for n, m in enumerate(ids)], [], "c", ""
    )
    conversation = ingested[0].conversation_id
    dispatcher.notify(conversation)
    async with asyncio.timeout(5):
        await agent.started.wait()
    return conversation


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


@contextlib.asynccontextmanager
async def scaling_in(
    pool: asyncpg.Pool,
    redis_url: str,
    prefix: str,
    stopping_agent: Agent,
    stopping_pool: Any = None,
    stopping_locks: type[Locks] = Locks,
) -> AsyncIterator[tuple[Dispatcher, Locks]]:
    """A replica about to stop (its dispatcher and locks, driving with `stopping_agent`, on
    `stopping_pool` and with `stopping_locks` if given) and one that stays, listening for
    hand-backs and answering as "staying" in the agent's log."""
    async with redis_client(redis_url) as client:
        locks = stopping_locks(client, ttl_seconds=30, prefix=prefix)
        stopping = Dispatcher(stopping_pool or pool, locks, stopping_agent, Dlq())
        staying_locks = Locks(client, ttl_seconds=30, prefix=prefix)
        staying = Dispatcher(pool, staying_locks, Agent(stopping_agent.log, "staying"), Dlq())
        listener = handback.Listener(client, prefix, staying_locks.instance, staying.notify)
        listening = asyncio.create_task(listener.run())
        try:
            async with asyncio.timeout(5):
                await listener.subscribed.wait()
            yield stopping, locks
        finally:
            listener.stop()
            await listening
            await staying.close()


async def test_a_stopping_replica_finishes_its_turn_and_hands_the_rest_to_another(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    turns: list[tuple[str, str]] = []
    stopping_agent = Agent(turns, "stopping", delay=0.3)
    async with scaling_in(pool, redis_server.url, redis_prefix, stopping_agent) as (
        stopping,
        locks,
    ):
        ids = [f"wamid.S{n}" for n in range(3)]
        conversation = await driving(pool, stopping, stopping_agent, ids)

        # SIGTERM: the turn in flight (0.3 s) has 5 s to finish; the rest goes back, in the
        # release of its lease.
        assert await stopping.close(grace=5.0) == {conversation}
        assert await locks.holder(conversation) is None  # its lease is released
        assert turns[0] == ("stopping", "wamid.S0")  # finished, not cut off
        await replied(pool, ids, timeout=3)
        assert turns == [
            ("stopping", "wamid.S0"),
            ("staying", "wamid.S1"),
            ("staying", "wamid.S2"),
        ]
        # Nothing waits any more: a hand-back names nothing.
        assert await handback.hand_back(pool, locks.client, redis_prefix, "x", {conversation}) == []


class SlowOnce(Agent):
    """Answers `slow_id` after 2 s, every other turn after 0.1 s; `slow` is set once the slow
    turn has started."""

    def __init__(self, log: list[tuple[str, str]], replica: str, slow_id: str) -> None:
        super().__init__(log, replica)
        self.slow_id = slow_id
        self.slow = asyncio.Event()

    async def reply(self, item: store.WorkItem, token: int) -> TurnResult:
        if item.message_id == self.slow_id:
            self.slow.set()
        self.delay = 2.0 if item.message_id == self.slow_id else 0.1
        return await super().reply(item, token)


async def test_a_stopping_replica_hands_back_each_conversation_as_it_lets_go_of_it(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """A conversation whose turn ends early in a stop goes back then, not once the slowest
    turn of the replica has ended: until handed back, its waiting messages are seen by no
    replica but the sweepers."""
    turns: list[tuple[str, str]] = []
    stopping_agent = SlowOnce(turns, "stopping", "wamid.B0")
    async with scaling_in(pool, redis_server.url, redis_prefix, stopping_agent) as (stopping, _):
        base = 1_700_000_000
        quick = ["wamid.A0", "wamid.A1", "wamid.A2"]
        ingested, _ = await store.ingest(
            pool,
            [
                *(inbound(m, "15550000001", ts=base + n) for n, m in enumerate(quick)),
                inbound("wamid.B0", "15550000002", ts=base),
                inbound("wamid.B1", "15550000002", ts=base + 1),
            ],
            [],
            "c",
            "",
        )
        conversations = sorted({i.conversation_id for i in ingested})
        assert len(conversations) == 2
        for conversation in conversations:
            stopping.notify(conversation)
        async with asyncio.timeout(5):
            await stopping_agent.slow.wait()  # both turns in flight: A0 ends in 0.1 s, B0 in 2

        closing = asyncio.create_task(stopping.close(grace=5.0))
        await replied(pool, quick, timeout=1.5)
        assert not closing.done()  # B0's turn still runs
        assert await closing == set(conversations)
        await replied(pool, ["wamid.B0", "wamid.B1"], timeout=3)
        assert sorted(turns) == sorted(
            [
                ("stopping", "wamid.A0"),
                ("staying", "wamid.A1"),
                ("staying", "wamid.A2"),
                ("stopping", "wamid.B0"),
                ("staying", "wamid.B1"),
            ]
        )


async def test_a_message_stored_after_its_conversation_went_back_goes_back_too(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """Until its server has stopped, a stopping replica still stores what the gateways send
    on their open streams: a conversation it handed back once goes back again."""
    turns: list[tuple[str, str]] = []
    agent = Agent(turns, "stopping", delay=0.3)
    async with scaling_in(pool, redis_server.url, redis_prefix, agent) as (stopping, _):
        conversation = await driving(pool, stopping, agent, ["wamid.X0", "wamid.X1"])
        assert await stopping.close(grace=5.0) == {conversation}
        await replied(pool, ["wamid.X0", "wamid.X1"], timeout=3)

        ingested, _ = await store.ingest(pool, [inbound("wamid.X2", ts=1_700_000_002)], [], "c", "")
        assert ingested[0].conversation_id == conversation
        stopping.notify(conversation)  # as the state's Ingests handler does after storing
        await stopping.close()  # as the set-up does once its server has stopped
        await replied(pool, ["wamid.X2"], timeout=3)
        assert turns == [
            ("stopping", "wamid.X0"),
            ("staying", "wamid.X1"),
            ("staying", "wamid.X2"),
        ]


class SlowLook:
    """The real pool, whose look for waiting work takes 0.5 s (a busy pool at shutdown)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == store.Q["has_waiting"]:
            await asyncio.sleep(0.5)
        return await self.pool.fetchval(query, *args, **kwargs)


async def test_a_driver_letting_go_when_the_grace_ends_is_not_cut_short(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """Cut between releasing its conversation and its lease, a driver would leave the lease
    held until it expired, and the conversation's messages waiting as long."""
    turns: list[tuple[str, str]] = []
    agent = Agent(turns, "stopping", delay=0.2)
    async with scaling_in(
        pool, redis_server.url, redis_prefix, agent, stopping_pool=SlowLook(pool)
    ) as (stopping, locks):
        conversation = await driving(pool, stopping, agent, ["wamid.Y0", "wamid.Y1"])
        # Y0's turn ends at 0.2 s; the driver then looks for waiting work until 0.7 s, past
        # the grace.
        assert await stopping.close(grace=0.5) == {conversation}
        assert await locks.holder(conversation) is None
        await replied(pool, ["wamid.Y0", "wamid.Y1"], timeout=3)
        assert turns == [("stopping", "wamid.Y0"), ("staying", "wamid.Y1")]


async def test_a_conversation_notified_as_the_stop_begins_goes_back(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """A driver the close cancels before it ever ran (DRAIN_SECONDS=0, or an ingest's notify
    in the same pass of the event loop) still hands its conversation back."""
    turns: list[tuple[str, str]] = []
    agent = Agent(turns, "stopping")
    async with scaling_in(pool, redis_server.url, redis_prefix, agent) as (stopping, _):
        ingested, _ = await store.ingest(pool, [inbound("wamid.Z0", ts=1_700_000_000)], [], "c", "")
        conversation = ingested[0].conversation_id
        stopping.notify(conversation)
        assert await stopping.close() == {conversation}
        await replied(pool, ["wamid.Z0"], timeout=3)
        assert turns == [("staying", "wamid.Z0")]


class SlowAnswer(Locks):
    """Locks whose acquire's answer comes 0.3 s after Redis took the lease."""

    async def acquire(self, conversation_id: int) -> Any:
        lease = await super().acquire(conversation_id)
        await asyncio.sleep(0.3)
        return lease


async def test_a_driver_taking_its_lease_as_the_stop_begins_hands_it_back_unused(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    """Cut while its lease was being taken, a driver would leave it held with no one to
    release it; it is not cut, and it starts no turn with the lease: it hands it back."""
    turns: list[tuple[str, str]] = []
    agent = Agent(turns, "stopping")
    async with scaling_in(
        pool, redis_server.url, redis_prefix, agent, stopping_locks=SlowAnswer
    ) as (stopping, locks):
        ingested, _ = await store.ingest(pool, [inbound("wamid.L0", ts=1_700_000_000)], [], "c", "")
        conversation = ingested[0].conversation_id
        stopping.notify(conversation)
        await asyncio.sleep(0.1)  # the lease is taken; its answer is on its way
        assert await stopping.close() == {conversation}
        assert await locks.holder(conversation) is None
        await replied(pool, ["wamid.L0"], timeout=3)
        assert turns == [("staying", "wamid.L0")]
