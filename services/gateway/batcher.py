"""Group commit for acknowledgements: deliveries that arrive while a batch is being stored go
together in the next `State.IngestBatch` call (one gRPC call and one transaction for many).

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

What waits for a batch is bounded too, in deliveries and in bytes: when the state service is
slower than the deliveries arrive, a delivery beyond either bound is refused at once
(`QueueFull`: the gateway answers 503 with `Retry-After`, Meta retries) instead of growing the
gateway's memory until it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import grpc
from prometheus_client import Gauge, Histogram
from wa.v1 import state_pb2, state_pb2_grpc

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "wa_gateway_ingest_batch_size",
    "Deliveries per IngestBatch call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

QUEUED = Gauge("wa_gateway_ingest_queue_deliveries", "Deliveries waiting for a batch")
QUEUED_BYTES = Gauge("wa_gateway_ingest_queue_bytes", "Bytes of the deliveries waiting")


class IngestError(Exception):
    """The delivery could not be stored durably."""


class QueueFull(IngestError):
    """Too much waits for the state service already: the delivery was not queued."""


# What a delivery adds to an IngestBatchRequest besides its own bytes: a field tag and a length.
FRAMING_BYTES = 16
# A quarter of the gRPC message limit: a single message (its text and its payload, each at most
# GATEWAY_MAX_BODY_BYTES, which config caps at 16 MiB) larger than a batch still fits alone.
MAX_BATCH_BYTES = 16 * 1024 * 1024

Pending = tuple[state_pb2.IngestRequest, int, asyncio.Future[state_pb2.IngestResponse]]


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
    ) -> None:
        self.stub = stub
        self.timeout = timeout
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

    async def submit(self, request: state_pb2.IngestRequest) -> state_pb2.IngestResponse:
        size = request.ByteSize() + FRAMING_BYTES
        if size <= self.max_batch_bytes:
            return await self._submit(request, size)
        parts = split(request, self.max_batch_bytes)
        answers = await asyncio.gather(
            *(self._submit(part, part.ByteSize() + FRAMING_BYTES) for part in parts)
        )
        return state_pb2.IngestResponse(
            results=[r for answer in answers for r in answer.results],
            statuses_stored=sum(answer.statuses_stored for answer in answers),
            events_stored=sum(answer.events_stored for answer in answers),
        )

    async def _submit(
        self, request: state_pb2.IngestRequest, size: int
    ) -> state_pb2.IngestResponse:
        # (A delivery larger than the byte bound still waits alone: else it never could.)
        if len(self._queue) >= self.max_queued or (
            self._queue and self._queued_bytes + size > self.max_queued_bytes
        ):
            raise QueueFull(
                f"{len(self._queue)} deliveries ({self._queued_bytes} bytes) wait already"
            )
        future: asyncio.Future[state_pb2.IngestResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append((request, size, future))
        self._queued_bytes += size
        # (A task about to take the queue takes this delivery too.)
        if self._senders == self._in_flight and self._may_call():
            self._senders += 1
            task = asyncio.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

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
            while self._queue and self._may_call():
                await self._send_next()
        finally:
            self._senders -= 1

    async def _send_next(self) -> None:
        batch = [self._queue.popleft()]
        total = batch[0][1]
        while (
            self._queue
            and len(batch) < self.max_batch
            and total + self._queue[0][1] <= self.max_batch_bytes
        ):
            total += self._queue[0][1]
            batch.append(self._queue.popleft())
        self._queued_bytes -= total
        self._in_flight += 1
        self._latest_start = asyncio.get_running_loop().time()
        try:
            await self._send_batch(batch)
        finally:
            self._in_flight -= 1

    async def _send_batch(self, batch: list[Pending]) -> None:
        BATCH_SIZE.observe(len(batch))
        try:
            resp = await self.stub.IngestBatch(
                state_pb2.IngestBatchRequest(deliveries=[r for r, _, _ in batch]),
                timeout=self.timeout,
            )
            answers = list(resp.deliveries)
            if len(answers) != len(batch):
                raise IngestError(f"state answered {len(answers)} of {len(batch)} deliveries")
        except (grpc.aio.AioRpcError, IngestError) as exc:
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc)
            )
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(IngestError(detail))
            return
        for (_, _, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if answer.HasField("error"):
                future.set_exception(IngestError(answer.error.message))
            else:
                future.set_result(answer)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, self.timeout)


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
