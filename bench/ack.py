"""Acknowledgement throughput: our gateway (signature, parse, gRPC Ingest to state, durable
insert) against the baseline (bare Starlette, signature, one asyncpg insert), side by side in
one run on the same PostgreSQL. Prints both and the ratio (target: >= 0.5).

    make bench                          # embedded PostgreSQL and Valkey
    DATABASE_URL=... REDIS_URL=... make bench
    BENCH_SECONDS=20 BENCH_CONNECTIONS=64 make bench
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import orjson

from common import embedded
from tests.support.servers import Postgres, Redis
from tests.support.system import SECRET, System

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))


def load(url: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", url, SECRET, str(CONNECTIONS), str(SECONDS)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = orjson.loads(out.stdout.strip().splitlines()[-1])
    return result


async def wait_http(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                await client.post(url, content=b"{}")
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="wa-bench-"))
    pg, redis = Postgres(root), Redis(root)
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(redis.start)
    try:
        template = await pg.create_template()
        ours_db = await pg.create_database(template)
        base_db = await pg.create_database(template)

        port = embedded.free_port()
        baseline = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
            [sys.executable, "-m", "bench.baseline_app", str(port), base_db, SECRET]
        )
        base_url = f"http://127.0.0.1:{port}/webhook"
        await wait_http(base_url)

        system = System(
            root / "system",
            ours_db,
            redis.url,
            "bench:",
            {"WA_ENHANCED_PROCESSING": "false", "LOG_LEVEL": "WARNING"},
        )
        (root / "system").mkdir()
        await system.start(("state", "agent", "dlq", "gateway"))
        ours_url = f"{system.url}/webhook"
        try:
            # Warm both up, then alternate so neither gets a quieter machine.
            results: dict[str, list[dict[str, float]]] = {"baseline": [], "gateway": []}
            for _round in range(2):
                results["baseline"].append(await asyncio.to_thread(load, base_url))
                results["gateway"].append(await asyncio.to_thread(load, ours_url))
                await asyncio.sleep(1)
        finally:
            await system.stop()
            baseline.terminate()
            baseline.wait(10)
        best = {k: max(v, key=lambda r: r["rps"]) for k, v in results.items()}
        for name, r in best.items():
            print(
                f"{name:<9} {r['rps']:8.0f} req/s  p50 {r['p50']:6.1f} ms  "
                f"p99 {r['p99']:6.1f} ms  errors {int(r['errors'])}"
            )
        print(
            f"ratio gateway/baseline: {best['gateway']['rps'] / best['baseline']['rps']:.2f} "
            f"({CONNECTIONS} connections, {SECONDS:.0f}s per run, best of 2)"
        )
    finally:
        await pg.drop_all()
        pg.stop()
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
