"""Acknowledgement benchmarks, each against a baseline measured in the same run.

1. Throughput: our gateway (signature, parse, gRPC State.Ingests to state, durable insert)
   against a bare Starlette endpoint that checks the signature and does one asyncpg insert,
   on the same PostgreSQL. Target: ratio >= 0.9.
2. Tracing: ack p50 with OTLP export on (to a local sink) against off. Target: within 5 %.
3. Slow model: ack p99 while the agent's model takes 2 s per call, against a fast model.
   Target: p99 does not move (the acknowledgement never waits for the agent).

    make bench                                   # embedded PostgreSQL and Valkey
    DATABASE_URL=... REDIS_URL=... make bench
    BENCH_SECONDS=20 BENCH_CONNECTIONS=64 make bench
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys

import httpx

from devtools.ports import free_port
from devtools.system import SECRET

from . import harness


async def wait_http(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                await client.post(url, content=b"{}")
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def throughput(s: harness.Servers) -> None:
    port = free_port()
    baseline = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
        [sys.executable, "-m", "bench.baseline_app", str(port), await s.database(), SECRET]
    )
    base_url = f"http://127.0.0.1:{port}/webhook"
    try:
        await wait_http(base_url)
        async with s.system(WA_ENHANCED_PROCESSING="false") as system:
            ours_url = f"{system.url}/webhook"
            results: dict[str, list[dict[str, float]]] = {"baseline": [], "gateway": []}
            for _ in range(2):  # alternate, so neither gets a quieter machine
                results["baseline"].append(await asyncio.to_thread(harness.load, base_url))
                results["gateway"].append(await asyncio.to_thread(harness.load, ours_url))
    finally:
        baseline.terminate()
        baseline.wait(10)
    best = {k: max(v, key=lambda r: r["rps"]) for k, v in results.items()}
    print(
        "== 1. acknowledgement throughput "
        f"({harness.CONNECTIONS} connections, {harness.SECONDS:.0f} s runs, best of 2)"
    )
    for name, r in best.items():
        print(harness.row(name, r))
    ratio = best["gateway"]["rps"] / best["baseline"]["rps"]
    print(f"ratio gateway/baseline: {ratio:.2f} (target >= 0.9)")


# 1: latency of one delivery at a time; 8: a busy gateway (the machine saturates around there).
TRACING_CONNECTIONS = (1, 8)
TRACING_SECONDS = float(os.environ.get("BENCH_TRACING_SECONDS", "40"))
TRACING_BLOCK_SECONDS = 0.5


async def tracing(s: harness.Servers) -> None:
    """Three systems run side by side for the whole measurement: tracing off, a twin of it,
    and tracing on. One load process keeps connections open to two of them and loads them in
    turn, half a second each (ABBA order); each pair's ratio compares two blocks a moment
    apart, so a noisy neighbour or a slow minute hits both alike, and the figure is the median
    of the pairs' ratios. Off against its twin is the method's own noise: what it reports is
    how far from 1.00 a ratio can land with no difference at all."""
    sink = harness.Sink()
    off = {"WA_ENHANCED_PROCESSING": "false"}
    sides = {
        "off": off,
        "twin": off,
        "on": {**off, "OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url},
    }
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = {}
            for name, env in sides.items():
                system = await stack.enter_async_context(s.system(**env))
                urls[name] = f"{system.url}/webhook"
                await asyncio.to_thread(harness.load, urls[name], 8, 2)  # warm up
            for connections in TRACING_CONNECTIONS:
                for other in ("on", "twin"):
                    results[other, connections] = await asyncio.to_thread(
                        harness.load_paired,
                        (urls["off"], urls[other]),
                        connections,
                        TRACING_SECONDS,
                        TRACING_BLOCK_SECONDS,
                    )
    finally:
        sink.stop()
    print(
        f"== 2. tracing cost (side by side, {TRACING_SECONDS:.0f} s per figure in alternating "
        f"{TRACING_BLOCK_SECONDS} s blocks; median of the pairs' ratios)"
    )
    for (other, connections), pairs in results.items():
        ratios = sorted(b / a for a, b in pairs)
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        what = "ack p50 on/off" if other == "on" else "noise: off/off twin"
        target = " (target <= 1.05)" if other == "on" else ""
        print(
            f"{connections} conn, {what:<20} {median:.2f}{target}  [{len(ratios)} pairs, "
            f"quartiles {q1:.2f}-{q3:.2f}; p50 {statistics.median(a for a, _ in pairs):.2f} ms"
            f" vs {statistics.median(b for _, b in pairs):.2f} ms]"
        )


async def slow_model(s: harness.Servers) -> None:
    results = {}
    for name, delay in (("model answers at once", 0.0), ("model takes 2 s", 2.0)):
        with harness.graph_standin(model_delay=delay) as url:
            async with s.system(
                AGENT_BACKEND="openai",
                OPENAI_BASE_URL=url,
                OPENAI_API_KEY="k",
                AGENT_MODEL="m",
                WHATSAPP_API_BASE_URL=url,
            ) as system:
                results[name] = await asyncio.to_thread(harness.load, f"{system.url}/webhook", 16)
    print("== 3. acknowledgement while the model is slow (16 connections, processing on)")
    for name, r in results.items():
        print(harness.row(name, r))
    fast, slow = results["model answers at once"]["p99"], results["model takes 2 s"]["p99"]
    print(f"ack p99 slow/fast model: {slow / fast:.2f} (the ack never waits for the model)")


async def main() -> None:
    which = set(sys.argv[1:]) or {"throughput", "tracing", "slow-model"}
    async with harness.servers() as s:
        if "throughput" in which:
            await throughput(s)
        if "tracing" in which:
            await tracing(s)
        if "slow-model" in which:
            await slow_model(s)


if __name__ == "__main__":
    asyncio.run(main())
