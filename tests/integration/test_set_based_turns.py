"""A batch of turns' claims, or of their final moves, does to each item what the single
function does to it alone (db/migrations/0037: the batch functions work on the whole batch in
a few statements, no longer by calling the single function per item).

Each comparison runs the batch in a transaction, notes what it answered and what the tables
then hold, and rolls it back; then the single functions, item by item, from the same start.
Both must answer the same rows and leave the same messages, conversations and audit trail
(timestamps aside). The items cover every outcome: a turn started, resumed, none waiting (the
conversation released), handed off to a person, a stale token, an illegal move, an unknown
message or conversation, a failure counted on its conversation, a reply whose status came
first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from common import db, roles, sqlfile
from common.db import Conn
from common.domain import Status
from services.agent import operator, saves
from services.state import handoff, machine, store
from tests.support.inbound import inbound
from tests.support.locks import holding, waiters, waiting_for_a_lock

ACTIVE_FROM = machine.conversation_sources(machine.ACTIVE)
IDLE_FROM = machine.conversation_sources(machine.IDLE)
# What a run may differ in: when it happened.
CLOCKS = {"db_now", "locked_at", "updated_at", "created_at", "started_at", "finished_at"}

Snapshot = dict[str, list[tuple[Any, ...]]]
AGENT_Q = sqlfile.load("services.agent", "queries.sql")


async def snapshot(conn: Conn) -> Snapshot:
    return {
        "messages": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT message_id, status, status_reason, attempts, turn_resumes,"
                " reply_message_id, reply_status FROM processed_webhook_messages ORDER BY id"
            )
        ],
        "conversations": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT id, status, fence_token, lock_owner, error_count, handoff_at IS NOT NULL"
                " FROM webhook_conversations ORDER BY id"
            )
        ],
        "replies": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT message_id, reply_text, reply_payload, agent_type,"
                " send_started_at IS NOT NULL, absorbed_message_ids"
                " FROM processed_webhook_messages ORDER BY id"
            )
        ],
        "contexts": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT conversation_id, agent_type, token_count, fence_token, correlation_id,"
                " last_seq FROM agent_contexts ORDER BY conversation_id"
            )
        ],
        "entries": [
            tuple(r)
            for r in await conn.fetch(
                # As JSON: a batch's jsonb argument writes its messages' text with spaces.
                "SELECT conversation_id, seq, n, ('[' || messages || ']')::jsonb"
                " FROM agent_context_entries ORDER BY conversation_id, seq"
            )
        ],
        "sessions": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT conversation_id, agent_type, turns, tokens_in, tokens_out,"
                " total_latency_ms, errors, correlation_id FROM agent_sessions"
                " ORDER BY conversation_id, agent_type"
            )
        ],
        # In order within each conversation (the batch writes conversations' rows in another
        # order across conversations than one item after another does).
        "audit": [
            tuple(r)
            for r in await conn.fetch(
                "SELECT conversation_id, message_id, entity, from_state, to_state, reason,"
                " fence_token, correlation_id FROM conversation_state_transitions"
                " ORDER BY conversation_id, id"
            )
        ],
    }


def answered(row: asyncpg.Record | None) -> dict[str, Any]:
    assert row is not None
    return {k: v for k, v in row.items() if k not in CLOCKS and k != "ord"}


async def by_item(conn: Conn | asyncpg.Pool, query: str, *args: Any) -> list[dict[str, Any]]:
    """A batch function's rows, in its items' order."""
    rows = {r["ord"]: answered(r) for r in await conn.fetch(query, *args)}
    return [rows[n + 1] for n in range(len(rows))]


async def each_alone(conn: Conn, query: str, calls: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The single function's row for each call, one after the other."""
    return [answered(await conn.fetchrow(query, *args)) for args in calls]


async def undone(
    conn: Conn, run: Callable[[], Awaitable[list[dict[str, Any]]]]
) -> tuple[list[dict[str, Any]], Snapshot]:
    """What `run` answers and leaves, then rolled back."""
    tx = conn.transaction()
    await tx.start()
    try:
        rows = await run()
        return rows, await snapshot(conn)
    finally:
        await tx.rollback()


async def conversation(pool: asyncpg.Pool, wa_id: str, *message_ids: str) -> int:
    now = int(time.time())
    rows, _ = await store.ingest(
        pool, [inbound(m, wa_id=wa_id, ts=now + n) for n, m in enumerate(message_ids)], [], "c", ""
    )
    return rows[0].conversation_id


async def started(pool: asyncpg.Pool, conversation_id: int) -> tuple[int, store.WorkItem]:
    token, item = await store.claim_turn(pool, conversation_id, "earlier")
    assert item is not None
    return token, item


async def test_a_batch_of_claims_does_what_each_claim_does_alone(pool: asyncpg.Pool) -> None:
    waiting = await conversation(pool, "15550000001", "wamid.W1", "wamid.W2")
    answered_before = await conversation(pool, "15550000002", "wamid.A1")
    token, item = await started(pool, answered_before)
    await store.finish_turn(pool, item, machine.REPLIED, "replied", token, start_next=False)
    # A turn whose holder died mid-turn: taken over, resumed.
    cut_off = await conversation(pool, "15550000003", "wamid.C1")
    await started(pool, cut_off)
    # Handed off to a person, with a message waiting since: held for the person.
    person = await conversation(pool, "15550000004", "wamid.P1")
    token, item = await started(pool, person)
    await handoff.finish_handing_off(
        pool, item, machine.REPLIED, "replied", token, start_next=False
    )
    await conversation(pool, "15550000004", "wamid.P2")
    items = [person, 999_999, waiting, cut_off, answered_before]

    async with pool.acquire() as conn:
        owners = [f"owner-{n}" for n in range(len(items))]

        def batch() -> Awaitable[list[dict[str, Any]]]:
            return by_item(
                conn, "SELECT * FROM wa_claim_turns($1, $2, $3, $4)", items, owners,
                ACTIVE_FROM, IDLE_FROM,
            )  # fmt: skip

        def alone() -> Awaitable[list[dict[str, Any]]]:
            return each_alone(
                conn,
                "SELECT * FROM wa_claim_turn($1, $2, $3, $4)",
                [(c, o, ACTIVE_FROM, IDLE_FROM) for c, o in zip(items, owners, strict=True)],
            )

        together, after_together = await undone(conn, batch)
        one_by_one, after_one_by_one = await undone(conn, alone)

    assert [r["outcome"] for r in together] == [
        "none",  # handed off: P2 kept for the person
        None,  # no such conversation: not claimed
        "started",
        "started",
        "none",
    ]
    assert together[3]["resumed"] and together[3]["message_id"] == "wamid.C1"
    assert [r["released"] for r in together] == [True, None, False, False, True]
    assert together == one_by_one
    assert after_together == after_one_by_one


async def test_a_batch_of_final_moves_does_what_each_does_alone(pool: asyncpg.Pool) -> None:
    now = int(time.time())
    next_waits = await conversation(pool, "15550000001", "wamid.N1", "wamid.N2")
    none_waits = await conversation(pool, "15550000002", "wamid.E1")
    moved_on = await conversation(pool, "15550000003", "wamid.S1")
    twice = await conversation(pool, "15550000004", "wamid.T1")
    fails = await conversation(pool, "15550000005", "wamid.F1", "wamid.F2")
    status_first = await conversation(pool, "15550000006", "wamid.R1")
    turns = {c: await started(pool, c) for c in (next_waits, none_waits, moved_on, twice, fails)}
    turns[status_first] = await started(pool, status_first)
    # A new holder took the conversation over since its turn began.
    await store.claim_turn(pool, moved_on, "newer")
    # Finished already: replied -> replied is no move.
    token, item = turns[twice]
    await store.finish_turn(pool, item, machine.REPLIED, "replied", token, start_next=False)
    # The reply's status came before its send was recorded.
    await store.ingest(
        pool, [], [Status("wamid.OUT-R1", "100", "15550000006", "delivered", now, "{}")], "c", ""
    )

    def move(
        c: int, to_state: str, *, next_: bool = True, reply: str | None = None
    ) -> tuple[Any, ...]:
        token, item = turns[c]
        return (item.message_id, to_state, f"{to_state} here", token, "", c, next_, reply)

    items = [
        move(status_first, machine.REPLIED, reply="wamid.OUT-R1"),
        move(fails, machine.FAILED, next_=False),
        move(moved_on, machine.REPLIED),
        ("wamid.nothing", machine.REPLIED, "replied", 1, "", next_waits + 1000, True, None),
        move(twice, machine.REPLIED),
        move(none_waits, machine.SKIPPED),
        move(next_waits, machine.REPLIED),
    ]

    async with pool.acquire() as conn:
        # (One list of legal sources for all: every move here is to a final state.)
        sources = machine.message_sources(machine.REPLIED)

        def batch() -> Awaitable[list[dict[str, Any]]]:
            columns = [[i[k] for i in items] for k in range(8)]
            return by_item(
                conn,
                "SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                columns[0], columns[1], sources, *columns[2:], IDLE_FROM,
            )  # fmt: skip

        def alone() -> Awaitable[list[dict[str, Any]]]:
            return each_alone(
                conn,
                "SELECT * FROM wa_finish_turn($1, $2, $3, $4, $5, $6, $7, $8,"
                " '{}', '{}', '', $9, $10)",
                [(i[0], i[1], sources, *i[2:], IDLE_FROM) for i in items],
            )

        together, after_together = await undone(conn, batch)
        one_by_one, after_one_by_one = await undone(conn, alone)

    assert [(r["finished"], r["outcome"]) for r in together] == [
        ("done", "none"),
        ("done", "unasked"),
        ("stale", "unasked"),
        ("unknown", "unasked"),
        ("illegal", "unasked"),
        ("done", "none"),
        ("done", "started"),
    ]
    assert together[6]["message_id"] == "wamid.N2"
    assert [r["released"] for r in together] == [True, None, None, None, None, True, False]
    assert together == one_by_one
    assert after_together == after_one_by_one
    replied = {m[0]: m for m in after_together["messages"]}
    assert replied["wamid.R1"][5:] == ("wamid.OUT-R1", "delivered")
    errors = {c[0]: c[4] for c in after_together["conversations"]}
    assert errors[fails] == 1


async def test_a_batch_with_two_items_of_one_conversation_runs_them_one_after_the_other(
    pool: asyncpg.Pool,
) -> None:
    c = await conversation(pool, "15550000001", "wamid.D1", "wamid.D2")
    rows = await pool.fetch(
        "SELECT * FROM wa_claim_turns($1, $2, $3, $4)",
        [c, c],
        ["first", "second"],
        ACTIVE_FROM,
        IDLE_FROM,
    )
    # The second claim took the conversation over from the first, and resumed its turn.
    by_item = {r["ord"]: r for r in rows}
    assert by_item[2]["claimed"] == by_item[1]["claimed"] + 1
    assert (by_item[1]["message_id"], by_item[1]["resumed"]) == ("wamid.D1", False)
    assert (by_item[2]["message_id"], by_item[2]["resumed"]) == ("wamid.D1", True)


def save(
    c: int, token: int, message_id: str, *words: str, keep: int = 20, **changes: Any
) -> saves.Save:
    """A turn's save: its question and answer appended to the context."""
    fields: dict[str, Any] = {
        "conversation_id": c,
        "token": token,
        "message_id": message_id,
        "agent_type": "concierge",
        "previous_agent_type": "concierge",
        "appended": [{"role": "user", "content": w} for w in words],
        "keep": keep,
        "token_count": 7 * len(words),
        "reply_text": f"answer to {message_id}",
        "tokens_in": 11,
        "tokens_out": 13,
        "latency_ms": 17,
        "correlation_id": f"cor-{message_id}",
        "send_started": False,
    }
    return saves.Save(**(fields | changes))


async def test_a_batch_of_saves_does_what_each_save_does_alone(pool: asyncpg.Pool) -> None:
    grows, fresh, full, moved_on, burst = [
        await conversation(pool, f"1555000000{n}", f"wamid.G{n}", f"wamid.H{n}") for n in range(5)
    ]
    turns = {c: await started(pool, c) for c in (grows, fresh, full, moved_on, burst)}
    saver = saves.Saves(pool)
    try:
        # Contexts saved by earlier turns: a small entry, and one near its 1,800 bytes.
        for c in (grows, burst):
            await saver.save(save(c, turns[c][0], turns[c][1].message_id, "hello", "hi"))
        await saver.save(save(full, turns[full][0], turns[full][1].message_id, "x" * 1750))
    finally:
        await saver.close()
    await store.claim_turn(pool, moved_on, "newer")

    def turn(c: int, *words: str, **changes: Any) -> saves.Save:
        token, item = turns[c]
        return save(c, token, item.message_id, *words, **changes)

    batch = [
        turn(full, "more", "words", keep=1),  # a new entry; the full one falls out
        turn(moved_on, "late"),  # another holder since: nothing written
        save(999_999, 1, "wamid.nowhere", "lost"),  # no such conversation
        turn(fresh, "first", agent_type="support", previous_agent_type=None),  # routed
        turn(grows, "and", "again"),  # to the newest entry
        turn(
            burst,
            "one",
            "two",
            send_started=True,
            reply_payload={"type": "interactive"},
            absorbed=["wamid.H4"],
        ),
    ]
    async with pool.acquire() as conn:

        async def together() -> list[dict[str, Any]]:
            rows = await conn.fetch(saves.Q["save_turns"], batch)
            return [dict(r) for r in sorted(rows, key=lambda r: r["ord"])]

        async def alone() -> list[dict[str, Any]]:
            return [
                {"ord": n, "fence_token": await conn.fetchval(
                    saves.Q["save_turn"], *saves.save_turn_args(s)
                )}
                for n, s in enumerate(batch, 1)
            ]  # fmt: skip

        rows, after_together = await undone(conn, together)
        one_by_one, after_one_by_one = await undone(conn, alone)

    tokens = [turns[full][0], turns[moved_on][0] + 1, None, turns[fresh][0], turns[grows][0]]
    assert [r["fence_token"] for r in rows] == [*tokens, turns[burst][0]]
    assert rows == one_by_one
    assert after_together == after_one_by_one
    entries = [e[:3] for e in after_together["entries"]]
    assert (full, 2, 2) in entries and (full, 1, 1) not in entries
    assert (grows, 1, 4) in entries


# While a batch waits for a row another transaction holds, what that transaction commits is
# what the batch must build on; and a batch must take message rows in the order the status
# ingest takes them, or the two deadlock.


@pytest.fixture
async def two(database_url: str) -> AsyncIterator[tuple[Conn, Conn]]:
    """A connection holding what the test has it hold, and one for the batch (the services'
    own, with their JSON codecs)."""
    own = await db.create_pool(database_url, min_size=2, max_size=2)
    try:
        async with own.acquire() as holder, own.acquire() as batcher:
            yield holder, batcher
    finally:
        await own.close()


def status(outbound_id: str, wa_id: str, state: str, callback: str = "") -> Status:
    return Status(outbound_id, "100", wa_id, state, int(time.time()), "{}", callback_data=callback)


async def test_a_final_move_that_waited_for_a_status_keeps_what_the_status_stored(
    pool: asyncpg.Pool, two: tuple[Conn, Conn]
) -> None:
    holder, batcher = two
    a = await conversation(pool, "15550000001", "wamid.A1")
    b = await conversation(pool, "15550000002", "wamid.B1")
    ta, tb = (await started(pool, a))[0], (await started(pool, b))[0]
    # Meta's `delivered` for A's reply, with our callback data, is being stored as the turns
    # finish: it holds A's message.
    delivered = status("wamid.OUT-A", "15550000001", "delivered", callback="wamid.A1")
    tx = holder.transaction()
    await tx.start()
    await store.insert_statuses(holder, [(store.DeliveryIn([], [delivered], "cor", ""), delivered)])
    finishing = asyncio.create_task(
        batcher.fetch(
            "SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            ["wamid.A1", "wamid.B1"],
            [machine.REPLIED] * 2,
            machine.message_sources(machine.REPLIED),
            ["replied"] * 2,
            [ta, tb],
            ["", ""],
            [a, b],
            [False, False],
            ["wamid.OUT-A", None],
        )
    )
    await waiting_for_a_lock(pool, batcher.get_server_pid())
    await tx.commit()
    assert [r["finished"] for r in await asyncio.wait_for(finishing, 10)] == ["done", "done"]
    row = await pool.fetchrow(
        "SELECT status, reply_message_id, reply_status FROM processed_webhook_messages"
        " WHERE message_id = 'wamid.A1'"
    )
    assert row is not None and tuple(row) == ("replied", "wamid.OUT-A", "delivered")


async def test_a_save_that_waited_for_an_operators_answer_adds_to_the_context_after_it(
    pool: asyncpg.Pool, two: tuple[Conn, Conn]
) -> None:
    holder, batcher = two
    c = await conversation(pool, "15550000001", "wamid.C1")
    d = await conversation(pool, "15550000002", "wamid.D1")
    (tc, ic), (td, id_) = await started(pool, c), await started(pool, d)
    saver = saves.Saves(pool)
    try:
        await saver.save(save(c, tc, ic.message_id, "q0", "a0"))
    finally:
        await saver.close()
    # A person answers the customer meanwhile: the answer is being added to the context.
    reply_id = await pool.fetchval(
        operator.Q["store"], "key-1", c, "100", "ada", "a person here", "cor-op"
    )
    answer = {"role": "assistant", "content": "a person here", "operator": "ada"}
    tx = await holding(holder, operator.Q["sent"], reply_id, "wamid.OP", "concierge", [answer], 5)
    saving = asyncio.create_task(
        batcher.fetch(
            saves.Q["save_turns"],
            [save(c, tc, ic.message_id, "q1", "a1"), save(d, td, id_.message_id, "hello")],
        )
    )
    await waiting_for_a_lock(pool, batcher.get_server_pid())
    await tx.commit()
    await asyncio.wait_for(saving, 10)
    context = orjson.loads(await pool.fetchval("SELECT wa_context($1)", c))
    assert [m["content"] for m in context] == ["q0", "a0", "a person here", "q1", "a1"]


@pytest.mark.parametrize("step", ["claims", "final moves"])
async def test_a_batch_and_a_status_delivery_take_messages_in_one_order(
    pool: asyncpg.Pool, two: tuple[Conn, Conn], step: str
) -> None:
    """The batch waits for B's message, which another transaction holds; meanwhile a status
    delivery for replies of A and B comes. Each must wait for the other's rows in the same
    order, or PostgreSQL breaks the cycle by failing one (deadlock_timeout is 1 s)."""
    holder, batcher = two
    a = await conversation(pool, "15550000001", "wamid.A1", "wamid.A2")
    b = await conversation(pool, "15550000002", "wamid.B1")
    ta, tb = (await started(pool, a))[0], (await started(pool, b))[0]
    # Replies sent and recorded by the agent, B's and one of A: of the message its claim
    # resumes, or of the one its next turn starts.
    answered = "wamid.A1" if step == "claims" else "wamid.A2"
    await pool.fetch(
        AGENT_Q["record_unanswered_sends"], [answered, "wamid.B1"], ["wamid.OUT-A", "wamid.OUT-B"]
    )
    if step == "claims":
        # A's holder died mid-turn (its turn is taken over); B was handed to a person.
        await pool.fetchval(handoff.Q["hand_off"], b, tb, "wamid.B1", "support", "cor")
        batch = batcher.fetch(
            "SELECT * FROM wa_claim_turns($1, $2, $3, $4)", [a, b], ["me", "me"], ACTIVE_FROM,
            IDLE_FROM,
        )  # fmt: skip
    else:
        batch = batcher.fetch(
            "SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            ["wamid.A1", "wamid.B1"], [machine.REPLIED] * 2,
            machine.message_sources(machine.REPLIED), ["replied"] * 2, [ta, tb], ["", ""],
            [a, b], [True, False], [None, None], IDLE_FROM,
        )  # fmt: skip
    tx = await holding(
        holder, "SELECT 1 FROM processed_webhook_messages WHERE message_id = 'wamid.B1' FOR UPDATE"
    )
    batching = asyncio.create_task(batch)
    await waiting_for_a_lock(pool, batcher.get_server_pid())
    statuses = [
        status("wamid.OUT-A", "15550000001", "sent"),
        status("wamid.OUT-B", "15550000002", "sent"),
    ]
    storing = asyncio.create_task(store.ingest(pool, [], statuses, "c", ""))
    await waiters(pool, 2)
    await tx.commit()
    rows = await asyncio.wait_for(batching, 10)
    await asyncio.wait_for(storing, 10)
    by_item = {r["ord"]: r for r in rows}
    if step == "claims":
        assert (by_item[1]["outcome"], by_item[1]["resumed"]) == ("started", True)
        assert by_item[2]["outcome"] == "none"  # held for the person
    else:
        assert [by_item[n]["finished"] for n in (1, 2)] == ["done", "done"]
        assert by_item[1]["message_id"] == "wamid.A2"


async def test_each_batch_runs_as_its_services_role(pool: asyncpg.Pool, database_url: str) -> None:
    """Connected as the state and agent services are (db/privileges.sql): a batch refused for
    want of a right would fall back, item by item, to the single functions, unseen."""
    urls = await roles.provision(database_url)
    a = await conversation(pool, "15550000001", "wamid.A1")
    b = await conversation(pool, "15550000002", "wamid.B1")
    state = await db.create_pool(urls["state"], min_size=1, max_size=1)
    agent = await db.create_pool(urls["agent"], min_size=1, max_size=1)
    try:
        claimed = await by_item(
            state, "SELECT * FROM wa_claim_turns($1, $2, $3, $4)", [a, b], ["me", "me"],
            ACTIVE_FROM, IDLE_FROM,
        )  # fmt: skip
        assert [r["outcome"] for r in claimed] == ["started", "started"]
        tokens = [r["claimed"] for r in claimed]
        saved = await agent.fetch(
            saves.Q["save_turns"],
            [
                save(c, t, m, "hi")
                for c, t, m in zip([a, b], tokens, ["wamid.A1", "wamid.B1"], strict=True)
            ],
        )
        assert sorted(r["fence_token"] for r in saved) == sorted(tokens)
        finished = await by_item(
            state,
            "SELECT * FROM wa_finish_turns($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            ["wamid.A1", "wamid.B1"], [machine.REPLIED] * 2,
            machine.message_sources(machine.REPLIED), ["replied"] * 2, tokens, ["", ""],
            [a, b], [True, True], ["wamid.OUT-A", "wamid.OUT-B"], IDLE_FROM,
        )  # fmt: skip
        assert [(r["finished"], r["released"]) for r in finished] == [("done", True)] * 2
    finally:
        await state.close()
        await agent.close()


async def test_a_redrive_waits_for_the_batch_that_holds_its_conversation(
    pool: asyncpg.Pool, two: tuple[Conn, Conn]
) -> None:
    """A message made to wait again (a redrive) while a batch of claims holds its conversation
    waits for the batch: the batch starts what waited when it looked, with its locks taken
    first, and the redriven message is the next turn's."""
    holder, batcher = two
    c = await conversation(pool, "15550000001", "wamid.M1")
    token, item = await started(pool, c)
    await store.finish_turn(
        pool, item, machine.FAILED, "gave up", token, start_next=True, release=True
    )
    await conversation(pool, "15550000001", "wamid.M2")
    # M2's row is held elsewhere (a status webhook being stored), so the claim waits for it,
    # holding the conversation.
    tx = await holding(
        holder, "SELECT 1 FROM processed_webhook_messages WHERE message_id = 'wamid.M2' FOR UPDATE"
    )
    claiming = asyncio.create_task(
        batcher.fetch(
            "SELECT * FROM wa_claim_turns($1, $2, $3, $4)", [c], ["me"], ACTIVE_FROM, IDLE_FROM
        )
    )
    await waiting_for_a_lock(pool, batcher.get_server_pid())
    redriving = asyncio.create_task(
        store.transition(pool, "wamid.M1", machine.RECEIVED, "redriven", sources=store.REDRIVABLE)
    )
    await waiters(pool, 2)
    assert not redriving.done()
    await tx.commit()
    (claimed,) = await asyncio.wait_for(claiming, 10)
    assert (claimed["outcome"], claimed["message_id"]) == ("started", "wamid.M2")
    assert await asyncio.wait_for(redriving, 10) == machine.FAILED
    waiting = await pool.fetch(
        "SELECT message_id, status FROM processed_webhook_messages ORDER BY id"
    )
    assert [tuple(r) for r in waiting] == [("wamid.M1", "received"), ("wamid.M2", "processing")]
