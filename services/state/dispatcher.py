"""The driver of acknowledged work: one turn at a time per conversation, oldest message first.

`notify(conversation_id)` is called after ingest (and by the sweeper); the conversation is then
claimed with a Redis lease plus a PostgreSQL fencing token and its waiting messages are handed to
the agent one by one until none is left. Everything it needs to resume lives in PostgreSQL, so a
killed driver loses nothing: the sweeper (or the next start) dispatches the conversation again.

Replicas cooperate without a message bus. A replica that ingests a message notifies its own
dispatcher only; when another replica holds the conversation, the lease is taken and this
driver gives up. The holder does not miss the message: the ingest committed before the failed
`acquire`, which happened while the holder held the lease, so before its release; after every
release the holder asks PostgreSQL whether anything waits (`has_waiting`) and takes the
conversation again if so, but only when someone asked for it meanwhile: a failed `acquire`
leaves a mark that the holder's release takes in the same round trip (services/state/locks.py).
This replica's own notifications reach its driver directly (`_dirty`), so with one replica,
or without contention, a hold costs no look at all; LISTEN/NOTIFY or Redis pub/sub would wake
every replica for every message. Pub/sub is
used for one rare event only: a replica that stops hands its conversations back (`close`,
services/state/handback.py), since it cannot take them again itself. It does so as it lets go
of each, not once it has let go of all: a conversation released early in a stop and handed
back only at its end would wait, unseen by any other replica but their sweepers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time

import asyncpg
from opentelemetry import trace

from common import retry, telemetry

from . import handback, handoff, machine, metrics, store
from .locks import Lease, Locks
from .ports import AgentPort, AgentUnavailable, DlqPort, DlqUnavailable, Failure, TurnResult

log = logging.getLogger(__name__)

# A message whose turn was cut off by a dying driver this many times is not retried again:
# something in it kills its driver, and it goes to the dead-letter queue instead. (A turn that
# could not start because the agent was unreachable does not count.)
MAX_TURN_RESUMES = 5
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
# The outcome nearly every turn counts, looked up once (labels() takes a lock and a lookup).
_REPLIED = metrics.OUTCOMES.labels("replied")


def backoff(failures: int) -> float:
    return retry.full_jitter(failures, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS)


# How long a close waits for the drivers it cut off to release their conversations.
CLOSE_TIMEOUT = 3.0


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        locks: Locks,
        agent: AgentPort,
        dlq: DlqPort,
        *,
        max_concurrent: int = 64,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.pool = pool
        self.close_timeout = close_timeout
        self.locks = locks
        self.agent = agent
        self.dlq = dlq
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._dirty: set[int] = set()
        self._failures: dict[int, int] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._closing = False
        # While closing: the conversations handed back to the other replicas, those waiting to
        # be (this replica let go of them), and the task that hands them back.
        self._handed: set[int] = set()
        self._giving: set[int] = set()
        self._giver: asyncio.Task[None] | None = None
        self._unheard = 0
        # Those whose driver's last release handed them back (its exit need not), and those
        # whose driver is taking or letting go of their lease (a close does not cut that short:
        # cut, it would leave the lease held, and the conversation waiting, until it expired).
        self._released_back: set[int] = set()
        self._lease_steps: set[int] = set()
        # After the last close nothing is handed back any more (Redis and the pool close).
        self._closed = False

    def notify(self, conversation_id: int) -> None:
        """There may be work for this conversation; drive it unless already driving it."""
        if self._closing:
            if conversation_id in self._tasks:
                # Its driver hands it back on its way out, this too (_drive).
                self._dirty.add(conversation_id)
            else:
                self._give(conversation_id)
            return
        if conversation_id in self._tasks:
            self._dirty.add(conversation_id)
            return
        # A fresh context: the driver serves many messages and must not inherit the correlation
        # id (or trace) of whichever request happened to notify it; each turn sets its own.
        task = asyncio.create_task(
            self._drive(conversation_id),
            name=f"conv-{conversation_id}",
            context=contextvars.Context(),
        )
        self._tasks[conversation_id] = task
        # The driver deregisters itself (see _drive); this only covers a task cancelled before
        # it ever ran (by a close: its conversation goes back), and never removes a successor
        # registered meanwhile.
        task.add_done_callback(functools.partial(self._ended, conversation_id))

    def _ended(self, conversation_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(conversation_id) is task:
            del self._tasks[conversation_id]
            if self._closing:
                self._give(conversation_id)

    def driving(self, conversation_id: int) -> bool:
        return conversation_id in self._tasks

    def _later(self, conversation_id: int) -> None:
        if self._closing:
            self._give(conversation_id)
            return
        failures = self._failures.get(conversation_id, 0) + 1
        self._failures[conversation_id] = failures
        delay = backoff(failures)
        if conversation_id not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[conversation_id] = loop.call_later(delay, self._fire, conversation_id)

    def _fire(self, conversation_id: int) -> None:
        self._timers.pop(conversation_id, None)
        self.notify(conversation_id)

    async def close(self, grace: float = 0.0, *, last: bool = False) -> set[int]:
        """Stops taking turns: a turn in flight has `grace` seconds to finish, then it is cut off
        (whoever takes the conversation next resumes it; its fencing token refuses the cut
        turn's late writes). Every conversation this replica lets go of, with work waiting, is
        handed back to the other replicas as it lets go of it: in the lease's release when it
        held one (locks.py), else at once (handback.py). Returns those handed back. Called again
        with `last` (the set-up's finally, once nothing notifies it any more): it waits for the
        hand-backs started since, cuts off even drivers in a lease step, and hands nothing back
        afterwards."""
        self._closing = True
        for conversation_id, handle in self._timers.items():
            handle.cancel()
            if conversation_id not in self._tasks:  # else its driver hands it back
                self._give(conversation_id)
        self._timers.clear()
        tasks = set(self._tasks.values())
        if tasks and grace > 0:
            # Drivers stop before their next turn (see _hold) and release their conversation.
            _, tasks = await asyncio.wait(tasks, timeout=grace)
        for conversation_id, task in list(self._tasks.items()):
            # One taking or letting go of its lease is not cut short (_lease_steps), but by
            # the last close, when the lease is left to expire whatever happens.
            if task in tasks and (last or conversation_id not in self._lease_steps):
                task.cancel()
        if tasks:
            # A cancelled driver still releases its conversation and lease on the way out; if
            # PostgreSQL or Redis hangs, shutdown goes on without it (the lease expires by
            # itself and the sweeper resumes the turn).
            done, pending = await asyncio.wait(tasks, timeout=self.close_timeout)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("a conversation driver failed while stopping: %r", task.exception())
            if pending:
                log.warning(
                    "%d conversation drivers did not stop within %.1f s; leaving them",
                    len(pending),
                    self.close_timeout,
                    extra={"drivers": sorted(t.get_name() for t in pending)},
                )
        # Each hand-back is bounded (handback.HANDBACK_TIMEOUT); one may start while another
        # ends, until every driver has gone.
        loop = asyncio.get_running_loop()
        until = loop.time() + 2 * handback.HANDBACK_TIMEOUT
        while self._giver is not None and not self._giver.done():
            if (left := until - loop.time()) <= 0:
                log.warning("handing conversations back did not end in time; leaving it")
                break
            await asyncio.wait([self._giver], timeout=left)
        if self._unheard:
            log.warning(
                "no other state replica heard %d conversations handed back; the next start "
                "resumes them",
                self._unheard,
            )
            self._unheard = 0
        self._closed = last
        return set(self._handed)

    def _give(self, conversation_id: int) -> None:
        """Closing: hands a conversation this replica does not hold back to the others, now
        (with those given meanwhile), if work waits. Again if it was handed back before: the
        replica still stores what the gateways send until its server has stopped."""
        if self._closed:
            log.warning(
                "a conversation was let go of after the last close; the sweepers recover it",
                extra={"conversation_id": conversation_id},
            )
            return
        self._giving.add(conversation_id)
        if self._giver is None or self._giver.done():
            self._giver = asyncio.create_task(
                self._hand_back(), name="handback-give", context=contextvars.Context()
            )

    async def _hand_back(self) -> None:
        with telemetry.untraced():  # housekeeping of a stopping replica, no message's trace
            while self._giving:
                giving, self._giving = self._giving, set()
                self._handed.update(
                    await handback.hand_back(
                        self.pool,
                        self.locks.client,
                        self.locks.prefix,
                        self.locks.instance,
                        giving,
                    )
                )

    async def _release_handing_back(self, lease: Lease) -> None:
        """Closing: releases a held conversation and hands it back in the same step (locks.py),
        when work waits or someone asked for it meanwhile."""
        conversation_id = lease.conversation_id
        try:
            waiting = await store.has_waiting(self.pool, conversation_id)
        except Exception:
            waiting = True  # whoever takes it looks for itself
        published, heard = await self.locks.release_handing_back(
            lease, handback.payload(self.locks.instance, [conversation_id]), waiting
        )
        if not published:
            return
        self._handed.add(conversation_id)
        self._released_back.add(conversation_id)
        metrics.HANDBACK.labels("given").inc()
        log.info(
            "handed conversations back",
            extra={"conversations": 1, "receivers": int(heard), "conversation_id": conversation_id},
        )
        if not heard:
            self._unheard += 1

    async def _drive(self, conversation_id: int) -> None:
        # Claiming, leases and the queue are the conversation's, not one message's: untraced.
        # Each turn continues its message's trace.
        try:
            with telemetry.untraced():
                await self._drive_untraced(conversation_id)
        finally:
            # A notify that came after the driver's last look only marked the conversation
            # dirty (it saw this driver still registered): without this, its message would
            # wait for the sweeper. No await between the look and the deregistration, so none
            # can slip in; a pending retry timer will notify by itself.
            if self._tasks.get(conversation_id) is asyncio.current_task():
                del self._tasks[conversation_id]
            if self._closing:
                # Unless its release handed it back, and nothing was notified since, the
                # hand-back looks again, now that the conversation is free.
                released_back = conversation_id in self._released_back
                self._released_back.discard(conversation_id)
                if not released_back or conversation_id in self._dirty:
                    self._dirty.discard(conversation_id)
                    self._give(conversation_id)
            elif conversation_id in self._dirty and conversation_id not in self._timers:
                self.notify(conversation_id)

    async def _drive_untraced(self, conversation_id: int) -> None:
        async with self._slots:
            metrics.ACTIVE_CONVERSATIONS.inc()
            try:
                while True:
                    if self._closing:
                        return  # handed back on the way out (_drive)
                    self._dirty.discard(conversation_id)
                    try:
                        held = await self._hold(conversation_id)
                    except AgentUnavailable as exc:
                        log.warning("agent unavailable, will retry: %s", exc)
                        self._later(conversation_id)
                        return
                    except store.StaleFence as exc:
                        metrics.STALE_WRITES.inc()
                        log.warning("lost the conversation to a later holder: %s", exc)
                        return
                    except store.UnknownMessage:
                        return  # the conversation is gone (`wa forget`, pruning): no work
                    except Exception:
                        log.exception(
                            "driving the conversation failed, will retry",
                            extra={"conversation_id": conversation_id},
                        )
                        self._later(conversation_id)
                        return
                    if held is None:
                        return
                    self._failures.pop(conversation_id, None)
                    if conversation_id in self._dirty:
                        continue
                    # The lease is released: a message another driver ingested while we held
                    # it, and could not take, is ours to drive (module docstring). Not left to
                    # the sweeper.
                    if not held.wanted:
                        return
                    try:
                        waiting = await store.has_waiting(self.pool, conversation_id)
                    except Exception as exc:
                        # (One failed statement answers a whole batch of looks.) The next
                        # hold looks for itself: it claims the conversation, or lets it go.
                        log.warning("looking for waiting work failed: %r", exc)
                        waiting = True
                    if not waiting:
                        return
            finally:
                metrics.ACTIVE_CONVERSATIONS.dec()

    async def _hold(self, conversation_id: int) -> Lease | None:
        """Claims the conversation and runs its waiting turns; returns the released lease (which
        says whether another driver asked for it meanwhile), None when someone else holds it."""
        self._lease_steps.add(conversation_id)
        try:
            lease = await self.locks.acquire(conversation_id)
        except Exception:
            metrics.LOCK_ERRORS.inc()
            raise
        finally:
            self._lease_steps.discard(conversation_id)
        if lease is None:
            metrics.LOCK_CONTENDED.inc()
            return None
        token: int | None = None
        released = False
        try:
            if self._closing:
                return lease  # taken as the stop began: handed back at once (finally), no turn
            async with self.locks.keep_renewed(lease):
                # The claim starts the first turn in the same round trip, and a replied turn
                # the next one; finding none, either also releases the conversation.
                token, first = await store.claim_turn_or_release(
                    self.pool, conversation_id, lease.owner
                )
                following: store.WorkItem | store.NotAsked | store.Released | None = first
                # A closing replica finishes the turn it is in (one already started counts:
                # left, it would come back as a cut-off turn) and starts no other.
                while not lease.lost:
                    if isinstance(following, store.Released):
                        released = True
                        break
                    if isinstance(following, store.NotAsked):
                        if self._closing:
                            break
                        item = await store.next_message(self.pool, conversation_id, token)
                    else:
                        item = following
                    if item is None:
                        break
                    following = await self._turn(lease, item, token)
        finally:
            self._lease_steps.add(conversation_id)
            try:
                if token is not None and not lease.lost and not released:
                    with contextlib.suppress(Exception):
                        await store.release_conversation(self.pool, conversation_id, token)
                with contextlib.suppress(Exception):
                    if self._closing:
                        await self._release_handing_back(lease)
                    else:
                        await self.locks.release(lease)
            finally:
                self._lease_steps.discard(conversation_id)
        return lease

    async def _turn(
        self, lease: Lease, item: store.WorkItem, token: int
    ) -> store.WorkItem | store.NotAsked | store.Released | None:
        """Runs one turn; returns the conversation's next turn when it was started with the
        turn's final transition (see store.finish_turn)."""
        with telemetry.continued(
            "state.turn",
            item.traceparent,
            item.correlation_id,
            message_id=item.message_id,
            conversation_id=item.conversation_id,
            phone_number_id=item.phone_number_id,
        ) as span:
            # Each turn starts with (nearly) a full lease: renewed unless it was set within the
            # last tenth of its TTL (a renewal shows in the message's trace).
            await self.locks.refresh(lease)
            started = time.perf_counter()
            if item.turn_resumes >= MAX_TURN_RESUMES:
                await self._fail(
                    item,
                    token,
                    TurnResult(
                        outcome="failed",
                        error_class="TurnNeverFinished",
                        error_message=f"its turn was cut off {item.turn_resumes} times "
                        "(its driver died each time)",
                        retryable=False,
                    ),
                )
                return store.NOT_ASKED
            try:
                result = await self.agent.reply(item, token)
            except AgentUnavailable as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                await store.transition(
                    self.pool,
                    item.message_id,
                    machine.RECEIVED,
                    f"agent unavailable: {exc}",
                    token=token,
                )
                raise
            metrics.TURN_SECONDS.observe(time.perf_counter() - started)
            if result.outcome == "replied":
                reason = result.detail or "replied"
                if result.absorbed_message_ids:
                    burst = len(result.absorbed_message_ids) + 1
                    reason = f"{reason}; answers a debounced burst of {burst} messages"
                start_next = not lease.lost and not self._closing
                if result.handoff:
                    finished = await handoff.finish_handing_off(
                        self.pool,
                        item,
                        machine.REPLIED,
                        reason,
                        token,
                        start_next=start_next,
                        agent_type=result.agent_type,
                        absorbed=result.absorbed_message_ids,
                    )
                else:
                    try:
                        finished = await store.finish_turn(
                            self.pool,
                            item,
                            machine.REPLIED,
                            reason,
                            token,
                            start_next=start_next,
                            absorbed=result.absorbed_message_ids,
                            # Sent, and left to this transition to record (TurnResult).
                            reply_message_id=(
                                result.reply_message_id if result.sent_unrecorded else None
                            ),
                            release=True,
                        )
                    except store.StaleFence:
                        if result.sent_unrecorded and result.reply_message_id:
                            await self._record_stale_send(item, result.reply_message_id)
                        raise
                _REPLIED.inc(1 + len(finished.absorbed))
                if log.isEnabledFor(logging.INFO):
                    log.info("message replied", extra=_who(item))
                left = (
                    set(result.absorbed_message_ids) - set(finished.absorbed)
                    if result.absorbed_message_ids
                    else None
                )
                if left:
                    # No longer waiting (another turn took them): they are theirs to answer.
                    log.warning(
                        "messages of a debounced burst were not waiting any more",
                        extra={**_who(item), "left": sorted(left)},
                    )
                if item.attempts > 1:
                    with contextlib.suppress(DlqUnavailable):
                        await self.dlq.resolve(item.message_id, item.correlation_id)
                return finished.next
            span.set_status(trace.StatusCode.ERROR, result.error_message)
            await self._fail(item, token, result)
            return store.NOT_ASKED

    async def _record_stale_send(self, item: store.WorkItem, reply_message_id: str) -> None:
        """The turn ran past the loss of its conversation (this replica stalled longer than
        its heartbeat lasts, and another broke its lease) and sent its reply: whoever runs the
        turn again finds a send in flight and waits for its confirmation. That the reply went
        out is recorded now, or the later run sends it again when no status webhook comes."""
        await _record_sent_anyway(
            self.pool,
            item.message_id,
            reply_message_id,
            "a turn that lost its conversation meanwhile",
            _who(item),
        )

    async def _fail(self, item: store.WorkItem, token: int, result: TurnResult) -> None:
        reason = f"{result.error_class}: {result.error_message}"
        await store.transition(self.pool, item.message_id, machine.FAILED, reason, token=token)
        metrics.OUTCOMES.labels("failed").inc()
        log.warning("message failed", extra={**_who(item), "reason": reason})
        failure = Failure(
            message_id=item.message_id,
            conversation_id=item.conversation_id,
            error_class=result.error_class,
            error_message=result.error_message,
            retryable=result.retryable,
            correlation_id=item.correlation_id,
        )
        await dead_letter(self.pool, self.dlq, failure)


async def _record_sent_anyway(
    pool: asyncpg.Pool, message_id: str, reply_message_id: str, turn: str, who: dict[str, str]
) -> None:
    """Records a reply that went out for `turn`, whose own record cannot be made any more:
    unfenced, where no reply is recorded (store.record_stale_send). Logged either way."""
    try:
        recorded = await store.record_stale_send(pool, message_id, reply_message_id)
    except Exception as exc:
        log.warning("could not record the reply of %s: %r", turn, exc, extra=who)
        return
    if recorded:
        log.warning("recorded the reply of %s", turn, extra={**who, "reply_id": reply_message_id})


# Records of unclaimed sends in flight (record_unclaimed_send), kept until done.
_RECORDING: set[asyncio.Task[None]] = set()


def record_unclaimed_send(pool: asyncpg.Pool, message_id: str, reply_message_id: str) -> None:
    """A turn's answer came after its driver had stopped waiting for it (the turn overran
    its deadline and grace, its driver was cancelled) and says that its reply went out, left
    to the driver to record: the message was failed or cut off meanwhile, and its next run
    would find the send in flight and, without a status webhook, send the reply again.
    Recorded now, in the background, unfenced where no reply is (store.record_stale_send)."""

    record = _record_sent_anyway(
        pool,
        message_id,
        reply_message_id,
        "a turn answered after its driver stopped waiting",
        {"message_id": message_id},
    )
    task = asyncio.create_task(record, name="record-unclaimed-send")
    _RECORDING.add(task)
    task.add_done_callback(_RECORDING.discard)


def _who(item: store.WorkItem) -> dict[str, str]:
    """The message and, for an operator reading logs, the customer's username when it has one
    (a customer with a username may have no phone number to recognise it by)."""
    who = {"message_id": item.message_id}
    if item.username:
        who["username"] = "@" + item.username
    return who


async def dead_letter(pool: asyncpg.Pool, dlq: DlqPort, failure: Failure) -> bool:
    """Hands a failed message to the DLQ; a failed hand-off is retried by the sweeper."""
    try:
        await dlq.enqueue(failure)
    except DlqUnavailable as exc:
        log.warning("dlq unavailable, the sweeper will hand the message over: %s", exc)
        return False
    with contextlib.suppress(machine.IllegalTransition):
        await store.transition(
            pool,
            failure.message_id,
            machine.DEAD_LETTERED,
            f"in the dead-letter queue: {failure.error_class}",
            correlation_id=failure.correlation_id,
        )
        metrics.OUTCOMES.labels("dead_lettered").inc()
    return True
