"""Meta's status webhooks at a customer's pace share calls to the state service: a delivery of
statuses only waits up to GATEWAY_STATUS_LINGER_SECONDS for company, a message does not wait
and takes them with it (services/gateway/batcher.py). Seen from outside: every webhook is
answered 200 once stored, and the gateway's own metric counts the calls."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.metrics import metric
from tests.support.system import System

pytestmark = pytest.mark.e2e


async def calls(system: System) -> float:
    """`IngestBatch` calls the gateway made so far (its batch-size histogram's count)."""
    return await metric(system.ports["gateway"], "wa_gateway_ingest_batch_size_count")


async def queued(system: System, n: int) -> None:
    """Until `n` deliveries wait in the gateway's queue (bounded)."""
    for _ in range(200):
        if await metric(system.ports["gateway"], "wa_gateway_ingest_queue_deliveries") == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {n} deliveries waiting")


async def test_statuses_arriving_one_by_one_are_stored_in_one_call_with_the_next_message(
    start_system: StartSystem,
) -> None:
    # A linger far longer than the test takes to send them: the message, not the timer, sends.
    system = await start_system(GATEWAY_STATUS_LINGER_SECONDS="1")
    before = await calls(system)
    posts = []
    for n, kind in enumerate(("sent", "delivered", "read", "sent")):
        status = payloads.status(f"wamid.OUT{n}", kind)
        posts.append(asyncio.create_task(system.post(payloads.delivery(statuses=[status]))))
        await asyncio.sleep(0.03)
    await queued(system, 4)  # all four lingering, none sent: then the message
    message = await system.post(payloads.text_delivery("and one more thing"))
    answers = await asyncio.gather(*posts)
    assert message.status_code == 200, message.text
    assert [(a.status_code, a.json()["stored"]) for a in answers] == [(200, 1)] * 4
    assert await calls(system) - before == 1, "four statuses and a message, one call"
    pool = await system.db()
    stored = await pool.fetchval(
        "SELECT count(*) FROM processed_webhook_messages WHERE kind = 'status'"
    )
    assert stored == 4

    # Statuses with no message after them are stored once the first is due, all together.
    before = await calls(system)
    alone = [
        system.post(payloads.delivery(statuses=[payloads.status(f"wamid.LATE{n}", "read")]))
        for n in range(3)
    ]
    assert [a.status_code for a in await asyncio.gather(*alone)] == [200] * 3
    assert await calls(system) - before == 1
