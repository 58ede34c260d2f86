"""What the state service does with values PostgreSQL refuses (each costs its own message only,
stored as a skipped placeholder with the reason) and the conversations' message counts, against
real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from wa.v1 import common_pb2, state_pb2

from common import kv, wire
from common.domain import Message
from services.gateway import parse
from services.state import store
from services.state.locks import Locks
from services.state.server import StateServicer
from tests.support import payloads
from tests.support.servers import Redis


@pytest.fixture
async def servicer(pool: asyncpg.Pool, redis_server: Redis) -> AsyncIterator[StateServicer]:
    redis = kv.create_client(redis_server.url)
    yield StateServicer(pool, Locks(redis, 30), dispatcher=None)
    await redis.aclose()


def message(
    message_id: str, wa_id: str = "15550001111", **fields: object
) -> common_pb2.InboundMessage:
    values: dict[str, object] = {
        "message_id": message_id,
        "phone_number_id": "100",
        "wa_id": wa_id,
        "type": "text",
        "timestamp": Timestamp(seconds=int(time.time())),
        "text": "hello",
        "payload_json": f'{{"id": "{message_id}"}}',
        **fields,
    }
    return common_pb2.InboundMessage(**values)  # type: ignore[arg-type]


async def rows(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    found = await pool.fetch(
        "SELECT message_id, status, status_reason, payload::text AS payload, body"
        " FROM processed_webhook_messages WHERE kind = 'message'"
    )
    return {r["message_id"]: r for r in found}


async def test_a_value_postgresql_refuses_costs_only_its_own_message(
    servicer: StateServicer, pool: asyncpg.Pool
) -> None:
    poisoned = state_pb2.IngestRequest(
        correlation_id="c1",
        messages=[
            message("wamid.A"),
            message("wamid.NUL", text="a\x00b"),  # PostgreSQL text holds no NUL
            message("wamid.JSON", payload_json='{"id": "wamid.JSON", "x": "\\u0000"}'),
            message("wamid.\x00ID"),
            message("wamid.HUGE", timestamp=Timestamp(seconds=2**63 - 1)),  # no datetime holds it
        ],
        statuses=[
            common_pb2.StatusUpdate(
                message_id="wamid.OUT\x00", status=common_pb2.DELIVERY_STATUS_READ
            )
        ],
    )
    clean = state_pb2.IngestRequest(correlation_id="c2", messages=[message("wamid.B", "1555")])
    answers = await servicer._ingest([poisoned, clean])
    assert [a.HasField("error") for a in answers] == [False, False]
    assert [len(a.results) for a in answers] == [5, 1]
    assert answers[0].statuses_stored == 1
    stored = await rows(pool)
    assert len(stored) == 6
    assert stored["wamid.A"]["status"] == stored["wamid.B"]["status"] == "received"
    placeholder_id = answers[0].results[3].message_id
    assert placeholder_id.startswith("invalid:")
    for message_id in ("wamid.NUL", "wamid.JSON", placeholder_id):
        row = stored[message_id]
        assert row["status"] == "skipped"
        assert "could not be stored as delivered" in row["status_reason"]
        assert "payload_json" in row["payload"]  # the payload kept as text
    assert stored["wamid.HUGE"]["status"] == "skipped"
    assert stored["wamid.HUGE"]["status_reason"].startswith("timestamp is not a time")
    audited = await pool.fetch(
        "SELECT message_id, to_state, reason FROM conversation_state_transitions"
        " WHERE entity = 'message'"
    )
    assert {r["message_id"]: r["to_state"] for r in audited} == {
        m: s["status"] for m, s in stored.items()
    }
    # Meta's retry of the same delivery: everything is a duplicate, nothing is stored twice.
    again = await servicer._ingest([poisoned])
    assert not again[0].HasField("error") and all(r.duplicate for r in again[0].results)
    assert len(await rows(pool)) == 6


async def test_a_single_poisoned_delivery_is_stored_not_refused(
    servicer: StateServicer, pool: asyncpg.Pool
) -> None:
    (answer,) = await servicer._ingest(
        [state_pb2.IngestRequest(correlation_id="c", messages=[message("m", text="\x00")])]
    )
    assert not answer.HasField("error")
    assert (await rows(pool))["m"]["status"] == "skipped"


async def test_message_count_counts_stored_messages_not_duplicates(pool: asyncpg.Pool) -> None:
    def inbound(message_id: str, wa_id: str) -> Message:
        return Message(message_id, "100", wa_id, "", "text", 0, "hi", "{}")

    first = store.DeliveryIn([inbound("a", "1"), inbound("b", "1"), inbound("c", "2")], [], "", "")
    await store.ingest_many(pool, [first])
    again = store.DeliveryIn([inbound("a", "1"), inbound("d", "1"), inbound("d", "1")], [], "", "")
    other = store.DeliveryIn([inbound("e", "2"), inbound("b", "1")], [], "", "")
    await store.ingest_many(pool, [again, other])
    counts = await pool.fetch("SELECT wa_id, message_count FROM webhook_conversations")
    assert {r["wa_id"]: r["message_count"] for r in counts} == {"1": 3, "2": 2}


@pytest.mark.parametrize(
    ("exc", "data"),
    [
        (asyncpg.exceptions.CharacterNotInRepertoireError("NUL"), True),
        (asyncpg.exceptions.InvalidTextRepresentationError("json"), True),
        (asyncpg.exceptions.ProgramLimitExceededError("index row size"), True),
        (asyncpg.exceptions.CheckViolationError("check"), True),
        (asyncpg.exceptions.DataError("invalid input for query argument"), True),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), True),
        (OverflowError("int too big"), True),
        (asyncpg.exceptions.AdminShutdownError("shutdown"), False),
        (asyncpg.exceptions.CannotConnectNowError("starting"), False),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), False),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), False),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), False),
        (asyncpg.exceptions.InsufficientPrivilegeError("permission denied"), False),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), False),
        (ConnectionRefusedError(), False),
        (TimeoutError(), False),
    ],
)
def test_only_errors_of_the_values_themselves_are_data_errors(exc: Exception, data: bool) -> None:
    # Only these are stored as placeholders: anything else is "not now" (a 503, Meta retries).
    assert store.is_data_error(exc) is data


async def test_a_click_to_whatsapp_referral_is_stored_with_its_message(
    servicer: StateServicer, pool: asyncpg.Pool
) -> None:
    referral = {
        "source_url": "https://fb.me/ad",
        "source_id": "120208",
        "source_type": "ad",
        "headline": "Book a table",
        "body": "Tonight only",
        "media_type": "image",
        "image_url": "https://example.com/a.jpg",
        "ctwa_clid": "ARAkLk",
    }
    with_ad = payloads.message("text", referral=referral)
    without = payloads.message("text")
    body = orjson.dumps(payloads.delivery(messages=[with_ad, without]))
    delivery = parse.parse(body)
    request = state_pb2.IngestRequest(
        correlation_id="c", messages=[wire.message_to_proto(m) for m in delivery.messages]
    )
    (answer,) = await servicer._ingest([request])
    assert not answer.HasField("error")
    stored = await pool.fetch(
        "SELECT message_id, referral::text FROM processed_webhook_messages WHERE kind = 'message'"
    )
    by_id = {r["message_id"]: r["referral"] for r in stored}
    assert orjson.loads(by_id[with_ad["id"]]) == referral
    assert by_id[without["id"]] is None
