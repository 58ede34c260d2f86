"""What an operator does, only through the services' gRPC APIs (so the rules that hold for
the bot hold for operators): dead-letter redrive and purge, and the health checks. The console
presents its own certificate (identity `console`, common/authz.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from wa.v1 import agent_pb2, agent_pb2_grpc, dlq_pb2, dlq_pb2_grpc, state_pb2, state_pb2_grpc

from common import config, grpcserver
from common.components import system_health

log = logging.getLogger("services.console")

CHUNK = 50
# Jobs kept for their progress page after they finish.
KEEP_FINISHED = 50


@dataclass
class Job:
    """A bulk retry or purge running in the console, polled by its page for progress."""

    id: int
    action: str
    operator: str
    total: int
    done: int = 0
    errors: list[str] = field(default_factory=list)
    finished: bool = False
    started: float = field(default_factory=time.monotonic)


class Jobs:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def start(self, settings: config.Base, action: str, operator: str, ids: list[int]) -> Job:
        job = Job(next(self._ids), action, operator, len(ids))
        self._jobs[job.id] = job
        finished = [j for j in self._jobs.values() if j.finished]
        for old in finished[:-KEEP_FINISHED]:
            del self._jobs[old.id]
        task = asyncio.create_task(_run(settings, job, ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _run(settings: config.Base, job: Job, ids: list[int]) -> None:
    try:
        async with grpcserver.channel(settings.dlq_addr) as ch:
            stub = dlq_pb2_grpc.DlqStub(ch)
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                if job.action == "retry":
                    await _retry(stub, job, chunk)
                else:
                    resp = await stub.Purge(dlq_pb2.PurgeRequest(ids=chunk), timeout=10)
                    job.done += len(chunk)
                    if resp.purged < len(chunk):
                        job.errors.append(f"{len(chunk) - resp.purged} already gone")
    except grpc.aio.AioRpcError as exc:
        job.errors.append(f"dlq service: {exc.code().name}: {exc.details()}")
        log.warning("console bulk action failed", extra={"action": job.action, "job": job.id})
    finally:
        job.finished = True


async def _retry(stub: dlq_pb2_grpc.DlqStub, job: Job, chunk: list[int]) -> None:
    """One call does a bounded amount of work; what it did not reach is asked for again, while
    calls make progress (as `wa dlq retry` does)."""
    request = dlq_pb2.RetryRequest(ids=chunk)
    while True:
        resp = await stub.Retry(request, timeout=60)
        job.done += len(resp.redriven) + len(resp.errors)
        job.errors.extend(resp.errors)
        if not resp.remaining or (not resp.redriven and not resp.errors):
            break
        request = dlq_pb2.RetryRequest(ids=list(resp.remaining))
    for item in resp.remaining:
        job.errors.append(f"{item}: not reached, retry it again")
        job.done += 1


async def gateway(url: str) -> dict[str, Any]:
    """The gateway's own readiness (/readyz: it answers 200 when it can acknowledge)."""
    try:
        async with httpx.AsyncClient(timeout=3) as client:
            resp = await client.get(f"{url.rstrip('/')}/readyz")
        return {
            "name": "gateway",
            "healthy": resp.status_code == 200,
            "detail": f"HTTP {resp.status_code}",
        }
    except httpx.HTTPError as exc:
        return {"name": "gateway", "healthy": False, "detail": f"unreachable: {exc!r}"}


async def health(
    settings: config.Base, gateway_url: str = ""
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each component's health, and the database's own checks (what `wa health` shows)."""
    components, checks = await system_health(settings, timeout=5)
    if gateway_url:
        components.append(await gateway(gateway_url))
    return components, checks


class Refused(Exception):
    """A service refused an operator's action (not found, outside the 24-hour window, ...);
    `down`: it did not answer at all (the action may be tried again once it is back)."""

    def __init__(self, said: str, *, down: bool = False) -> None:
        super().__init__(said)
        self.down = down


def _refused(service: str, exc: grpc.aio.AioRpcError) -> Refused:
    if exc.code() in grpcserver.UNREACHABLE:
        return Refused(f"the {service} service did not answer: try again shortly", down=True)
    return Refused(f"{exc.code().name}: {exc.details()}")


def customer_key(conv: Any) -> str:
    """How the services name a conversation's customer: its phone number, else its BSUID."""
    return str(conv["wa_id"] or conv["user_id"] or "")


async def take_over(settings: config.Base, conv: Any, operator: str) -> None:
    await _state_call(
        settings,
        "TakeOver",
        state_pb2.TakeOverRequest(
            customer=customer_key(conv), phone_number_id=conv["phone_number_id"], operator=operator
        ),
    )


async def release(settings: config.Base, conv: Any, operator: str) -> None:
    await _state_call(
        settings,
        "ReleaseHandoff",
        state_pb2.ReleaseHandoffRequest(
            customer=customer_key(conv), phone_number_id=conv["phone_number_id"], operator=operator
        ),
    )


async def _state_call(settings: config.Base, method: str, request: Any) -> None:
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            await getattr(state_pb2_grpc.StateStub(ch), method)(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise _refused("state", exc) from exc


async def reply(
    settings: config.Base, conv: Any, text: str, key: str, operator: str
) -> agent_pb2.SendOperatorReplyResponse:
    """Sent once per key, whatever the number of submits (the agent keeps the key)."""
    async with grpcserver.channel(settings.agent_addr) as ch:
        try:
            resp: agent_pb2.SendOperatorReplyResponse = await agent_pb2_grpc.AgentStub(
                ch
            ).SendOperatorReply(
                agent_pb2.SendOperatorReplyRequest(
                    customer=customer_key(conv),
                    phone_number_id=conv["phone_number_id"],
                    text=text,
                    idempotency_key=key,
                    operator=operator,
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refused("agent", exc) from exc
    return resp
