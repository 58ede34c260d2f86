"""Per-conversation leases in Redis: `SET NX PX`, compare-and-delete release, renewal.

A lease is not a guarantee (a holder can stall past its TTL); the fencing token in PostgreSQL
is what refuses a stale holder's writes. Each process also keeps a heartbeat key so that the
sweeper can tell a lease held by a dead process from one held by a live, slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass
class Lease:
    conversation_id: int
    owner: str
    lost: bool = False
    # When the lease was last set to its full TTL (time.monotonic(), taken before the call).
    renewed_at: float = field(default_factory=time.monotonic)


class Locks:
    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: float,
        *,
        prefix: str = "wa:",
        instance: str | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_seconds * 1000)
        self.instance = instance or uuid.uuid4().hex[:12]
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    def lock_key(self, conversation_id: int) -> str:
        return f"{self.prefix}conv:{conversation_id}:lock"

    def heartbeat_key(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    def _owner(self) -> str:
        return f"{self.instance}:{uuid.uuid4().hex[:8]}"

    # `execute_command`, not `set()` and the script object: the same command, retries and
    # reply, without the keyword handling and wrappers around it (about a tenth of a command's
    # CPU in redis-py). A hold makes two: acquire and release.

    async def acquire(self, conversation_id: int) -> Lease | None:
        owner = self._owner()
        asked = time.monotonic()
        ok = await self.client.execute_command(
            "SET", self.lock_key(conversation_id), owner, "NX", "PX", self.ttl_ms
        )
        return Lease(conversation_id, owner, renewed_at=asked) if ok else None

    async def release(self, lease: Lease) -> bool:
        return bool(
            await self._run(self._release, self.lock_key(lease.conversation_id), lease.owner)
        )

    async def _run(self, script: AsyncScript, key: str, *args: str | int) -> object:
        try:
            return await self.client.execute_command("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:
            # A server that does not know it (restarted, flushed): the script object loads it.
            return await script(keys=[key], args=list(args))

    async def renew(self, lease: Lease) -> bool:
        asked = time.monotonic()
        ok = bool(
            await self._renew(
                keys=[self.lock_key(lease.conversation_id)], args=[lease.owner, self.ttl_ms]
            )
        )
        if not ok:
            lease.lost = True
        else:
            lease.renewed_at = asked
        return ok

    async def refresh(self, lease: Lease, fraction: float = 0.1) -> bool:
        """Renews the lease unless it was set to its full TTL less than `fraction` of the TTL
        ago: a turn that follows another within the same hold starts with nearly all of it
        already, and a Redis round trip per turn buys it nothing."""
        if not lease.lost and time.monotonic() - lease.renewed_at < fraction * self.ttl_ms / 1000:
            return True
        return await self.renew(lease)

    @contextlib.asynccontextmanager
    async def keep_renewed(self, lease: Lease):  # type: ignore[no-untyped-def]
        """Renews the lease every third of its TTL while the body runs."""
        keeper = _Keeper(self, lease)
        try:
            yield lease
        finally:
            await keeper.stop()

    async def holder(self, conversation_id: int) -> str | None:
        value = await self.client.get(self.lock_key(conversation_id))
        return str(value) if value is not None else None

    async def holder_alive(self, owner: str) -> bool:
        instance = owner.split(":", 1)[0]
        return bool(await self.client.exists(self.heartbeat_key(instance)))

    async def break_lock(self, conversation_id: int, owner: str) -> bool:
        """Removes a dead holder's lease (compare-and-delete: only that holder's)."""
        return bool(await self._release(keys=[self.lock_key(conversation_id)], args=[owner]))

    async def heartbeat(self, ttl_seconds: float) -> None:
        await self.client.set(self.heartbeat_key(self.instance), "1", px=int(ttl_seconds * 1000))

    async def ping(self) -> None:
        await self.client.ping()


class _Keeper:
    """The renewals of one lease: a timer that starts a renewal when one is due, not a task
    that waits for it. Nearly every hold ends long before its first renewal, and a task per
    hold (with the wait's own task and timer) cost a hold about a fifth of its CPU, Redis
    round trips included (a microbenchmark of acquire, keep_renewed and release)."""

    def __init__(self, locks: Locks, lease: Lease) -> None:
        self.locks = locks
        self.lease = lease
        self.period = locks.ttl_ms / 3000
        self.loop = asyncio.get_running_loop()
        self.stopped = False
        self.renewal: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(self.period, self._due)

    def _due(self) -> None:
        self.timer = None
        if self.stopped:
            return
        if self.lease.lost:  # a turn's refresh found it taken
            log.warning("lease lost", extra={"conversation_id": self.lease.conversation_id})
            return
        # A renewal since (a turn's `refresh`) moved the lease's expiry: the next one is due a
        # period after it, not now.
        due = self.lease.renewed_at + self.period
        if due - time.monotonic() > 0.001 * self.period:
            self.timer = self.loop.call_later(due - time.monotonic(), self._due)
            return
        self.renewal = self.loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            await self.locks.renew(self.lease)
        except Exception:
            log.warning("lease renewal failed", extra={"conv": self.lease.conversation_id})
        if self.lease.lost:
            log.warning("lease lost", extra={"conversation_id": self.lease.conversation_id})
        elif not self.stopped:
            self.timer = self.loop.call_later(self.period, self._due)

    async def stop(self) -> None:
        # The flag, not only the cancel: a cancel that lands as a command's own timeout fires
        # can surface as TimeoutError (Python 3.11's asyncio.timeout), which the renewal would
        # take for a failed one and schedule the next.
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        renewal = self.renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
