"""`wa health`: each component's status and, when unhealthy, why."""

from __future__ import annotations

import httpx
import orjson
from wa.v1 import state_pb2_grpc

from common import config, grpcserver
from services.gateway.app import check_components

# Without these the system cannot acknowledge at all: down. Anything else missing: degraded.
CRITICAL = {"postgres", "state", "gateway"}


async def health(as_json: bool) -> int:
    settings = config.Settings.from_env()
    async with grpcserver.channel(settings.state_addr) as ch:
        components = await check_components(settings, state_pb2_grpc.StateStub(ch))
    url = f"http://127.0.0.1:{settings.gateway_port}/healthz"
    try:
        async with httpx.AsyncClient(timeout=3) as client:
            resp = await client.get(url)
        gateway = {
            "name": "gateway",
            "healthy": resp.status_code == 200,
            "detail": f"HTTP {resp.status_code}",
            "target": url,
        }
    except httpx.HTTPError as exc:
        gateway = {
            "name": "gateway",
            "healthy": False,
            "detail": f"unreachable: {exc}",
            "target": url,
        }
    components.append(gateway)
    unhealthy = {c["name"] for c in components if not c["healthy"]}
    if unhealthy & CRITICAL or {"agent", "state"} <= unhealthy:
        status, code = "down", 2
    elif unhealthy:
        status, code = "degraded", 1
    else:
        status, code = "healthy", 0
    if as_json:
        print(
            orjson.dumps(
                {"status": status, "components": components}, option=orjson.OPT_INDENT_2
            ).decode()
        )
    else:
        print(f"system: {status}")
        for c in components:
            mark = "ok  " if c["healthy"] else "DOWN"
            print(f"  {mark} {c['name']:<9} {c['detail']}")
    return code
