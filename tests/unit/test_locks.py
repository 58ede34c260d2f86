"""Lease renewal ends with its body, whatever an in-flight renewal does with the cancel."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from services.state.locks import Lease, Locks


class Script:
    def __init__(self, source: str) -> None:
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class SwallowingClient:
    """A Redis client whose scripts answer slowly and, when cancelled, raise TimeoutError
    instead: what a cancel racing a command's own timeout can look like on Python 3.11."""

    def __init__(self) -> None:
        self.renewals = 0
        self.in_flight = asyncio.Event()

    def register_script(self, source: str) -> Any:
        return Script(source)

    async def execute_command(self, *args: Any) -> int:
        self.renewals += 1
        self.in_flight.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            raise TimeoutError("timed out") from None
        return 1


async def test_leaving_keep_renewed_stops_renewing_even_if_the_cancel_is_swallowed() -> None:
    client = SwallowingClient()
    locks = Locks(client, ttl_seconds=0.3)  # type: ignore[arg-type]
    lease = Lease(7, "me")

    async def leave_during_a_renewal() -> None:
        async with locks.keep_renewed(lease):
            # Leave while a renewal is in flight (waiting for it, not sleeping a guess: on a
            # busy machine the first renewal can start later than any fixed sleep).
            await client.in_flight.wait()

    # Not asyncio.timeout: the bug swallows cancels, a timeout's too, and the test would hang.
    leaving = asyncio.create_task(leave_during_a_renewal())
    done, _ = await asyncio.wait({leaving}, timeout=3)
    if leaving not in done:
        lease.lost = True  # ends the runaway loop, so the failure below ends the test too
    assert leaving in done, "leaving keep_renewed never returned"
    leaving.result()
    renewals = client.renewals
    await asyncio.sleep(0.3)
    assert renewals >= 1 and client.renewals == renewals  # and no renewal after the body


class CountingClient:
    """A Redis client whose scripts answer at once (1: still ours) and are counted."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, source: str) -> Any:
        return Script(source)

    async def execute_command(self, *args: Any) -> int:
        self.calls += 1
        return 1


async def test_keep_renewed_renews_every_third_of_the_ttl() -> None:
    client = CountingClient()
    locks = Locks(client, ttl_seconds=0.3)  # type: ignore[arg-type]
    lease = Lease(7, "me")
    async with locks.keep_renewed(lease):
        await asyncio.sleep(0.45)  # renewals due at 0.1, 0.2, 0.3, 0.4 s
    renewals = client.calls
    await asyncio.sleep(0.25)
    assert renewals >= 1 and client.calls == renewals and not lease.lost


async def test_a_renewal_by_refresh_postpones_keep_renewed_s_next_one() -> None:
    """A lease a turn just renewed (`refresh`) needs no renewal a third of the TTL after the
    hold started, only a third after that renewal (fails when the timer renews regardless)."""
    client = CountingClient()
    locks = Locks(client, ttl_seconds=0.9)  # type: ignore[arg-type]
    lease = Lease(7, "me")
    async with locks.keep_renewed(lease):
        for _ in range(10):  # 0.5 s, past the first renewal's 0.3
            lease.renewed_at = time.monotonic()  # what a refresh does
            await asyncio.sleep(0.05)
    assert client.calls == 0
