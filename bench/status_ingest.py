"""What PostgreSQL spends on the ingest of delivery statuses, per call and per status: the
CPU of one backend (from /proc) calling `wa_ingest_statuses` as the state service does, a
status alone (a customer's pace: Meta sends each status webhook on its own) and ten to a call
(a burst), on a business's history (devtools/history.py).

    .venv/bin/python -m bench.status_ingest [--rounds 8] [--rows 40000] [--no-sync]
        [--version FILE ...]

Without `--version` it measures the function the migrations define. Each `--version` is a
file holding another definition of it (a migration, e.g. db/migrations/0032_generic_turn_plans.sql:
its `CREATE [OR REPLACE] FUNCTION wa_ingest_statuses(...) ... $$;` is taken out and renamed),
and then every version is called in turn, round after round, in the same backend on the same
tables, so that the machine's drift reaches all of them alike. `--no-sync` turns
synchronous_commit off for the backend: the WAL flush at each commit is the same for every
version and the noisiest part of the figure.

Every status is about a reply of the history whose delivery state it moves on (and each call
about other replies than the one before), with our callback data, as the services send them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import harness
from bench.cpu import process_cpu
from common import sqlfile
from devtools import history

# The state service's statement, whose function each version replaces by name.
STATEMENT = sqlfile.load("services.state", "queries.sql")["ingest_statuses"]
# A status webhook's object as Meta sends it, stored as the status row's payload.
PAYLOAD = (
    '{"id": "wamid.x", "status": "delivered", "timestamp": "1700000000", "recipient_id": "1",'
    ' "conversation": {"id": "c", "origin": {"type": "service"}},'
    ' "pricing": {"billable": true, "pricing_model": "PMP", "category": "service"}}'
)
ALONE, TOGETHER = 1, 10
CALLS_ALONE, CALLS_TOGETHER = 250, 40  # per round: 250 statuses each way
_DEFINITION = re.compile(
    r"CREATE (?:OR REPLACE )?FUNCTION wa_ingest_statuses\(.*?\n\$\$;", re.DOTALL
)


@dataclass
class Version:
    name: str  # the function's name in the database
    label: str
    cpu: dict[int, float]  # seconds, by batch size
    statuses: dict[int, int]


def definition(path: Path, name: str) -> str:
    """The definition of wa_ingest_statuses in `path`, as a function called `name`."""
    found = _DEFINITION.search(path.read_text())
    if found is None:
        raise SystemExit(f"{path}: no CREATE FUNCTION wa_ingest_statuses(...) ... $$;")
    _, _, rest = found.group(0).partition("(")
    return f"CREATE FUNCTION {name}({rest}"


class Replies:
    """The history's replies in turn: reply k of customer i is `out-<i>-<k>` (history.py), the
    answer to message `old-<i>-<k>` of phone number and BSUID `1666<i>`; customers' ids are
    their conversations' ids in a fresh database."""

    def __init__(self, customers: int, each: int) -> None:
        self.customers, self.each, self.n = customers, each, 0

    def take(self, count: int) -> list[tuple[str, str, str]]:
        taken = []
        for _ in range(count):
            i, k = self.n % self.customers + 1, self.n // self.customers % self.each + 1
            self.n += 1
            taken.append((f"out-{i}-{k}", f"1666{i}", f"old-{i}-{k}"))
        return taken


async def call(
    conn: asyncpg.Connection,
    function: str,
    replies: list[tuple[str, str, str]],
    status: str,
    now: dt.datetime,
) -> None:
    n = len(replies)
    await conn.fetch(
        STATEMENT.replace("wa_ingest_statuses(", f"{function}("),
        [r[0] for r in replies],
        [harness.PHONE_NUMBER_ID] * n,
        [r[1] for r in replies],
        [status] * n,
        [now] * n,
        [PAYLOAD] * n,
        [""] * n,
        ["bench"] * n,
        [""] * n,
        [r[2] for r in replies],
        [r[1] for r in replies],
    )


def replies_needed(rounds: int, versions: int) -> int:
    """How many replies a run's statuses are about: each once, so that every status stores a
    row and moves a reply's state on (a reply taken twice would find its statuses stored)."""
    warm = 10 * ALONE + TOGETHER
    per_round = CALLS_ALONE * ALONE + CALLS_TOGETHER * TOGETHER
    return versions * (warm + rounds * per_round)


async def measure(rounds: int, rows: int, sync: bool, files: Sequence[Path]) -> list[Version]:
    harness.analyzed_plans()
    # history.write writes a whole number of messages per customer.
    needed = -(-replies_needed(rounds, 1 + len(files)) // history.CUSTOMERS) * history.CUSTOMERS
    rows = max(rows, needed)
    async with harness.servers() as servers:
        dsn = await servers.database()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            written = await history.write(pool, harness.PHONE_NUMBER_ID, rows)
        finally:
            await pool.close()
        conn = await asyncpg.connect(dsn)
        try:
            versions = [Version("wa_ingest_statuses", "the migrations' own", {}, {})]
            for n, path in enumerate(files):
                name = f"wa_ingest_statuses_bench{n}"
                await conn.execute(definition(path, name))
                versions.append(Version(name, str(path), {}, {}))
            # Every reply back to `sent`: each status then moves one on (delivered, read).
            await conn.execute(
                "UPDATE processed_webhook_messages SET reply_status = 'sent' WHERE kind = 'message'"
            )
            await conn.execute("VACUUM ANALYZE processed_webhook_messages")
            if not sync:
                await conn.execute("SET synchronous_commit = off")
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            replies = Replies(history.CUSTOMERS, written // history.CUSTOMERS)
            now = dt.datetime.now(dt.UTC)
            for v in versions:  # each connection plans each statement once: not measured
                for _ in range(10):
                    await call(conn, v.name, replies.take(ALONE), "delivered", now)
                await call(conn, v.name, replies.take(TOGETHER), "delivered", now)
            for r in range(rounds):
                for v in versions if r % 2 == 0 else versions[::-1]:
                    for size, calls, status in (
                        (ALONE, CALLS_ALONE, "delivered"),
                        (TOGETHER, CALLS_TOGETHER, "read"),
                    ):
                        before = process_cpu(backend)
                        for _ in range(calls):
                            await call(conn, v.name, replies.take(size), status, now)
                        v.cpu[size] = v.cpu.get(size, 0.0) + process_cpu(backend) - before
                        v.statuses[size] = v.statuses.get(size, 0) + size * calls
        finally:
            await conn.close()
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.status_ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--rows",
        type=int,
        default=40_000,
        help="answered messages of history (more when the run needs more replies)",
    )
    parser.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="synchronous_commit off in the measuring backend",
    )
    parser.add_argument("--version", dest="files", type=Path, action="append", default=[])
    args = parser.parse_args()
    versions = asyncio.run(measure(args.rounds, args.rows, args.sync, args.files))
    print(
        f"PostgreSQL backend CPU per status, {args.rounds} rounds, synchronous_commit "
        f"{'on' if args.sync else 'off'}:"
    )
    for v in versions:
        alone = 1e6 * v.cpu[ALONE] / v.statuses[ALONE]
        together = 1e6 * v.cpu[TOGETHER] / v.statuses[TOGETHER]
        print(
            f"  {alone:6.0f} µs alone, {together:5.0f} µs each of {TOGETHER} in a call:  {v.label}"
        )


if __name__ == "__main__":
    main()
