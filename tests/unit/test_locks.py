"""Lease renewal ends with its body, whatever an in-flight renewal does with the cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from services.state.locks import Lease, Locks


class SwallowingClient:
    """A Redis client whose scripts answer slowly and, when cancelled, raise TimeoutError
    instead: what a cancel racing a command's own timeout can look like on Python 3.11."""

    def __init__(self) -> None:
        self.renewals = 0

    def register_script(self, source: str) -> Any:
        async def run(keys: list[str], args: list[Any]) -> int:
            self.renewals += 1
            try:
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise TimeoutError("timed out") from None
            return 1

        return run


async def test_leaving_keep_renewed_stops_renewing_even_if_the_cancel_is_swallowed() -> None:
    client = SwallowingClient()
    locks = Locks(client, ttl_seconds=0.3)  # type: ignore[arg-type]
    lease = Lease(7, "me")
    async with asyncio.timeout(3):
        async with locks.keep_renewed(lease):
            await asyncio.sleep(0.15)  # a renewal is in flight now
        renewals = client.renewals
        await asyncio.sleep(0.3)
    assert renewals >= 1 and client.renewals == renewals  # and no renewal after the body
