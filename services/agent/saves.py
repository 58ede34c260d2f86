"""A turn's save (its reply, context, session figures and burst: wa_save_turn and wa_save_burst),
coalesced with the saves of other turns that finish at the same time: one statement and one
commit for all of them (db/migrations/0023, wa_save_turns) instead of one each.

Each save keeps its own outcome: the conversation's fence token as its own statement would have
returned it (the turn's: saved; another: stale, nothing of that turn written). An idle agent
saves each turn alone, through the statement it always used; so does a batch whose statement
failed as a whole (a deadlock, or one save that raised), each of its saves again alone, so that
only the save that raises fails. The database being unreachable fails every save of the batch,
as it would have failed each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import asyncpg

from common import sqlfile
from common.coalesce import Coalescer

log = logging.getLogger(__name__)
Q = sqlfile.load("services.agent", "queries.sql")

# The database could not be reached: a turn that has not called the model yet did not run.
DB_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Save:
    """wa_save_turn's arguments (by its parameters' names, less `p_`) and the burst's."""

    conversation_id: int
    token: int
    message_id: str
    agent_type: str
    previous_agent_type: str | None
    # The turn's own context messages (its question and its answer), appended to the stored
    # context, which keeps the newest `keep` (db/migrations/0030).
    appended: list[dict[str, Any]]
    keep: int
    token_count: int
    reply_text: str
    tokens_in: int
    tokens_out: int
    latency_ms: int
    correlation_id: str
    send_started: bool
    reply_payload: dict[str, Any] | None = None
    absorbed: list[str] | None = None


class Saves:
    def __init__(self, pool: asyncpg.Pool, *, max_batch: int = 64, max_in_flight: int = 2) -> None:
        self.pool = pool
        self._coalescer: Coalescer[Save, int | None] = Coalescer(
            "agent_save_turn", self._run, max_batch=max_batch, max_in_flight=max_in_flight
        )

    async def save(self, save: Save) -> int | None:
        """The conversation's fence token after the save (saved only if it is the turn's)."""
        return await self._coalescer.submit(save)

    async def close(self) -> None:
        await self._coalescer.close()

    async def _run(self, batch: list[Save]) -> Sequence[int | BaseException | None]:
        if len(batch) == 1:
            return [await _outcome(self._one(batch[0]))]
        try:
            # The pool's jsonb codec is orjson, which writes a dataclass as an object of its
            # fields (no copy of the contexts, unlike dataclasses.asdict).
            rows = await self.pool.fetch(Q["save_turns"], batch)
        except DB_DOWN as exc:
            return [exc] * len(batch)
        except Exception as exc:  # a deadlock, or one save that raised: each alone
            log.warning(
                "a batch of %d saves failed (%r): each is saved again alone", len(batch), exc
            )
            return await asyncio.gather(*(_outcome(self._one(s)) for s in batch))
        fences: dict[int, int | None] = {row["ord"]: row["fence_token"] for row in rows}
        return [
            fences[n] if n in fences else RuntimeError("wa_save_turns returned no row for it")
            for n in range(1, len(batch) + 1)
        ]

    async def _one(self, s: Save) -> int | None:
        fence: int | None = await self.pool.fetchval(Q["save_turn"], *save_turn_args(s))
        return fence


def save_turn_args(s: Save) -> tuple[Any, ...]:
    """The arguments of the statement that saves one turn alone (queries.sql save_turn)."""
    return (
        s.conversation_id,
        s.token,
        s.message_id,
        s.agent_type,
        s.previous_agent_type,
        s.appended,
        s.token_count,
        s.reply_text,
        s.tokens_in,
        s.tokens_out,
        s.latency_ms,
        s.correlation_id,
        s.send_started,
        s.absorbed,
        s.reply_payload,
        s.keep,
    )


async def _outcome(call: Awaitable[int | None]) -> int | BaseException | None:
    try:
        result: int | None = await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return exc
    return result
