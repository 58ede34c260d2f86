"""The whole system as processes for the tests: it lives in `devtools.system`, shared with
bench/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from devtools.system import ACCESS_TOKEN, SECRET, SERVICES, VERIFY_TOKEN, System

__all__ = ["ACCESS_TOKEN", "SECRET", "SERVICES", "VERIFY_TOKEN", "System", "readiness"]


async def readiness(
    system: System, until: Callable[[int, dict[str, Any]], bool], timeout: float = 30.0
) -> tuple[int, dict[str, Any]]:
    """`/readyz`'s status and body once `until(status, body)` holds: it answers the gateway's
    last background check (GATEWAY_READY_REFRESH_SECONDS), so a change shows within a period."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await system.http.get(f"{system.url}/readyz")
        body = resp.json()
        if until(resp.status_code, body):
            return resp.status_code, body
        if time.monotonic() > deadline:
            raise TimeoutError(f"/readyz never got there: {resp.status_code} {body}")
        await asyncio.sleep(0.1)
