"""Group commit for acknowledgements: deliveries that arrive while a batch is being stored go
together in the next `State.IngestBatch` call (one gRPC call and one transaction for many).

Nothing waits for a timer: an idle gateway sends each delivery at once; a busy one sends what
queued up meanwhile. Each delivery is still answered only once its own batch is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from prometheus_client import Histogram
from wa.v1 import state_pb2, state_pb2_grpc

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "wa_gateway_ingest_batch_size",
    "Deliveries per IngestBatch call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


class IngestError(Exception):
    """The delivery could not be stored durably."""


class IngestBatcher:
    def __init__(
        self,
        stub: state_pb2_grpc.StateStub,
        *,
        timeout: float,
        max_batch: int = 128,
        max_in_flight: int = 4,
    ) -> None:
        self.stub = stub
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[tuple[state_pb2.IngestRequest, asyncio.Future[state_pb2.IngestResponse]]]
        self._queue = []
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: state_pb2.IngestRequest) -> state_pb2.IngestResponse:
        future: asyncio.Future[state_pb2.IngestResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append((request, future))
        if len(self._tasks) < self.max_in_flight:
            task = asyncio.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _send(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            await self._send_batch(batch)

    async def _send_batch(
        self,
        batch: list[tuple[state_pb2.IngestRequest, asyncio.Future[state_pb2.IngestResponse]]],
    ) -> None:
        BATCH_SIZE.observe(len(batch))
        try:
            resp = await self.stub.IngestBatch(
                state_pb2.IngestBatchRequest(deliveries=[r for r, _ in batch]),
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
            for _, future in batch:
                if not future.done():
                    future.set_exception(IngestError(detail))
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            if future.done():
                continue
            if answer.error:
                future.set_exception(IngestError(answer.error))
            else:
                future.set_result(answer)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, self.timeout)
