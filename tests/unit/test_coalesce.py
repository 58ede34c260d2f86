"""Concurrent calls of one operation go together; each caller still gets its own outcome."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from common.coalesce import Coalescer

pytestmark = pytest.mark.asyncio


class Recorder:
    def __init__(self, delay: float = 0.01) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay

    async def __call__(self, args: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(args))
        await asyncio.sleep(self.delay)
        return [ValueError(f"odd {a}") if a % 2 else a * 10 for a in args]


async def test_an_idle_call_runs_at_once_and_alone() -> None:
    run = Recorder()
    c: Coalescer[int, int] = Coalescer("t", run)
    assert await c.submit(2) == 20
    assert await c.submit(4) == 40
    assert run.batches == [[2], [4]]


async def test_calls_made_while_batches_run_go_together_and_each_gets_its_own_outcome() -> None:
    run = Recorder()
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)
    outcomes = await asyncio.gather(*(c.submit(a) for a in range(10)), return_exceptions=True)
    # The first runs at once, alone; the nine made meanwhile go together in the next batch.
    assert run.batches == [[0], list(range(1, 10))]
    for a, outcome in zip(range(10), outcomes, strict=True):
        if a % 2:
            assert isinstance(outcome, ValueError) and str(outcome) == f"odd {a}"
        else:
            assert outcome == a * 10


async def test_a_batch_takes_at_most_max_batch_calls() -> None:
    run = Recorder()
    c: Coalescer[int, int] = Coalescer("t", run, max_batch=3, max_in_flight=1)
    await asyncio.gather(*(c.submit(a * 2) for a in range(8)))
    assert [len(b) for b in run.batches] == [1, 3, 3, 1]
    assert [a for b in run.batches for a in b] == [a * 2 for a in range(8)]


async def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_still_runs() -> None:
    calls = 0

    async def run(args: list[int]) -> Sequence[int | BaseException]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 2:
            raise ConnectionError("database gone")
        return args

    c: Coalescer[int, int] = Coalescer("t", run, max_batch=2, max_in_flight=1)
    outcomes = await asyncio.gather(*(c.submit(a) for a in range(5)), return_exceptions=True)
    # Batches [0], [1, 2], [3, 4]: the second fails.
    assert outcomes[0] == 0
    assert all(isinstance(o, ConnectionError) for o in outcomes[1:3])
    assert outcomes[3:] == [3, 4]


async def test_a_wrong_number_of_outcomes_fails_the_batch_instead_of_misrouting_them() -> None:
    async def run(args: list[int]) -> Sequence[int | BaseException]:
        await asyncio.sleep(0.01)
        return args[:-1]

    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)
    results = await asyncio.gather(c.submit(1), c.submit(2), c.submit(3), return_exceptions=True)
    assert [str(r) for r in results] == [
        "t: 0 outcomes for 1 calls",
        "t: 1 outcomes for 2 calls",
        "t: 1 outcomes for 2 calls",
    ]


async def test_a_cancelled_caller_stops_waiting_while_the_others_get_their_outcomes() -> None:
    run = Recorder(delay=0.05)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)
    first = asyncio.create_task(c.submit(0))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(c.submit(2))
    kept = asyncio.create_task(c.submit(4))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    assert await first == 0
    assert await kept == 40
    assert cancelled.cancelled()
    assert run.batches == [[0], [2, 4]]  # its part still ran


async def test_a_queued_batch_does_not_run_in_the_context_of_any_of_its_callers() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def run(args: list[int]) -> Sequence[int | BaseException]:
        seen.append(var.get())
        await asyncio.sleep(0.01)
        return args

    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)

    async def call(name: str, arg: int) -> int:
        var.set(name)
        return await c.submit(arg)

    assert list(await asyncio.gather(call("first", 1), call("second", 2))) == [1, 2]
    # The first ran alone from its own task; the second's batch from one of ours.
    assert seen == ["first", "unset"]


async def test_close_waits_for_the_queued_batches_in_flight() -> None:
    run = Recorder(delay=0.05)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)
    alone = asyncio.create_task(c.submit(2))
    await asyncio.sleep(0)
    queued = asyncio.create_task(c.submit(4))
    await alone  # its end starts the queued call's batch
    await c.close()
    assert queued.done() and queued.result() == 40


async def test_a_call_running_alone_is_cancelled_with_its_caller_and_frees_its_place() -> None:
    run = Recorder(delay=10)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=1)
    alone = asyncio.create_task(c.submit(2))
    await asyncio.sleep(0.01)
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    run.delay = 0
    assert await c.submit(4) == 40  # runs at once: the cancelled call left no batch behind
    assert run.batches == [[2], [4]]


class Timed:
    """A run whose batches take `slow` seconds when they hold `slow_arg`, else `fast`; it
    records each batch and how many ran at once when it started."""

    def __init__(self, *, fast: float = 0.01, slow: float = 1.0, slow_arg: int = -1) -> None:
        self.fast, self.slow, self.slow_arg = fast, slow, slow_arg
        self.batches: list[list[int]] = []
        self.running = 0
        self.started: list[tuple[float, int]] = []  # (loop time, batches running then)

    async def __call__(self, args: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(args))
        self.running += 1
        self.started.append((asyncio.get_running_loop().time(), self.running))
        try:
            await asyncio.sleep(self.slow if self.slow_arg in args else self.fast)
        finally:
            self.running -= 1
        return args


async def test_calls_made_while_a_batch_runs_wait_for_it_though_another_may_run() -> None:
    run = Timed(fast=0.01)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.2)
    assert list(await asyncio.gather(*(c.submit(a) for a in range(10)))) == list(range(10))
    # Not [[0], [1], [2..9]]: a second batch beside the first would halve every batch of a
    # burst.
    assert run.batches == [[0], list(range(1, 10))]
    assert max(n for _, n in run.started) == 1


async def test_calls_behind_a_stalled_batch_go_in_another_without_waiting_for_it() -> None:
    run = Timed(fast=0.01, slow=5.0, slow_arg=0)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.05)
    stuck = asyncio.create_task(c.submit(0))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    assert await asyncio.wait_for(c.submit(1), 2.0) == 1
    assert loop.time() - asked >= 0.05  # it waited for the stall, not less
    assert not stuck.done()
    # Both places taken: a third waits for one of them.
    third = asyncio.create_task(c.submit(2))
    assert await asyncio.wait_for(third, 2.0) == 2
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck


async def test_once_a_stalled_batch_ends_the_calls_go_one_batch_at_a_time_again() -> None:
    # A fast batch is far from stalling, even on a busy machine.
    run = Timed(fast=0.01, slow=0.8, slow_arg=100)
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    first = asyncio.create_task(c.submit(1))  # alone
    await asyncio.sleep(0)
    slow = asyncio.create_task(c.submit(100))  # the next batch, which stalls
    calls = [first, slow]
    while loop.time() - began < 1.3:
        calls.append(asyncio.create_task(c.submit(2)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*calls)
    slow_ended = began + 0.01 + 0.8
    assert any(n == 2 for _, n in run.started), "a batch beside the stalled one"
    # After the slow batch ended, one batch at a time (with some leeway for the clock).
    after = [n for t, n in run.started if t > slow_ended + 0.05]
    assert after and max(after) == 1
