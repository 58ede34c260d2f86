"""Human handoff, the state service's part (README, "Human handoff").

A turn answered by a handoff agent type (its result says `handoff`) hands its conversation to
a person: the turn's final transition and the handoff are one transaction. From then on the
turn-start function (`wa_start_turn`, db/migrations/0017) starts no turn for it: whatever waits
ends skipped, "waiting for a person", until an operator releases it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from common import customers, sqlfile

from . import store

log = logging.getLogger(__name__)
Q = sqlfile.load("services.state", "handoff.sql")

# Waiting messages listed per conversation (the count says how many there are).
WAITING_SHOWN = 20


class NotHandedOff(Exception):
    """The conversation is not waiting for a person."""


async def finish_handing_off(
    pool: asyncpg.Pool,
    item: store.WorkItem,
    to_state: str,
    reason: str,
    token: int,
    *,
    start_next: bool,
    agent_type: str = "",
    absorbed: tuple[str, ...] = (),
) -> store.Finished:
    """`store.finish_turn`, the conversation handed off to a person in the same transaction
    (the next turn it looks for is then none: what waits is held for the person)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.fetchval(
            Q["hand_off"],
            item.conversation_id,
            token,
            item.message_id,
            agent_type or "handoff",
            item.correlation_id,
        )
        finished = await store.finish_turn(
            conn, item, to_state, reason, token, start_next=start_next, absorbed=absorbed
        )
    log.info("conversation handed off to a person", extra={"message_id": item.message_id})
    return finished


async def conversation_of(pool: asyncpg.Pool, customer: str, phone_number_id: str) -> int:
    """The conversation an operator names (raises customers.UnknownCustomer / Ambiguous)."""
    key = customers.key(customer)
    rows = await pool.fetch(Q["customer_conversations"], key, phone_number_id.strip())
    return int(customers.choose(rows, key, phone_number_id)["id"])


@dataclass(frozen=True)
class Released:
    conversation_id: int
    phone_number_id: str
    since: dt.datetime


async def release(
    pool: asyncpg.Pool, customer: str, phone_number_id: str, by: str, correlation_id: str = ""
) -> Released:
    """Gives the conversation back to the bot (audited with `by`); raises NotHandedOff."""
    conversation_id = await conversation_of(pool, customer, phone_number_id)
    row = await pool.fetchrow(Q["release_handoff"], conversation_id, by, correlation_id)
    if row is None:
        raise NotHandedOff(f"the conversation with {customer} is not waiting for a person")
    log.info(
        "conversation released to the bot",
        extra={"conversation_id": conversation_id, "released_by": by},
    )
    return Released(int(row["id"]), row["phone_number_id"], row["handoff_at"])


@dataclass(frozen=True)
class TakenOver:
    conversation_id: int
    phone_number_id: str
    since: dt.datetime
    already: bool


async def take_over(
    pool: asyncpg.Pool, customer: str, phone_number_id: str, by: str, correlation_id: str = ""
) -> TakenOver:
    """An operator takes the conversation from the bot (audited with `by`): from the next turn
    start on, what arrives waits for a person. A turn already in flight still ends."""
    conversation_id = await conversation_of(pool, customer, phone_number_id)
    row = await pool.fetchrow(Q["take_over"], conversation_id, by, correlation_id)
    if row is None:  # gone meanwhile (`wa forget`)
        raise customers.UnknownCustomer(f"no conversation with customer {customer}")
    if row["taken"]:
        log.info(
            "conversation taken over by an operator",
            extra={"conversation_id": conversation_id, "taken_by": by},
        )
    return TakenOver(int(row["id"]), row["phone_number_id"], row["handoff_at"], not row["taken"])


@dataclass(frozen=True)
class Waiting:
    conversation_id: int
    phone_number_id: str
    wa_id: str
    user_id: str
    username: str
    contact_name: str
    since: dt.datetime
    handoff_message_id: str
    waiting_count: int
    messages: list[dict[str, Any]] = field(default_factory=list)


async def waiting(pool: asyncpg.Pool, phone_number_id: str = "", limit: int = 100) -> list[Waiting]:
    rows = await pool.fetch(Q["list_handoffs"], phone_number_id, limit, WAITING_SHOWN)
    return [
        Waiting(
            conversation_id=int(r["id"]),
            phone_number_id=r["phone_number_id"],
            wa_id=r["wa_id"] or "",
            user_id=r["user_id"] or "",
            username=r["username"] or "",
            contact_name=r["contact_name"] or "",
            since=r["handoff_at"],
            handoff_message_id=r["handoff_message_id"] or "",
            waiting_count=int(r["waiting_count"] or 0),
            messages=list(r["messages"] or []),
        )
        for r in rows
    ]
