"""The state service's tables: ingest, turns, transitions and timelines, all fenced and audited."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from opentelemetry import trace

from common import retry, sqlfile, telemetry
from common.coalesce import Coalescer
from common.db import Conn
from common.domain import Event, Message, Status, TurnRequest

from . import machine, metrics

log = logging.getLogger(__name__)
Q = sqlfile.load("services.state", "queries.sql")


class StaleFence(Exception):
    """A turn's fencing token is no longer the conversation's: a later holder owns it."""


class UnknownMessage(Exception):
    pass


@dataclass(frozen=True)
class Ingested:
    message_id: str
    conversation_id: int
    status: str  # received / skipped, or "" for a duplicate
    duplicate: bool


@dataclass(frozen=True, kw_only=True)
class WorkItem(TurnRequest):
    """A claimed message: the turn the agent is asked for, and what the driver needs."""

    id: int
    type: str
    timestamp: int
    traceparent: str
    attempts: int
    contact_name: str
    resumed: bool = False
    turn_resumes: int = 0
    username: str = ""  # the customer's, for logs (wa_id may be "" without it)


@dataclass
class Timeline:
    messages: list[asyncpg.Record] = field(default_factory=list)
    transitions: list[asyncpg.Record] = field(default_factory=list)
    customer: asyncpg.Record | None = None


# What the agent answers (services/agent/inbound.py reads each kind: a choice, a caption, a
# transcript, a location...; what it cannot read gets the fallback reply, never silence).
ANSWERED_TYPES = frozenset(
    {
        "text",
        "interactive",
        "button",
        "image",
        "video",
        "document",
        "audio",
        "sticker",
        "location",
        "contacts",
        "order",
        "unsupported",
        "unknown",
    }
)
# Recorded, never answered, and why.
NOT_ANSWERED = {
    "reaction": "reactions are recorded, not answered",
}


def skip_reason(message_type: str) -> str:
    """Why a message is stored but not answered ("" when it is answered)."""
    if message_type in ANSWERED_TYPES:
        return ""
    return NOT_ANSWERED.get(message_type, f"message type {message_type!r} is not answered")


# 9999-12-31T23:59:59Z, the last second a datetime holds.
MAX_TIMESTAMP = 253_402_300_799


def _ts(seconds: int) -> dt.datetime:
    """The WhatsApp timestamp, or now when there is none a datetime can hold (the gateway has
    then recorded why the message is skipped)."""
    if not 0 < seconds <= MAX_TIMESTAMP:
        return dt.datetime.now(dt.UTC)
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


@dataclass(frozen=True)
class DeliveryIn:
    messages: list[Message]
    statuses: list[Status]
    correlation_id: str
    traceparent: str
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class DeliveryOut:
    results: list[Ingested]
    statuses_stored: int
    events_stored: int = 0


async def ingest(
    pool: asyncpg.Pool,
    messages: list[Message],
    statuses: list[Status],
    correlation_id: str,
    traceparent: str,
) -> tuple[list[Ingested], int]:
    """Stores one delivery (`ingest_many`)."""
    (out,) = await ingest_many(pool, [DeliveryIn(messages, statuses, correlation_id, traceparent)])
    return out.results, out.statuses_stored


async def ingest_many(pool: asyncpg.Pool, deliveries: list[DeliveryIn]) -> list[DeliveryOut]:
    """Stores several deliveries, in one statement per kind of event (messages, statuses
    and, rarely, customer events).

    The statuses are stored first, in a statement of their own; then the customer's events
    and messages, together or not at all. A status locks the messages its reply answered, and
    a batch of turns' final statements takes each conversation's row before its messages': in
    one transaction with the messages' conversation rows, a status could hold a conversation
    that batch waits for while waiting for a message the batch holds (a deadlock PostgreSQL
    breaks after deadlock_timeout by failing one of them). When either fails the call fails,
    and storing again is idempotent; statuses first, so that a failure never leaves messages
    stored whose retry would find them duplicates (a duplicate wakes no conversation)."""
    messages = [(d, m) for d in deliveries for m in d.messages]
    statuses = [(d, s) for d in deliveries for s in d.statuses]
    events = [(d, e) for d in deliveries for e in d.events]
    async with pool.acquire() as conn:
        stored = await insert_statuses(conn, statuses) if statuses else set()
        # One statement is atomic by itself: no BEGIN/COMMIT round trips.
        # Customer events are stored and applied together or not at all (a stored event is a
        # duplicate when Meta retries it, so it must not be stored unapplied).
        async with conn.transaction() if events else contextlib.nullcontext():
            if not events:
                rows = await _insert_messages(conn, messages) if messages else []
                applied: set[str] = set()
            else:
                rows, applied = await _around_events(conn, messages, events)
    seen: set[str] = set()
    results: dict[int, list[Ingested]] = {id(d): [] for d in deliveries}
    for (d, m), row in zip(messages, rows, strict=True):
        status = row["status"] or ""
        # A second copy inside the same batch is a duplicate too.
        duplicate = not status or m.message_id in seen
        seen.add(m.message_id)
        results[id(d)].append(
            Ingested(m.message_id, row["conversation_id"], "" if duplicate else status, duplicate)
        )
    counts: dict[int, int] = {id(d): 0 for d in deliveries}
    for d, st in statuses:
        key = f"status:{st.message_id}:{st.status}"
        if key in stored:
            counts[id(d)] += 1
            stored.discard(key)
    event_counts: dict[int, int] = {id(d): 0 for d in deliveries}
    for d, ev in events:
        if ev.event_id in applied:
            event_counts[id(d)] += 1
            applied.discard(ev.event_id)
    return [DeliveryOut(results[id(d)], counts[id(d)], event_counts[id(d)]) for d in deliveries]


async def _around_events(
    conn: Conn,
    messages: list[tuple[DeliveryIn, Message]],
    events: list[tuple[DeliveryIn, Event]],
) -> tuple[list[asyncpg.Record], set[str]]:
    """The messages' rows (in order) and the events stored now. A changed BSUID or number
    applies from its own moment: the messages sent before it (a text just before the change,
    in the same delivery or batch) are stored first, under the key they name, in the
    conversation the change then moves; the others after it, so that they find their
    conversation under the new key."""
    changes = [e.timestamp for _, e in events if e.kind == "user_id_update"]
    cut = min(changes) if changes else 0
    early = [i for i, (_, m) in enumerate(messages) if m.timestamp < cut]
    late = [i for i, (_, m) in enumerate(messages) if m.timestamp >= cut]
    rows: list[asyncpg.Record | None] = [None] * len(messages)
    if early:
        for i, row in zip(
            early, await _insert_messages(conn, [messages[i] for i in early]), strict=True
        ):
            rows[i] = row
    applied = await _apply_events(conn, events)
    if late:
        for i, row in zip(
            late, await _insert_messages(conn, [messages[i] for i in late]), strict=True
        ):
            rows[i] = row
    return [r for r in rows if r is not None], applied


async def _apply_events(conn: Conn, events: list[tuple[DeliveryIn, Event]]) -> set[str]:
    """Stores each customer event once and applies the new ones to the customer's
    conversations: a changed BSUID becomes the conversation's key (its context and history
    stay), marketing preferences are recorded. Returns the ids stored now."""
    rows = await conn.fetch(
        Q["ingest_events"],
        [e.event_id for _, e in events],
        [e.phone_number_id for _, e in events],
        [e.kind for _, e in events],
        [e.wa_id for _, e in events],
        [e.user_id for _, e in events],
        [e.previous_user_id for _, e in events],
        [e.preference_value for _, e in events],
        [_ts(e.timestamp) for _, e in events],
        [e.payload_json or "{}" for _, e in events],
        [d.correlation_id for d, _ in events],
        [d.traceparent for d, _ in events],
        [e.previous_wa_id for _, e in events],
    )
    stored = {r["message_id"] for r in rows}
    for _, e in sorted(events, key=lambda de: de[1].timestamp):
        if e.event_id not in stored:
            continue  # a duplicate: applied when it was first stored
        if e.kind == "user_id_update":
            changed = await conn.fetch(
                Q["apply_user_id_update"],
                e.previous_user_id,
                e.user_id,
                e.parent_user_id,
                e.wa_id,
                e.previous_wa_id,
                e.phone_number_id,
            )
        else:
            changed = await conn.fetch(
                Q["apply_user_preferences"],
                e.user_id,
                e.wa_id,
                e.preference_value,
                _ts(e.timestamp),
                e.phone_number_id,
            )
        log.info(
            "customer event applied",
            extra={"event": e.kind, "event_id": e.event_id, "conversations": len(changed)},
        )
    return stored


# SQLSTATE classes that the values being stored cause, so that storing them again fails again:
# data exceptions (22, also asyncpg's own for a value it cannot encode), integrity constraints
# (23), program limits such as an index entry too large (54), cardinality (21). Every other
# error (connection, resources, shutdown, timeouts, privileges) says "not now", not "never".
DATA_ERROR_CLASSES = frozenset({"21", "22", "23", "54"})
PROBLEMS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OverflowError)


def is_data_error(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES
    # A value Python cannot convert (a lone surrogate, an out-of-range number).
    return isinstance(exc, ValueError | OverflowError)


def describe(exc: BaseException) -> str:
    """The error without its message: asyncpg's name the values it could not encode, and
    those are customers' words."""
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} {sqlstate}" if sqlstate else type(exc).__name__


async def ingest_isolating(
    pool: asyncpg.Pool, deliveries: list[DeliveryIn]
) -> list[DeliveryOut | str]:
    """`ingest_many`, except that a value PostgreSQL refuses costs only its own message: that
    message is stored as a skipped placeholder with the reason, and the rest of its delivery and
    of the batch as usual (each delivery then in several statements: a part stored before a
    failure is a duplicate when Meta retries). Per delivery, its outcome or why it cannot be
    stored now. Raises what says that nothing can be stored now."""
    try:
        return list(await ingest_many(pool, deliveries))
    except PROBLEMS as exc:
        if not is_data_error(exc):
            raise
        log.warning(
            "a batch was refused (%s): storing its %d deliveries one by one",
            describe(exc),
            len(deliveries),
        )
    outs: list[DeliveryOut | str] = []
    for delivery in deliveries:
        try:
            outs.append(await _ingest_one(pool, delivery))
        except PROBLEMS as exc:
            log.error("ingest failed: %s", describe(exc))
            outs.append(f"cannot store: {describe(exc)}")
    return outs


async def _ingest_one(pool: asyncpg.Pool, delivery: DeliveryIn) -> DeliveryOut:
    try:
        (out,) = await ingest_many(pool, [delivery])
        return out
    except PROBLEMS as exc:
        if not is_data_error(exc):
            raise
    # The delivery's own values, should they be what PostgreSQL refused.
    cid, tp = _storable(delivery.correlation_id, 128), _storable(delivery.traceparent, 128)
    results: list[Ingested] = []
    statuses_stored = 0
    for message in delivery.messages:
        one = DeliveryIn([message], [], delivery.correlation_id, delivery.traceparent)
        try:
            (out,) = await ingest_many(pool, [one])
        except PROBLEMS as exc:
            if not is_data_error(exc):
                raise
            log.warning(
                "a message was refused (%s): stored as a skipped placeholder",
                describe(exc),
                extra={"message_id": _storable(message.message_id)[:MAX_ID_CHARS]},
            )
            (out,) = await ingest_many(
                pool,
                [DeliveryIn([_placeholder(message, exc)], [], cid, tp)],
            )
        results.extend(out.results)
    for status in delivery.statuses:
        one = DeliveryIn([], [status], delivery.correlation_id, delivery.traceparent)
        try:
            (out,) = await ingest_many(pool, [one])
        except PROBLEMS as exc:
            if not is_data_error(exc):
                raise
            log.warning("a status was refused (%s): stored as a placeholder", describe(exc))
            (out,) = await ingest_many(
                pool,
                [DeliveryIn([], [_status_placeholder(status, exc)], cid, tp)],
            )
        statuses_stored += out.statuses_stored
    events_stored = 0
    for event in delivery.events:
        one = DeliveryIn([], [], delivery.correlation_id, delivery.traceparent, [event])
        try:
            (out,) = await ingest_many(pool, [one])
            events_stored += out.events_stored
        except PROBLEMS as exc:
            if not is_data_error(exc):
                raise
            # Not a message: nothing waits for it. Said, and left.
            log.error("a customer event was refused (%s): not applied", describe(exc))
    return DeliveryOut(results, statuses_stored, events_stored)


MAX_ID_CHARS = 256


def _storable(text: str, limit: int | None = None) -> str:
    """`text` as PostgreSQL text holds it: no NUL, lone surrogates as U+FFFD."""
    text = text.replace("\x00", "")
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text[:limit] if limit is not None else text


def _storable_id(message_id: str) -> str:
    kept = _storable(message_id)
    if kept == message_id and 0 < len(kept) <= MAX_ID_CHARS:
        return kept
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"invalid:{digest}"


def _placeholder(message: Message, exc: BaseException) -> Message:
    """What can be kept of a message PostgreSQL refused: its ids, and its payload as text."""
    reason = f"could not be stored as delivered ({describe(exc)}): kept as a placeholder"
    return Message(
        message_id=_storable_id(message.message_id),
        phone_number_id=_storable(message.phone_number_id, 64),
        wa_id=_storable(message.wa_id, MAX_ID_CHARS),
        user_id=_storable(message.user_id, MAX_ID_CHARS),
        contact_name="",
        type=_storable(message.type, 64) or "unknown",
        timestamp=0,
        text="",
        payload_json=orjson.dumps(
            {"placeholder": reason, "payload_json": _storable(message.payload_json)}
        ).decode(),
        skip_reason=reason,
    )


def _status_placeholder(status: Status, exc: BaseException) -> Status:
    reason = f"could not be stored as delivered ({describe(exc)}): kept as a placeholder"
    return Status(
        message_id=_storable_id(status.message_id),
        phone_number_id=_storable(status.phone_number_id, 64),
        recipient_id=_storable(status.recipient_id, MAX_ID_CHARS),
        status=_storable(status.status, 16),
        timestamp=0,
        payload_json=orjson.dumps(
            {"placeholder": reason, "payload_json": _storable(status.payload_json)}
        ).decode(),
    )


async def _insert_messages(
    conn: Conn, messages: list[tuple[DeliveryIn, Message]]
) -> list[asyncpg.Record]:
    reasons = [m.skip_reason or skip_reason(m.type) for _, m in messages]
    return list(
        await conn.fetch(
            Q["ingest_messages"],
            [m.message_id for _, m in messages],
            [m.phone_number_id for _, m in messages],
            [m.wa_id for _, m in messages],
            [m.contact_name for _, m in messages],
            [d.correlation_id for d, _ in messages],
            [_ts(m.timestamp) for _, m in messages],
            [m.type for _, m in messages],
            [m.text for _, m in messages],
            [m.payload_json or "{}" for _, m in messages],
            [machine.SKIPPED if r else machine.RECEIVED for r in reasons],
            reasons,
            [d.traceparent for d, _ in messages],
            [m.user_id for _, m in messages],
            [m.parent_user_id for _, m in messages],
            [m.username for _, m in messages],
            [m.referral_json for _, m in messages],
        )
    )


async def insert_statuses(conn: Conn, statuses: list[tuple[DeliveryIn, Status]]) -> set[str]:
    """Stores delivery statuses, each with the delivery it came in, in the caller's transaction;
    returns the keys of those stored (not already known)."""
    rows = await conn.fetch(
        Q["ingest_statuses"],
        [s.message_id for _, s in statuses],
        [s.phone_number_id for _, s in statuses],
        [s.recipient_id for _, s in statuses],
        [s.status for _, s in statuses],
        [_ts(s.timestamp) for _, s in statuses],
        [s.payload_json or "{}" for _, s in statuses],
        [s.error_code for _, s in statuses],
        [d.correlation_id for d, _ in statuses],
        [d.traceparent for d, _ in statuses],
        [s.callback_data for _, s in statuses],
        [s.recipient_user_id for _, s in statuses],
    )
    stored = {r["message_id"] for r in rows}
    failed = sum(1 for key in stored if key.endswith(":failed"))
    if failed:
        metrics.DELIVERY_FAILED.inc(failed)
    return stored


async def claim_conversation(pool: asyncpg.Pool, conversation_id: int, owner: str) -> int:
    """Moves the fencing token on and marks the conversation active (audited, one round trip);
    returns the new token."""
    row = await pool.fetchrow(
        Q["claim_conversation"],
        conversation_id,
        owner,
        machine.conversation_sources(machine.ACTIVE),
    )
    if row is None:
        raise UnknownMessage(f"conversation {conversation_id} does not exist")
    return int(row["fence_token"])


async def claim_turn(
    pool: asyncpg.Pool, conversation_id: int, owner: str
) -> tuple[int, WorkItem | None]:
    """`claim_conversation` and, with the new token, `next_message`: one round trip (and one
    commit) instead of two. Returns the token and the started turn (None when none waits)."""
    token, row = await _claim(pool, conversation_id, owner, None)
    return token, _started(row, conversation_id, token)


async def claim_turn_or_release(
    pool: asyncpg.Pool, conversation_id: int, owner: str
) -> tuple[int, WorkItem | Released | None]:
    """`claim_turn` and, when none waits, `release_conversation` in the same statement too
    (RELEASED when it applied). Concurrent calls of different conversations share one
    statement (`_TurnBatches`)."""
    token, row = await _claim(pool, conversation_id, owner, _IDLE_SOURCES, batched=True)
    started = _started(row, conversation_id, token)
    return token, RELEASED if started is None and row["released"] else started


async def _claim(
    pool: asyncpg.Pool,
    conversation_id: int,
    owner: str,
    release_from: list[str] | None,
    *,
    batched: bool = False,
) -> tuple[int, asyncpg.Record]:
    args = (
        conversation_id,
        owner,
        machine.conversation_sources(machine.ACTIVE),
        release_from,
    )
    row: asyncpg.Record | None
    batches = _batches(pool) if batched else None
    if batches is not None:
        key = _batch_key(args[2], release_from)
        row = await batches.claims.submit(_Call(args, key))
    else:
        row = await pool.fetchrow(Q["claim_turn"], *args)
    if row is None or row["claimed"] is None:
        raise UnknownMessage(f"conversation {conversation_id} does not exist")
    return int(row["claimed"]), row


async def release_conversation(pool: asyncpg.Pool, conversation_id: int, token: int) -> bool:
    """Marks the conversation idle (audited) if `token` still holds it."""
    released = await pool.fetchval(
        Q["release_conversation"],
        conversation_id,
        token,
        machine.conversation_sources(machine.IDLE),
    )
    return released is not None


async def next_message(pool: asyncpg.Pool, conversation_id: int, token: int) -> WorkItem | None:
    """The oldest waiting message of a claimed conversation, moved to processing (one round
    trip: `wa_start_turn`, whose moves received -> processing, and processing -> received ->
    processing for a resumed turn, are legal by the machine)."""
    row = await pool.fetchrow(Q["start_turn"], conversation_id, token)
    assert row is not None
    return _started(row, conversation_id, token)


def _started(row: asyncpg.Record, conversation_id: int, token: int) -> WorkItem | None:
    """What `wa_start_turn` answered: the started message, None when none waits."""
    if row["outcome"] == "stale":
        raise StaleFence(
            f"conversation {conversation_id} is held with token {row['fence_token']}, not {token}"
        )
    if row["outcome"] == "none":
        return None
    return WorkItem(
        id=row["id"],
        message_id=row["message_id"],
        conversation_id=row["conversation_id"],
        phone_number_id=row["phone_number_id"],
        wa_id=row["wa_id"],
        type=row["message_type"],
        text=row["body"] or "",
        timestamp=int(row["wa_timestamp"].timestamp()),
        correlation_id=row["correlation_id"],
        traceparent=row["traceparent"],
        attempts=row["attempts"],
        contact_name=row["contact_name"] or "",
        resumed=row["resumed"],
        turn_resumes=row["turn_resumes"],
        fence_token=token,
        probe=row["queued_because"] == machine.OPERATOR_REDRIVE,
        user_id=row["user_id"] or "",
        username=row["username"] or "",
        # The turn's stored state, for the agent (db/migrations/0020): JSON passed on as text.
        has_state=True,
        message_type=row["message_type"],
        payload_json=row["payload"] or "",
        context_json=row["context"] or "",
        context_agent_type=row["context_agent_type"] or "",
        has_reply=row["reply_text"] is not None,
        reply_text=row["reply_text"] or "",
        reply_payload_json=row["reply_payload"] or "",
        reply_message_id=row["reply_message_id"] or "",
        agent_type=row["agent_type"] or "",
        send_started=row["send_started_at"] is not None,
        absorbed_message_ids=tuple(row["absorbed_message_ids"] or ()),
        last_customer_at=_seconds(row["last_customer_at"]),
        db_now=_seconds(row["db_now"]),
        # The reply's id is recorded with the turn's final transition (finish_turn).
        defer_sent_record=True,
    )


def _seconds(value: dt.datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


class NotAsked:
    """`finish_turn` did not look for the next turn: the caller asks `next_message`."""


NOT_ASKED = NotAsked()


class Released:
    """No turn waited, and the conversation was released with the statement that looked
    (`release_conversation` is done)."""


RELEASED = Released()
_IDLE_SOURCES = machine.conversation_sources(machine.IDLE)


@dataclass(frozen=True)
class Finished:
    """A turn's final transition, and the next turn when it was asked for."""

    from_state: str
    # The next turn: started (a WorkItem), none waiting (None; RELEASED when the conversation
    # was released with it), or not looked for.
    next: WorkItem | NotAsked | Released | None
    # The messages of a debounced burst moved to the same state with it, in order.
    absorbed: tuple[str, ...] = ()


async def finish_turn(
    pool: asyncpg.Pool | Conn,
    item: WorkItem,
    to_state: str,
    reason: str,
    token: int,
    *,
    start_next: bool,
    absorbed: tuple[str, ...] = (),
    reply_message_id: str | None = None,
    release: bool = False,
) -> Finished:
    """`transition` of a finished turn's message and, when `start_next` and the transition
    applied, `next_message` of its conversation with the same token: one round trip (and one
    commit) instead of two. Raises what `transition` raises.

    `reply_message_id`: the reply the agent sent and did not record (TurnResult
    sent_unrecorded), recorded in the same row update as the transition (db/migrations/0020).
    `release`: when the next turn finds nothing waiting, `release_conversation` in the same
    statement too (the next turn is then RELEASED).

    `absorbed`: the debounced burst the turn's reply answered too (TurnResult); each of those
    messages saved with the reply and still received moves to `to_state` as well, in the same
    statement, audited with its own reason (db/migrations/0018)."""
    args = (
        item.message_id,
        to_state,
        machine.message_sources(to_state),
        reason,
        token,
        "",
        item.conversation_id,
        start_next,
        list(absorbed),
        list(machine.ABSORBED_FROM),
        f"replied together with {item.message_id} (debounced burst)",
        reply_message_id or None,
        _IDLE_SOURCES if release and start_next else None,
    )
    # (Within a caller's transaction, a handoff's, it is that transaction's statement.)
    row: asyncpg.Record | None
    batches = _batches(pool)
    if batches is not None:
        # A burst's text[] of its own does not fit the batch's arrays: it runs alone.
        key = None if absorbed else _batch_key(args[2], args[12])
        row = await batches.finishes.submit(_Call(args, key))
    else:
        row = await pool.fetchrow(Q["finish_turn"], *args)
    assert row is not None
    from_state = _transitioned(
        item.message_id,
        to_state,
        token,
        row["finished"],
        row["finished_from"],
        row["finished_fence"],
    )
    moved = tuple(row["absorbed"] or ())
    if row["outcome"] in ("unasked", "stale"):
        # Stale: the turn was finished under its token and the conversation has moved on
        # since; next_message says so the usual way.
        return Finished(from_state, NOT_ASKED, moved)
    started = _started(row, item.conversation_id, token)
    if started is None and row["released"]:
        return Finished(from_state, RELEASED, moved)
    return Finished(from_state, started, moved)


# Turns batched across conversations (db/migrations/0022). With many conversations in flight,
# their claims (and their finishes) arrive together; each as a statement of its own paid a
# round trip, a transaction and a commit, more than its row work. A pool's concurrent calls
# share one statement instead (common/coalesce.py: an idle call still runs at once, alone).


@dataclass(frozen=True)
class _Call:
    """One call: the single statement's arguments in order, and what must be the same for the
    calls that share a batch statement (None: it runs alone)."""

    args: tuple[Any, ...]
    key: Hashable | None


_Outcome = asyncpg.Record | None | BaseException


class _TurnBatches:
    """A pool's claims, finishes and looks for waiting work, each gathered into batch
    statements."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        # Weak: this lives in a WeakKeyDictionary keyed by the pool.
        self._pool = weakref.ref(pool)
        self.claims: Coalescer[_Call, asyncpg.Record | None] = Coalescer("claim_turn", self._claims)
        self.finishes: Coalescer[_Call, asyncpg.Record | None] = Coalescer(
            "finish_turn", self._finishes
        )
        # With replicas, many holders release conversations another replica asked for at once
        # (a burst): each look alone took a connection of its own, and grew both pools to
        # their limit (20 backends against 4 for one replica, each planning for itself).
        self.looks: Coalescer[int, bool] = Coalescer("has_waiting", self._looks)

    async def _looks(self, conversation_ids: list[int]) -> list[bool | BaseException]:
        pool = self._pool()
        if pool is None:
            raise RuntimeError("the pool is gone")
        # Housekeeping after releases, part of no message's trace (as every caller's look is;
        # a queued batch runs in the Coalescer's own task, which knows nothing of that).
        with telemetry.untraced():
            waiting = set(await waiting_among(pool, conversation_ids))
        return [c in waiting for c in conversation_ids]

    async def _claims(self, calls: list[_Call]) -> list[_Outcome]:
        def columns(group: list[_Call]) -> tuple[Any, ...]:
            _, _, sources, release_from = group[0].args
            return ([c.args[0] for c in group], [c.args[1] for c in group], sources, release_from)

        return await self._run(Q["claim_turn"], Q["claim_turns"], calls, columns)

    async def _finishes(self, calls: list[_Call]) -> list[_Outcome]:
        def columns(group: list[_Call]) -> tuple[Any, ...]:
            def each(n: int) -> list[Any]:
                return [c.args[n] for c in group]

            # (message, to_state, reason, token, correlation id, conversation, next, reply id)
            # per call; the sources and the release's are the batch's (its key).
            first = group[0].args
            return (
                each(0), each(1), first[2], each(3), each(4), each(5), each(6), each(7),
                each(11), first[12],
            )  # fmt: skip

        return await self._run(Q["finish_turn"], Q["finish_turns"], calls, columns)

    async def _run(
        self,
        single: str,
        batch: str,
        calls: list[_Call],
        columns: Callable[[list[_Call]], tuple[Any, ...]],
    ) -> list[_Outcome]:
        pool = self._pool()
        if pool is None:
            raise RuntimeError("the pool is gone")
        outcomes: dict[int, _Outcome] = {}

        async def alone(n: int) -> None:
            for attempt in range(1, CONFLICT_ATTEMPTS + 1):
                try:
                    outcomes[n] = await pool.fetchrow(single, *calls[n].args)
                    return
                except CONFLICTS as exc:
                    # Undone whole by PostgreSQL, nothing written: run again, a few times.
                    # A finish that failed here would leave a reply sent and unrecorded.
                    if attempt == CONFLICT_ATTEMPTS:
                        outcomes[n] = exc
                        return
                    log.warning("a turn statement was undone (%s): running it again", exc)
                    await asyncio.sleep(retry.full_jitter(attempt, 0.02, 0.2))
                except Exception as exc:  # its caller's alone
                    outcomes[n] = exc
                    return

        async def together(members: list[int]) -> None:
            # (The function runs them in the order their conversations are locked by every
            # batch and every ingest, db/migrations/0022; each row says which one it is.)
            try:
                rows = await pool.fetch(batch, *columns([calls[n] for n in members]))
            except UNDONE as exc:
                # Nothing of it was written: each call alone, so that only one that fails by
                # itself fails (a deadlock, or an error raised inside one call's function).
                log.warning(
                    "a batch of %d turn statements failed as a whole (%s): each runs alone",
                    len(members),
                    describe(exc),
                )
                await asyncio.gather(*(alone(n) for n in members))
                return
            except Exception as exc:  # how far it got is unknown: as a single call's would be
                for n in members:
                    outcomes[n] = exc
                return
            for row in rows:
                outcomes[members[row["ord"] - 1]] = row

        groups: dict[Hashable, list[int]] = {}
        runs = []
        for n, call in enumerate(calls):
            if call.key is None:
                runs.append(alone(n))
            else:
                groups.setdefault(call.key, []).append(n)
        for members in groups.values():
            runs.append(alone(members[0]) if len(members) == 1 else together(members))
        # A call run at once from its caller's task is traced as its caller's; a queued batch,
        # run by the Coalescer's own task, is many messages' work: part of no one trace.
        traced = trace.get_current_span().get_span_context().is_valid
        with contextlib.nullcontext() if traced else telemetry.untraced():
            await asyncio.gather(*runs)
        missing = RuntimeError("the batch statement returned no row for it")
        return [outcomes.get(n, missing) for n in range(len(calls))]


# An error PostgreSQL answered (the statement, its own transaction, was rolled back), or a
# value the driver could not encode (nothing was sent).
UNDONE = (asyncpg.PostgresError, ValueError, OverflowError)
# What PostgreSQL undoes to let concurrent transactions go on, and a run again may pass.
CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
CONFLICT_ATTEMPTS = 3

_BATCHES: weakref.WeakKeyDictionary[asyncpg.Pool, _TurnBatches] = weakref.WeakKeyDictionary()


def _batches(pool: asyncpg.Pool | Conn) -> _TurnBatches | None:
    """The pool's batches; None for a connection (a caller's transaction) and for a pool that
    cannot be weakly referenced (asyncpg's own; common.db's can)."""
    if not isinstance(pool, asyncpg.Pool):
        return None
    try:
        batches = _BATCHES.get(pool)
        if batches is None:
            batches = _BATCHES[pool] = _TurnBatches(pool)
    except TypeError:
        return None
    return batches


def _batch_key(*shared: list[str] | None) -> tuple[tuple[str, ...] | None, ...]:
    return tuple(None if v is None else tuple(v) for v in shared)


# What a redrive may put back in its conversation's queue: a message that has finished failing.
REDRIVABLE = [machine.FAILED, machine.DEAD_LETTERED]


async def transition(
    pool: asyncpg.Pool,
    message_id: str,
    to_state: str,
    reason: str,
    *,
    token: int | None = None,
    correlation_id: str = "",
    sources: list[str] | None = None,
) -> str:
    """Applies one validated, audited transition in one round trip; returns the state it left.

    With a token, the write happens only while that token is still the conversation's.
    `sources`: only from these states (a subset of what the machine allows).
    """
    row = await pool.fetchrow(
        Q["transition_message"],
        message_id,
        to_state,
        sources if sources is not None else machine.message_sources(to_state),
        reason,
        token,
        correlation_id,
    )
    assert row is not None
    return _transitioned(
        message_id, to_state, token, row["outcome"], row["from_state"], row["fence_token"]
    )


def _transitioned(
    message_id: str,
    to_state: str,
    token: int | None,
    outcome: str,
    from_state: str | None,
    fence: int | None,
) -> str:
    """What `wa_transition_message` answered: the state the message left, or the error."""
    if outcome == "unknown":
        raise UnknownMessage(message_id)
    if outcome == "stale":
        raise StaleFence(f"message {message_id}: conversation token is {fence}, not {token}")
    if outcome == "illegal":
        raise machine.IllegalTransition("message", from_state, to_state)
    return str(from_state)


async def record_stale_send(pool: asyncpg.Pool, message_id: str, reply_message_id: str) -> bool:
    """A reply sent by a turn whose final transition was refused as stale, recorded unfenced
    where none is (queries.sql record_stale_send); whether it was."""
    return await pool.fetchval(Q["record_stale_send"], message_id, reply_message_id) is not None


async def record_illegal(
    pool: asyncpg.Pool, message_id: str, exc: machine.IllegalTransition, correlation_id: str
) -> None:
    """An illegal transition is refused, and the refusal is audited."""
    async with pool.acquire() as conn:
        conv = await conn.fetchval(Q["conversation_of_message"], message_id)
        await conn.execute(
            Q["record_transition"],
            conv,
            message_id,
            exc.entity,
            exc.from_state,
            "refused:" + exc.to_state,
            str(exc),
            None,
            correlation_id,
        )


async def has_waiting(pool: asyncpg.Pool, conversation_id: int) -> bool:
    """Whether the conversation has a message waiting or in flight; looks made at once go in
    one statement (`_TurnBatches.looks`)."""
    batches = _batches(pool)
    if batches is None:
        return bool(await pool.fetchval(Q["has_waiting"], conversation_id))
    return await batches.looks.submit(conversation_id)


async def waiting_among(pool: asyncpg.Pool, conversation_ids: list[int]) -> list[int]:
    rows = await pool.fetch(Q["waiting_among"], conversation_ids)
    return sorted(int(r["conversation_id"]) for r in rows)


async def sweep_candidates(
    pool: asyncpg.Pool, unstarted_after: float, stuck_after: float, limit: int = 500
) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["sweep_candidates"], unstarted_after, stuck_after, limit))


async def all_waiting_conversations(pool: asyncpg.Pool) -> list[int]:
    return [r["conversation_id"] for r in await pool.fetch(Q["all_waiting_conversations"])]


async def failed_not_dead_lettered(
    pool: asyncpg.Pool, older_than: float, limit: int = 100
) -> list[asyncpg.Record]:
    return list(await pool.fetch(Q["failed_not_dead_lettered"], older_than, limit))


async def timeline(pool: asyncpg.Pool, message_id: str, wa_id: str, limit: int) -> Timeline:
    async with pool.acquire() as conn:
        conv: int | None = None
        if message_id:
            conv = await conn.fetchval(Q["conversation_of_message"], message_id)
        elif wa_id:
            conv = await conn.fetchval(Q["conversation_of_customer"], wa_id)
        if conv is None:
            raise UnknownMessage(message_id or wa_id)
        return Timeline(
            messages=list(await conn.fetch(Q["timeline_messages"], conv, limit)),
            transitions=list(await conn.fetch(Q["timeline_transitions"], conv, limit * 4)),
            customer=await conn.fetchrow(Q["timeline_customer"], conv),
        )


async def record_stuck_timeout(pool: asyncpg.Pool, seconds: float) -> None:
    """STUCK_TIMEOUT_SECONDS, for the monitoring views and functions (db/migrations/0009)."""
    await pool.execute(Q["record_stuck_timeout"], seconds)
