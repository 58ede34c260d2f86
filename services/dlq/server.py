"""The dlq service's gRPC adapter and its redrive worker."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator

import asyncpg
import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from wa.v1 import agent_pb2, agent_pb2_grpc, dlq_pb2, dlq_pb2_grpc, state_pb2, state_pb2_grpc

from common import db, grpcserver, logs, roles, wire
from services.dlq.settings import DlqSettings

from . import store
from .redrive import Handed, RedriveRefused, RedriveUnavailable, Worker, redrive_items

log = logging.getLogger(__name__)

# The state service answered that the message cannot be redriven, ever (it is gone:
# `wa forget`, pruning).
REDRIVE_NEVER = frozenset({grpc.StatusCode.NOT_FOUND})

# One operator Retry call considers at most this many items (`--all`) and works for at most
# RETRY_CALL_SECONDS, stopping before its deadline: the rest is returned as `remaining`.
MAX_RETRY_ITEMS = 1000
RETRY_CALL_SECONDS = 30.0


def _at(value: object) -> Timestamp | None:
    """A history entry's time (text, as jsonb holds it) as a Timestamp."""
    if not value:
        return None
    ts = Timestamp()
    ts.FromDatetime(dt.datetime.fromisoformat(str(value)))
    return ts


def to_item(row: asyncpg.Record, *, full: bool = False) -> dlq_pb2.DlqItem:
    item = dlq_pb2.DlqItem(
        id=row["id"],
        message_id=row["message_id"],
        conversation_id=row["conversation_id"] or 0,
        status=wire.DLQ_STATUS_NUMBER[row["status"]],
        attempts=row["attempts"],
        error=wire.error(row["error_class"], row["error_message"], row["retryable"]),
        next_attempt_at=wire.datetime_ts(row["next_attempt_at"]),
        created_at=wire.datetime_ts(row["created_at"]),
        updated_at=wire.datetime_ts(row["updated_at"]),
        correlation_id=row["correlation_id"],
        wa_id=row.get("wa_id") or "",
        user_id=row.get("user_id") or "",
        username=row.get("username") or "",
        deferrals=row["deferrals"],
    )
    if full:
        item.payload_json = orjson.dumps(row["payload"]).decode()
        for h in row["history"]:
            item.history.append(
                dlq_pb2.DlqAttempt(
                    at=_at(h.get("at")),
                    error_class=str(h.get("error_class", "")),
                    error_message=str(h.get("error_message", "")),
                    deferred=bool(h.get("deferred", False)),
                )
            )
    return item


class GrpcState:
    def __init__(self, channel: grpc.aio.Channel, timeout: float = 5.0) -> None:
        self.stub = state_pb2_grpc.StateStub(channel)
        self.timeout = timeout

    async def redrive(
        self, message_id: str, reason: str, correlation_id: str, *, operator: bool
    ) -> Handed:
        try:
            resp = await self.stub.Redrive(
                state_pb2.RedriveRequest(
                    message_id=message_id,
                    reason=reason,
                    correlation_id=correlation_id,
                    operator=operator,
                ),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            said = f"{exc.code().name}: {exc.details()}"
            if exc.code() in REDRIVE_NEVER:
                raise RedriveRefused(said) from exc
            raise RedriveUnavailable(
                said, unreachable=exc.code() in grpcserver.UNREACHABLE
            ) from exc
        return Handed(accepted=bool(resp.accepted), status=resp.status)


class GrpcAgentStatus:
    """The model's circuit breaker, as the agent service reports it."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 2.0) -> None:
        self.stub = agent_pb2_grpc.AgentStub(channel)
        self.timeout = timeout

    async def breaker_state(self) -> str:
        try:
            resp = await self.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError:
            # Unknown: redrive as usual (the state service waits for an unreachable agent,
            # and a refused call is deferred when it is enqueued again).
            return ""
        return str(resp.breaker_state)


class DlqServicer(dlq_pb2_grpc.DlqServicer):
    def __init__(self, pool: asyncpg.Pool, state: GrpcState, settings: DlqSettings) -> None:
        self.pool = pool
        self.state = state
        self.settings = settings

    async def Enqueue(
        self, request: dlq_pb2.EnqueueRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.EnqueueResponse:
        if request.correlation_id:
            logs.correlation_id.set(request.correlation_id)
        if not request.message_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message_id is required")
        failure = wire.failure_from_proto(request)
        row = await store.enqueue(
            self.pool,
            message_id=failure.message_id,
            conversation_id=failure.conversation_id,
            error_class=failure.error_class or "Error",
            error_message=failure.error_message,
            retryable=failure.retryable,
            correlation_id=failure.correlation_id,
            max_attempts=self.settings.dlq_max_attempts,
            base_seconds=self.settings.dlq_retry_base_seconds,
            max_defer_seconds=self.settings.dlq_max_defer_seconds,
        )
        extra = {"dlq_id": row["id"], "message_id": row["message_id"], "attempts": row["attempts"]}
        if row["status"] == "dead":
            log.warning(
                "dead-letter item is dead: %s: %s",
                row["error_class"],
                row["error_message"],
                extra=extra,
            )
        else:
            log.info("dead-lettered, redrive scheduled", extra=extra)
        return dlq_pb2.EnqueueResponse(item=to_item(row))

    async def List(
        self, request: dlq_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.ListResponse:
        rows = await store.list_items(
            self.pool,
            wire.DLQ_STATUS[request.status],
            request.limit or 100,
            request.message_id,
            request.customer.lstrip("+")
            if request.customer.lstrip("+").isdigit()
            else request.customer,
        )
        full = bool(request.message_id)
        return dlq_pb2.ListResponse(items=[to_item(r, full=full) for r in rows])

    async def Get(
        self, request: dlq_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.GetResponse:
        row = await store.get(self.pool, request.id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no dead-letter item {request.id}")
        assert row is not None
        return dlq_pb2.GetResponse(item=to_item(row, full=True))

    async def Retry(
        self, request: dlq_pb2.RetryRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.RetryResponse:
        if request.all:
            status = wire.DLQ_STATUS[request.status]
            statuses = [status] if status else ["pending", "dead"]
            if any(s not in ("pending", "dead", "retrying") for s in statuses):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "only pending, retrying or dead can be retried",
                )
            ids = await store.retry_candidates(self.pool, statuses, MAX_RETRY_ITEMS)
        elif request.ids:
            ids = list(dict.fromkeys(request.ids))
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give ids or all")
        # Each item is claimed just before its hand-over, and none after the time left: a
        # call cut off by its deadline leaves nothing claimed and not handed over.
        loop = asyncio.get_running_loop()
        left = context.time_remaining()
        budget = min(RETRY_CALL_SECONDS, left if left is not None else RETRY_CALL_SECONDS)
        stop_at = loop.time() + budget - self.state.timeout - 1.0
        done: list[int] = []
        errors: list[str] = []
        remaining: list[int] = []
        for n, item_id in enumerate(ids):
            if loop.time() >= stop_at:
                remaining = ids[n:]
                break
            claimed = await store.claim_ids(self.pool, [item_id])
            if not claimed:
                if request.ids:
                    errors.append(f"{item_id}: unknown, resolved or purged")
                continue  # --all: taken by the worker meanwhile
            handed, failed, unavailable = await redrive_items(
                self.pool, self.state, claimed, "redriven by an operator", operator=True
            )
            done.extend(handed)
            errors.extend(failed)
            if unavailable:
                # Each other hand-over would wait for it too; the item is pending again, and
                # the worker redrives it once the state service answers.
                return dlq_pb2.RetryResponse(
                    redriven=done, errors=errors, state_unavailable=unavailable
                )
        if remaining:
            log.info("operator retry: items left for the next call", extra={"n": len(remaining)})
        return dlq_pb2.RetryResponse(redriven=done, errors=errors, remaining=remaining)

    async def Purge(
        self, request: dlq_pb2.PurgeRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.PurgeResponse:
        return dlq_pb2.PurgeResponse(purged=await store.purge(self.pool, list(request.ids)))

    async def Resolve(
        self, request: dlq_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> dlq_pb2.ResolveResponse:
        resolved = await store.resolve_message(self.pool, request.message_id)
        if resolved:
            log.info("dead-letter item resolved", extra={"message_id": request.message_id})
        return dlq_pb2.ResolveResponse(resolved=resolved)


@contextlib.asynccontextmanager
async def setup(
    server: grpc.aio.Server, settings: DlqSettings, stopping: asyncio.Event
) -> AsyncIterator[list[str]]:
    pool = await db.create_pool(
        settings.require_database(), max_size=settings.pool_size("dlq"), application_name="wa-dlq"
    )
    await roles.refuse_privileged(pool, settings)
    async with (
        grpcserver.channel(settings.state_addr) as state_ch,
        grpcserver.channel(settings.agent_addr, traced=False) as agent_ch,
    ):
        # A hand-over well within the stuck timeout: the worker's recovery of stranded items
        # never takes one that is still being handed over.
        state = GrpcState(state_ch, timeout=min(5.0, settings.stuck_timeout_seconds / 4))
        worker = Worker(
            pool,
            state,
            poll_seconds=settings.dlq_poll_seconds,
            agent=GrpcAgentStatus(agent_ch),
            stuck_timeout=settings.stuck_timeout_seconds,
            retry_base_seconds=settings.dlq_retry_base_seconds,
            max_defer_seconds=settings.dlq_max_defer_seconds,
        )
        task = asyncio.create_task(worker.run(), name="dlq-worker")
        dlq_pb2_grpc.add_DlqServicer_to_server(DlqServicer(pool, state, settings), server)
        try:
            yield [dlq_pb2.DESCRIPTOR.services_by_name["Dlq"].full_name]
        finally:
            worker.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
            await pool.close()
