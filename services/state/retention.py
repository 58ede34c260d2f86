"""Retention and erasure: prune passes (a background loop, and `wa prune` on demand) and one
customer's erasure (`wa forget`). The deletes themselves are SQL functions
(db/migrations/0013_retention.sql); this module paces them, keeps replicas from pruning at
the same time, and takes a customer's conversation leases before erasing them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import asyncpg

from common import retry, sqlfile, telemetry, wire

from . import metrics
from .locks import Lease, Locks

log = logging.getLogger(__name__)
R = sqlfile.load("services.state", "retention.sql")

# pg_try_advisory_lock key of a prune pass (migrations use another); advisory locks are per
# database, so systems sharing a cluster do not block each other.
PRUNE_LOCK_KEY = 0x57A_9E7
# One batch statement may not run longer than this (a cancelled batch deletes nothing).
BATCH_TIMEOUT_SECONDS = 60.0
# A dry run counts everything at once; a customer's erasure is one transaction.
DRY_RUN_TIMEOUT = 120.0
FORGET_TIMEOUT = 60.0
# A pass stops after this many batches (500 rows each by default) and the next one goes on:
# a pass always ends, whatever the backlog.
MAX_BATCHES_PER_PASS = 2_000
# How long `wa forget` waits for a turn in flight on the customer's conversation to end.
FORGET_WAIT_SECONDS = 10.0


class PruneBusy(Exception):
    """Another prune pass holds the lock (a replica's background loop, or an operator's)."""


class ConversationBusy(Exception):
    """A turn of the customer's conversation is in flight and did not end in time."""


@dataclass
class Pruned:
    counts: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    complete: bool = True  # false: stopped (asked to, or MAX_BATCHES_PER_PASS) with work left

    @property
    def total(self) -> int:
        """Rows deleted."""
        return sum(n for name, n in self.counts.items() if not wire.cleared_count(name))

    @property
    def cleared(self) -> int:
        """Values cleared in rows that stay."""
        return sum(n for name, n in self.counts.items() if wire.cleared_count(name))

    def add(self, rows: list[asyncpg.Record]) -> int:
        """Adds a batch's counts; returns how many rows it deleted or changed."""
        changed = 0
        for r in rows:
            self.counts[r["table_name"]] = self.counts.get(r["table_name"], 0) + int(r["rows"])
            changed += int(r["rows"])
        return changed


async def prune(
    pool: asyncpg.Pool,
    days: int,
    batch: int,
    *,
    dry_run: bool = False,
    requested_by: str,
    stopping: asyncio.Event | None = None,
) -> Pruned:
    """One prune pass: batch after batch (each its own short transaction) until nothing is
    left; or, `dry_run`, what it would delete now. Raises PruneBusy while another pass runs."""
    out = Pruned()
    if dry_run:
        out.add(list(await pool.fetch(R["prune"], days, batch, True, timeout=DRY_RUN_TIMEOUT)))
        return out
    async with pool.acquire() as conn:
        if not await conn.fetchval(R["try_lock"], PRUNE_LOCK_KEY):
            raise PruneBusy("a prune pass is running now (a state replica's); try again later")
        try:
            while True:
                if stopping is not None and stopping.is_set():
                    out.complete = False
                    break
                if out.batches >= MAX_BATCHES_PER_PASS:
                    out.complete = False
                    break
                rows = await conn.fetch(
                    R["prune"], days, batch, False, timeout=BATCH_TIMEOUT_SECONDS
                )
                out.batches += 1
                if out.add(list(rows)) == 0:
                    break
            if out.total or out.cleared:
                await conn.execute(R["record_prune"], out.counts, requested_by)
        finally:
            # The pool's connections carry no session state: one whose lock cannot be let go
            # (a timeout, a broken connection, the caller gone meanwhile) is closed, which
            # lets it go.
            try:
                await conn.fetchval(R["unlock"], PRUNE_LOCK_KEY)
            except BaseException as exc:
                conn.terminate()
                if not isinstance(exc, Exception):
                    raise
    for name, n in out.counts.items():
        if n:
            counter = metrics.CLEARED if wire.cleared_count(name) else metrics.PRUNED
            counter.labels(name).inc(n)
    return out


class Pruner:
    """The background loop: a prune pass every `interval` (jittered, so replicas started
    together drift apart), stoppable, each pass logged and counted; a failed pass is logged
    and the next one tries again."""

    def __init__(self, pool: asyncpg.Pool, *, days: int, batch: int, interval: float) -> None:
        self.pool = pool
        self.days = days
        self.batch = batch
        self.interval = interval
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _next_wait(self) -> float:
        return self.interval * random.uniform(0.8, 1.2)

    async def run(self) -> None:
        log.info(
            "retention loop started",
            extra={"retention_days": self.days, "interval": self.interval, "batch": self.batch},
        )
        # The first pass within five minutes of start (sooner with a short interval), at a
        # random point so replicas started together do not all go at once.
        wait = random.uniform(0.2, 1.0) * min(self.interval, 300.0)
        failures = 0
        with telemetry.untraced():  # housekeeping, part of no message's trace
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
                if self._stop.is_set():
                    break
                wait = self._next_wait()
                try:
                    await self.pass_once()
                    failures = 0
                except PruneBusy:
                    metrics.PRUNE_RUNS.labels("busy").inc()
                    log.info("prune pass skipped: another one is running")
                except Exception as exc:
                    failures += 1
                    metrics.PRUNE_RUNS.labels("error").inc()
                    log.error("prune pass failed, the next one tries again: %r", exc)
                    # Sooner than a whole interval, backing off while it keeps failing.
                    wait = min(wait, 1.0 + retry.full_jitter(failures, 5.0, self.interval))

    async def pass_once(self) -> Pruned:
        started = time.perf_counter()
        out = await prune(
            self.pool, self.days, self.batch, requested_by="state", stopping=self._stop
        )
        metrics.PRUNE_RUNS.labels("ok").inc()
        log.info(
            "prune pass",
            extra={
                "deleted": out.total,
                "cleared": out.cleared,
                "counts": {k: v for k, v in out.counts.items() if v},
                "batches": out.batches,
                "complete": out.complete,
                "seconds": round(time.perf_counter() - started, 3),
                "retention_days": self.days,
            },
        )
        return out


async def forget(
    pool: asyncpg.Pool,
    locks: Locks,
    customer: str,
    *,
    requested_by: str,
    wait_seconds: float = FORGET_WAIT_SECONDS,
) -> dict[str, int]:
    """Erases one customer everywhere (wa_forget_customer) while holding each of their
    conversations' leases, so no turn of theirs runs meanwhile; waits up to `wait_seconds`
    for one in flight, then raises ConversationBusy. Returns the rows erased per table."""
    conversations = [r["id"] for r in await pool.fetch(R["customer_conversations"], customer)]
    leases: list[Lease] = []
    deadline = time.monotonic() + wait_seconds
    try:
        for conv in conversations:
            attempt = 0
            while (lease := await locks.acquire(conv)) is None:
                attempt += 1
                if time.monotonic() >= deadline:
                    raise ConversationBusy(
                        f"a turn of this customer's conversation is in flight (conversation "
                        f"{conv}); nothing was erased: try again in a few seconds"
                    )
                await asyncio.sleep(min(1.0, 0.05 + retry.full_jitter(attempt, 0.1, 1.0)))
            leases.append(lease)
        rows = await pool.fetch(R["forget"], customer, requested_by, timeout=FORGET_TIMEOUT)
    finally:
        # The lease is the conversation's only Redis key: released, it is gone too.
        for lease in leases:
            with contextlib.suppress(Exception):
                await locks.release(lease)
    counts = {r["table_name"]: int(r["rows"]) for r in rows}
    metrics.FORGOTTEN.inc()
    log.info(
        "customer erased",
        extra={"counts": counts, "requested_by": requested_by},
    )
    return counts
