"""The state service's `Ingests`: the gateway's batches many to a call (services/gateway/batcher.py,
common/streamcalls.py), against the real state service over mutual TLS."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from wa.v1 import state_pb2, state_pb2_grpc

from common import grpcserver, wire
from services.gateway import parse
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph

pytestmark = pytest.mark.e2e


def _ingest_request(doc: dict[str, Any]) -> state_pb2.IngestRequest:
    """A delivery as the gateway hands it to the state service."""
    delivery = parse.parse_obj(doc)
    return state_pb2.IngestRequest(
        correlation_id=payloads.new_id(),
        messages=[wire.message_to_proto(m) for m in delivery.messages],
        statuses=[wire.status_to_proto(s) for s in delivery.statuses],
        events=[wire.event_to_proto(e) for e in delivery.events],
    )


async def _ingests(
    call: Any, batches: dict[int, list[state_pb2.IngestRequest]]
) -> dict[int, state_pb2.IngestsResponse]:
    for batch_id, deliveries in batches.items():
        batch = state_pb2.IngestBatchRequest(deliveries=deliveries)
        await call.write(state_pb2.IngestsRequest(id=batch_id, batch=batch))
    await call.done_writing()
    return {answer.id: answer async for answer in call}


async def test_batches_on_one_call_are_each_answered_by_id_and_their_messages_answered(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    # Two customers; the first one's second message in the other batch.
    first, second, third = (
        payloads.message("text", wa_id=wa_id)
        for wa_id in ("15550002001", "15550002002", "15550002001")
    )
    batches = {
        7: [_ingest_request(payloads.delivery([first]))],
        9: [
            _ingest_request(payloads.delivery([second])),
            _ingest_request(payloads.delivery([third])),
        ],
    }
    target = f"127.0.0.1:{system.ports['state']}"
    async with grpcserver.channel(target, transport=system.transport("gateway")) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        answers = await _ingests(stub.Ingests(timeout=30), batches)
        assert sorted(answers) == [7, 9]
        assert all(a.code == 0 for a in answers.values())
        stored = {
            batch_id: [[r.message_id for r in d.results] for d in a.batch.deliveries]
            for batch_id, a in answers.items()
        }
        assert stored == {7: [[first["id"]]], 9: [[second["id"]], [third["id"]]]}
        assert not any(r.duplicate for d in answers[9].batch.deliveries for r in d.results)

        # Each stored message is driven at once (no sweeper): answered, the first customer's
        # two in order.
        ids = [first["id"], second["id"], third["id"]]
        await system.wait_status(ids, {"replied"}, timeout=20)

        # The same batch again, on another call: stored once, said to be a duplicate.
        again = await _ingests(stub.Ingests(timeout=30), {1: batches[7]})
        assert [r.duplicate for r in again[1].batch.deliveries[0].results] == [True]

    # Only the gateway stores deliveries: the operator's certificate gets nothing here.
    async with grpcserver.channel(target, transport=system.transport("operator")) as channel:
        call = state_pb2_grpc.StateStub(channel).Ingests(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_batch_past_its_deadline_is_cancelled_not_stored_later(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    """Past its deadline the gateway has answered Meta 503: a batch still waiting (here for a
    row lock) is cancelled, as a unary call's handler is, instead of holding up the batches
    behind it and storing what Meta will send again."""
    system = await start_system()
    first = payloads.message("text", wa_id="15550002003")
    target = f"127.0.0.1:{system.ports['state']}"
    async with grpcserver.channel(target, transport=system.transport("gateway")) as channel:
        stub = state_pb2_grpc.StateStub(channel)
        await _ingests(stub.Ingests(timeout=30), {1: [_ingest_request(payloads.delivery([first]))]})
        await system.wait_status([first["id"]], {"replied"}, timeout=20)

        late = payloads.message("text", wa_id="15550002003")
        pool = await system.db()
        async with pool.acquire() as conn, conn.transaction():
            # The customer's conversation, locked as a long transaction would hold it.
            await conn.execute(
                "SELECT 1 FROM webhook_conversations WHERE wa_id = '15550002003' FOR UPDATE"
            )
            call = stub.Ingests(timeout=30)
            batch = state_pb2.IngestBatchRequest(
                deliveries=[_ingest_request(payloads.delivery([late]))]
            )
            await call.write(state_pb2.IngestsRequest(id=2, batch=batch, timeout_seconds=1.0))
            answer = await asyncio.wait_for(call.read(), 10)
            assert answer.id == 2
            assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            await call.done_writing()
        await asyncio.sleep(1.0)  # the lock is gone: a batch still running would store it now
        stored = await pool.fetchval(
            "SELECT count(*) FROM processed_webhook_messages WHERE message_id = $1", late["id"]
        )
        assert stored == 0
