"""The gateway's group commit against a real gRPC server that enforces its message limit."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

from common import grpcserver, tls
from services.gateway.batcher import IngestBatcher

LIMIT = 256 * 1024  # the server's receive limit in this test
CAP = LIMIT // 4  # the batcher's cap per batch


class State(state_pb2_grpc.StateServicer):
    """Answers each delivery with its message ids, and records each batch's size."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (deliveries, bytes)

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        self.batches.append((len(request.deliveries), request.ByteSize()))
        await asyncio.sleep(0.001)  # others queue up meanwhile
        return state_pb2.IngestBatchResponse(
            deliveries=[
                state_pb2.IngestResponse(
                    results=[state_pb2.IngestResult(message_id=m.message_id) for m in d.messages],
                    statuses_stored=len(d.statuses),
                )
                for d in request.deliveries
            ]
        )


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[tuple[State, state_pb2_grpc.StateStub]]:
    """The servicer behind what the services' servers have (mutual TLS, the authorization of
    each call), called as the gateway calls it."""
    tls.create(tmp_path)
    as_state = tls.Credentials.load(tmp_path, "state")
    servicer = State()
    server = grpc.aio.server(
        interceptors=grpcserver.interceptors(as_state),
        options=[("grpc.max_receive_message_length", LIMIT)],
    )
    state_pb2_grpc.add_StateServicer_to_server(servicer, server)
    port = grpcserver.bind(server, "127.0.0.1", 0, as_state)
    await server.start()
    as_gateway = tls.Credentials.load(tmp_path, "gateway")
    async with grpcserver.channel(f"127.0.0.1:{port}", transport=as_gateway) as channel:
        yield servicer, state_pb2_grpc.StateStub(channel)
    await server.stop(None)


def delivery(n: int, sizes: list[int]) -> state_pb2.IngestRequest:
    return state_pb2.IngestRequest(
        correlation_id=f"c{n}",
        messages=[
            common_pb2.InboundMessage(message_id=f"m{n}.{i}", text="x" * size)
            for i, size in enumerate(sizes)
        ],
        statuses=[
            common_pb2.StatusUpdate(message_id=f"s{n}", status=common_pb2.DELIVERY_STATUS_READ)
        ],
    )


async def test_concurrent_large_deliveries_go_in_batches_under_the_byte_cap(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10, max_batch_bytes=CAP)
    rng = random.Random(12)
    requests = [
        delivery(n, [rng.randrange(1, CAP // 3) for _ in range(rng.randrange(1, 4))])
        for n in range(60)
    ]
    # Larger than a batch: goes in parts, each under the cap, answered as one.
    requests.append(delivery(60, [CAP // 2, CAP // 2, CAP // 2, 10]))
    answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for request, answer in zip(requests, answers, strict=True):
        assert [r.message_id for r in answer.results] == [m.message_id for m in request.messages]
        assert answer.statuses_stored == 1
    assert all(size <= CAP for _, size in servicer.batches)
    assert max(n for n, _ in servicer.batches) > 1, "deliveries were still group-committed"
    await batcher.close()
