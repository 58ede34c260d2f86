"""Group commit for acknowledgements: deliveries that arrive while a batch is being stored go
together in the next batch (one transaction for many), sent on `State.Ingests` (`IngestCalls`).

Nothing waits for a timer: an idle gateway sends each delivery at once; a busy one sends what
queued up meanwhile. Each delivery is still answered only once its own batch is stored.

One call at a time, normally: deliveries that arrive while a batch is being stored wait for it
and go together in the next one, so under load batches grow by themselves (each call costs both
processes a fixed price, about the CPU of storing several messages). A second call (up to
`max_in_flight`) starts only when the latest one has run longer than `stall_seconds`: one
batch held up (a lock wait, a slow commit) does not hold every acknowledgement behind it.

A batch is capped in bytes as well as in deliveries, so that it stays within the state
service's gRPC message limit (`common.grpcserver.MAX_MESSAGE_BYTES`) however large the
deliveries (Meta sends up to 3 MB): a delivery larger than the cap goes in parts, each alone,
and is answered once every part is stored (a part stored before another failed is a duplicate
when Meta retries).

Deliveries that no customer waits on (Meta's delivery statuses: `sent`, `delivered`, `read` of
each reply, three webhooks for every message answered) may linger up to `linger_seconds` for
company: at a customer's pace each would otherwise be a call and a transaction of its own, and
a call's fixed price, in the gateway, the state service and PostgreSQL, is several times what a
status costs in a batch (docs/benchmarks.md, "A message's way through PostgreSQL"). A delivery
that is not allowed to wait (a message, a customer event) goes at once, as ever, and takes the
lingering ones with it; so does a batch that is full. Meta waits seconds for an answer; a status's
acknowledgement a few tens of milliseconds later costs nobody anything.

What waits for a batch is bounded too, in deliveries and in bytes: when the state service is
slower than the deliveries arrive, a delivery beyond either bound is refused at once
(`QueueFull`: the gateway answers 503 with `Retry-After`, Meta retries) instead of growing the
gateway's memory until it dies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import grpc
from prometheus_client import Gauge, Histogram
from wa.v1 import state_pb2, state_pb2_grpc

from common import retry
from common.streamcalls import CallError, StreamCalls

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "wa_gateway_ingest_batch_size",
    "Deliveries per batch stored (one Ingests message, or IngestBatch call)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

QUEUED = Gauge("wa_gateway_ingest_queue_deliveries", "Deliveries waiting for a batch")
QUEUED_BYTES = Gauge("wa_gateway_ingest_queue_bytes", "Bytes of the deliveries waiting")


class IngestError(Exception):
    """The delivery could not be stored durably."""


class QueueFull(IngestError):
    """Too much waits for the state service already: the delivery was not queued."""


# Calls of `State.Ingests` open for new batches at a time, and how long each takes them
# (common/streamcalls.py: new calls go to the state service's replicas in turn).
WIDTH = 4
CALL_SECONDS = 1.0
# A batch's call breaking (the replica went away) is re-sent this many times in all, with a
# backoff, within the batch's timeout: as the channel's retry policy does for `IngestBatch`
# (common/balancing.py); storing a delivery twice stores it once. And throttled as it is
# there: each broken call takes a token, each stored batch gives back a tenth of one, and no
# batch is sent again while half the tokens are gone (the state service is down: retries
# would only double the load).
MAX_ATTEMPTS = 4
RETRY_BASE_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
RETRY_TOKENS = 100.0
RETRY_TOKEN_RATIO = 0.1
# After a state service answered that it has no `Ingests` (an earlier release, in a rolling
# deploy), batches go in unary calls for this long, then `Ingests` is tried again.
UNARY_SECONDS = 60.0


def _late(seconds: float) -> CallError:
    return CallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"not stored within {seconds:.1f} s")


class IngestCalls:
    """Batches stored through `State.Ingests`, many to a call (common/streamcalls.py): at a
    customer's pace each batch would otherwise be a unary `IngestBatch` call of its own, whose
    set-up costs the gateway and the state service more CPU than storing a delivery does. A
    state service of an earlier release (UNIMPLEMENTED, a rolling deploy) gets unary calls
    for UNARY_SECONDS at a time."""

    def __init__(
        self,
        stub: state_pb2_grpc.StateStub,
        timeout: float,
        *,
        width: int = WIDTH,
        call_seconds: float = CALL_SECONDS,
    ) -> None:
        self.stub = stub
        self.timeout = timeout
        self._unary_until = 0.0  # by the loop's clock
        self._tokens = RETRY_TOKENS
        # A call's own deadline only bounds a call that somehow does not end: each batch's
        # own time is over before it.
        call_timeout = call_seconds + timeout + 5.0
        self._calls: StreamCalls[
            tuple[state_pb2.IngestBatchRequest, float], state_pb2.IngestBatchResponse
        ] = StreamCalls(
            "state-ingests",
            lambda: stub.Ingests(timeout=call_timeout),
            _ingests_request,
            lambda r: ((r.id, r.code, r.details, r.batch),),
            width=width,
            call_seconds=call_seconds,
        )

    async def store(self, batch: state_pb2.IngestBatchRequest) -> state_pb2.IngestBatchResponse:
        """Each delivery's answer; raises CallError (or grpc.aio.AioRpcError, for a unary
        call) when the batch could not be stored."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempt = 1
        while loop.time() >= self._unary_until:
            left = deadline - loop.time()
            try:
                answer = await self._calls.ask((batch, left), left, _late)
            except CallError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning(
                        "the state service has no Ingests: each batch is a call for %g s",
                        UNARY_SECONDS,
                    )
                    self._unary_until = loop.time() + UNARY_SECONDS
                    break
                delay = retry.full_jitter(attempt, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS)
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    self._tokens = max(0.0, self._tokens - 1)
                if (
                    exc.code != grpc.StatusCode.UNAVAILABLE
                    or attempt == MAX_ATTEMPTS
                    or self._tokens <= RETRY_TOKENS / 2
                    or loop.time() + delay >= deadline
                ):
                    raise
                log.info("a batch's call broke (%s): sending it again", exc)
                attempt += 1
                await asyncio.sleep(delay)
            else:
                self._tokens = min(RETRY_TOKENS, self._tokens + RETRY_TOKEN_RATIO)
                return answer
        answer = await self.stub.IngestBatch(batch, timeout=max(0.0, deadline - loop.time()))
        return answer  # type: ignore[no-any-return]

    def close(self) -> None:
        self._calls.close()


def _ingests_request(
    queued: list[tuple[int, tuple[state_pb2.IngestBatchRequest, float]]],
) -> state_pb2.IngestsRequest:
    # One batch a message: the state service does not read several (it announces none).
    ((batch_id, (batch, seconds)),) = queued
    return state_pb2.IngestsRequest(id=batch_id, batch=batch, timeout_seconds=seconds)


# What a delivery adds to an IngestBatchRequest besides its own bytes: a field tag and a length.
FRAMING_BYTES = 16
# A quarter of the gRPC message limit: a single message (its text and its payload, each at most
# GATEWAY_MAX_BODY_BYTES, which config caps at 16 MiB) larger than a batch still fits alone.
MAX_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class Pending:
    request: state_pb2.IngestRequest
    size: int
    future: asyncio.Future[state_pb2.IngestResponse]
    urgent: bool
    # By the loop's clock: when a delivery that may linger must be on its way.
    due: float


class IngestBatcher:
    def __init__(
        self,
        stub: state_pb2_grpc.StateStub,
        *,
        timeout: float,
        max_batch: int = 128,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_in_flight: int = 4,
        stall_seconds: float = 0.05,
        max_queued: int = 1024,
        max_queued_bytes: int = 64 * 1024 * 1024,
        linger_seconds: float = 0.0,
    ) -> None:
        self.stub = stub
        self.timeout = timeout
        self.calls = IngestCalls(stub, timeout)
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self._queue: deque[Pending] = deque()
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        # Read when scraped, never written per delivery.
        QUEUED.set_function(lambda: len(self._queue))
        QUEUED_BYTES.set_function(lambda: self._queued_bytes)
        self.max_in_flight = max_in_flight
        self.stall_seconds = stall_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._senders = 0  # tasks of `_send`: each is in a call, or about to take the queue
        self._in_flight = 0  # calls being answered
        self._latest_start = 0.0  # of the latest call, by the loop's clock
        self.linger_seconds = linger_seconds
        self._urgent = 0  # queued deliveries that may not linger
        self._timer: asyncio.TimerHandle | None = None  # when to look again: a linger due, a stall
        self._closing = False

    async def submit(
        self, request: state_pb2.IngestRequest, *, urgent: bool = True
    ) -> state_pb2.IngestResponse:
        """`request` stored; `urgent=False`: it may wait up to `linger_seconds` for others."""
        size = request.ByteSize() + FRAMING_BYTES
        if size <= self.max_batch_bytes:
            return await self._submit(request, size, urgent)
        parts = split(request, self.max_batch_bytes)
        answers = await asyncio.gather(
            *(self._submit(part, part.ByteSize() + FRAMING_BYTES, urgent) for part in parts)
        )
        return state_pb2.IngestResponse(
            results=[r for answer in answers for r in answer.results],
            statuses_stored=sum(answer.statuses_stored for answer in answers),
            events_stored=sum(answer.events_stored for answer in answers),
        )

    async def _submit(
        self, request: state_pb2.IngestRequest, size: int, urgent: bool
    ) -> state_pb2.IngestResponse:
        # (A delivery larger than the byte bound still waits alone: else it never could.)
        if len(self._queue) >= self.max_queued or (
            self._queue and self._queued_bytes + size > self.max_queued_bytes
        ):
            raise QueueFull(
                f"{len(self._queue)} deliveries ({self._queued_bytes} bytes) wait already"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[state_pb2.IngestResponse] = loop.create_future()
        urgent = urgent or self.linger_seconds <= 0
        self._queue.append(
            Pending(request, size, future, urgent, loop.time() + self.linger_seconds)
        )
        self._queued_bytes += size
        self._urgent += urgent
        self._wake()
        return await future

    def _wake(self) -> None:
        """Starts a call for what is queued when one may start and what is queued may not wait
        longer; else makes sure the lingering deliveries are sent when the first is due."""
        # (A task about to take the queue takes these deliveries too.)
        if not self._queue or self._senders != self._in_flight:
            return
        if not self._may_call():
            # A call is being answered: its task takes these deliveries once it is done, or,
            # should it stall first, another call does, without waiting for a next delivery
            # to notice (else, at a quiet moment, they would wait for the stalled call's
            # deadline). With the most calls under way, the first to end takes them.
            if self._in_flight < self.max_in_flight:
                self._wake_at(self._latest_start + self.stall_seconds + 0.002)
            return
        if self._ready():
            self._senders += 1
            task = asyncio.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._wake_at(self._queue[0].due)

    def _wake_at(self, when: float) -> None:
        """Looks at the queue again at `when` (by the loop's clock), or sooner."""
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _ready(self) -> bool:
        """Whether what is queued goes now: something may not wait, a batch is full, or the
        longest lingering delivery is due (the queue is in order: it is the first)."""
        return (
            self._closing
            or self._urgent > 0
            or len(self._queue) >= self.max_batch
            or self._queued_bytes >= self.max_batch_bytes
            # (Timers may fire up to the clock's resolution early.)
            or self._queue[0].due <= asyncio.get_running_loop().time() + 0.001
        )

    def _may_call(self) -> bool:
        """Whether a call may start besides those being answered: when none is, or when the
        latest has been answered for longer than `stall_seconds` (and fewer than the most)."""
        return self._in_flight == 0 or (
            self._in_flight < self.max_in_flight
            and asyncio.get_running_loop().time() - self._latest_start > self.stall_seconds
        )

    async def _send(self) -> None:
        try:
            # After each batch: the next one, unless another call is being answered (and does
            # not stall): that one's task takes what queued meanwhile once it is done.
            while self._queue and self._may_call() and self._ready():
                await self._send_next()
        finally:
            self._senders -= 1
            self._wake()  # what lingers, on its timer

    async def _send_next(self) -> None:
        batch = [self._queue.popleft()]
        total = batch[0].size
        while (
            self._queue
            and len(batch) < self.max_batch
            and total + self._queue[0].size <= self.max_batch_bytes
        ):
            total += self._queue[0].size
            batch.append(self._queue.popleft())
        self._queued_bytes -= total
        self._urgent -= sum(p.urgent for p in batch)
        self._in_flight += 1
        self._latest_start = asyncio.get_running_loop().time()
        self._wake()  # what a full batch left: another call, should this one stall
        try:
            await self._send_batch(batch)
        finally:
            self._in_flight -= 1

    async def _send_batch(self, batch: list[Pending]) -> None:
        BATCH_SIZE.observe(len(batch))
        try:
            resp = await self.calls.store(
                state_pb2.IngestBatchRequest(deliveries=[p.request for p in batch])
            )
            answers = list(resp.deliveries)
            if len(answers) != len(batch):
                raise IngestError(f"state answered {len(answers)} of {len(batch)} deliveries")
        except (grpc.aio.AioRpcError, CallError, IngestError) as exc:
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc)
            )
            _fail(batch, detail)
            return
        except BaseException:
            # (Cancelled at close, or a bug: the waiting requests are answered 503 all the same,
            # and Meta delivers them again.)
            _fail(batch, "the gateway stopped before the state service answered")
            raise
        for p, answer in zip(batch, answers, strict=True):
            if p.future.done():
                continue
            if answer.HasField("error"):
                p.future.set_exception(IngestError(answer.error.message))
            else:
                p.future.set_result(answer)

    async def close(self) -> None:
        """Sends what lingers at once, and waits for the calls under way (each bounded)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        # (A sender that ends may start another for what it left, a stalled call beside it:
        # until none is left. Each call is bounded by the timeout, and nothing lingers now.)
        while self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=self.timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._timer is not None:  # (a stall's, set while the last calls ran)
            self._timer.cancel()
            self._timer = None
        self.calls.close()


def _fail(batch: list[Pending], detail: str) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(IngestError(detail))


def split(request: state_pb2.IngestRequest, max_bytes: int) -> list[state_pb2.IngestRequest]:
    """`request`'s messages, statuses and customer events, in order, in parts of at most
    `max_bytes` each (an event larger than that alone in its part)."""

    def empty() -> state_pb2.IngestRequest:
        return state_pb2.IngestRequest(
            correlation_id=request.correlation_id, traceparent=request.traceparent
        )

    parts = [empty()]
    base = parts[0].ByteSize() + FRAMING_BYTES
    size = base
    for kind in ("messages", "statuses", "events"):
        for event in getattr(request, kind):
            event_size = event.ByteSize() + FRAMING_BYTES
            if size > base and size + event_size > max_bytes:
                parts.append(empty())
                size = base
            getattr(parts[-1], kind).append(event)
            size += event_size
    return parts
