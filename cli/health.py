"""`wa health`: every component with its status and, when unhealthy, why; then the database's
own checks (check_webhook_system_health). Exit 0 healthy, 1 degraded, 2 down."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from cli.settings import CliSettings
from common.components import system_health

# A stopped service or database means messages are not acknowledged or not processed: down.
# Redis missing (processing paused, acks go on) or a failing check: degraded.
DOWN_IF_UNHEALTHY = {"postgres", "state", "agent", "dlq", "gateway"}


async def _gateway(settings: CliSettings) -> dict[str, Any]:
    url = f"http://127.0.0.1:{settings.gateway_port}/healthz"
    try:
        async with httpx.AsyncClient(timeout=3) as client:
            resp = await client.get(url)
        return {
            "name": "gateway",
            "healthy": resp.status_code == 200,
            "detail": f"HTTP {resp.status_code}",
            "target": url,
        }
    except httpx.HTTPError as exc:
        return {
            "name": "gateway",
            "healthy": False,
            "detail": f"unreachable: {exc!r}",
            "target": url,
        }


async def health(as_json: bool) -> int:
    settings = CliSettings.from_env()
    components, checks = await system_health(settings, timeout=10)
    components.append(await _gateway(settings))
    # (A component that could not be checked counts as down: nothing says it is not.)
    unhealthy = {c["name"] for c in components if not c["healthy"]}
    failing = [c for c in checks if c["status"] not in ("ok", "unknown")]
    if unhealthy & DOWN_IF_UNHEALTHY:
        status, code = "down", 2
    elif unhealthy or failing:
        status, code = "degraded", 1
    else:
        status, code = "healthy", 0
    if as_json:
        print(
            orjson.dumps(
                {"status": status, "components": components, "checks": checks},
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return code
    print(f"system: {status}")
    for c in components:
        mark = "ok  " if c["healthy"] else "?   " if c.get("unknown") else "DOWN"
        print(f"  {mark} {c['name']:<9} {c['detail']}")
    for c in checks:
        print(f"  {c['status']:<8} {c['name']:<20} {c['detail']}")
    return code
