"""A stopping state replica hands the conversations it leaves with work waiting back to the
other replicas, over Redis pub/sub, so that none of them waits for a sweeper.

Only at shutdown: while it runs, a replica that releases a conversation takes it again itself
when work arrived meanwhile (services/state/dispatcher.py). A replica that stops cannot, and
the messages other replicas ingested for its conversations while it held them were dropped by
those replicas' dispatchers (the lease was taken). A conversation it holds is handed back by
the lease's release itself (services/state/locks.py); one it does not hold (asked for while
stopping, or waiting for a retry) by `hand_back`. Pub/sub is fire-and-forget, which is enough
here: if no replica hears it (the last one stopping, Redis down), the next start resumes every
waiting conversation and the sweepers recover what is left, as after a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
import orjson
import redis.asyncio as aioredis

from common import retry

from . import metrics, store
from .locks import handback_channel

log = logging.getLogger(__name__)

HANDBACK_TIMEOUT = 3.0  # the query and the publish, within the replica's grace period
RESUBSCRIBE_BASE_SECONDS = 0.5
RESUBSCRIBE_MAX_SECONDS = 10.0
# How long one wait for a hand-back lasts. Nothing is late for it: a message wakes the wait at
# once, and `stop` cancels it. Long, so that an idle replica does not wake every second (each
# wake is a few Redis client calls); no longer than the client's health check interval
# (common/kv.py), which each new wait runs when due.
LISTEN_SECONDS = 15.0


def payload(instance: str, conversations: list[int]) -> bytes:
    return orjson.dumps({"from": instance, "conversations": conversations})


async def hand_back(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    prefix: str,
    instance: str,
    conversations: set[int],
) -> list[int]:
    """Publishes those of `conversations` with work waiting; returns them. Called for
    conversations this replica does not hold, so a replica that hears it can take them at
    once."""
    if not conversations:
        return []
    try:
        async with asyncio.timeout(HANDBACK_TIMEOUT):
            waiting = await store.waiting_among(pool, sorted(conversations))
            if not waiting:
                return []
            message = payload(instance, waiting)
            receivers = await redis.publish(handback_channel(prefix), message)
    except Exception as exc:
        log.warning("could not hand conversations back; the sweepers will: %r", exc)
        return []
    metrics.HANDBACK.labels("given").inc(len(waiting))
    log.info(
        "handed conversations back",
        extra={"conversations": len(waiting), "receivers": receivers},
    )
    if not receivers:
        log.warning("no other state replica heard the hand-back; the next start resumes them")
    return waiting


class Listener:
    """Hears other replicas' hand-backs and drives those conversations, until stopped;
    resubscribes (with backoff) when Redis goes away."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        instance: str,
        notify: Callable[[int], None],
    ) -> None:
        self.redis = redis
        self.channel = handback_channel(prefix)
        self.instance = instance
        self.notify = notify
        self._stop = asyncio.Event()
        self.subscribed = asyncio.Event()
        # Set once `run` has returned: unsubscribed, so no publisher counts this replica.
        self.stopped = asyncio.Event()
        self._waiting: asyncio.Task[object] | None = None

    def stop(self) -> None:
        self._stop.set()
        if self._waiting is not None:
            self._waiting.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.stopped.set()

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self._listen()
                return
            except Exception as exc:
                # Backoff grows while subscribing fails, from the start after a subscription
                # that worked.
                failures = 1 if self.subscribed.is_set() else failures + 1
                self.subscribed.clear()
                log.warning("hand-back subscription lost, subscribing again: %r", exc)
                delay = retry.full_jitter(
                    failures, RESUBSCRIBE_BASE_SECONDS, RESUBSCRIBE_MAX_SECONDS
                )
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except TimeoutError:
                    pass

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.subscribed.set()
            while not self._stop.is_set():
                self._waiting = asyncio.ensure_future(pubsub.get_message(timeout=LISTEN_SECONDS))
                try:
                    message = await self._waiting
                except asyncio.CancelledError:
                    if self._stop.is_set() and not _cancelling():
                        return  # stopped while waiting
                    raise
                finally:
                    self._waiting = None
                if isinstance(message, dict):
                    self._heard(message.get("data"))
        finally:
            await pubsub.aclose()

    def _heard(self, data: object) -> None:
        try:
            doc = orjson.loads(data)  # type: ignore[arg-type]
            sender, conversations = str(doc["from"]), [int(c) for c in doc["conversations"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored a malformed hand-back: %r", data)
            return
        if sender == self.instance:
            return
        metrics.HANDBACK.labels("taken").inc(len(conversations))
        log.info(
            "taking conversations handed back",
            extra={"from": sender, "conversations": len(conversations)},
        )
        for conversation_id in conversations:
            self.notify(conversation_id)


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not only the wait it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
