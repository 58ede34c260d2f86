"""The baseline: a bare Starlette endpoint that checks the signature and does one asyncpg insert.

Run as `python -m bench.baseline_app PORT DSN SECRET` (one uvicorn worker, like the gateway).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway import signature


def make_app(dsn: str, secret: str) -> Starlette:
    pool: asyncpg.Pool | None = None

    async def webhook(request: Request) -> Response:
        body = await request.body()
        if not signature.verify(body, request.headers.get("x-hub-signature-256"), secret):
            return Response(status_code=401)
        assert pool is not None
        await pool.execute("INSERT INTO bench_baseline (body) VALUES ($1)", body.decode())
        return Response(b'{"status":"ok"}', media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10)
        assert pool is not None
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS bench_baseline (id bigserial PRIMARY KEY, body text)"
        )
        yield
        await pool.close()

    return Starlette(routes=[Route("/webhook", webhook, methods=["POST"])], lifespan=lifespan)


if __name__ == "__main__":
    port, dsn, secret = sys.argv[1], sys.argv[2], sys.argv[3]
    uvicorn.run(
        make_app(dsn, secret),
        host="127.0.0.1",
        port=int(port),
        log_level="warning",
        access_log=False,
    )
