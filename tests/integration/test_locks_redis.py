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
