"""One coarse timer keeps the deadlines of many awaits (common/deadlines.py): an answer in time
is returned, one that does not come fails with its owner's error soon after its deadline, and
never before it."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.deadlines import Deadlines


class Late(Exception):
    pass


def late(seconds: float) -> Late:
    return Late(f"nothing within {seconds:g} s")


async def test_an_answer_in_time_is_returned_and_a_missing_one_fails_soon_after_its_deadline() -> (
    None
):
    deadlines = Deadlines(0.02)
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[str] = loop.create_future()
    silent: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.05, answered.set_result, "yes")
    started = time.monotonic()
    assert await deadlines.wait(answered, 1.0, late) == "yes"
    with pytest.raises(Late, match=r"nothing within 0\.2 s"):
        await deadlines.wait(silent, 0.2, late)
    waited = time.monotonic() - started
    assert 0.2 <= waited < 2.0  # never before its deadline; "soon after" is loose for CI
    assert silent.exception() is not None  # the future itself failed: its owner sees it too


async def test_many_awaits_fail_each_by_its_own_deadline_under_one_timer() -> None:
    deadlines = Deadlines(0.02)
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[int]] = [loop.create_future() for _ in range(3)]
    waits = [
        asyncio.ensure_future(deadlines.wait(f, seconds, late))
        for f, seconds in zip(futures, (0.05, 5.0, 0.1), strict=True)
    ]
    await asyncio.sleep(0.5)
    assert isinstance(waits[0].exception(), Late)
    assert isinstance(waits[2].exception(), Late)
    assert not waits[1].done()  # its deadline is still ahead
    futures[1].set_result(7)
    assert await waits[1] == 7
    await asyncio.sleep(0.05)
    assert deadlines._timer is None  # nothing awaited: no timer left running


async def test_a_closed_watch_stops_its_timer() -> None:
    deadlines = Deadlines(0.02)
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(deadlines.wait(future, 0.05, late))
    await asyncio.sleep(0)
    deadlines.close()
    await asyncio.sleep(0.2)
    assert not waiting.done()  # the owner fails it itself on closing
    future.set_exception(Late("closing"))
    with pytest.raises(Late, match="closing"):
        await waiting
