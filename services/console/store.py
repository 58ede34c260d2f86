"""What the console's pages read, as the operator login role. Every query runs inside
`as_operator`, which names the logged-in operator for the transaction: row level security
(wa_operator_may, migrations 0012 and 0019) then returns only its numbers' rows, whatever a
query forgets to filter."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from common.db import Conn

PAGE = 50
OPEN_DLQ = ("pending", "retrying", "dead")
# Ceiling of one bulk action's "all matching" (the dry run says when it is reached).
BULK_MAX = 5000


@contextlib.asynccontextmanager
async def as_operator(pool: asyncpg.Pool, operator: str) -> AsyncIterator[Conn]:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('wa.console_operator', $1, true)", operator)
        yield conn


async def overview(conn: Conn) -> dict[str, Any]:
    """Messages per minute (the last hour), acknowledged-to-reply p95 per 5 minutes (the last
    hour), and the DLQ's depth and oldest open item."""
    per_minute = await conn.fetch(
        """SELECT g.minute, count(m.id) AS n
             FROM generate_series(date_trunc('minute', now()) - interval '59 minutes',
                                  date_trunc('minute', now()), interval '1 minute') AS g(minute)
             LEFT JOIN processed_webhook_messages m
               ON m.kind = 'message' AND m.received_at >= now() - interval '1 hour'
              AND date_trunc('minute', m.received_at) = g.minute
            GROUP BY g.minute ORDER BY g.minute"""
    )
    p95 = await conn.fetch(
        """SELECT g.bucket,
                  percentile_cont(0.95) WITHIN GROUP (
                      ORDER BY extract(epoch FROM m.finished_at - m.received_at)) AS p95
             FROM generate_series(now() - interval '60 minutes', now() - interval '5 minutes',
                                  interval '5 minutes') AS g(bucket)
             LEFT JOIN processed_webhook_messages m
               ON m.kind = 'message' AND m.status = 'replied'
              AND m.received_at >= now() - interval '1 hour'
              AND m.received_at >= g.bucket AND m.received_at < g.bucket + interval '5 minutes'
            GROUP BY g.bucket ORDER BY g.bucket"""
    )
    dlq = await conn.fetchrow(
        "SELECT count(*) AS depth, min(created_at) AS oldest FROM webhook_dlq "
        "WHERE status = ANY($1::text[])",
        list(OPEN_DLQ),
    )
    assert dlq is not None
    return {
        "per_minute": [int(r["n"]) for r in per_minute],
        "p95": [float(r["p95"]) if r["p95"] is not None else None for r in p95],
        "dlq_depth": int(dlq["depth"]),
        "dlq_oldest": dlq["oldest"],
    }


@dataclass(frozen=True)
class ConversationFilter:
    q: str = ""
    state: str = ""  # idle | active
    agent_type: str = ""
    number: str = ""  # business phone_number_id
    since_hours: float = 0.0
    # Keyset cursor: the last row of the previous page.
    before_at: datetime.datetime | None = None
    before_id: int = 0


async def conversations(conn: Conn, f: ConversationFilter) -> list[asyncpg.Record]:
    where = ["true"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if f.q:
        needle = f.q.strip().lstrip("+@")
        # A % or _ typed is looked for as itself, not as LIKE's wildcard.
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = arg(f"%{escaped}%")
        where.append(
            f"(c.wa_id = {arg(needle)} OR c.wa_id LIKE {like} OR c.contact_name ILIKE {like} "
            f"OR c.username ILIKE {like} OR c.user_id = {arg(needle)})"
        )
    if f.state:
        where.append(f"c.status = {arg(f.state)}")
    if f.number:
        where.append(f"c.phone_number_id = {arg(f.number)}")
    if f.since_hours > 0:
        where.append(
            f"c.last_activity_at >= now() - make_interval(secs => {arg(f.since_hours * 3600)})"
        )
    if f.agent_type:
        where.append(
            "EXISTS (SELECT 1 FROM processed_webhook_messages m WHERE m.conversation_id = c.id "
            f"AND m.agent_type = {arg(f.agent_type)})"
        )
    if f.before_at is not None:
        where.append(f"(c.last_activity_at, c.id) < ({arg(f.before_at)}, {arg(f.before_id)})")
    sql = f"""SELECT c.id, c.phone_number_id, c.wa_id, c.username, c.contact_name, c.status,
                     c.message_count, c.error_count, c.last_activity_at,
                     (SELECT m.body FROM processed_webhook_messages m
                       WHERE m.conversation_id = c.id AND m.kind = 'message'
                       ORDER BY m.received_at DESC LIMIT 1) AS last_text
                FROM webhook_conversations c
               WHERE {" AND ".join(where)}
               ORDER BY c.last_activity_at DESC, c.id DESC
               LIMIT {PAGE + 1}"""
    return list(await conn.fetch(sql, *args))


async def filter_choices(conn: Conn) -> dict[str, list[str]]:
    numbers = await conn.fetch(
        "SELECT DISTINCT phone_number_id FROM webhook_conversations ORDER BY 1 LIMIT 100"
    )
    agents = await conn.fetch(
        "SELECT DISTINCT agent_type FROM processed_webhook_messages "
        "WHERE agent_type IS NOT NULL AND received_at > now() - interval '7 days' "
        "ORDER BY 1 LIMIT 50"
    )
    classes = await conn.fetch(
        "SELECT DISTINCT error_class FROM webhook_dlq WHERE status = ANY($1::text[]) "
        "ORDER BY 1 LIMIT 50",
        list(OPEN_DLQ),
    )
    return {
        "numbers": [r[0] for r in numbers],
        "agents": [r[0] for r in agents],
        "error_classes": [r[0] for r in classes],
    }


async def conversation(conn: Conn, conversation_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, phone_number_id, wa_id, user_id, username, contact_name, status, "
        "message_count, error_count, last_activity_at, created_at, handoff_at "
        "FROM webhook_conversations WHERE id = $1",
        conversation_id,
    )


async def messages(conn: Conn, conversation_id: int, limit: int = 200) -> list[asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT m.message_id, m.message_type, m.body, m.status, m.status_reason, m.agent_type,
                  m.reply_text, m.reply_status, m.reply_error_code, m.received_at,
                  m.finished_at, m.traceparent,
                  (SELECT d.id FROM webhook_dlq d WHERE d.message_id = m.message_id
                    ORDER BY d.id DESC LIMIT 1) AS dlq_id
             FROM processed_webhook_messages m
            WHERE m.conversation_id = $1 AND m.kind = 'message'
            ORDER BY m.received_at DESC, m.id DESC LIMIT $2""",
        conversation_id,
        limit,
    )
    return list(reversed(rows))


async def transitions(conn: Conn, conversation_id: int, limit: int = 100) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT created_at, entity, message_id, from_state, to_state, reason "
            "FROM conversation_state_transitions WHERE conversation_id = $1 "
            "ORDER BY created_at DESC, id DESC LIMIT $2",
            conversation_id,
            limit,
        )
    )


@dataclass(frozen=True)
class DlqFilter:
    status: str = ""  # "" = every open status
    error_class: str = ""
    since_hours: float = 0.0
    message_id: str = ""  # one message's items (a conversation page links to them)


def _dlq_where(f: DlqFilter) -> tuple[str, list[Any]]:
    args: list[Any] = [[f.status] if f.status else list(OPEN_DLQ)]
    where = ["d.status = ANY($1::text[])"]
    if f.error_class:
        args.append(f.error_class)
        where.append(f"d.error_class = ${len(args)}")
    if f.since_hours > 0:
        args.append(f.since_hours * 3600)
        where.append(f"d.created_at >= now() - make_interval(secs => ${len(args)})")
    if f.message_id:
        args.append(f.message_id)
        where.append(f"d.message_id = ${len(args)}")
    return " AND ".join(where), args


# Dead letters a page lists, newest first.
DLQ_SHOWN = 100


async def dlq_items(conn: Conn, f: DlqFilter, limit: int = DLQ_SHOWN) -> list[asyncpg.Record]:
    where, args = _dlq_where(f)
    return list(
        await conn.fetch(
            f"""SELECT d.id, d.message_id, d.conversation_id, d.status, d.attempts,
                       d.error_class, d.error_message, d.created_at, d.next_attempt_at,
                       c.wa_id, c.username, c.phone_number_id
                  FROM webhook_dlq d LEFT JOIN webhook_conversations c
                    ON c.id = d.conversation_id
                 WHERE {where} ORDER BY d.id DESC LIMIT {int(limit)}""",
            *args,
        )
    )


async def dlq_matching_ids(conn: Conn, f: DlqFilter) -> list[int]:
    """Every matching item this operator may see (at most BULK_MAX): a bulk action's ids."""
    where, args = _dlq_where(f)
    rows = await conn.fetch(
        f"SELECT d.id FROM webhook_dlq d WHERE {where} ORDER BY d.id LIMIT {BULK_MAX}", *args
    )
    return [r[0] for r in rows]


async def visible_dlq_ids(conn: Conn, ids: list[int]) -> list[int]:
    """Of these ids, those the operator may see: what it may act on."""
    rows = await conn.fetch("SELECT id FROM webhook_dlq WHERE id = ANY($1::bigint[])", ids)
    return sorted(r[0] for r in rows)


async def audit(conn: Conn, limit: int = 50) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT at, operator, action, target, phone_number_id, detail FROM wa_console_audit "
            "ORDER BY at DESC, id DESC LIMIT $1",
            limit,
        )
    )


async def handoffs(conn: Conn, limit: int = 100) -> list[dict[str, Any]]:
    """Conversations waiting for a person (migration 0017's handoff_at), oldest first, each
    with the messages that arrived since (at most 20)."""
    rows = await conn.fetch(
        "SELECT id, phone_number_id, wa_id, user_id, username, contact_name, handoff_at "
        "FROM webhook_conversations WHERE handoff_at IS NOT NULL "
        "ORDER BY handoff_at, id LIMIT $1",
        limit,
    )
    out = []
    for r in rows:
        waiting = await conn.fetch(
            "SELECT message_id, message_type, body, received_at FROM processed_webhook_messages "
            "WHERE conversation_id = $1 AND kind = 'message' AND received_at >= $2 "
            "ORDER BY received_at, id LIMIT 20",
            r["id"],
            r["handoff_at"],
        )
        out.append({**dict(r), "waiting": [dict(w) for w in waiting]})
    return out


async def operator_replies(
    conn: Conn, conversation_id: int, limit: int = 200
) -> list[asyncpg.Record]:
    """Answers operators sent in this conversation (migration 0017), oldest first."""
    rows = await conn.fetch(
        "SELECT operator, body, sent_id, error_code, created_at FROM operator_replies "
        "WHERE conversation_id = $1 ORDER BY id DESC LIMIT $2",
        conversation_id,
        limit,
    )
    return list(reversed(rows))
