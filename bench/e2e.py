"""End to end with the rules backend: messages across 200 conversations, from the first POST
to the last reply at the (fake, loopback) Graph API. Target: at least 500 messages/s, and at
most 2.2 ms of CPU per message across the system's processes, PostgreSQL and the
Redis-compatible server included (from /proc; the load generator and the Graph API stand-in
are not the system and are not counted).

    .venv/bin/python -m bench.e2e [MESSAGES_PER_CONVERSATION]
    WA_SCALE=agent=2,state=2 .venv/bin/python -m bench.e2e     # replicas (devtools/replicas.py)
    .venv/bin/python -m bench.e2e --curve [MESSAGES_PER_CONVERSATION]
    .venv/bin/python -m bench.e2e --statements [MESSAGES_PER_CONVERSATION]
    .venv/bin/python -m bench.e2e --curve --rate 400 20     # an offered load, 400 messages/s
    .venv/bin/python -m bench.e2e --curve --idle 30         # no load: background loops' CPU
    .venv/bin/python -m bench.e2e --history 50 10   # established customers, not new ones
    .venv/bin/python -m bench.e2e --rows 200000 10  # on a business's history
    .venv/bin/python -m bench.e2e --statuses 10     # with Meta's status webhooks

`--statements` (embedded PostgreSQL only) preloads pg_stat_statements and prints, after the
run, what PostgreSQL executed per message: each statement's calls and time per message, the
commits per message, and the rows inserted, updated (HOT or not) and deleted per message. Each
statement's plans a call show one PostgreSQL plans again at every run instead of keeping a plan
(db/migrations/0032_generic_turn_plans.sql).

`--rate` offers the messages at a fixed rate instead of as fast as they are acknowledged. A
burst's CPU per message falls as a backlog builds (a turn that finds the next message waiting
needs no new claim, and batches grow), so a faster system pays more per message for draining it
sooner; at one offered rate below every configuration's capacity, each is measured at the
same backlog, as customers load it.

`--statements` also counts the audit rows per message by transition.

`--rows N` first writes, in bulk, a business's history of N answered messages (20,000 other
customers, two delivery statuses a reply, a context each) and analyzes it: what PostgreSQL
plans for a statement depends on its tables' statistics, and a deployment's tables are not
empty. On the empty tables of a plain run, planning every statement at every run costs little;
on a history of 200,000 messages the ingest's plan alone cost more than running it (fixed by
db/migrations/0032_generic_turn_plans.sql).

`--statuses` has the Graph API stand-in post every reply's statuses (`sent`, `delivered`,
`read`, each its own signed delivery, as Meta does) to the system; the run also waits until
they are all acknowledged, and CPU per message includes them. "Deliveries per ingest
batch" then counts status deliveries too.

`--history N` first sends every conversation N messages and waits for their replies, unmeasured:
the measured messages then come from customers with a history (a context of up to
AGENT_CONTEXT_MAX_MESSAGES messages, read and written by every turn) instead of new ones.

Every run also reports the WAL PostgreSQL wrote per message (from pg_current_wal_lsn(), so on a
shared server it counts what others wrote meanwhile too).

`--curve` runs the same load with 1, 2 and 4 replicas of state and agent, one after the other
on the same servers. Each run reports messages/s, CPU per message per process and in total,
and the worst (and p99) time from a message's acknowledgement to its reply, from PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cli.simulate import text_delivery, username_bsuid
from devtools.system import SECRET, System

from . import cpu, graph, harness, load
from .harness import Servers

CONVERSATIONS = 200


async def _wal_lsn(system: System) -> str:
    lsn: str = await (await system.db()).fetchval("SELECT pg_current_wal_lsn()::text")
    return lsn


async def _wal_since(system: System, lsn: str) -> float:
    """Bytes of WAL written since `lsn`."""
    return float(
        await (await system.db()).fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", lsn
        )
    )


def delivery(conv: int, n: int, base_ts: int) -> dict[str, Any]:
    """Message `n` of conversation `conv`. A third of the customers write by phone number only,
    a third by BSUID only (a username), a third with both, as Meta names customers since
    BSUIDs."""
    phone, user_id = f"1555{conv:07d}", username_bsuid(f"customer-{conv}")
    wa_id, uid = [(phone, ""), (None, user_id), (phone, user_id)][conv % 3]
    text = f"c{conv:03d}-m{n} please help"
    return text_delivery(text, wa_id=wa_id, user_id=uid, timestamp=base_ts + n)


async def replies(client: httpx.AsyncClient, url: str) -> dict[str, int]:
    out: dict[str, int] = (await client.get(f"{url}/replies")).json()
    return out


def _signed(system: System, docs: list[dict[str, Any]]) -> list[bytes]:
    host = system.url.split("//")[1]
    return [load.signed_request(host, "/webhook", SECRET, orjson.dumps(doc)) for doc in docs]


async def _post(system: System, requests: list[bytes], rate: float | None = None) -> None:
    errors = await load.post_all(f"{system.url}/webhook", requests, 32, rate)
    assert errors == 0, f"{errors} deliveries were not acknowledged"


async def _until_replied(
    client: httpx.AsyncClient, graph_url: str, before: int, total: int, started: float
) -> dict[str, int]:
    """The stand-in's counts once `total` replies more than `before` were sent."""
    deadline = started + 600
    while (counts := await replies(client, graph_url))["sent"] - before < total:
        assert time.monotonic() < deadline, "replies did not all arrive in 600 s"
        await asyncio.sleep(0.05)
    return counts


async def _until_statuses(
    client: httpx.AsyncClient, graph_url: str, before: dict[str, int], total: int
) -> dict[str, int]:
    """The stand-in's counts once the statuses of `total` replies were acknowledged: each
    stored, since the gateway answers 200 only once the state service has stored it."""
    deadline = time.monotonic() + 600
    expected = len(graph.STATUSES) * total
    while True:
        counts = await replies(client, graph_url)
        refused = counts["status_errors"] - before["status_errors"]
        assert not refused, f"{refused} status webhooks were refused"
        if counts["statuses"] - before["statuses"] >= expected:
            return counts
        assert time.monotonic() < deadline, "status webhooks were not all acknowledged in 600 s"
        await asyncio.sleep(0.05)


CURVE = ("state=1,agent=1", "state=2,agent=2", "state=4,agent=4")


def _cpu(s: Servers, system: System) -> dict[str, float]:
    # Every process of every service, each replica on its own line.
    roots: dict[str, int | None] = {r.name: system.sup.pid(r.name) for r in system.scale.all()}
    by_name: dict[str, list[str]] = {}
    if s.pg.external:
        by_name["postgres"] = ["postgres"]
    else:
        roots["postgres"] = s.pg.proc.pid if s.pg.proc else None
    if s.redis.external:
        by_name["redis"] = ["redis-server", "valkey-server"]
    else:
        roots["redis"] = s.redis.proc.pid if s.redis.proc else None
    return cpu.snapshot(roots, by_name)


def _report_cpu(per: dict[str, float], system: System) -> float:
    if not per:
        print("  CPU per message: not measured (no /proc)")
        return 0.0
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in per.items())
    print(f"  CPU per message: {sum(per.values()):.2f} ms ({parts})")
    if system.scale.scaled:
        services = {
            service: sum(per.get(n, 0.0) for n in system.scale.names(service))
            for service in system.scale.replicas
        }
        print("  by service: " + ", ".join(f"{k} {v:.2f}" for k, v in services.items()))
    return sum(per.values())


async def idle(s: Servers, graph_url: str, scale: str, seconds: float) -> float:
    """The system up, ready and sent nothing: CPU per second of each process (its background
    loops: leases, sweeps, polls, readiness checks, gauges), and in total."""
    async with s.system(WHATSAPP_API_BASE_URL=graph_url, WA_SCALE=scale) as system:
        await asyncio.sleep(3)  # start-up's own work done
        before = _cpu(s, system)
        await asyncio.sleep(seconds)
        per_second = {
            name: ms / seconds for name, ms in cpu.per_message(before, _cpu(s, system), 1).items()
        }
    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in per_second.items())
    total = sum(per_second.values())
    print(f"idle for {seconds:g} s, WA_SCALE={scale or 'none'}: {total:.1f} ms of CPU a second")
    print(f"  ({parts})")
    return total


async def _latency(system: System) -> tuple[float, float]:
    """The worst and p99 seconds from acknowledgement (stored) to reply (finished)."""
    row = await (await system.db()).fetchrow(
        "SELECT max(extract(epoch FROM finished_at - received_at)) AS worst,"
        " percentile_cont(0.99) WITHIN GROUP"
        " (ORDER BY extract(epoch FROM finished_at - received_at)) AS p99"
        " FROM processed_webhook_messages WHERE kind = 'message' AND status = 'replied'"
    )
    assert row is not None
    return float(row["worst"] or 0), float(row["p99"] or 0)


async def _backends(system: System) -> str:
    """The services' PostgreSQL connections open at the end of the run (each pool keeps what
    it opened for 60 s idle), in total and per service."""
    rows = await (await system.db()).fetch(
        "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity"
        " WHERE application_name LIKE 'wa-%' GROUP BY 1 ORDER BY 1"
    )
    parts = ", ".join(f"{r['name'].removeprefix('wa-')} {r['n']}" for r in rows)
    return f"{sum(r['n'] for r in rows)} ({parts})"


async def _samples(client: httpx.AsyncClient, url: str) -> list[Sample]:
    """Every sample a process's /metrics shows, read as a Prometheus scraper reads them."""
    text = (await client.get(url)).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def _ingest_batches(client: httpx.AsyncClient, system: System) -> tuple[float, float]:
    """The gateway's ingest batches so far and the deliveries they carried (its /metrics;
    with gateway replicas, the one that answered)."""
    found = {s.name: s.value for s in await _samples(client, f"{system.url}/metrics")}
    return (
        found.get("wa_gateway_ingest_batch_size_count", 0.0),
        found.get("wa_gateway_ingest_batch_size_sum", 0.0),
    )


# The coalescers' histogram (common/coalesce.py): batches, and the calls they carried.
_COALESCED = {"wa_coalesced_batch_size_count": 0, "wa_coalesced_batch_size_sum": 1}


async def _batches(client: httpx.AsyncClient, system: System) -> dict[tuple[str, str], list[float]]:
    """Each process's coalesced batches so far (common/coalesce.py's histogram on its
    /metrics): (process, operation) -> [batches, calls]."""
    found: dict[tuple[str, str], list[float]] = {}
    for replica in system.scale.all():
        if replica.metrics_port is None or replica.service not in ("state", "agent"):
            continue
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        for sample in await _samples(client, url):
            i = _COALESCED.get(sample.name)
            if i is not None:
                key = (replica.name, sample.labels["operation"])
                found.setdefault(key, [0.0, 0.0])[i] = sample.value
    return found


def _report_batches(
    before: dict[tuple[str, str], list[float]],
    after: dict[tuple[str, str], list[float]],
    total: int,
) -> None:
    """Calls a batch and batches a message, by operation and process: what each replica
    groups depends on what it sees."""
    parts: list[str] = []
    for (name, operation), (batches, calls) in sorted(after.items(), key=lambda kv: kv[0][::-1]):
        was = before.get((name, operation), [0.0, 0.0])
        n, c = batches - was[0], calls - was[1]
        if n:
            parts.append(f"{operation} {name} {c / n:.1f} ({n / total:.2f})")
    if parts:
        print("  calls a batch (batches a message): " + ", ".join(parts))


async def _statements_reset(system: System) -> None:
    db = await system.db()
    await db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    await db.execute("SELECT pg_stat_statements_reset(), pg_stat_reset()")


async def _statements_report(system: System, total: int) -> None:
    """Where PostgreSQL's time went, per message (pg_stat_statements: time inside the
    executor, functions' statements included as their own rows with `track=all`)."""
    db = await system.db()
    rows = await db.fetch(
        "SELECT calls, plans, total_exec_time, total_plan_time, rows, toplevel,"
        " regexp_replace(left(query, 110), '\\s+', ' ', 'g') AS q"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())"
        " ORDER BY total_exec_time + total_plan_time DESC LIMIT 30"
    )
    print(
        "  PostgreSQL statements (per message: calls, µs in all, plans a call, µs of planning;"
        " top level or inside a function):"
    )
    for r in rows:
        us = 1000 * (r["total_exec_time"] + r["total_plan_time"]) / total
        where = "top" if r["toplevel"] else "fn "
        plans = r["plans"] / max(r["calls"], 1)
        planning = 1000 * r["total_plan_time"] / total
        calls = r["calls"] / total
        print(f"    {calls:6.2f} {us:8.1f} µs {plans:5.2f} {planning:6.1f} {where} {r['q']}")
    db_row = await db.fetchrow(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )
    assert db_row is not None
    print(
        f"  commits per message {db_row['xact_commit'] / total:.2f},"
        f" rollbacks {db_row['xact_rollback'] / total:.2f}"
    )
    tables = await db.fetch(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
        " FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"
        " ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC"
    )
    # Buffers and index entries read: like the counts of rows, they do not depend on how busy
    # the machine is (an index read whole, or one full of dead entries, shows here first).
    blk = await db.fetch(
        "SELECT shared_blks_hit + shared_blks_read AS b, calls,"
        " regexp_replace(left(query, 90), '\\s+', ' ', 'g') AS q"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database()) ORDER BY 1 DESC LIMIT 15"
    )
    print("  buffers per message (per call), the 15 most:")
    for r in blk:
        print(f"    {r['b'] / total:8.1f} ({r['b'] / max(r['calls'], 1):8.1f}) {r['q']}")
    idx = await db.fetch(
        "SELECT indexrelname, idx_scan, idx_tup_read, idx_tup_fetch FROM pg_stat_user_indexes"
        " WHERE idx_scan > 0 ORDER BY idx_tup_read DESC LIMIT 15"
    )
    print("  index entries per message (scans, entries read, rows fetched), the 15 most read:")
    for r in idx:
        print(
            f"    {r['indexrelname']:<48} {r['idx_scan'] / total:6.2f}"
            f" {r['idx_tup_read'] / total:7.2f} {r['idx_tup_fetch'] / total:7.2f}"
        )
    print("  rows per message (inserted, updated of which HOT, deleted):")
    for t in tables:
        print(
            f"    {t['relname']:<32} {t['n_tup_ins'] / total:5.2f} {t['n_tup_upd'] / total:5.2f}"
            f" ({t['n_tup_hot_upd'] / total:4.2f}) {t['n_tup_del'] / total:5.2f}"
        )
    audit = await db.fetch(
        "SELECT entity, coalesce(from_state, '-') AS f, to_state AS t, count(*) AS n"
        " FROM conversation_state_transitions GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 12"
    )
    print("  audit rows per message (entity: from -> to):")
    for r in audit:
        print(f"    {r['n'] / total:5.2f} {r['entity']}: {r['f']} -> {r['t']}")


async def run(
    s: Servers,
    graph_url: str,
    per: int,
    scale: str,
    statements: bool = False,
    rate: float | None = None,
    history: int = 0,
    rows: int = 0,
    statuses: bool = False,
) -> tuple[float, float, float]:
    """One run; returns messages/s, CPU ms per message and the worst ack-to-reply seconds."""
    async with (
        s.system(WHATSAPP_API_BASE_URL=graph_url, WA_SCALE=scale) as system,
        httpx.AsyncClient(timeout=10) as client,
    ):
        base = int(time.time())
        if rows:
            await harness.write_history(system, rows)
        if history:
            # The conversations' earlier messages, a second apart, before the measured ones.
            earlier = [
                delivery(c, n, base - history - 1)
                for n in range(history)
                for c in range(CONVERSATIONS)
            ]
            sent = (await replies(client, graph_url))["sent"]
            await _post(system, _signed(system, earlier))
            await _until_replied(client, graph_url, sent, len(earlier), time.monotonic())
        before = await replies(client, graph_url)
        docs = [delivery(c, history + n, base) for n in range(per) for c in range(CONVERSATIONS)]
        total = len(docs)
        requests = _signed(system, docs)
        if statements:
            await _statements_reset(system)
        batches_before = await _ingest_batches(client, system)
        coalesced_before = await _batches(client, system)
        if statuses:
            target = {"url": f"{system.url}/webhook", "secret": SECRET}
            await client.post(f"{graph_url}/statuses", json=target)
        wal_before = await _wal_lsn(system)
        cpu_before = _cpu(s, system)
        started = time.monotonic()
        await _post(system, requests, rate)
        acked = time.monotonic() - started
        counts = await _until_replied(client, graph_url, before["sent"], total, started)
        elapsed = time.monotonic() - started
        if statuses:
            counts = await _until_statuses(client, graph_url, before, total)
            await client.post(f"{graph_url}/statuses", json={"url": None})
        statuses_done = time.monotonic() - started
        cpu_after = _cpu(s, system)
        wal = await _wal_since(system, wal_before)
        batches_after = await _ingest_batches(client, system)
        coalesced_after = await _batches(client, system)
        sent = counts["sent"] - before["sent"]
        worst, p99 = await _latency(system)
        backends = await _backends(system)
        print(
            f"{total} messages across {CONVERSATIONS} conversations (rules backend),"
            f" WA_SCALE={scale or 'none'}"
            + (f", offered at {rate:g}/s" if rate else "")
            + (f", after {history} earlier messages each" if history else "")
        )
        print(f"  all acknowledged after {acked:.1f} s ({total / acked:.0f} acks/s)")
        print(f"  {sent} replies after {elapsed:.1f} s: {sent / elapsed:.0f} messages/s")
        print(f"  duplicates: {counts['duplicates'] - before['duplicates']}")
        if statuses:
            acked_statuses = counts["statuses"] - before["statuses"]
            print(
                f"  status webhooks (sent, delivered, read of each reply): {acked_statuses},"
                f" all acknowledged (stored) after {statuses_done:.1f} s; CPU below includes them"
            )
        print(f"  acknowledged to replied: worst {worst:.2f} s, p99 {p99:.2f} s")
        print(f"  PostgreSQL backends of the services: {backends}")
        calls = batches_after[0] - batches_before[0]
        if calls:
            per_call = (batches_after[1] - batches_before[1]) / calls
            print(f"  deliveries per ingest batch: {per_call:.1f} ({calls:.0f} batches)")
        _report_batches(coalesced_before, coalesced_after, total)
        ms = _report_cpu(cpu.per_message(cpu_before, cpu_after, total), system)
        print(f"  WAL per message: {wal / total / 1024:.1f} kB")
        if statements:
            await _statements_report(system, total)
        return sent / elapsed, ms, worst


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description="End to end with the rules backend: messages/s and CPU per message.",
    )
    parser.add_argument(
        "per", nargs="?", type=int, default=10, help="messages per conversation (200 of them)"
    )
    parser.add_argument(
        "--curve", action="store_true", help="1, 2 and 4 replicas of state and agent in turn"
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="offer the messages at this rate (messages/s) instead of as fast as acknowledged",
    )
    parser.add_argument(
        "--idle",
        type=float,
        metavar="SECONDS",
        help="send nothing: each process's CPU a second while the system idles this long",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        metavar="N",
        help="first send every conversation N messages, unmeasured (customers with a history)",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=0,
        metavar="N",
        help="first write a business's history of N answered messages, in bulk, unmeasured",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="what PostgreSQL executed per message (embedded PostgreSQL only)",
    )
    parser.add_argument(
        "--statuses",
        action="store_true",
        help="the Graph API stand-in posts every reply's statuses (sent, delivered, read) to"
        " the system as Meta does; CPU per message includes them",
    )
    return parser.parse_args()


async def main() -> None:
    args = _arguments()
    if args.statements:
        if os.environ.get("DATABASE_URL"):
            sys.exit("--statements needs the embedded PostgreSQL (unset DATABASE_URL)")
        os.environ["WA_PG_SETTINGS"] = (
            "shared_preload_libraries=pg_stat_statements pg_stat_statements.track=all "
            "pg_stat_statements.track_planning=on " + os.environ.get("WA_PG_SETTINGS", "")
        )
    harness.analyzed_plans()
    per: int = args.per
    scales = CURVE if args.curve else (os.environ.get("WA_SCALE", ""),)
    results = []
    with harness.graph_standin() as graph_url:
        async with harness.servers() as s:
            for scale in scales:
                if args.idle:
                    await idle(s, graph_url, scale, args.idle)
                    continue
                results.append(
                    (
                        scale,
                        *await run(
                            s,
                            graph_url,
                            per,
                            scale,
                            args.statements,
                            args.rate,
                            args.history,
                            args.rows,
                            args.statuses,
                        ),
                    )
                )
    if len(results) > 1:
        print("\nreplicas of state and agent | messages/s | CPU ms/message | worst ack->reply s")
        for scale, rate, ms, worst in results:
            print(f"  {scale:<26} | {rate:10.0f} | {ms:14.2f} | {worst:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
