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


class Checked:
    """A run that records each batch and checks, as each starts, that every batch already
    running has run `stall` seconds at least (one batch at a time, but for a stall)."""

    def __init__(
        self, stall: float, durations: dict[int, float], fail: frozenset[int] = frozenset()
    ) -> None:
        self.stall, self.durations, self.fail = stall, durations, fail
        self.running: list[float] = []
        self.batches: list[list[int]] = []
        self.beside_fresh: list[list[int]] = []  # batches started beside one not stalled

    async def __call__(self, args: list[int]) -> Sequence[int | BaseException]:
        now = asyncio.get_running_loop().time()
        if any(now - started < self.stall - 0.02 for started in self.running):
            self.beside_fresh.append(list(args))
        self.batches.append(list(args))
        self.running.append(now)
        try:
            await asyncio.sleep(self.durations.get(args[0], 0.01))
        finally:
            self.running.remove(now)
        if args[0] in self.fail:
            raise ConnectionError("the batch failed")
        return args


async def test_a_drain_about_to_start_is_not_taken_for_a_stalled_batch() -> None:
    run = Checked(stall=10.0, durations={})
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=10.0)

    async def caller() -> None:
        await c.submit(0)  # alone; its end starts a drain for 1, which has not run yet
        other = asyncio.create_task(c.submit(2))
        await c.submit(3)  # made before that drain runs: it must not start another
        await other

    first = asyncio.create_task(caller())
    await asyncio.sleep(0)
    await asyncio.gather(first, c.submit(1))
    assert run.beside_fresh == [], run.batches


async def test_after_a_failed_batch_the_next_still_waits_for_the_one_running() -> None:
    # 0 runs alone; 1 goes beside it once it stalls, and fails; 2 goes when 0 ends (1 has
    # stalled by then); 3 comes while 1 and 2 run, and must wait for 2 to stall, not go as
    # soon as the failed 1 ends.
    run = Checked(stall=0.2, durations={0: 0.7, 1: 0.6, 2: 0.6, 3: 0.1}, fail=frozenset({1}))
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.2)

    async def at(delay: float, arg: int) -> int | BaseException:
        await asyncio.sleep(delay)
        try:
            return await c.submit(arg)
        except ConnectionError as exc:
            return exc

    outcomes = await asyncio.gather(at(0, 0), at(0.02, 1), at(0.4, 2), at(0.74, 3))
    assert isinstance(outcomes[1], ConnectionError) and list(outcomes[::2]) == [0, 2]
    assert outcomes[3] == 3
    assert run.beside_fresh == [], run.batches


async def test_close_waits_for_every_queued_call_even_those_a_drain_left_to_another() -> None:
    run = Checked(stall=0.2, durations={0: 0.7, 1: 0.6, 2: 0.6, 3: 0.1})
    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.2)

    async def at(delay: float, arg: int) -> int:
        await asyncio.sleep(delay)
        return await c.submit(arg)

    calls = [asyncio.create_task(at(d, a)) for d, a in [(0, 0), (0.02, 1), (0.4, 2), (0.74, 3)]]
    await asyncio.sleep(0.6)
    await c.close()
    assert [t.done() for t in calls[1:]] == [True, True, True]
    assert [t.result() for t in calls[1:]] == [1, 2, 3]
    await calls[0]


async def test_a_coalescer_used_on_a_second_event_loop_still_relieves_a_stalled_batch() -> None:
    # (Loops of their own, in a thread: this test's loop runs the thread.)
    await asyncio.to_thread(_two_loops)


def _two_loops() -> None:
    durations = {0: 0.5}

    async def run(args: list[int]) -> Sequence[int | BaseException]:
        await asyncio.sleep(durations.get(args[0], 0.01))
        return args

    c: Coalescer[int, int] = Coalescer("t", run, max_in_flight=2, stall_seconds=0.05)

    async def stall_then_leave() -> None:
        # A call queued behind a stalled batch arms a timer; the loop ends before it fires.
        slow = asyncio.create_task(c.submit(0))
        await asyncio.sleep(0)
        queued = asyncio.create_task(c.submit(1))
        await asyncio.sleep(0.01)
        slow.cancel()
        queued.cancel()
        await asyncio.gather(slow, queued, return_exceptions=True)

    asyncio.run(stall_then_leave())

    async def again() -> float:
        c._queue.clear()  # what the first loop left queued went with it
        slow = asyncio.create_task(c.submit(0))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        assert await asyncio.wait_for(c.submit(1), 2.0) == 1
        waited = loop.time() - asked
        await slow
        return waited

    assert asyncio.run(again()) < 0.4  # the stall's relief, not the slow batch's end
