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
