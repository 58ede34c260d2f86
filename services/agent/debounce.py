"""Quick bursts become one turn: customers often send three short messages in a row.

With `debounce_seconds` set on the conversation's agent type, the turn of its oldest waiting
message M (the state service holds the conversation, so no other turn of it runs meanwhile)
first waits until the newest waiting message has been stored that long (the database's own
ingestion time: WhatsApp's timestamps are the sender's clock), then takes M and the
conversation's text messages waiting after it, in order, and the turn answers them together.
Which ones is saved with M's reply (wa_save_turn, fenced), so a run of the turn resumed after a
crash answers the same burst without calling the model again; the state service moves them to
replied with M (wa_finish_turn).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from common import sqlfile

from .deadline import Deadline

log = logging.getLogger(__name__)
Q = sqlfile.load("services.agent", "queries.sql")

# Messages answered by one turn, M included: one reply cannot answer a backlog sensibly, and the
# rest get turns of their own.
MAX_BURST = 20
# The whole wait, in quiet windows: a customer who never pauses is answered anyway.
MAX_WINDOWS = 3
# Of what remains of the turn, the share the wait may take (the model and the send need the rest).
WAIT_SHARE = 0.25
# What a burst is made of: text, read as it is stored. Any other kind (a choice, media, a voice
# note: services/agent/inbound.py) ends the burst and gets its own turn, as does a message that
# had a turn before (back from a failure or a redrive): answering what comes after it first
# would answer out of order.
KINDS = frozenset({"text"})


@dataclass(frozen=True)
class Burst:
    """The messages a turn answers after M, in the order they are read, and their texts."""

    message_ids: tuple[str, ...]
    texts: tuple[str, ...]


NONE = Burst((), ())


async def settle(
    pool: asyncpg.Pool, conversation_id: int, seconds: float, deadline: Deadline
) -> None:
    """Returns once the conversation's newest waiting message was stored `seconds` ago, or when
    the wait's bounds (MAX_WINDOWS of it, WAIT_SHARE of the turn) are reached."""
    until = time.monotonic() + min(seconds * MAX_WINDOWS, deadline.remaining() * WAIT_SHARE)
    while True:
        quiet = await pool.fetchval(Q["burst_quiet_seconds"], conversation_id)
        left = seconds - (seconds if quiet is None else float(quiet))
        now = time.monotonic()
        if left <= 0 or now >= until:
            return
        await asyncio.sleep(min(left, until - now))


async def gather(
    pool: asyncpg.Pool, conversation_id: int, message_id: str, seconds: float, deadline: Deadline
) -> Burst:
    """The burst the turn of `message_id` answers besides it (NONE when nothing else waits)."""
    await settle(pool, conversation_id, seconds, deadline)
    rows = await pool.fetch(Q["burst"], message_id, MAX_BURST - 1)
    end = next(
        (i for i, r in enumerate(rows) if r["message_type"] not in KINDS or r["attempts"]),
        len(rows),
    )
    rows = rows[:end]
    if not rows:
        return NONE
    log.info(
        "answering a debounced burst in one turn",
        extra={"message_id": message_id, "burst": len(rows) + 1},
    )
    return Burst(
        tuple(str(r["message_id"]) for r in rows), tuple(str(r["body"] or "") for r in rows)
    )
