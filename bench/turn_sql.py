"""What PostgreSQL spends on a message's way, step by step, as the services send it: the ingest
of a customer's text message, its turn's claim, the save of its reply before the send, the
turn's final move (with the send's id, the next turn's start and the conversation's release),
and, with `--statuses`, its reply's three status webhooks (those of customers writing at once
in one call, as the gateway batches them). Each step is measured as the CPU of
one backend (/proc/PID/schedstat) per message, on a business's history (devtools/history.py).

    .venv/bin/python -m bench.turn_sql [--rounds 6] [--rows 40000] [--together N]
        [--statuses] [--no-sync] [--before PREFIX]

The steps run through the services' own code (services/state/store.py, services/agent/saves.py),
so they send what the services send. `--together 1` (the default) is a customer's pace: each
message alone, each step a call of its own; `--together N` has N customers write at once, as
to a busy replica: one delivery, and their claims, saves and final moves batched.

`--before PREFIX` (a migration's number, e.g. 0034) measures as well a database with only the
migrations before PREFIX, the release before them: the same statements call that release's
functions (so a migration measured this way may change functions' bodies, not what they take
or return). The two databases are on the same server, each measured in a backend of its own,
their rounds interleaved, so that the machine's drift reaches both alike. `--no-sync` turns
synchronous_commit off in both backends: the WAL flush at each commit is the same for both and
the noisiest part of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg

from bench import harness
from bench.cpu import process_cpu
from common import db
from common.domain import Message, Status
from devtools import history, turns
from devtools.inbound import inbound
from devtools.servers import migrated_before
from services.agent.saves import Saves
from services.state import machine, store

STEPS = ("ingest", "claim", "save", "finish", "statuses")
MESSAGES_PER_ROUND = 200
OWNER = "bench"
T = TypeVar("T")


@dataclass
class Database:
    label: str
    pool: asyncpg.Pool
    saves: Saves
    backend: int
    cpu: dict[str, float] = field(default_factory=dict)  # seconds, by step
    messages: int = 0


def _message(message_id: str, customer: int) -> Message:
    return inbound(message_id, f"1666{customer}", phone_number_id=harness.PHONE_NUMBER_ID)


async def _save(saves: Saves, item: store.WorkItem) -> None:
    """The agent's save before the send (services/agent/turn.py), as its rules backend makes it."""
    saved = await saves.save(turns.answer_save(item, correlation_id="bench"))
    if saved != item.fence_token:
        raise RuntimeError(f"the save of {item.message_id} found fence {saved}")


class Run:
    def __init__(self, together: int, statuses: bool) -> None:
        self.together, self.statuses = together, statuses
        self._customers = itertools.cycle(range(1, history.CUSTOMERS + 1))
        self._n = 0

    async def _step(self, d: Database, step: str, work: Callable[[], Awaitable[T]]) -> T:
        before = process_cpu(d.backend)
        result = await work()
        d.cpu[step] = d.cpu.get(step, 0.0) + process_cpu(d.backend) - before
        return result

    async def group(self, d: Database) -> None:
        """`together` customers' messages, each answered, its conversation released."""
        customers = [next(self._customers) for _ in range(self.together)]
        ids = [f"wamid.B{self._n + k}" for k in range(1, self.together + 1)]
        self._n += self.together
        pool = d.pool

        async def ingest() -> list[int]:
            rows, _ = await store.ingest(
                pool, [_message(m, c) for m, c in zip(ids, customers, strict=True)], [], "b", ""
            )
            if any(r.duplicate for r in rows):
                raise RuntimeError("a message was found stored already")
            return [r.conversation_id for r in rows]

        conversations = await self._step(d, "ingest", ingest)

        async def claim() -> list[store.WorkItem]:
            claims = await asyncio.gather(
                *(store.claim_turn_or_release(pool, c, OWNER) for c in conversations)
            )
            turns = [item for _, item in claims if isinstance(item, store.WorkItem)]
            if [t.message_id for t in turns] != ids:
                raise RuntimeError(f"the claims started {claims}, not {ids}")
            return turns

        turns = await self._step(d, "claim", claim)

        async def save() -> None:
            await asyncio.gather(*(_save(d.saves, t) for t in turns))

        await self._step(d, "save", save)

        async def finish() -> None:
            done = await asyncio.gather(
                *(
                    store.finish_turn(
                        pool,
                        t,
                        machine.REPLIED,
                        "replied",
                        t.fence_token,
                        start_next=True,
                        reply_message_id=f"{t.message_id}.out",
                        release=True,
                    )
                    for t in turns
                )
            )
            if any(f.next is not store.RELEASED for f in done):
                raise RuntimeError(f"a conversation was not released: {done}")

        await self._step(d, "finish", finish)
        if self.statuses:

            async def statuses() -> None:
                # A webhook each, as Meta sends them; those of customers writing at once reach
                # the state service together, in one call (the gateway's IngestBatch).
                for status in ("sent", "delivered", "read"):
                    updates = [
                        Status(
                            f"{t.message_id}.out",
                            harness.PHONE_NUMBER_ID,
                            f"1666{c}",
                            status,
                            int(time.time()),
                            "{}",
                        )
                        for t, c in zip(turns, customers, strict=True)
                    ]
                    _, stored = await store.ingest(pool, [], updates, "b", "")
                    if stored != len(updates):
                        raise RuntimeError(f"{stored} of {len(updates)} statuses stored")

            await self._step(d, "statuses", statuses)
        d.messages += self.together


async def _database(
    servers: harness.Servers, label: str, before: str | None, rows: int
) -> tuple[str, str]:
    if before is None:
        dsn = await servers.database()
    else:
        folder = servers.root / f"migrations-before-{before}"
        dsn = await migrated_before(servers.pg, folder, before)
    pool = await db.create_pool(dsn, min_size=1, max_size=1)
    try:
        # (Analyzed by history.write; vacuumed as a deployment's tables are.)
        await history.write(pool, harness.PHONE_NUMBER_ID, rows, context_entries=5)
        await pool.execute("VACUUM")
    finally:
        await pool.close()
    return label, dsn


async def measure(
    rounds: int, rows: int, together: int, statuses: bool, sync: bool, before: str | None
) -> list[Database]:
    harness.analyzed_plans()
    async with harness.servers() as servers:
        wanted: list[tuple[str, str | None]] = [("the migrations' own", None)]
        if before is not None:
            wanted.append((f"the migrations before {before}", before))
        made = [await _database(servers, label, b, rows) for label, b in wanted]
        databases = []
        for label, dsn in made:
            # One connection: one backend, whose CPU is the figure.
            pool = await db.create_pool(dsn, min_size=1, max_size=1)
            if not sync:
                name = await pool.fetchval("SELECT current_database()")
                await pool.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
                await pool.expire_connections()
            backend = await pool.fetchval("SELECT pg_backend_pid()")
            databases.append(Database(label, pool, Saves(pool), backend))
        run = Run(together, statuses)
        try:
            groups = max(1, MESSAGES_PER_ROUND // together)
            for d in databases:  # each connection plans each statement once: not measured
                for _ in range(10):
                    await run.group(d)
                d.cpu.clear()
                d.messages = 0
            for r in range(rounds):
                for d in databases if r % 2 == 0 else databases[::-1]:
                    for _ in range(groups):
                        await run.group(d)
            for d in databases:
                if await d.pool.fetchval("SELECT pg_backend_pid()") != d.backend:
                    raise RuntimeError(f"{d.label}: the connection was replaced mid-run")
        finally:
            for d in databases:
                await d.saves.close()
                await d.pool.close()
    return databases


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.turn_sql",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=40_000, help="answered messages of history")
    parser.add_argument("--together", type=int, default=1, help="customers writing at once")
    parser.add_argument("--statuses", action="store_true", help="and the replies' statuses")
    parser.add_argument(
        "--no-sync", dest="sync", action="store_false", help="synchronous_commit off"
    )
    parser.add_argument("--before", metavar="PREFIX", help="also the release before PREFIX")
    args = parser.parse_args()
    databases = asyncio.run(
        measure(args.rounds, args.rows, args.together, args.statuses, args.sync, args.before)
    )
    steps = [s for s in STEPS if s in databases[0].cpu]
    print(
        f"PostgreSQL backend CPU per message, µs ({args.rounds} rounds of {MESSAGES_PER_ROUND},"
        f" {args.together} at once, synchronous_commit {'on' if args.sync else 'off'}):"
    )
    print("  " + "".join(f"{s:>9}" for s in [*steps, "total"]))
    for d in databases:
        each = [1e6 * d.cpu[s] / d.messages for s in steps]
        print("  " + "".join(f"{v:9.0f}" for v in [*each, sum(each)]) + f"   {d.label}")
    if len(databases) == 2:
        a, b = databases
        ratios = [a.cpu[s] / b.cpu[s] if b.cpu[s] else 0.0 for s in steps]
        total = sum(a.cpu.values()) / sum(b.cpu.values())
        print("  " + "".join(f"{v:9.2f}" for v in [*ratios, total]) + "   ratio")


if __name__ == "__main__":
    main()
