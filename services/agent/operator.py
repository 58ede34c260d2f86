"""An operator's answer to a customer (`wa reply`, the console): README, "Human handoff".

The same guarantees as a bot's reply. The answer is stored under the request's idempotency key
before it is sent, with its send marked as started; the send carries callback data naming it;
the id Meta gives it is recorded. A request repeated with the same key (a CLI retry, a double
click) finds the stored one: sent, it is not sent again; a send whose outcome is unknown (no
answer from the Graph API, or another request sending it right now) is never repeated blindly.
The 24-hour customer service window applies as to every free-form message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from common import customers, sqlfile

from . import limits, service_window, window
from .agents import AgentCatalog
from .backends import clean_text
from .deadline import UNBOUNDED, Deadline
from .graph import GraphClient, GraphError

log = logging.getLogger(__name__)
Q = sqlfile.load("services.agent", "operator.sql")

# How long a repeated request waits for the first one's send to be recorded.
DUPLICATE_WAIT_SECONDS = 5.0


class InvalidReply(ValueError):
    """The request cannot be sent as it is (no text, too long, no key)."""


class OutsideWindow(Exception):
    """The customer's last message is older than 24 hours: no free-form message may go."""


class SendUncertain(Exception):
    """An earlier request with this key may have sent the answer: not sent again."""


def window_refusal(last_customer_message_at: dt.datetime | None, now: dt.datetime) -> str | None:
    """Why a free-form message may not be sent now, or None: the turn's rule."""
    return service_window.check(last_customer_message_at, now)


@dataclass(frozen=True)
class OperatorSent:
    reply_message_id: str  # "" when recorded, not sent (no WHATSAPP_ACCESS_TOKEN)
    conversation_id: int
    phone_number_id: str
    duplicate: bool = False


class OperatorReplies:
    def __init__(self, pool: asyncpg.Pool, catalog: AgentCatalog, graph: GraphClient) -> None:
        self.pool = pool
        self.catalog = catalog
        self.graph = graph

    async def send(
        self,
        *,
        customer: str,
        phone_number_id: str,
        text: str,
        idempotency_key: str,
        operator: str,
        correlation_id: str = "",
        deadline: Deadline = UNBOUNDED,
    ) -> OperatorSent:
        if not idempotency_key.strip():
            raise InvalidReply("an idempotency key is required (one per operator action)")
        if "\x00" in text or "\x00" in idempotency_key or "\x00" in customer:
            # PostgreSQL's text cannot hold it (a customer's is dropped at the gateway).
            raise InvalidReply("the answer, key or customer contains a NUL character")
        try:
            limits.check_text(text)
        except limits.LimitError as exc:
            raise InvalidReply(str(exc)) from exc
        reply_id = 0
        earlier = await self.pool.fetchrow(Q["by_key"], idempotency_key)
        if earlier is not None:
            key = customers.key(customer)
            if earlier["body"] != text or key not in (earlier["wa_id"], earlier["user_id"]):
                raise InvalidReply(
                    "this idempotency key was used for another reply: use a new key per reply"
                )
            done = await self._earlier(earlier, deadline)
            if done is not None:
                return done
            # The earlier request's send definitely failed: this one sends it.
            if await self.pool.fetchval(Q["start_again"], earlier["id"]) is None:
                raise SendUncertain(UNCERTAIN)
            conv: asyncpg.Record = earlier
            reply_id = int(earlier["id"])
            conversation_id = int(earlier["conversation_id"])
            text = earlier["body"]
        else:
            key = customers.key(customer)
            rows = await self.pool.fetch(Q["customer_conversations"], key, phone_number_id.strip())
            conv = customers.choose(rows, key, phone_number_id)
            conversation_id = int(conv["id"])
        refusal = window_refusal(conv["last_message_at"], dt.datetime.now(dt.UTC))
        if refusal is not None:
            if earlier is not None:
                await self.pool.execute(Q["send_failed"], reply_id, "outside_window")
            raise OutsideWindow(refusal)
        if earlier is None:
            stored = await self.pool.fetchval(
                Q["store"],
                idempotency_key,
                conversation_id,
                conv["phone_number_id"],
                operator,
                text,
                correlation_id,
            )
            if stored is None:  # a concurrent request with the same key stored it first
                again = await self.pool.fetchrow(Q["by_key"], idempotency_key)
                done = await self._earlier(again, deadline) if again is not None else None
                if done is not None:
                    return done
                raise SendUncertain(UNCERTAIN)
            reply_id = int(stored)
        sent_id = ""
        if self.graph.enabled:
            try:
                sent = await self.graph.send_text(
                    conv["phone_number_id"],
                    conv["wa_id"] or "",
                    text,
                    callback_data=f"operator:{reply_id}",
                    deadline=deadline,
                    user_id=conv["user_id"] or "",
                )
            except GraphError as exc:
                if exc.status:  # Meta answered: nothing was delivered, a retry may send it
                    await self.pool.execute(Q["send_failed"], reply_id, exc.code)
                raise
            sent_id = sent.message_id
        else:
            log.info(
                "no WHATSAPP_ACCESS_TOKEN: operator reply recorded, not sent",
                extra={"conversation_id": conversation_id, "reply_chars": len(text)},
            )
        entry: dict[str, Any] = {"role": "assistant", "content": text, "operator": operator}
        entry["tokens"] = window.message_tokens(entry)
        # What the customer said to the person since the previous answer (held, never a turn's)
        # goes into the context before the answer: the bot, once released, knows what was asked.
        entries = [*await self._held_since(conversation_id, reply_id), entry]
        await self.pool.execute(
            Q["sent"],
            reply_id,
            sent_id,
            self.catalog.default,
            entries,
            sum(e["tokens"] for e in entries),
        )
        log.info(
            "operator reply sent",
            extra={"conversation_id": conversation_id, "reply_id": sent_id, "operator": operator},
        )
        return OperatorSent(sent_id, conversation_id, conv["phone_number_id"])

    async def _held_since(self, conversation_id: int, reply_id: int) -> list[dict[str, Any]]:
        """The customer's text held for a person since this conversation's previous operator
        answer, as the context's user messages, oldest first."""
        rows = await self.pool.fetch(Q["held_since_last_answer"], conversation_id, reply_id)
        return [window.user_message(clean_text(r["body"]), r["message_id"]) for r in rows]

    async def _earlier(self, row: asyncpg.Record, deadline: Deadline) -> OperatorSent | None:
        """What an earlier request with the same key did: sent (returned as a duplicate), being
        sent or of unknown outcome (SendUncertain, after waiting a little for it), or failed
        for sure (None: send it)."""
        until = time.monotonic() + min(DUPLICATE_WAIT_SECONDS, deadline.remaining() / 2)
        while True:
            if row["sent_at"] is not None:
                return OperatorSent(
                    row["sent_id"] or "",
                    int(row["conversation_id"]),
                    row["phone_number_id"],
                    duplicate=True,
                )
            if row["send_started_at"] is None:
                return None
            if time.monotonic() >= until:
                raise SendUncertain(UNCERTAIN)
            await asyncio.sleep(0.2)
            fresh = await self.pool.fetchrow(Q["by_key"], _key_of(row))
            if fresh is None:
                return None
            row = fresh


def _key_of(row: asyncpg.Record) -> str:
    return str(row["idempotency_key"])


UNCERTAIN = (
    "an earlier request with this idempotency key is sending this reply or may have sent it "
    "(the Graph API did not answer): it is not sent again; see `wa trace CUSTOMER`"
)
