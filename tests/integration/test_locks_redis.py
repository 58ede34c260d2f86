"""Leases against a real Redis: taken once, released only by their holder, and released even
when the server forgot the release script (restarted, `SCRIPT FLUSH`); the lease calls of many
conversations share round trips, each still with its own answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import kv
from devtools.servers import Redis
from services.state.locks import Locks


async def test_a_lease_is_taken_once_and_released_by_its_holder_only(
    redis_server: Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        lease = await locks.acquire(5)
        assert lease is not None and await locks.holder(5) == lease.owner
        assert 0 < await client.pttl(locks.lock_key(5)) <= 30_000
        assert await locks.acquire(5) is None
        assert await locks.release(lease)
        assert await locks.holder(5) is None
        again = await locks.acquire(5)
        assert again is not None
        assert not await locks.release(lease)  # an old holder's release leaves it alone
        assert await locks.holder(5) == again.owner
    finally:
        await client.aclose()


async def test_a_lease_is_released_after_the_server_forgot_the_script(
    redis_server: Redis, redis_admin: aioredis.Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        lease = await locks.acquire(6)
        assert lease is not None
        await redis_admin.script_flush()
        assert await locks.release(lease)
        assert await locks.holder(6) is None
    finally:
        await client.aclose()


async def test_a_holder_learns_on_release_whether_another_driver_asked_for_the_conversation(
    redis_server: Redis, redis_prefix: str
) -> None:
    """The dispatcher looks for work another replica ingested only when told so: without the
    mark, a message ingested by the replica that could not take the lease would wait for the
    sweeper; with a mark that is never taken, every hold would pay for a look."""
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        alone = await locks.acquire(7)
        assert alone is not None and alone.wanted  # unknown until released
        assert await locks.release(alone)
        assert not alone.wanted

        held = await locks.acquire(7)
        assert held is not None
        assert await locks.acquire(7) is None  # another driver asks
        assert await locks.release(held)
        assert held.wanted
        again = await locks.acquire(7)
        assert again is not None and await locks.release(again)
        assert not again.wanted  # the mark was taken by the release that learnt of it

        lost = await locks.acquire(8)
        assert lost is not None
        await client.delete(locks.lock_key(8))  # expired: another driver holds it now
        holder = await locks.acquire(8)
        assert holder is not None
        assert await locks.acquire(8) is None  # a third asks: the mark is the holder's
        assert not await locks.release(lost)
        assert lost.wanted  # no answer for a lease no longer ours: look, to be safe
        assert await locks.release(holder)
        assert holder.wanted
    finally:
        await client.aclose()


class CountingRelay:
    """A TCP relay in front of Redis that counts what its clients send: each read of a
    client's socket is about one request on the wire (one command, or one whole pipeline)."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        self.host, self.port = self.parts.hostname or "127.0.0.1", self.parts.port or 6379
        self.reads = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        login = self.parts.netloc.rpartition("@")[0]
        return urlunsplit(self.parts._replace(netloc=f"{login}@127.0.0.1:{port}".lstrip("@")))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counted: bool) -> None:
            try:
                while data := await src.read(1 << 16):
                    self.reads += counted
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(
            copy(reader, up_writer, True), copy(up_reader, writer, False), return_exceptions=True
        )

    def reset(self) -> None:
        self.reads = 0

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()


@pytest.fixture
async def relay(redis_server: Redis) -> AsyncIterator[CountingRelay]:
    relay = CountingRelay(redis_server.url)
    yield relay
    await relay.close()


async def test_concurrent_lease_calls_of_many_conversations_share_round_trips(
    redis_server: Redis, redis_prefix: str, relay: CountingRelay
) -> None:
    """Forty holds taken, refused, renewed and released at once: a few requests on the wire,
    not one per call, and each caller gets its own lease, refusal or mark."""
    client = kv.create_client(await relay.start())
    other_client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        other = Locks(other_client, ttl_seconds=30, prefix=redis_prefix)
        # Connections opened (their handshakes are no lease calls), on other conversations.
        warm = await asyncio.gather(*(locks.acquire(c) for c in range(1001, 1041)))
        await asyncio.gather(*(locks.release(lease) for lease in warm if lease is not None))
        # Half the conversations are held by another replica already.
        held = [await other.acquire(c) for c in range(1, 41, 2)]
        relay.reset()
        leases = await asyncio.gather(*(locks.acquire(c) for c in range(1, 41)))
        mine = [lease for lease in leases if lease is not None]
        renewed = await asyncio.gather(*(locks.renew(lease) for lease in mine))
        released = await asyncio.gather(*(locks.release(lease) for lease in mine))
        calls = 40 + 20 + 20
        # Alone, each call is a request; together, a pipeline can still span a few reads.
        assert relay.reads <= calls // 5, f"{relay.reads} requests for {calls} calls"
        for c, lease in zip(range(1, 41), leases, strict=True):
            if c % 2:
                assert lease is None, c  # refused, and the holder is told it was asked for
            else:
                assert lease is not None and lease.conversation_id == c
        assert renewed == released == [True] * 20
        assert not any(lease.wanted for lease in mine)  # nobody asked for these
        for lease in held:
            assert lease is not None and await other.release(lease) and lease.wanted
    finally:
        await client.aclose()
        await other_client.aclose()


async def test_a_call_that_fails_in_a_shared_round_trip_fails_alone(
    redis_server: Redis, redis_admin: aioredis.Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        leases = [await locks.acquire(c) for c in range(1, 11)]
        assert all(leases)
        # Conversation 5's lease key is no string now: its release script fails (WRONGTYPE).
        await client.delete(locks.lock_key(5))
        await redis_admin.hset(locks.lock_key(5), "x", "1")
        outcomes = await asyncio.gather(
            *(locks.release(lease) for lease in leases if lease is not None),
            return_exceptions=True,
        )
        assert isinstance(outcomes[4], ResponseError) and "WRONGTYPE" in str(outcomes[4])
        assert outcomes[:4] + outcomes[5:] == [True] * 9
        assert [await locks.holder(c) for c in (1, 2, 3, 4, 6, 7, 8, 9, 10)] == [None] * 9
    finally:
        await client.aclose()


async def test_lease_calls_sharing_a_round_trip_survive_a_forgotten_script(
    redis_server: Redis, redis_admin: aioredis.Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        await redis_admin.script_flush()
        leases = await asyncio.gather(*(locks.acquire(c) for c in range(1, 11)))
        assert all(leases)
        await redis_admin.script_flush()
        released = await asyncio.gather(
            *(locks.release(lease) for lease in leases if lease is not None)
        )
        assert released == [True] * 10
    finally:
        await client.aclose()


async def test_a_lost_lease_is_refused_its_renewal_among_others_and_fenced_off(
    redis_server: Redis, redis_prefix: str
) -> None:
    """A lease that expired and was taken by another holder: its renewal (in a round trip with
    others' renewals) says lost, and its release leaves the new holder's lease alone."""
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        leases = [await locks.acquire(c) for c in range(1, 6)]
        assert all(leases)
        mine = [lease for lease in leases if lease is not None]
        await client.delete(locks.lock_key(3))  # expired
        newcomer = await locks.acquire(3)
        assert newcomer is not None
        await client.pexpire(locks.lock_key(1), 1_000)
        renewed = await asyncio.gather(*(locks.renew(lease) for lease in mine))
        assert renewed == [True, True, False, True, True]
        assert [lease.lost for lease in mine] == [False, False, True, False, False]
        assert await client.pttl(locks.lock_key(1)) > 1_000  # renewed to its full TTL
        released = await asyncio.gather(*(locks.release(lease) for lease in mine))
        assert released == [True, True, False, True, True]
        assert await locks.holder(3) == newcomer.owner
        assert await locks.release(newcomer)
    finally:
        await client.aclose()
