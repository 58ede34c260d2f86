"""The gateway's group commit against a real gRPC server that enforces its message limit: one
that takes batches many to a call (`State.Ingests`), and one of an earlier release that has only
the unary `IngestBatch`."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from wa.v1 import common_pb2, state_pb2, state_pb2_grpc

from common import grpcserver, tls
from services.gateway import batcher as batcher_module
from services.gateway.batcher import IngestBatcher, IngestError, QueueFull

LIMIT = 256 * 1024  # the server's receive limit in this test
CAP = LIMIT // 4  # the batcher's cap per batch


class State(state_pb2_grpc.StateServicer):
    """Answers each delivery with its message ids, and records each batch's size."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []  # (deliveries, bytes)
        self.open = asyncio.Event()  # cleared: every call waits (a stalled state service)
        self.open.set()

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        self.batches.append((len(request.deliveries), request.ByteSize()))
        await self.open.wait()
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


class StreamingState(State):
    """The same answers, many batches to an `Ingests` call, each answered when it is done.
    `broken`: calls that end UNAVAILABLE once they have read a batch, without answering it (a
    replica that went away); `refused`: batches answered with their own error."""

    def __init__(self) -> None:
        super().__init__()
        self.streams = 0
        self.ended = 0  # calls whose handler returned
        self.timeouts: list[float] = []  # each batch's deadline, as read
        self.unary = 0
        self.broken = 0
        self.refused: set[str] = set()

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        self.unary += 1
        return await super().IngestBatch(request, context)

    async def Ingests(
        self,
        requests: AsyncIterator[state_pb2.IngestsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[state_pb2.IngestsResponse]:
        self.streams += 1
        answers: asyncio.Queue[state_pb2.IngestsResponse | None] = asyncio.Queue()

        async def one(request: state_pb2.IngestsRequest) -> None:
            self.timeouts.append(request.timeout_seconds)
            if request.batch.deliveries[0].correlation_id in self.refused:
                self.batches.append((len(request.batch.deliveries), request.batch.ByteSize()))
                code = grpc.StatusCode.INTERNAL.value[0]
                answers.put_nowait(state_pb2.IngestsResponse(id=request.id, code=code))
                return
            batch = await State.IngestBatch(self, request.batch, context)
            answers.put_nowait(state_pb2.IngestsResponse(id=request.id, batch=batch))

        async def read() -> None:
            running = set()
            async for request in requests:
                if self.broken:
                    self.broken -= 1
                    self.batches.append((len(request.batch.deliveries), request.batch.ByteSize()))
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
                running.add(asyncio.create_task(one(request)))
            if running:
                await asyncio.wait(running)
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        while (answer := await answers.get()) is not None:
            yield answer
        await reader
        self.ended += 1


@contextlib.asynccontextmanager
async def streaming_state(tmp_path: Path) -> AsyncIterator[tuple[StreamingState, grpc.aio.Channel]]:
    """A state service with Ingests, and the gateway's channel to it."""
    tls.create(tmp_path)
    as_state = tls.Credentials.load(tmp_path, "state")
    servicer = StreamingState()
    server = grpc.aio.server(interceptors=grpcserver.interceptors(as_state))
    state_pb2_grpc.add_StateServicer_to_server(servicer, server)
    port = grpcserver.bind(server, "127.0.0.1", 0, as_state)
    await server.start()
    as_gateway = tls.Credentials.load(tmp_path, "gateway")
    try:
        async with grpcserver.channel(f"127.0.0.1:{port}", transport=as_gateway) as channel:
            yield servicer, channel
    finally:
        await server.stop(None)


@pytest.fixture(params=["streams", "unary"], ids=["ingests", "earlier-release"])
async def state(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[State, state_pb2_grpc.StateStub]]:
    """The servicer behind what the services' servers have (mutual TLS, the authorization of
    each call), called as the gateway calls it: a state service of this release, and one of an
    earlier release, without `Ingests`."""
    tls.create(tmp_path)
    as_state = tls.Credentials.load(tmp_path, "state")
    servicer = StreamingState() if request.param == "streams" else State()
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


async def test_a_stalled_state_service_fills_a_bounded_queue_and_no_more(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    servicer.open.clear()
    batcher = IngestBatcher(stub, timeout=10, max_in_flight=2, max_queued=3)
    waiting = [asyncio.create_task(batcher.submit(delivery(n, [10]))) for n in range(40)]
    await asyncio.sleep(0.2)
    refused = [t for t in waiting if t.done() and isinstance(t.exception(), QueueFull)]
    # Two batches in flight took what was queued when they started; 3 wait; the rest refused.
    assert len(refused) >= 40 - 2 * 3 - 3
    assert len(batcher._queue) <= 3
    servicer.open.set()
    stored = await asyncio.gather(*(t for t in waiting if t not in refused))
    assert len(stored) == 40 - len(refused)
    # Room again: the next delivery is taken.
    assert (await batcher.submit(delivery(99, [10]))).results[0].message_id == "m99.0"

    # By bytes: beyond the bound refused, but one delivery alone larger than it still waits.
    servicer.open.clear()
    small = IngestBatcher(stub, timeout=10, max_in_flight=1, max_queued_bytes=1000)
    first = asyncio.create_task(small.submit(delivery(100, [10])))
    await asyncio.sleep(0.1)  # in flight: the queue is empty
    alone = asyncio.create_task(small.submit(delivery(101, [5000])))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        await small.submit(delivery(102, [10]))
    servicer.open.set()
    await asyncio.gather(first, alone)
    await batcher.close()
    await small.close()


async def _calls(servicer: State, n: int) -> None:
    """Until the state service has received `n` calls (bounded)."""
    for _ in range(500):
        if len(servicer.batches) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(servicer.batches)} calls, not {n}")


async def test_deliveries_arriving_while_a_batch_is_stored_go_together_in_the_next(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    servicer.open.clear()
    batcher = IngestBatcher(stub, timeout=10, stall_seconds=60)
    first = asyncio.create_task(batcher.submit(delivery(0, [10])))
    await _calls(servicer, 1)  # an idle batcher sends at once, alone
    more = [asyncio.create_task(batcher.submit(delivery(n, [10]))) for n in range(1, 11)]
    await asyncio.sleep(0.1)
    assert len(servicer.batches) == 1, "no second call while the first is answered"
    servicer.open.set()
    answers = await asyncio.gather(first, *more)
    assert [a.results[0].message_id for a in answers] == [f"m{n}.0" for n in range(11)]
    assert [n for n, _ in servicer.batches] == [1, 10]
    await batcher.close()


async def test_a_call_that_stalls_does_not_hold_the_next_deliveries(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    servicer.open.clear()
    batcher = IngestBatcher(stub, timeout=10, stall_seconds=0.5, max_in_flight=2)
    first = asyncio.create_task(batcher.submit(delivery(0, [10])))
    await _calls(servicer, 1)
    await asyncio.sleep(0.7)  # the first call is answered for longer than the stall
    second = asyncio.create_task(batcher.submit(delivery(1, [10])))
    await _calls(servicer, 2)  # a second call, besides the stalled one
    third = asyncio.create_task(batcher.submit(delivery(2, [10])))
    await asyncio.sleep(0.05)
    assert len(servicer.batches) == 2, "at most max_in_flight calls"
    servicer.open.set()
    await asyncio.gather(first, second, third)
    assert [n for n, _ in servicer.batches] == [1, 1, 1]
    await batcher.close()


@pytest.mark.parametrize("urgent", [True, False], ids=["message", "statuses"])
async def test_a_delivery_queued_behind_a_call_that_then_stalls_goes_without_a_next_one(
    state: tuple[State, state_pb2_grpc.StateStub], urgent: bool
) -> None:
    """Queued while a call was answered in time, then nothing else arrives (a quiet moment):
    once that call stalls, the delivery goes in a call of its own, not after the stalled
    call's deadline (10 s here)."""
    servicer, stub = state
    batcher = IngestBatcher(
        stub, timeout=10, stall_seconds=0.5, max_in_flight=2, linger_seconds=0.1
    )
    await batcher.submit(delivery(9, [10]))  # the channel connected: calls start at once
    servicer.open.clear()
    first = asyncio.create_task(batcher.submit(delivery(0, [10])))
    await _calls(servicer, 2)
    queued = asyncio.create_task(batcher.submit(delivery(1, [10] if urgent else []), urgent=urgent))
    await asyncio.sleep(0.15)
    assert len(servicer.batches) == 2, "not stalled yet: it waits for the call under way"
    await _calls(servicer, 3)  # (within 5 s; before this change, not before the first ended)
    servicer.open.set()
    await asyncio.wait_for(asyncio.gather(first, queued), 10)
    assert [n for n, _ in servicer.batches] == [1, 1, 1]
    await batcher.close()


async def test_what_a_full_batch_leaves_goes_in_another_call_should_that_one_stall(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10, stall_seconds=0.5, max_in_flight=2, max_batch=2)
    await batcher.submit(delivery(9, [10]))  # the channel connected
    servicer.open.clear()
    three = [asyncio.create_task(batcher.submit(delivery(n, [10]))) for n in range(3)]
    await _calls(servicer, 2)  # two of them; the third waits: the call is not stalled yet
    await asyncio.sleep(0.15)
    assert [n for n, _ in servicer.batches] == [1, 2]
    await _calls(servicer, 3)  # once it stalls, with nothing else arriving
    servicer.open.set()
    await asyncio.wait_for(asyncio.gather(*three), 10)
    assert [n for n, _ in servicer.batches] == [1, 2, 1]
    await batcher.close()


# (`delivery(n, [])`: statuses only, as Meta sends each of a reply's.)
async def test_statuses_at_a_customers_pace_linger_and_go_together(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10, linger_seconds=0.5)
    waiting = []
    for n in range(5):  # one every 20 ms: without lingering, each a call of its own
        waiting.append(asyncio.create_task(batcher.submit(delivery(n, []), urgent=False)))
        await asyncio.sleep(0.02)
    assert servicer.batches == [], "nothing went before the first was due"
    answers = await asyncio.gather(*waiting)
    assert [a.statuses_stored for a in answers] == [1] * 5
    assert [n for n, _ in servicer.batches] == [5]

    # An idle batcher still sends a message at once: nothing lingers but what may.
    await batcher.submit(delivery(9, [10]))
    assert [n for n, _ in servicer.batches] == [5, 1]
    await batcher.close()


async def test_a_message_takes_the_lingering_statuses_with_it(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10, linger_seconds=60)
    lingering = [
        asyncio.create_task(batcher.submit(delivery(n, []), urgent=False)) for n in range(3)
    ]
    await asyncio.sleep(0.05)
    assert servicer.batches == []
    message = await asyncio.wait_for(batcher.submit(delivery(3, [10])), 10)
    assert message.results[0].message_id == "m3.0"
    await asyncio.wait_for(asyncio.gather(*lingering), 10)  # answered with it, not in 60 s
    assert [n for n, _ in servicer.batches] == [4]
    await batcher.close()


async def test_a_full_batch_of_statuses_goes_without_waiting_and_close_sends_the_rest(
    state: tuple[State, state_pb2_grpc.StateStub],
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10, linger_seconds=60, max_batch=4)
    full = [asyncio.create_task(batcher.submit(delivery(n, []), urgent=False)) for n in range(4)]
    await asyncio.wait_for(asyncio.gather(*full), 10)
    assert [n for n, _ in servicer.batches] == [4]

    rest = [asyncio.create_task(batcher.submit(delivery(n, []), urgent=False)) for n in range(2)]
    await asyncio.sleep(0.05)
    assert len(servicer.batches) == 1, "two of four: they wait"
    # A gateway shutting down stores what lingers before it stops, instead of dropping it.
    await asyncio.wait_for(batcher.close(), 10)
    assert [a.statuses_stored for a in await asyncio.gather(*rest)] == [1, 1]
    assert [n for n, _ in servicer.batches] == [4, 2]


async def test_batches_go_many_to_a_call_and_an_earlier_release_gets_one_call_each(
    state: tuple[State, state_pb2_grpc.StateStub], caplog: pytest.LogCaptureFixture
) -> None:
    servicer, stub = state
    batcher = IngestBatcher(stub, timeout=10)
    for n in range(12):  # one at a time, as at a customer's pace: each its own batch
        answer = await batcher.submit(delivery(n, [10]))
        assert answer.results[0].message_id == f"m{n}.0"
    assert [n for n, _ in servicer.batches] == [1] * 12
    if isinstance(servicer, StreamingState):
        assert servicer.unary == 0
        assert servicer.streams <= batcher_module.WIDTH, "calls are kept open and reused"
    else:
        assert "the state service has no Ingests" in caplog.text
    await batcher.close()


async def test_a_batch_whose_call_breaks_is_sent_again_and_one_refused_is_not(
    tmp_path: Path,
) -> None:
    async with streaming_state(tmp_path) as (servicer, channel):
        batcher = IngestBatcher(state_pb2_grpc.StateStub(channel), timeout=10)
        # Its call ends UNAVAILABLE before answering (the replica may or may not have stored
        # it): sent again on another call, and stored (a second store of it is a duplicate).
        servicer.broken = 2
        answer = await asyncio.wait_for(batcher.submit(delivery(0, [10])), 10)
        assert answer.results[0].message_id == "m0.0"
        assert [n for n, _ in servicer.batches] == [1, 1, 1]
        assert servicer.streams == 3 and servicer.unary == 0
        # Never more than MAX_ATTEMPTS calls: then the delivery is refused (503: Meta retries).
        servicer.broken = batcher_module.MAX_ATTEMPTS
        with pytest.raises(IngestError, match="UNAVAILABLE"):
            await asyncio.wait_for(batcher.submit(delivery(1, [10])), 10)
        assert servicer.broken == 0
        # An answer that says the batch failed is the batch's: not sent again.
        servicer.refused.add("c2")
        before = len(servicer.batches)
        with pytest.raises(IngestError, match="INTERNAL"):
            await asyncio.wait_for(batcher.submit(delivery(2, [10])), 10)
        assert len(servicer.batches) == before + 1
        assert (await batcher.submit(delivery(3, [10]))).results[0].message_id == "m3.0"
        await batcher.close()


async def test_a_call_ends_once_its_time_is_over_even_unused_and_batches_carry_their_deadline(
    tmp_path: Path,
) -> None:
    """An idle call left open would hold a stopping state replica's graceful stop until the
    call's own deadline; each batch says how long the gateway waits for it."""
    async with streaming_state(tmp_path) as (servicer, channel):
        batcher = IngestBatcher(state_pb2_grpc.StateStub(channel), timeout=10)
        batcher.calls = batcher_module.IngestCalls(batcher.stub, 10, call_seconds=0.3)
        await batcher.submit(delivery(0, [10]))
        assert servicer.streams == 1 and 9 < servicer.timeouts[0] <= 10
        for _ in range(100):
            if servicer.ended == 1:
                break
            await asyncio.sleep(0.02)
        assert servicer.ended == 1, "the call ended by itself, with nothing more to send"
        await batcher.submit(delivery(1, [10]))  # on a call of its own
        assert servicer.streams == 2
        await batcher.close()


async def test_broken_calls_are_sent_again_only_while_most_calls_succeed(tmp_path: Path) -> None:
    """A state service that is down: after about fifty broken calls each batch is tried once,
    not four times (the channel's retry throttling for IngestBatch, common/balancing.py)."""
    async with streaming_state(tmp_path) as (servicer, channel):
        batcher = IngestBatcher(state_pb2_grpc.StateStub(channel), timeout=10)
        servicer.broken = 10_000
        tried = []
        for n in range(24):
            before = len(servicer.batches)
            with pytest.raises(IngestError, match="UNAVAILABLE"):
                await batcher.submit(delivery(n, [10]))
            tried.append(len(servicer.batches) - before)
        assert tried[:12] == [batcher_module.MAX_ATTEMPTS] * 12
        assert tried[-8:] == [1] * 8
        # Up again: stored, and each success gives back a tenth of a token.
        servicer.broken = 0
        assert (await batcher.submit(delivery(99, [10]))).results[0].message_id == "m99.0"
        await batcher.close()
