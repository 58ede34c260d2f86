"""The agent's writes to the state service's table are fenced: a turn whose conversation was
taken over (its fencing token moved on) neither starts a send nor writes anything else, but
the id of a reply it did send (where none is recorded), against real PostgreSQL and a Graph
API played over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from common.domain import TurnRequest
from services.agent import agents, replies
from services.agent import turn as agent_turn
from services.agent.backends import RulesBackend
from services.agent.graph import GraphClient
from services.agent.turn import Agent, StaleFence
from services.state import store
from tests.support.fakes import FakeGraph
from tests.support.inbound import inbound

ROOT = Path(__file__).resolve().parents[2]


def make_agent(
    pool: asyncpg.Pool, graph: FakeGraph, http: aiohttp.ClientSession, max_retries: int
) -> Agent:
    client = GraphClient(
        http, base_url=graph.url, version="v23.0", access_token="t", max_retries=max_retries
    )
    return Agent(
        pool,
        agents.load(ROOT / "config" / "agents.toml"),
        RulesBackend(),
        client,
        token_limit=4000,
        confirm_seconds=0.5,
    )


@pytest.fixture
async def agent(pool: asyncpg.Pool, graph: FakeGraph) -> AsyncIterator[Agent]:
    async with aiohttp.ClientSession() as http:
        yield make_agent(pool, graph, http, max_retries=0)


async def claimed(pool: asyncpg.Pool, message_id: str) -> tuple[int, int]:
    """The message stored and its turn started by a driver: (conversation, fence token)."""
    await store.ingest(pool, [inbound(message_id)], [], "c", "")
    conversation = await pool.fetchval(
        "SELECT conversation_id FROM processed_webhook_messages WHERE message_id = $1",
        message_id,
    )
    token = await store.claim_conversation(pool, conversation, "driver-a")
    assert await store.next_message(pool, conversation, token) is not None
    return int(conversation), token


def request(message_id: str, conversation: int, token: int) -> TurnRequest:
    return TurnRequest(
        message_id=message_id,
        conversation_id=conversation,
        fence_token=token,
        phone_number_id="100",
        wa_id="15550001111",
        text="hi",
        correlation_id="c",
    )


async def reply_row(pool: asyncpg.Pool, message_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT reply_text, reply_message_id, send_started_at, reply_error_code "
        "FROM processed_webhook_messages WHERE message_id = $1",
        message_id,
    )
    assert row is not None
    return row


async def test_a_holder_taken_over_mid_send_records_what_it_sent_and_nothing_more(
    pool: asyncpg.Pool, graph: FakeGraph, agent: Agent
) -> None:
    conversation, token = await claimed(pool, "wamid.MID")
    graph.release.clear()  # the send is held at the Graph API
    turn = asyncio.create_task(agent.reply(request("wamid.MID", conversation, token)))
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1)
    # The sweeper breaks the lease of a holder that looks dead; another driver claims it.
    assert await store.claim_conversation(pool, conversation, "driver-b") == token + 1
    graph.release.set()
    with pytest.raises(StaleFence):
        await turn
    # Its send is recorded all the same (where none is), as the reply's status webhook would
    # record it: the new holder finds that the reply went out instead of waiting for that
    # webhook and, without one, sending it again. The turn itself is refused.
    row = await reply_row(pool, "wamid.MID")
    assert row["reply_text"] and row["reply_message_id"].startswith("wamid.OUT")
    # A reply already recorded is never replaced by a stale holder's.
    with pytest.raises(StaleFence):
        await agent._fenced(
            request("wamid.MID", conversation, token), "record_sent", "wamid.MID", "wamid.STALE"
        )
    assert await reply_row(pool, "wamid.MID") == row


async def test_a_stale_holder_neither_sends_again_nor_records_errors(
    pool: asyncpg.Pool, graph: FakeGraph, agent: Agent
) -> None:
    conversation, token = await claimed(pool, "wamid.OLD")
    # The first run's send is refused: its reply is stored, no send in flight.
    graph.fail_next(graph.error(500, 131000, "try later"))
    out = await agent.reply(request("wamid.OLD", conversation, token))
    assert out.outcome == "failed" and out.error_class == "GraphError131000"
    row = await reply_row(pool, "wamid.OLD")
    assert row["reply_error_code"] == "131000" and row["send_started_at"] is None
    await store.claim_conversation(pool, conversation, "driver-b")
    # The stalled driver runs its turn again: refused before anything is sent or written.
    graph.fail_next(graph.error(400, 131026, "undeliverable"))
    with pytest.raises(StaleFence):
        await agent.reply(request("wamid.OLD", conversation, token))
    assert len(graph.sends) == 1
    assert await reply_row(pool, "wamid.OLD") == row


async def test_a_holder_taken_over_while_it_waits_to_send_again_does_not_send(
    pool: asyncpg.Pool, graph: FakeGraph
) -> None:
    """The Graph API throttles the send (Retry-After); while the turn waits, its driver is
    taken for dead and another one claims the conversation, whose turn will send the reply
    itself. The first turn must not send it too when its wait is over."""
    conversation, token = await claimed(pool, "wamid.WAIT")
    throttled = graph.error(429, 130429, "rate limit hit")
    graph.fail_next((throttled[0], throttled[1], {"Retry-After": "1"}))
    async with aiohttp.ClientSession() as http:
        agent = make_agent(pool, graph, http, max_retries=3)
        turn = asyncio.create_task(agent.reply(request("wamid.WAIT", conversation, token)))
        assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1)
        await store.claim_conversation(pool, conversation, "driver-b")
        with pytest.raises(StaleFence):
            await turn
    await asyncio.sleep(0.5)
    assert len(graph.sends) == 1


async def test_a_stale_holder_outside_the_window_neither_stores_nor_sends_the_template(
    pool: asyncpg.Pool, graph: FakeGraph
) -> None:
    conversation, token = await claimed(pool, "wamid.LATE")
    # Two days pass: the customer's message, and its conversation's last message time with it.
    await pool.execute(
        "UPDATE processed_webhook_messages SET wa_timestamp = now() - interval '2 days';"
        " UPDATE webhook_conversations SET last_message_at = now() - interval '2 days'"
    )
    await store.claim_conversation(pool, conversation, "driver-b")
    async with aiohttp.ClientSession() as http:
        agent = make_agent(pool, graph, http, max_retries=0)
        agent.window_template = replies.template("hello_again", "en_US")
        with pytest.raises(StaleFence):
            await agent.reply(request("wamid.LATE", conversation, token))
        assert graph.messages == []
        row = await reply_row(pool, "wamid.LATE")
        assert row["reply_text"] is None and row["send_started_at"] is None
        # The holder's own turn: the template, stored and sent once; never the model.
        out = await agent.reply(request("wamid.LATE", conversation, token + 1))
    assert out.outcome == "replied" and [m.body["type"] for m in graph.messages] == ["template"]
    assert graph.reads == []


class NoTurnStateReads:
    """The pool, refusing the agent's own read of a turn's state (turn_state)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def __getattr__(self, name: str) -> object:
        return getattr(self.pool, name)

    async def fetchrow(self, query: str, *args: object) -> object:
        assert query != agent_turn.Q["turn_state"], "the turn's state was read again"
        return await self.pool.fetchrow(query, *args)


async def test_a_turn_started_by_the_driver_reads_nothing_and_leaves_its_send_to_record(
    pool: asyncpg.Pool, agent: Agent, graph: FakeGraph
) -> None:
    """The driver's request carries the turn's state (read by the statement that started the
    turn) and asks to record the send itself: the agent does not read the state again, sends
    once, and hands the id back unrecorded; the driver's final transition records it
    (db/migrations/0020). A caller that does not ask (an older one) gets it recorded."""
    await store.ingest(pool, [inbound("wamid.DRV")], [], "c", "")
    conversation = await pool.fetchval(
        "SELECT conversation_id FROM processed_webhook_messages WHERE message_id = 'wamid.DRV'"
    )
    token, item = await store.claim_turn(pool, conversation, "driver-a")
    assert item is not None and item.has_state and item.defer_sent_record
    agent.pool = NoTurnStateReads(pool)  # type: ignore[assignment]
    out = await agent.reply(item)
    assert out.outcome == "replied" and out.sent_unrecorded and out.reply_message_id
    assert len(graph.sends) == 1
    row = await reply_row(pool, "wamid.DRV")
    assert row["reply_message_id"] is None and row["send_started_at"] is not None
    assert row["reply_text"] == out.reply_text
    finished = await store.finish_turn(
        pool,
        item,
        "replied",
        out.detail,
        token,
        start_next=True,
        reply_message_id=out.reply_message_id,
        release=True,
    )
    assert finished.next is store.RELEASED
    assert (await reply_row(pool, "wamid.DRV"))["reply_message_id"] == out.reply_message_id

    agent.pool = pool
    conversation, token = await claimed(pool, "wamid.OLDCALLER")
    old = await agent.reply(request("wamid.OLDCALLER", conversation, token))
    assert old.outcome == "replied" and not old.sent_unrecorded
    assert (await reply_row(pool, "wamid.OLDCALLER"))["reply_message_id"] == old.reply_message_id


async def test_a_holder_taken_over_mid_part_records_the_part_it_sent_and_starts_no_other(
    pool: asyncpg.Pool, graph: FakeGraph, agent: Agent
) -> None:
    """A long reply (stored, as a resumed turn finds it) goes out in parts; the turn is taken
    over while its first part is at the Graph API. That part's id is recorded all the same (the
    new holder's run starts at the next part instead of waiting for the part's status webhook
    and, without one, sending it again); the next part is neither started nor sent."""
    conversation, token = await claimed(pool, "wamid.PARTS")
    long = "\n\n".join(f"Paragraph {n}. " + "word " * 300 for n in range(6))
    await pool.execute(
        "UPDATE processed_webhook_messages SET reply_text = $2, agent_type = 'concierge' "
        "WHERE message_id = $1",
        "wamid.PARTS",
        long,
    )
    graph.release.clear()  # the first part is held at the Graph API
    turn = asyncio.create_task(agent.reply(request("wamid.PARTS", conversation, token)))
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1)
    assert await store.claim_conversation(pool, conversation, "driver-b") == token + 1
    graph.release.set()
    with pytest.raises(StaleFence):
        await turn
    assert len(graph.sends) == 1
    parts = await pool.fetch(
        "SELECT part, sent_id, send_started_at FROM agent_reply_parts "
        "WHERE message_id = 'wamid.PARTS' ORDER BY part"
    )
    assert len(parts) > 1
    assert parts[0]["sent_id"].startswith("wamid.OUT") and parts[0]["send_started_at"] is None
    assert all(p["sent_id"] is None and p["send_started_at"] is None for p in parts[1:])


async def test_a_turn_with_no_number_or_user_id_fails_to_the_dlq_without_a_send(
    pool: asyncpg.Pool, graph: FakeGraph, agent: Agent
) -> None:
    # A customer whose number changed, with no business-scoped user id known (db/migrations/
    # 0038): the old number is not theirs any more, and there is nobody to send to.
    conversation, token = await claimed(pool, "wamid.NOBODY")
    nobody = dataclasses.replace(request("wamid.NOBODY", conversation, token), wa_id="")
    result = await agent.reply(nobody)
    assert (result.outcome, result.error_class, result.retryable) == (
        "failed",
        "NoRecipient",
        False,
    )
    assert graph.sends == []
    assert (await reply_row(pool, "wamid.NOBODY"))["reply_text"] is None
