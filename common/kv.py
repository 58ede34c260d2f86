"""The Redis client every service uses, with timeouts on connect and on every command."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=False,
        decode_responses=True,
    )
