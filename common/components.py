"""What the system's readiness is made of: PostgreSQL and Redis as the state service sees them,
and the three gRPC services. The gateway's `/readyz`, `wa health` and the console report it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc, state_pb2, state_pb2_grpc

from . import config, grpcserver


class Channels:
    """A channel per component checked, opened at its first check and kept while it answers (a
    check that opened its own paid a connection and its TLS handshake each time: most of the
    CPU of the gateway's readiness loop, whatever the system was doing). A component found
    down gets a new channel at the next check, which connects at once, rather than waiting
    out the kept channel's reconnection backoff. Per component, not per target: two
    components at one address (a misconfiguration `wa health` must report) each close only
    their own channel."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[contextlib.AbstractAsyncContextManager[Any], Any]] = {}

    async def get(self, name: str, target: str) -> grpc.aio.Channel:
        entry = self._open.get(name)
        if entry is None:
            opener = grpcserver.channel(target)
            entry = self._open[name] = (opener, await opener.__aenter__())
        ch: grpc.aio.Channel = entry[1]
        return ch

    async def drop(self, name: str) -> None:
        entry = self._open.pop(name, None)
        if entry is not None:
            await entry[0].__aexit__(None, None, None)

    async def aclose(self) -> None:
        for name in list(self._open):
            await self.drop(name)


async def check_components(
    settings: config.Base, state: state_pb2_grpc.StateStub, channels: Channels | None = None
) -> list[dict[str, Any]]:
    """PostgreSQL and Redis (as the state service sees them) and the three gRPC services, on
    `channels` when given (else on channels of this check's own)."""
    if channels is None:
        async with contextlib.aclosing(Channels()) as own:
            return await check_components(settings, state, own)

    async def deps() -> list[dict[str, Any]]:
        try:
            resp = await state.CheckDependencies(state_pb2.CheckDependenciesRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            # Not known to be down: only the state service checks them. Not healthy either, so
            # not ready; `wa health` shows them as unknown, the state service as down.
            reason = f"state service cannot check it: {exc.code().name}"
            return [
                {"name": n, "healthy": False, "unknown": True, "detail": reason}
                for n in ("postgres", "redis")
            ]
        return [{"name": c.name, "healthy": c.healthy, "detail": c.detail} for c in resp.components]

    async def service(name: str, target: str) -> dict[str, Any]:
        ch = await channels.get(name, target)
        ok, detail = await grpcserver.check_health_on(ch)
        if not ok:
            await channels.drop(name)
        component: dict[str, Any] = {
            "name": name,
            "healthy": ok,
            "detail": detail,
            "target": target,
        }
        if name == "agent" and ok:
            # An open breaker does not make the gateway unready (acks do not need the model);
            # it is shown so an operator sees why replies are not going out.
            try:
                status = await agent_pb2_grpc.AgentStub(ch).GetStatus(
                    agent_pb2.GetStatusRequest(), timeout=2
                )
                component["backend"] = status.backend
                component["breaker"] = status.breaker_state
                component["detail"] = (
                    f"{detail}; model backend {status.backend}, "
                    f"circuit breaker {status.breaker_state}"
                )
            except grpc.aio.AioRpcError:
                pass
        return component

    results = await asyncio.gather(
        deps(),
        service("state", settings.state_addr),
        service("agent", settings.agent_addr),
        service("dlq", settings.dlq_addr),
    )
    first, *rest = results
    assert isinstance(first, list)
    return [*first, *rest]  # type: ignore[list-item]


async def system_health(
    settings: config.Base, *, timeout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each component's health (check_components) and the database's own checks
    (check_webhook_system_health through State.GetSystemHealth): what `wa health` and the
    console's overview show."""
    async with grpcserver.channel(settings.state_addr) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        components = await check_components(settings, stub)
        try:
            resp = await stub.GetSystemHealth(state_pb2.GetSystemHealthRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            unknown = {
                "name": "database_checks",
                "status": "unknown",
                "value": 0,
                "detail": f"not available: {exc.code().name}",
            }
            return components, [unknown]
    checks = [
        {"name": c.name, "status": c.status, "value": c.value, "detail": c.detail}
        for c in resp.checks
    ]
    return components, checks
