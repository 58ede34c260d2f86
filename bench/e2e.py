"""End to end with the rules backend: messages across 200 conversations, from the first POST
to the last reply at the (fake, loopback) Graph API. Target: at least 500 messages/s, and at
most 2.2 ms of CPU per message across the system's processes, PostgreSQL and the
Redis-compatible server included (from /proc; the load generator and the Graph API stand-in
are not the system and are not counted).

    .venv/bin/python -m bench.e2e [MESSAGES_PER_CONVERSATION]
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import httpx
import orjson

from cli.simulate import text_delivery, username_bsuid
from devtools.system import SECRET, SERVICES, System

from . import cpu, harness, load
from .harness import Servers

CONVERSATIONS = 200


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


def _cpu(s: Servers, system: System) -> dict[str, float]:
    roots: dict[str, int | None] = {name: system.sup.pid(name) for name in SERVICES}
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


def _report_cpu(per: dict[str, float]) -> None:
    if not per:
        print("  CPU per message: not measured (no /proc)")
        return
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in per.items())
    print(f"  CPU per message: {sum(per.values()):.2f} ms ({parts})")


async def main() -> None:
    per = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with harness.graph_standin() as graph_url:
        async with (
            harness.servers() as s,
            s.system(WHATSAPP_API_BASE_URL=graph_url) as system,
            httpx.AsyncClient(timeout=10) as client,
        ):
            base = int(time.time())
            docs = [delivery(c, n, base) for n in range(per) for c in range(CONVERSATIONS)]
            total = len(docs)
            host = system.url.split("//")[1]
            requests = [
                load.signed_request(host, "/webhook", SECRET, orjson.dumps(doc)) for doc in docs
            ]
            cpu_before = _cpu(s, system)
            started = time.monotonic()
            errors = await load.post_all(f"{system.url}/webhook", requests, 32)
            acked = time.monotonic() - started
            assert errors == 0, f"{errors} deliveries were not acknowledged"
            deadline = started + 600
            while (counts := await replies(client, graph_url))["sent"] < total:
                assert time.monotonic() < deadline, "replies did not all arrive in 600 s"
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            cpu_after = _cpu(s, system)
            sent = counts["sent"]
            print(f"{total} messages across {CONVERSATIONS} conversations (rules backend)")
            print(f"  all acknowledged after {acked:.1f} s ({total / acked:.0f} acks/s)")
            print(f"  {sent} replies after {elapsed:.1f} s: {sent / elapsed:.0f} messages/s")
            print(f"  duplicates: {counts['duplicates']}")
            _report_cpu(cpu.per_message(cpu_before, cpu_after, total))


if __name__ == "__main__":
    asyncio.run(main())
