"""What every benchmark needs: PostgreSQL and Redis (embedded, or DATABASE_URL / REDIS_URL),
fresh databases, the system as processes, and a load run in a separate process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson

from devtools import history
from devtools.loopback import LoopbackServer
from devtools.ports import free_port
from devtools.servers import Postgres, Redis
from devtools.system import SECRET, System

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))


class Servers:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wa-bench-"))
        self.pg = Postgres(self.root)
        self.redis = Redis(self.root)
        self.template = ""
        self._n = 0

    async def database(self) -> str:
        return await self.pg.create_database(self.template)

    @contextlib.asynccontextmanager
    async def system(self, **env: str) -> AsyncIterator[System]:
        self._n += 1
        root = self.root / f"system{self._n}"
        root.mkdir()
        system = System(
            root,
            await self.database(),
            self.redis.url,
            f"wa:bench{self._n}:",
            {"LOG_LEVEL": "WARNING", **env},
        )
        await system.start()
        try:
            yield system
        finally:
            await system.stop()


# The business number the measured messages go to (cli.simulate.text_delivery's default).
PHONE_NUMBER_ID = "100000000000001"


async def write_history(system: System, rows: int) -> None:
    """A business's history of `rows` answered messages, in bulk (devtools/history.py)."""
    started = time.monotonic()
    written = await history.write(await system.db(), PHONE_NUMBER_ID, rows)
    print(f"  (a history of {written} messages written in {time.monotonic() - started:.0f} s)")


def analyzed_plans() -> None:
    """Has the embedded PostgreSQL's autovacuum look every second (call before `servers()`).

    A run starts on an empty database. Each backend caches a generic plan of every statement
    at its sixth run, and on tables that small every index costs the same: the plans chosen
    then read a whole index (the finish's lookup of a message by id scanned all of
    processed_messages_customer_last_idx, the ingest's adopt every conversation of the business
    number) until autovacuum's first ANALYZE replaces them, up to a minute
    (autovacuum_naptime) later: a 10-message run never got there, a 50-message run late, and
    its cost per message grew with the tables. A deployment runs on analyzed tables: what a
    throughput bench measures is that steady state. (A server of DATABASE_URL is left as it is.)
    """
    if not os.environ.get("DATABASE_URL"):
        os.environ["WA_PG_SETTINGS"] = (
            "autovacuum_naptime=1 " + os.environ.get("WA_PG_SETTINGS", "")
        ).strip()


@contextlib.asynccontextmanager
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    await asyncio.to_thread(s.pg.start)
    await asyncio.to_thread(s.redis.start)
    s.template = await s.pg.create_template()
    try:
        yield s
    finally:
        if s.pg.external:
            await s.pg.drop_all()
        s.pg.stop()
        s.redis.stop()


def _run_load(*args: str) -> Any:
    """bench.load in its own process; returns the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", *args], check=True, capture_output=True, text=True
    )
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def load(url: str, connections: int = CONNECTIONS, seconds: float = SECONDS) -> dict[str, float]:
    """Loads one system; returns rps, p50, p99 and errors."""
    result: dict[str, float] = _run_load(url, SECRET, str(connections), str(seconds))
    return result


def load_paired(
    urls: tuple[str, str], connections: int, seconds: float, block: float
) -> list[tuple[float, float]]:
    """Loads two systems in turn, `block` seconds each, for `seconds`; returns each pair's two
    p50s (ms)."""
    args = (urls[0], SECRET, str(connections), str(seconds), "--against", urls[1])
    pairs = _run_load(*args, "--block", str(block))["pairs"]
    return [(a, b) for a, b in pairs]


@contextlib.contextmanager
def graph_standin(model_delay: float = 0.0) -> Iterator[str]:
    """bench.graph (the Graph API and the model) in its own process; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.graph", str(port), str(model_delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class Sink:
    """An OTLP/HTTP endpoint that accepts and drops everything (the exporter's cost only)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def row(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<28} {r['rps']:8.0f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms"
        f"  errors {int(r['errors'])}"
    )
