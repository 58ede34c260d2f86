"""Leases against a real Redis: taken once, released only by their holder, and released even
when the server forgot the release script (restarted, `SCRIPT FLUSH`)."""

from __future__ import annotations

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
    redis_server: Redis, redis_prefix: str
) -> None:
    client = kv.create_client(redis_server.url)
    try:
        locks = Locks(client, ttl_seconds=30, prefix=redis_prefix)
        lease = await locks.acquire(6)
        assert lease is not None
        await client.script_flush()
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
