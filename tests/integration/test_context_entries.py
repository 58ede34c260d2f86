"""A conversation's context as entries (db/migrations/0030): a turn's save appends its own
messages and drops those past the bound, whatever the conversation's length; the context reads
back as one JSON array, in order, whoever wrote to it meanwhile."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from common import db
from services.agent import operator


async def _conversation(pool: asyncpg.Pool) -> tuple[int, int]:
    """A conversation and its fence token."""
    row = await pool.fetchrow(
        "INSERT INTO webhook_conversations (phone_number_id, wa_id) VALUES ('1', '2')"
        " RETURNING id, fence_token"
    )
    assert row is not None
    return int(row["id"]), int(row["fence_token"])


async def _context(pool: asyncpg.Pool, conversation: int) -> list[object]:
    text = await pool.fetchval("SELECT (SELECT c FROM wa_context($1) c)", conversation)
    return list(orjson.loads(text)) if text else []


_SAVE = (
    "SELECT wa_save_turn($1, $2, $3, 'a', 'a', $4::text::json, $5, 0, 'r', 0, 0, 0, 'c',"
    " false, NULL)"
)


async def _wal_bytes(conn: db.Conn, *args: object) -> int:
    """The WAL one save writes, its functions' statements included (this backend's alone)."""
    out = await conn.fetchval("EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + _SAVE, *args)
    plan = orjson.loads(out) if isinstance(out, str) else out
    return int(plan[0]["Plan"].get("WAL Bytes", 0))


async def test_a_turns_save_writes_its_own_messages_not_the_whole_context(
    pool: asyncpg.Pool,
) -> None:
    # db/migrations/0030: the context was one value that every save wrote whole (15 kB and
    # more once a conversation reached AGENT_CONTEXT_MAX_MESSAGES); a save now adds the turn's
    # messages to an entry of at most 1,800 bytes and drops the entries past the bound,
    # whatever the conversation's length.
    conversation, token = await _conversation(pool)
    keep, said = 50, []
    async with pool.acquire() as conn:
        wal = []
        for turn in range(60):
            pair = [
                {"role": "user", "content": f"q{turn} " + "x" * 300, "tokens": 80},
                {"role": "assistant", "content": f"a{turn} " + "y" * 300, "tokens": 80},
            ]
            said += pair
            args = (conversation, token, f"m{turn}", orjson.dumps(pair).decode(), keep)
            if turn < 55:
                assert await conn.fetchval(_SAVE, *args) == token
            else:
                wal.append(await _wal_bytes(conn, *args))
        # Read as wa_start_turn and the agent's turn_state read it: written into the statement
        # (one-row set-returning SQL), not called (track_functions counts what is called).
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'all'")
            stored = await conn.fetchval("SELECT (SELECT c FROM wa_context($1) c)", conversation)
            called = await conn.fetch("SELECT funcname FROM pg_stat_xact_user_functions")
        assert "wa_context" not in {r["funcname"] for r in called}, called
    # The newest `keep`, and of older ones only the rest of the entry across the bound: a turn
    # of two 300-byte messages fills an entry with the next one (four messages).
    context = orjson.loads(stored)
    assert context[-keep:] == said[-keep:] and keep <= len(context) < keep + 4, len(context)
    rows = await pool.fetch(
        "SELECT seq, n, octet_length(messages) AS size FROM agent_context_entries"
        " WHERE conversation_id = $1 ORDER BY seq",
        conversation,
    )
    assert [(r["seq"], r["n"]) for r in rows] == [(s, 4) for s in range(69, 121, 4)], rows
    assert all(r["size"] < 1800 for r in rows)
    # At most one entry of 1,800 bytes written, one deleted, the counters: a few kilobytes
    # (the least of five, should a checkpoint make one save write whole pages), where the
    # context alone is over 15 kB.
    assert min(wal) < 6000 < len(stored), (wal, len(stored))


async def test_an_entry_takes_messages_for_a_day_at_most(pool: asyncpg.Pool) -> None:
    """Retention deletes an entry by the day it began (db/migrations/0031): a save adds to
    the newest entry only while it is younger than a day."""
    conversation, token = await _conversation(pool)
    pair = orjson.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    for turn in range(2):
        await pool.fetchval(_SAVE, conversation, token, f"m{turn}", pair.decode(), 100)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM agent_context_entries WHERE conversation_id = $1", conversation
        )
        == 1
    )
    await pool.execute(
        "UPDATE agent_context_entries SET created_at = now() - interval '25 hours'"
        " WHERE conversation_id = $1",
        conversation,
    )
    await pool.fetchval(_SAVE, conversation, token, "m2", pair.decode(), 100)
    rows = await pool.fetch(
        "SELECT seq, n FROM agent_context_entries WHERE conversation_id = $1 ORDER BY seq",
        conversation,
    )
    assert [tuple(r) for r in rows] == [(1, 4), (5, 2)]
    assert len(await _context(pool, conversation)) == 6


async def test_a_context_entry_is_refused_unless_the_context_stays_valid_json(
    pool: asyncpg.Pool,
) -> None:
    # A context is read as its entries joined by commas between brackets (wa_context).
    conversation, token = await _conversation(pool)
    await pool.execute(
        "INSERT INTO agent_contexts (conversation_id, agent_type) VALUES ($1, 'a')", conversation
    )
    insert = (
        "INSERT INTO agent_context_entries (conversation_id, seq, n, messages)"
        " VALUES ($1, $2, $3, $4)"
    )
    for n, bad in enumerate(["", '{"a": 1},', "[1],[2", '{"a": '], start=1):
        with pytest.raises((asyncpg.CheckViolationError, asyncpg.InvalidTextRepresentationError)):
            await pool.execute(insert, conversation, n, 1, bad)
    await pool.execute(insert, conversation, 2, 2, '{"a": 1}, {"b": 2}')
    await pool.execute(insert, conversation, 4, 1, '"c"')
    context = await _context(pool, conversation)
    assert context == [{"a": 1}, {"b": 2}, "c"]
    with pytest.raises(asyncpg.RaiseError, match="not a JSON array"):
        await pool.fetchval(_SAVE, conversation, token, "m", '{"role": "user"}', 10)
    # Nothing to append: no entry, the context as it was.
    assert await pool.fetchval(_SAVE, conversation, token, "m", "[]", 10) == token
    assert await _context(pool, conversation) == context


async def test_an_operators_reply_sent_while_a_turn_runs_stays_in_the_context(
    pool: asyncpg.Pool,
) -> None:
    # The turn read its context before the operator's reply was added (a handoff while the
    # bot answered); its save appends to the context instead of writing back what it read.
    conversation, token = await _conversation(pool)

    def turn(n: int) -> str:
        return orjson.dumps(
            [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]
        ).decode()

    assert await pool.fetchval(_SAVE, conversation, token, "m1", turn(1), 100) == token
    read_by_the_turn = await _context(pool, conversation)
    reply = await pool.fetchval(
        operator.Q["store"], "key-1", conversation, "1", "ann", "A person here.", "c"
    )
    person = {"role": "assistant", "content": "A person here.", "tokens": 7}
    await pool.execute(operator.Q["sent"], reply, "wamid.op", "concierge", [person], 7)
    assert await pool.fetchval(_SAVE, conversation, token, "m2", turn(2), 100) == token
    assert await _context(pool, conversation) == [
        *read_by_the_turn,
        person,
        *orjson.loads(turn(2)),
    ]
    assert (
        await pool.fetchval(
            "SELECT last_seq FROM agent_contexts WHERE conversation_id = $1", conversation
        )
        == 5
    )


async def test_a_turns_context_statements_use_the_key_on_a_million_entries(
    pool: asyncpg.Pool,
) -> None:
    # 20,000 conversations of 50 entries each. PL/pgSQL runs wa_save_turn's and wa_start_turn's
    # statements with generic plans: each is checked as one, its parameters unknown.
    await pool.execute(
        """
        INSERT INTO webhook_conversations (id, phone_number_id, wa_id, customer_id)
        SELECT i, '1', '1555' || i, '1555' || i FROM generate_series(1, 20000) i;
        INSERT INTO agent_contexts (conversation_id, agent_type, last_seq)
        SELECT i, 'concierge', 100 FROM generate_series(1, 20000) i;
        INSERT INTO agent_context_entries (conversation_id, seq, n, messages)
        SELECT c, 2 * s - 1, 2,
               '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}'
          FROM generate_series(1, 50) s, generate_series(1, 20000) c;
        ANALYZE agent_context_entries;
    """,
        timeout=300,
    )
    statements = {
        "read": "SELECT (SELECT c FROM wa_context($1) c)",
        "prune": "DELETE FROM agent_context_entries x"
        " WHERE x.conversation_id = $1 AND x.seq <= $2::bigint - $3::integer",
    }
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        for name, sql in statements.items():
            await conn.execute(f"PREPARE {name} AS {sql}")
        plans = {
            "read": await conn.fetch("EXPLAIN EXECUTE read(7777)"),
            "prune": await conn.fetch("EXPLAIN EXECUTE prune(7777, 100, 60)"),
        }
    for name, rows in plans.items():
        plan = "\n".join(r[0] for r in rows)
        assert "agent_context_entries_pkey" in plan and "Seq Scan" not in plan, (name, plan)
    context = await _context(pool, 7777)
    assert len(context) == 100 and context[0] == {"role": "user", "content": "q"}
