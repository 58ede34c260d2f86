"""One JSON POST over the agent's shared aiohttp session, with a timeout, answered as plain
data (status, body, headers) so callers decide what is an error and what is retryable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


class HttpFailure(Exception):
    """No answer: the call timed out or the connection failed."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def session(*, connections: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=30, connect=5),
    )


async def post_json(
    http: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    try:
        async with http.post(
            url,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json", **headers},
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        ) as resp:
            return Answer(
                resp.status, await resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            )
    except TimeoutError as exc:
        raise HttpFailure(f"no answer within {timeout:g}s", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise HttpFailure(f"{type(exc).__name__}: {exc}", timeout=False) from exc
