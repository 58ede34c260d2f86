"""What the system's readiness is made of: PostgreSQL and Redis as the state service sees them,
and the three gRPC services. The gateway's `/readyz`, `wa health` and the console report it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc, state_pb2, state_pb2_grpc

from . import config, grpcserver


async def check_components(
    settings: config.Base, state: state_pb2_grpc.StateStub
) -> list[dict[str, Any]]:
    """PostgreSQL and Redis (as the state service sees them) and the three gRPC services."""

    async def deps() -> list[dict[str, Any]]:
        try:
            resp = await state.CheckDependencies(state_pb2.CheckDependenciesRequest(), timeout=3)
        except grpc.aio.AioRpcError as exc:
            reason = f"state service cannot check it: {exc.code().name}"
            return [{"name": n, "healthy": False, "detail": reason} for n in ("postgres", "redis")]
        return [{"name": c.name, "healthy": c.healthy, "detail": c.detail} for c in resp.components]

    async def service(name: str, target: str) -> dict[str, Any]:
        ok, detail = await grpcserver.check_health(target)
        component: dict[str, Any] = {
            "name": name,
            "healthy": ok,
            "detail": detail,
            "target": target,
        }
        if name == "agent" and ok:
            # An open breaker does not make the gateway unready (acks do not need the model);
            # it is shown so an operator sees why replies are not going out.
            async with grpcserver.channel(target) as ch:
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
