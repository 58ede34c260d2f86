"""Per-conversation leases in Redis: `SET NX PX`, compare-and-delete release, renewal.

A lease is not a guarantee (a holder can stall past its TTL); the fencing token in PostgreSQL
is what refuses a stale holder's writes. Each process also keeps a heartbeat key so that the
sweeper can tell a lease held by a dead process from one held by a live, slow one.

The lease scripts of concurrent holds (acquire, release, renew, break) go to Redis together:
one non-transactional pipeline of EVALSHA calls per round trip (common/coalesce.py). One
batcher for all of them, not one per kind: a busy replica acquires some conversations while it
releases others, and one pipeline carries both (the calls of one hold follow each other, so
they never share a batch). A pipeline, not one script over many keys: a script's keys must
hash to one slot on Redis Cluster, and the keys of different conversations do not; and in a
pipeline each call keeps its own reply or its own error (WRONGTYPE, NOSCRIPT), as if alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from common.coalesce import Coalescer

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# A failed acquire leaves a mark that someone wanted the conversation while it was held (in
# the same round trip); the holder's release takes the mark, and only then asks PostgreSQL
# whether work waits (services/state/dispatcher.py). A released lease that nobody asked for
# needs no look: this replica's own notifications reach its driver directly.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
redis.call('set', KEYS[2], '1', 'PX', ARGV[3])
return 0
"""
# 0: not this holder's lease (the mark is left for the holder); 1: released; 3: released,
# and someone asked for it meanwhile.
_RELEASE_ASKED = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
return 1 + 2 * redis.call('del', KEYS[2])
"""
# A stopping replica's release (services/state/dispatcher.py, `close`): also publishes the
# conversation on the hand-back channel (services/state/handback.py) when work waits (ARGV[2])
# or someone asked for it meanwhile. In the same script, so there is no moment at which the
# conversation is free and no other replica has been told: a sweeper looking then would take
# its waiting messages as abandoned. Bits of the answer: 1 released, 2 asked, 4 published and
# heard by some replica.
_RELEASE_HANDING_BACK = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
local asked = redis.call('del', KEYS[2])
local heard = 0
if asked == 1 or ARGV[2] == '1' then
  -- pcall: the lease is released whatever becomes of the message (an ACL without the
  -- channel); unheard, the conversation waits for the sweepers, as if nobody had listened.
  local receivers = redis.pcall('publish', ARGV[3], ARGV[4])
  if type(receivers) == 'number' and receivers > 0 then heard = 1 end
end
return 1 + 2 * asked + 4 * heard
"""
# The mark outlives any hold (a hold renews its lease while its turns run); one left behind
# by a dead holder costs the next holder one look, nothing more.
WANTED_TTL_MS = 3_600_000
# How often, per renewal period, the leases held are looked at for a renewal due (_Keeper).
WATCHES_PER_PERIOD = 4
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def handback_channel(prefix: str) -> str:
    """The pub/sub channel of stopping replicas' hand-backs (services/state/handback.py)."""
    return f"{prefix}handback"


@dataclass(frozen=True, slots=True)
class _Call:
    """One script call: the script, its keys, its arguments."""

    script: AsyncScript
    keys: tuple[str, ...]
    args: tuple[str | int | bytes, ...]


@dataclass
class Lease:
    conversation_id: int
    owner: str
    lost: bool = False
    # When the lease was last set to its full TTL (time.monotonic(), taken before the call).
    renewed_at: float = field(default_factory=time.monotonic)
    # Whether another driver may have asked for the conversation during the hold: known only
    # once `release` said so, assumed until then (a failed release gives no answer).
    wanted: bool = True


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
        self._acquire = client.register_script(_ACQUIRE)
        self._release_asked = client.register_script(_RELEASE_ASKED)
        self._release_handing_back = client.register_script(_RELEASE_HANDING_BACK)
        self.handback_channel = handback_channel(prefix)
        self._renew = client.register_script(_RENEW)
        self._calls: Coalescer[_Call, object] = Coalescer("redis_lease", self._run_batch)
        # The leases of the holds running (keep_renewed), and the one timer that renews them.
        self.period = self.ttl_ms / 3000
        self._kept: set[_Keeper] = set()
        self._watch: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None

    def lock_key(self, conversation_id: int) -> str:
        return f"{self.prefix}conv:{conversation_id}:lock"

    def wanted_key(self, conversation_id: int) -> str:
        return f"{self.prefix}conv:{conversation_id}:wanted"

    def heartbeat_key(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    def _owner(self) -> str:
        # 32 random bits, as uuid4().hex[:8] gave them, without building a UUID per hold.
        return f"{self.instance}:{os.urandom(4).hex()}"

    async def acquire(self, conversation_id: int) -> Lease | None:
        """The conversation's lease, or None (held: the holder learns that it was asked for)."""
        owner = self._owner()
        asked = time.monotonic()
        keys = (self.lock_key(conversation_id), self.wanted_key(conversation_id))
        ok = await self._run(self._acquire, keys, owner, self.ttl_ms, WANTED_TTL_MS)
        return Lease(conversation_id, owner, renewed_at=asked) if ok else None

    async def release(self, lease: Lease) -> bool:
        """Releases the holder's own lease (False: not its lease any more) and sets
        `lease.wanted` to whether another driver asked for the conversation meanwhile."""
        keys = (self.lock_key(lease.conversation_id), self.wanted_key(lease.conversation_id))
        answer = await self._run(self._release_asked, keys, lease.owner)
        lease.wanted = answer != 1
        return answer in (1, 3)

    async def release_handing_back(
        self, lease: Lease, payload: bytes, waiting: bool
    ) -> tuple[bool, bool]:
        """`release`, publishing `payload` on the hand-back channel in the same step when work
        waits or someone asked for the conversation (`_RELEASE_HANDING_BACK`). Returns whether
        it was published, and whether some replica heard it."""
        keys = (self.lock_key(lease.conversation_id), self.wanted_key(lease.conversation_id))
        args = (lease.owner, int(waiting), self.handback_channel, payload)
        answer = await self._run(self._release_handing_back, keys, *args)
        answer = int(answer)  # type: ignore[call-overload]
        released, asked = answer & 1 != 0, answer & 2 != 0
        lease.wanted = asked or not released  # as `release`: unknown, so assumed
        return released and (waiting or asked), answer & 4 != 0

    async def renew(self, lease: Lease) -> bool:
        asked = time.monotonic()
        keys = (self.lock_key(lease.conversation_id),)
        ok = bool(await self._run(self._renew, keys, lease.owner, self.ttl_ms))
        if not ok:
            lease.lost = True
        else:
            lease.renewed_at = asked
        return ok

    async def _run(
        self, script: AsyncScript, keys: tuple[str, ...], *args: str | int | bytes
    ) -> object:
        """One script call, sent with whatever other calls wait (module docstring)."""
        return await self._calls.submit(_Call(script, keys, args))

    async def _run_batch(self, calls: list[_Call]) -> list[object]:
        if len(calls) == 1:
            # Alone (an idle replica, or the first calls of a busy one): the plain command,
            # without a pipeline's own costs.
            return [await self._run_one(calls[0])]
        outcomes = await self._pipeline(calls)
        forgotten = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, NoScriptError)]
        if forgotten:
            # A server that does not know a script (restarted, flushed) did not run it: load
            # it, then send those calls again.
            for script in {calls[i].script.sha: calls[i].script for i in forgotten}.values():
                await self.client.script_load(script.script)
            again = await self._pipeline([calls[i] for i in forgotten])
            for i, outcome in zip(forgotten, again, strict=True):
                outcomes[i] = outcome
        return outcomes

    # `execute_command`, not the script object: the same command, retries and reply, without
    # the keyword handling and wrappers around it (about a tenth of a command's CPU in
    # redis-py).

    async def _run_one(self, call: _Call) -> object:
        script, keys, args = call.script, call.keys, call.args
        try:
            return await self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # A server that does not know it (restarted, flushed): the script object loads it.
            return await script(keys=list(keys), args=list(args))

    async def _pipeline(self, calls: list[_Call]) -> list[object]:
        """The calls in one round trip: each one's reply, or its own error (a script that
        fails is that call's outcome; the calls after it still run)."""
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            keys = call.keys
            pipe.execute_command("EVALSHA", call.script.sha, len(keys), *keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def refresh(self, lease: Lease, fraction: float = 0.1) -> bool:
        """Renews the lease unless it was set to its full TTL less than `fraction` of the TTL
        ago: a turn that follows another within the same hold starts with nearly all of it
        already, and a Redis round trip per turn buys it nothing."""
        if not lease.lost and time.monotonic() - lease.renewed_at < fraction * self.ttl_ms / 1000:
            return True
        return await self.renew(lease)

    def keep_renewed(self, lease: Lease) -> _Keeper:
        """`async with`: renews the lease every third of its TTL while the body runs."""
        return _Keeper(self, lease)

    def _keep(self, keeper: _Keeper) -> None:
        self._kept.add(keeper)
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch_loop is not loop:
            self._watch_loop = loop
            self._watch = loop.call_later(self.period / WATCHES_PER_PERIOD, self._look)

    def _look(self) -> None:
        """The watch: starts the renewals that are due; looks again while leases are kept."""
        self._watch = None
        now = time.monotonic()
        for keeper in list(self._kept):
            keeper.look(now)
        if self._kept and self._watch_loop is not None:
            self._watch = self._watch_loop.call_later(self.period / WATCHES_PER_PERIOD, self._look)

    async def holder(self, conversation_id: int) -> str | None:
        value = await self.client.get(self.lock_key(conversation_id))
        return str(value) if value is not None else None

    async def holders(self, conversation_ids: list[int]) -> list[str | None]:
        """`holder` of each, in one round trip (a pipeline, not MGET: the keys need not share a
        Redis Cluster slot)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for conversation_id in conversation_ids:
                pipe.get(self.lock_key(conversation_id))
            values = await pipe.execute()
        return [str(value) if value is not None else None for value in values]

    async def holder_alive(self, owner: str) -> bool:
        instance = owner.split(":", 1)[0]
        return bool(await self.client.exists(self.heartbeat_key(instance)))

    async def break_lock(self, conversation_id: int, owner: str) -> bool:
        """Removes a dead holder's lease (compare-and-delete: only that holder's)."""
        return bool(await self._run(self._release, (self.lock_key(conversation_id),), owner))

    async def heartbeat(self, ttl_seconds: float) -> None:
        await self.client.set(self.heartbeat_key(self.instance), "1", px=int(ttl_seconds * 1000))

    async def ping(self) -> None:
        await self.client.ping()


class _Keeper:
    """The renewals of one lease, started by its Locks' watch (`Locks._look`, one timer for
    every lease held, looking WATCHES_PER_PERIOD times a period): nearly every hold ends long
    before its first renewal, and a timer per hold (set, then cancelled) cost a hold more than
    the rest of its Python work but the Redis calls. A renewal starts at most a
    WATCHES_PER_PERIOD-th of a period late; the next is due a period after the last renewal
    (one by a turn's `refresh` included) or, after a failed one, a period after it failed."""

    def __init__(self, locks: Locks, lease: Lease) -> None:
        self.locks = locks
        self.lease = lease
        self.period = locks.period
        self.due = time.monotonic() + self.period
        self.stopped = False
        self.renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        self.locks._keep(self)
        return self.lease

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def look(self, now: float) -> None:
        if self.stopped or (self.renewal is not None and not self.renewal.done()):
            return
        if self.lease.lost:  # a turn's refresh found it taken
            log.warning("lease lost", extra={"conversation_id": self.lease.conversation_id})
            self.locks._kept.discard(self)
            return
        # A renewal since (a turn's `refresh`) moved the lease's expiry: the next one is due a
        # period after it, not now.
        due = max(self.due, self.lease.renewed_at + self.period)
        if due - now > 0.001 * self.period:
            return
        self.renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        try:
            await self.locks.renew(self.lease)
        except Exception:
            log.warning("lease renewal failed", extra={"conv": self.lease.conversation_id})
            self.due = time.monotonic() + self.period
        if self.lease.lost:
            log.warning("lease lost", extra={"conversation_id": self.lease.conversation_id})
            self.locks._kept.discard(self)

    async def stop(self) -> None:
        # The flag, not only the cancel: a cancel that lands as a command's own timeout fires
        # can surface as TimeoutError (Python 3.11's asyncio.timeout), which the renewal would
        # take for a failed one.
        self.stopped = True
        self.locks._kept.discard(self)
        renewal = self.renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
