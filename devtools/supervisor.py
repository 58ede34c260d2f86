"""A small process supervisor: starts children, restarts one that dies (with backoff), and stops
them all, politely then firmly, within a deadline. Children die with the supervisor even when
it is killed (PR_SET_PDEATHSIG on Linux).

Each child runs in a session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground
process group) reaches the supervisor alone, which stops the children in its own order. Had it
reached them too, each would have stopped at once, in no order (a database before the services
still writing to it), and the supervisor, not yet told it was stopping, would have restarted
the first ones to exit."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Asks the kernel to send `sig` to this process when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)


@dataclass
class Spec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    user: str | None = None
    log_file: str | None = None
    restart: bool = True


@dataclass
class Child:
    spec: Spec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(
        self,
        *,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        healthy_after: float = 30.0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.children: dict[str, Child] = {}
        self._stopping = False
        self.on_event = on_event or (lambda name, what: None)

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env}
        out: Any = None
        if spec.log_file:
            out = open(spec.log_file, "ab")  # noqa: ASYNC230 - a local file, opened once per start
        try:
            child.process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                user=spec.user,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            if out is not None:
                out.close()  # the child has its own copy of the descriptor
        child.started_at = time.monotonic()
        self.on_event(spec.name, f"started pid {child.process.pid}")

    async def start(self, spec: Spec) -> Child:
        child = Child(spec)
        self.children[spec.name] = child
        await self._spawn(child)
        child.task = asyncio.create_task(self._watch(child), name=f"watch-{spec.name}")
        return child

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping or not child.spec.restart:
                return
            ran = time.monotonic() - child.started_at
            if ran >= self.healthy_after:
                child.restarts = 0
            delay = min(self.backoff_max, self.backoff_base * 2**child.restarts)
            child.restarts += 1
            self.on_event(child.spec.name, f"exited with {code}; restarting in {delay:.1f}s")
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(child)

    def pid(self, name: str) -> int | None:
        child = self.children.get(name)
        if child is None or child.process is None or child.process.returncode is not None:
            return None
        return child.process.pid

    def stopping(self) -> None:
        """Restarts nothing from now on: the children are about to be stopped, in stages."""
        self._stopping = True

    async def stop(self, names: list[str] | None = None, timeout: float = 8.0) -> None:
        """Stops the named children (all by default) in the given order, each within `timeout`
        in total, escalating to SIGKILL."""
        self._stopping = names is None or self._stopping
        targets = [self.children[n] for n in (names or list(self.children)) if n in self.children]
        deadline = time.monotonic() + timeout
        for child in targets:
            child.spec.restart = False
            proc = child.process
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(child.spec.stop_signal)
        for child in targets:
            proc = child.process
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self.on_event(child.spec.name, "did not stop in time; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if child.task is not None:
                child.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task
            self.on_event(child.spec.name, "stopped")
