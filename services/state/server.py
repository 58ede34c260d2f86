"""The state service's gRPC adapter: requests in, domain calls, domain errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import grpc
from prometheus_client import Counter
from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

from common import (
    config,
    customers,
    db,
    domain,
    grpcserver,
    kv,
    logs,
    migrate,
    retry,
    roles,
    telemetry,
    wire,
)
from services.state.settings import StateSettings

from . import handback, handoff, machine, metrics, retention, store
from .clients import GrpcAgent, GrpcDlq
from .dispatcher import Dispatcher, record_unclaimed_send
from .locks import Locks
from .sweeper import Sweeper

log = logging.getLogger(__name__)


def _checked(m: domain.Message, pb: common_pb2.InboundMessage) -> domain.Message:
    """The message, or a skipped one when it cannot be answered: the gateway names and checks
    every message, a caller that did not still loses nothing."""
    if m.message_id and m.type and 0 <= m.timestamp <= store.MAX_TIMESTAMP:
        return m
    message_id, reason = m.message_id, m.skip_reason
    if not message_id:
        digest = hashlib.sha256(pb.SerializeToString(deterministic=True)).hexdigest()
        message_id, reason = f"invalid:{digest}", reason or "message without an id"
    if not 0 <= m.timestamp <= store.MAX_TIMESTAMP and not reason:
        reason = "timestamp is not a time in seconds between 1970 and 9999"
    return dataclasses.replace(
        m, message_id=message_id, type=m.type or "unknown", skip_reason=reason
    )


def _delivery_in(request: state_pb2.IngestRequest) -> store.DeliveryIn:
    return store.DeliveryIn(
        messages=[_checked(wire.message_from_proto(m), m) for m in request.messages],
        statuses=[wire.status_from_proto(s) for s in request.statuses if s.message_id],
        correlation_id=request.correlation_id,
        traceparent=request.traceparent,
        events=[
            wire.event_from_proto(e)
            for e in request.events
            if e.event_id and e.kind in ("user_id_update", "user_preferences")
        ],
    )


_ingest_result = wire.to_proto(store.Ingested, state_pb2.IngestResult)


def _ingests_error(
    request_id: int, code: grpc.StatusCode, details: str = ""
) -> state_pb2.IngestsResponse:
    return state_pb2.IngestsResponse(id=request_id, code=code.value[0], details=details)


# The ingest counter's children, looked up once per label (`labels` per message is a lock and
# a dict lookup each).
_ingested: dict[str, Counter] = {}


def _count_ingested(result: str) -> None:
    child = _ingested.get(result)
    if child is None:
        child = _ingested[result] = metrics.INGESTED.labels(result)
    child.inc()


class StateServicer(state_pb2_grpc.StateServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        locks: Locks,
        dispatcher: Dispatcher | None,
        settings: StateSettings | None = None,
    ) -> None:
        self.pool = pool
        self.locks = locks
        self.dispatcher = dispatcher
        self.settings = settings or StateSettings()
        # Batches of `Ingests` calls being stored, whether or not their caller still waits.
        self._ingesting: set[asyncio.Task[None]] = set()

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        return state_pb2.IngestBatchResponse(deliveries=await self._ingest(request.deliveries))

    async def Ingests(
        self,
        requests: AsyncIterator[state_pb2.IngestsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[state_pb2.IngestsResponse]:
        """Each batch read is stored at once, beside the others; each answer is written as
        its batch is stored. The call ends when the caller has stopped writing and every batch
        is answered."""
        answers: asyncio.Queue[state_pb2.IngestsResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: state_pb2.IngestsRequest) -> None:
            # Untraced, as IngestBatch (common/telemetry.py): each delivery's trace goes on
            # from its own traceparent when its turn starts. Bounded by the batch's deadline,
            # as a unary call's handler is cancelled at its own: past it the gateway has
            # answered 503, and a batch still waiting (for a connection, a lock) only holds up
            # the ones behind it.
            try:
                with telemetry.untraced():
                    async with asyncio.timeout(request.timeout_seconds or None):
                        stored = await self._ingest(request.batch.deliveries)
            except TimeoutError:
                log.warning("a batch of deliveries was not stored within its deadline")
                answers.put_nowait(_ingests_error(request.id, grpc.StatusCode.DEADLINE_EXCEEDED))
                return
            except Exception as exc:  # as a unary call's handler failing would end it
                log.exception("a batch of deliveries failed")
                answers.put_nowait(_ingests_error(request.id, grpc.StatusCode.UNKNOWN, repr(exc)))
                return
            answers.put_nowait(
                state_pb2.IngestsResponse(
                    id=request.id, batch=state_pb2.IngestBatchResponse(deliveries=stored)
                )
            )

        async def read() -> None:
            try:
                async for request in requests:
                    # A fresh context each: a batch's log lines carry its own correlation id.
                    task = asyncio.create_task(one(request), context=contextvars.Context())
                    for tasks in (running, self._ingesting):
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            finally:
                if running:
                    await asyncio.wait(set(running))
                answers.put_nowait(None)

        reader = asyncio.create_task(read(), name="ingests-reader")
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # raises what ended the reading (the caller went away)
        finally:
            # A caller that goes away stops the reading, not the batches: each is stored (or
            # cancelled at its deadline) and its conversations driven (self._ingesting keeps
            # them, `drain` waits for them); a delivery Meta sends again is a duplicate.
            reader.cancel()

    async def drain(self, timeout: float) -> None:
        """On the way out, after the gRPC server has stopped: the batches of `Ingests` calls
        still being stored (each bounded by its own deadline) finish, and notify the
        dispatcher, before it closes."""
        if self._ingesting:
            await asyncio.wait(set(self._ingesting), timeout=timeout)

    async def _ingest(
        self, requests: Sequence[state_pb2.IngestRequest]
    ) -> list[state_pb2.IngestResponse]:
        deliveries = [_delivery_in(r) for r in requests]
        if deliveries:
            # Log lines about the batch carry its first delivery's correlation id.
            logs.correlation_id.set(deliveries[0].correlation_id)
        try:
            # A value PostgreSQL refuses costs its own message only (stored as a skipped
            # placeholder); an error here means nothing can be stored now (a 503: Meta retries).
            outs = await _ingest_retrying_conflicts(self.pool, deliveries)
        except store.PROBLEMS as exc:
            log.error("ingest failed: %s", store.describe(exc))
            error = wire.error("StoreUnavailable", f"cannot store: {store.describe(exc)}", True)
            return [state_pb2.IngestResponse(error=error)] * len(requests)
        answers = []
        for out in outs:
            if isinstance(out, str):
                answers.append(
                    state_pb2.IngestResponse(error=wire.error("StoreUnavailable", out, True))
                )
                continue
            for r in out.results:
                _count_ingested("duplicate" if r.duplicate else r.status)
                if r.status == machine.RECEIVED and self.dispatcher is not None:
                    self.dispatcher.notify(r.conversation_id)
            answers.append(
                state_pb2.IngestResponse(
                    results=[_ingest_result(r) for r in out.results],
                    statuses_stored=out.statuses_stored,
                    events_stored=out.events_stored,
                )
            )
        return answers

    async def Redrive(
        self, request: state_pb2.RedriveRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.RedriveResponse:
        if request.correlation_id:
            logs.correlation_id.set(request.correlation_id)
        try:
            await store.transition(
                self.pool,
                request.message_id,
                machine.RECEIVED,
                machine.OPERATOR_REDRIVE
                if request.operator
                else request.reason or "redriven from the dead-letter queue",
                correlation_id=request.correlation_id,
                # Only a message that has finished failing: one that waits or whose turn is
                # running (a redrive repeated after a timeout) is not queued a second time.
                sources=store.REDRIVABLE,
            )
        except store.UnknownMessage:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no message {request.message_id}")
        except machine.IllegalTransition as exc:
            # Already replied/skipped (or waiting): a redrive never causes a second turn.
            current = wire.MESSAGE_STATUS_NUMBER.get(
                exc.from_state or "", common_pb2.MESSAGE_STATUS_UNSPECIFIED
            )
            return state_pb2.RedriveResponse(status=current, accepted=False)
        conv = await self.pool.fetchval(store.Q["conversation_of_message"], request.message_id)
        if self.dispatcher is not None and conv is not None:
            self.dispatcher.notify(int(conv))
        return state_pb2.RedriveResponse(
            status=wire.MESSAGE_STATUS_NUMBER[machine.RECEIVED], accepted=True
        )

    async def GetTimeline(
        self, request: state_pb2.GetTimelineRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetTimelineResponse:
        try:
            tl = await store.timeline(
                self.pool, request.message_id, request.wa_id, request.limit or 20
            )
        except store.UnknownMessage:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such message or phone")
        return state_pb2.GetTimelineResponse(
            messages=[
                state_pb2.TimelineMessage(
                    message_id=m["message_id"],
                    type=m["message_type"],
                    status=wire.MESSAGE_STATUS_NUMBER[m["status"]],
                    status_reason=m["status_reason"] or "",
                    text=m["body"] or "",
                    reply_text=m["reply_text"] or "",
                    reply_message_id=m["reply_message_id"] or "",
                    reply_status=m["reply_status"] or "",
                    correlation_id=m["correlation_id"],
                    trace_id=telemetry.trace_id_of(m["traceparent"]),
                    received_at=wire.datetime_ts(m["received_at"]),
                    conversation_id=m["conversation_id"],
                    attempts=m["attempts"],
                    reply_error_code=m["reply_error_code"] or "",
                    reply_parts=m["reply_parts"] or 0,
                    reply_parts_failed=m["reply_parts_failed"] or 0,
                )
                for m in tl.messages
            ],
            transitions=[
                state_pb2.TimelineTransition(
                    message_id=t["message_id"] or "",
                    entity=t["entity"],
                    from_state=t["from_state"] or "",
                    to_state=t["to_state"],
                    reason=t["reason"],
                    correlation_id=t["correlation_id"],
                    at=wire.datetime_ts(t["created_at"]),
                )
                for t in tl.transitions
            ],
            **{k: v or "" for k, v in (dict(tl.customer) if tl.customer else {}).items()},
        )

    async def GetStats(
        self, request: state_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetStatsResponse:
        hours = request.hours or 1.0
        if hours <= 0 or hours > domain.STATS_MAX_HOURS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"hours must be in (0, {domain.STATS_MAX_HOURS}]"
            )
        row = await self.pool.fetchrow(store.Q["performance_stats"], hours)
        assert row is not None
        return state_pb2.GetStatsResponse(
            hours=hours,
            total=row["total"] or 0,
            replied=row["replied"] or 0,
            skipped=row["skipped"] or 0,
            failed=row["failed"] or 0,
            dead_lettered=row["dead_lettered"] or 0,
            in_flight=row["in_flight"] or 0,
            avg_ms=float(row["avg_ms"] or 0),
            p95_ms=float(row["p95_ms"] or 0),
            p99_ms=float(row["p99_ms"] or 0),
            delivery_failed=row["delivery_failed"] or 0,
        )

    async def GetSystemHealth(
        self, request: state_pb2.GetSystemHealthRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.GetSystemHealthResponse:
        rows = await self.pool.fetch(store.Q["system_health"])
        return state_pb2.GetSystemHealthResponse(
            checks=[
                state_pb2.HealthCheck(
                    name=r["check_name"],
                    status=r["status"],
                    value=float(r["value"] or 0),
                    detail=r["detail"] or "",
                )
                for r in rows
            ]
        )

    async def Prune(
        self, request: state_pb2.PruneRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.PruneResponse:
        days = self.settings.retention_days
        try:
            out = await retention.prune(
                self.pool,
                days,
                self.settings.retention_batch_size,
                dry_run=request.dry_run,
                requested_by=caller_identity(context),
            )
        except retention.PruneBusy as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        if not request.dry_run:
            log.info("prune pass (on demand)", extra={"counts": out.counts})
        return state_pb2.PruneResponse(
            counts=_table_counts(out.counts),
            retention_days=days,
            batches=out.batches,
            dry_run=request.dry_run,
            complete=out.complete,
        )

    async def Forget(
        self, request: state_pb2.ForgetRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.ForgetResponse:
        customer = request.customer.strip()
        if not customer:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name a customer: a phone number or a BSUID"
            )
        try:
            counts = await retention.forget(
                self.pool, self.locks, customer, requested_by=caller_identity(context)
            )
        except retention.ConversationBusy as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        return state_pb2.ForgetResponse(counts=_table_counts(counts))

    async def ListHandoffs(
        self, request: state_pb2.ListHandoffsRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.ListHandoffsResponse:
        waiting = await handoff.waiting(
            self.pool, request.phone_number_id.strip(), min(request.limit or 100, 1000)
        )
        return state_pb2.ListHandoffsResponse(
            handoffs=[
                state_pb2.Handoff(
                    conversation_id=w.conversation_id,
                    phone_number_id=w.phone_number_id,
                    wa_id=w.wa_id,
                    user_id=w.user_id,
                    username=w.username,
                    contact_name=w.contact_name,
                    since=wire.datetime_ts(w.since),
                    handoff_message_id=w.handoff_message_id,
                    waiting_count=w.waiting_count,
                    waiting=[
                        state_pb2.WaitingMessage(
                            message_id=m["message_id"],
                            type=m["type"],
                            text=m["text"] or "",
                            received_at=wire.datetime_ts(
                                dt.datetime.fromisoformat(m["received_at"])
                            ),
                            status=wire.MESSAGE_STATUS_NUMBER[m["status"]],
                            status_reason=m["status_reason"] or "",
                        )
                        for m in w.messages
                    ],
                )
                for w in waiting
            ]
        )

    async def ReleaseHandoff(
        self, request: state_pb2.ReleaseHandoffRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.ReleaseHandoffResponse:
        customer = request.customer.strip()
        if not customer:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name a customer: a phone number or a BSUID"
            )
        by = operator_name(request.operator, context)
        try:
            released = await handoff.release(
                self.pool, customer, request.phone_number_id, by, logs.correlation_id.get()
            )
        except customers.UnknownCustomer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except customers.AmbiguousCustomer as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except handoff.NotHandedOff as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return state_pb2.ReleaseHandoffResponse(
            conversation_id=released.conversation_id,
            phone_number_id=released.phone_number_id,
            since=wire.datetime_ts(released.since),
        )

    async def TakeOver(
        self, request: state_pb2.TakeOverRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.TakeOverResponse:
        customer = request.customer.strip()
        if not customer:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name a customer: a phone number or a BSUID"
            )
        by = operator_name(request.operator, context)
        try:
            taken = await handoff.take_over(
                self.pool, customer, request.phone_number_id, by, logs.correlation_id.get()
            )
        except customers.UnknownCustomer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except customers.AmbiguousCustomer as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return state_pb2.TakeOverResponse(
            conversation_id=taken.conversation_id,
            phone_number_id=taken.phone_number_id,
            since=wire.datetime_ts(taken.since),
            already=taken.already,
        )

    async def CheckDependencies(
        self, request: state_pb2.CheckDependenciesRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.CheckDependenciesResponse:
        components = []
        try:
            await db.ping(self.pool)
            components.append(common_pb2.Component(name="postgres", healthy=True, detail="ok"))
        except Exception as exc:
            components.append(
                common_pb2.Component(name="postgres", healthy=False, detail=f"{exc!r}"[:200])
            )
        try:
            await asyncio.wait_for(self.locks.ping(), 2.0)
            detail = "ok" if self.dispatcher is not None else "ok (processing is switched off)"
            components.append(common_pb2.Component(name="redis", healthy=True, detail=detail))
        except Exception as exc:
            components.append(
                common_pb2.Component(
                    name="redis",
                    healthy=False,
                    detail=f"processing paused until Redis answers: {exc!r}"[:200],
                )
            )
        return state_pb2.CheckDependenciesResponse(components=components)


# Concurrent deliveries of the same messages can deadlock in PostgreSQL (40P01) or fail to
# serialize (40001): the statement was rolled back whole and storing is idempotent, so it is run
# again, a bounded number of times with jitter, before answering 503 (which Meta would retry).
CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
INGEST_ATTEMPTS = 3


async def _ingest_retrying_conflicts(
    pool: asyncpg.Pool, deliveries: list[store.DeliveryIn]
) -> list[store.DeliveryOut | str]:
    for attempt in range(1, INGEST_ATTEMPTS + 1):
        try:
            return await store.ingest_isolating(pool, deliveries)
        except CONFLICTS as exc:
            if attempt == INGEST_ATTEMPTS:
                raise
            log.warning("ingest conflicted, storing again: %s", store.describe(exc))
            await asyncio.sleep(retry.full_jitter(attempt, 0.02, 0.2))
    raise AssertionError("unreachable")


def _table_counts(counts: dict[str, int]) -> list[state_pb2.TableCount]:
    return [state_pb2.TableCount(table_name=t, rows=n) for t, n in counts.items()]


def operator_name(named: str, context: grpc.aio.ServicerContext) -> str:
    """Who acted, for the audit: the person the caller names (the console's operator, the
    CLI's user) and the identity its certificate proves."""
    identity = caller_identity(context)
    named = " ".join(named.split())[:100]
    return f"{named} (via {identity})" if named else identity


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """Who called, for the audit: the identity its client certificate names (mutual TLS: the
    last segment of its `spiffe://wa-agents/<identity>` name, e.g. `operator`), or
    "unauthenticated" when internal gRPC runs in plaintext (GRPC_INSECURE)."""
    names = [bytes(n).decode(errors="replace") for n in context.peer_identities() or ()]
    for name in names:
        if name.startswith("spiffe://"):
            return name.rsplit("/", 1)[-1]
    return names[0] if names else "unauthenticated"


@contextlib.asynccontextmanager
async def setup(
    server: grpc.aio.Server, settings: StateSettings, stopping: asyncio.Event
) -> AsyncIterator[list[str]]:
    # The owner migrates (`make run`, `wa migrate`, compose's job); this role cannot, and
    # will not run on a database its code does not match.
    with telemetry.untraced():
        await migrate.require_current(settings.require_database())
    pool = await db.create_pool(
        settings.require_database(),
        max_size=settings.pool_size("state"),
        application_name="wa-state",
    )
    await roles.refuse_privileged(pool, settings)
    with telemetry.untraced():  # start-up housekeeping, part of no message's trace
        await store.record_stuck_timeout(pool, settings.stuck_timeout_seconds)
    redis_url = settings.require_redis()
    anonymous = kv.anonymous_remote(redis_url)
    if anonymous is not None:
        log.warning(
            "REDIS_URL has no password and %s is not this host: whoever reaches it can take "
            "or break every lease. Give the server an ACL user (README, Security)",
            anonymous,
        )
    redis = kv.create_client(redis_url)
    locks = Locks(redis, settings.lock_ttl_seconds, prefix=settings.redis_prefix)
    background: list[asyncio.Task[None]] = []
    dispatcher: Dispatcher | None = None
    sweeper: Sweeper | None = None
    listener: handback.Listener | None = None
    # Pruning runs whether or not processing is switched on: it only takes finished work.
    pruner = retention.Pruner(
        pool,
        days=settings.retention_days,
        batch=settings.retention_batch_size,
        interval=settings.retention_interval_seconds,
    )
    background.append(asyncio.create_task(pruner.run(), name="retention"))
    async with (
        grpcserver.channel(settings.agent_addr) as agent_ch,
        grpcserver.channel(settings.dlq_addr) as dlq_ch,
    ):
        dlq = GrpcDlq(dlq_ch)
        if settings.enhanced_processing:
            # The one deadline of a turn, end to end: sent as the gRPC deadline, the agent
            # bounds its model and Graph API calls, their retries and waits by it, and sends
            # nothing past it. Shorter than the stuck timeout, so the sweeper never takes over
            # a turn that is still running (and no two turns of one message overlap).
            turn_timeout = turn_deadline_seconds(settings)
            dispatcher = Dispatcher(
                pool,
                locks,
                GrpcAgent(
                    agent_ch,
                    turn_timeout,
                    functools.partial(record_unclaimed_send, pool),
                ),
                dlq,
                max_concurrent=settings.max_concurrent_conversations,
            )
            sweeper = Sweeper(
                pool, locks, dispatcher, dlq, stuck_timeout=settings.stuck_timeout_seconds
            )
            background.append(asyncio.create_task(sweeper.run(), name="sweeper"))
            listener = handback.Listener(
                redis, settings.redis_prefix, locks.instance, dispatcher.notify
            )
            background.append(asyncio.create_task(listener.run(), name="handback"))
            background.append(asyncio.create_task(_resume_all(pool, dispatcher), name="resume"))
        else:
            log.warning("WA_ENHANCED_PROCESSING=false: ingest and acknowledge only")
        servicer = StateServicer(pool, locks, dispatcher, settings)
        state_pb2_grpc.add_StateServicer_to_server(servicer, server)
        scale_in = asyncio.create_task(
            _stop_taking_turns(stopping, listener, dispatcher, settings.drain_seconds),
            name="scale-in",
        )
        try:
            yield [state_pb2.DESCRIPTOR.services_by_name["State"].full_name]
        finally:
            stopping.set()  # also when the server failed rather than was told to stop
            pruner.stop()
            await servicer.drain(INGEST_DRAIN_SECONDS)
            try:
                await scale_in
            except Exception:
                log.exception("stopping the dispatcher failed; the sweepers recover its work")
            if sweeper is not None:
                sweeper.stop()
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if dispatcher is not None:
                # Nothing notifies it any more: what the batches stored since it closed (and
                # the sweeper found) goes back too, before Redis and the pool close.
                await dispatcher.close(last=True)
            await redis.aclose()
            await pool.close()


async def _stop_taking_turns(
    stopping: asyncio.Event,
    listener: handback.Listener | None,
    dispatcher: Dispatcher | None,
    drain_seconds: float,
) -> None:
    """Scale-in, from the moment the replica is told to stop: it starts no turn, lets those
    in flight finish, releases every lease and hands what waits to the other replicas
    (handback.py), while its server still stores what the gateways send (and hands that back
    too). The sweeper heartbeats meanwhile, so nobody breaks the leases of turns that are
    finishing."""
    await stopping.wait()
    if listener is not None:
        # Unsubscribed first, so that this replica's own hand-backs do not count it as a
        # replica that heard them.
        listener.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LISTENER_STOP_SECONDS):
                await listener.stopped.wait()
    if dispatcher is not None:
        await dispatcher.close(drain_seconds)


LISTENER_STOP_SECONDS = 1.0
# How long a stopping replica waits for the batches still being stored: each is bounded by
# its own deadline (the gateway's INGEST_TIMEOUT), this only by a caller that sent none.
INGEST_DRAIN_SECONDS = 6.0


def turn_deadline_seconds(settings: config.TurnLimits) -> float:
    """Long enough for the model's retries and the Graph API's, but always ending well before
    the sweeper would consider the turn stuck (STUCK_TIMEOUT_SECONDS)."""
    wanted = (
        (settings.model_timeout_seconds + 2) * (settings.agent_max_retries + 1)
        + (settings.graph_timeout_seconds + 2) * (settings.graph_max_retries + 1)
        + settings.send_confirm_seconds
    )
    stuck = settings.stuck_timeout_seconds
    return max(0.5, min(wanted, stuck - max(2.0, stuck * 0.2)))


async def _resume_all(pool: asyncpg.Pool, dispatcher: Dispatcher) -> None:
    """At start-up, everything acknowledged and unfinished is driven again (after a crash, or
    after processing was switched back on)."""
    delay = 0.5
    while True:
        try:
            with telemetry.untraced():  # housekeeping, like the sweeper's
                conversations = await store.all_waiting_conversations(pool)
            break
        except Exception as exc:
            log.warning("cannot list waiting work yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    if conversations:
        log.info("resuming acknowledged work", extra={"conversations": len(conversations)})
    for conv in conversations:
        dispatcher.notify(conv)
