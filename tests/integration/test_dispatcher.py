"""The dispatcher against real PostgreSQL and Redis: no notification is lost between a driver's
last look at its conversation's queue and its end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from common import kv
from services.state import store
from services.state.dispatcher import Dispatcher
from services.state.locks import Locks
from services.state.ports import Failure, TurnResult
from tests.support.inbound import inbound
from tests.support.servers import Redis


class Agent:
    def __init__(self, expect: int) -> None:
        self.replied: list[str] = []
        self.expect = expect
        self.done = asyncio.Event()

    async def reply(self, item: store.WorkItem, token: int) -> TurnResult:
        self.replied.append(item.message_id)
        if len(self.replied) == self.expect:
            self.done.set()
        return TurnResult(outcome="replied", reply_text="ok")


class Dlq:
    async def enqueue(self, failure: Failure) -> None:
        raise AssertionError(f"nothing should fail: {failure}")

    async def resolve(self, message_id: str, correlation_id: str) -> None:
        pass


class LateCommitLocks(Locks):
    """Real leases; the first time the driver releases one, a message commits (and notifies)
    just after, as an acknowledgement can: after the driver's last look at its queue (the turn's
    final statement, which found nothing and released the conversation) and before it ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_release: Callable[[], Awaitable[None]] | None = None

    async def release(self, lease: Any) -> bool:
        released = await super().release(lease)
        if self.after_release is not None:
            hook, self.after_release = self.after_release, None
            await hook()
        return released


async def test_a_message_acknowledged_as_the_driver_finishes_is_not_left_to_the_sweeper(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    locks = LateCommitLocks(client, ttl_seconds=30, prefix=redis_prefix)
    agent = Agent(expect=2)
    dispatcher = Dispatcher(pool, locks, agent, Dlq())
    try:
        ((first,), _) = await store.ingest(pool, [inbound("wamid.R1")], [], "c1", "")

        async def late_message() -> None:
            ((late,), _) = await store.ingest(pool, [inbound("wamid.R2")], [], "c2", "")
            dispatcher.notify(late.conversation_id)

        locks.after_release = late_message
        dispatcher.notify(first.conversation_id)
        async with asyncio.timeout(5):  # the sweeper would take 15 s or more
            await agent.done.wait()
        assert agent.replied == ["wamid.R1", "wamid.R2"]
        assert locks.after_release is None  # the race was staged
    finally:
        await dispatcher.close()
        await client.aclose()


class StuckRelease(Locks):
    """Releasing a lease does not return until the test says so, as when Redis stops
    answering mid-shutdown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unstick = asyncio.Event()
        self.returned = asyncio.Event()

    async def release(self, lease: Any) -> bool:
        await self.unstick.wait()
        self.returned.set()
        return True


class Waiting:
    """A turn that is still talking to the model when the service stops."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def reply(self, item: store.WorkItem, token: int) -> TurnResult:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stopping_does_not_wait_forever_for_a_driver_stuck_on_its_way_out(
    pool: asyncpg.Pool, redis_server: Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    agent = Waiting()
    locks = StuckRelease(client, ttl_seconds=30, prefix=redis_prefix)
    dispatcher = Dispatcher(
        pool,
        locks,
        agent,
        Dlq(),
        close_timeout=0.5,
    )
    try:
        ((first,), _) = await store.ingest(pool, [inbound("wamid.S1")], [], "c1", "")
        dispatcher.notify(first.conversation_id)
        async with asyncio.timeout(5):
            await agent.started.wait()
        # Waited for, not cancelled: an unbounded close waits for the release forever.
        closing = asyncio.create_task(dispatcher.close())
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert closing in done, "close() is still waiting for the stuck driver"
        # The turn it left is still the message's: received or processing, for the sweeper.
        status = await pool.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.S1'"
        )
        assert status in ("received", "processing")
    finally:
        # Let the driver it left finish, so no task outlives the test's event loop.
        locks.unstick.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await locks.returned.wait()
        await asyncio.sleep(0.05)
        await client.aclose()
