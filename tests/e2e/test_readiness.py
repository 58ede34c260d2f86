"""The gateway's readiness checks keep their connections to the services open between checks:
a check that opened its own paid a connection and a TLS handshake to every service, every
`GATEWAY_READY_REFRESH_SECONDS`, whether or not anything else was happening."""

from __future__ import annotations

import asyncio

import pytest

from devtools.ports import free_port
from tests.conftest import StartSystem
from tests.support.relay import Relay
from tests.support.system import System

pytestmark = pytest.mark.e2e


async def _checks(system: System) -> float:
    """The gateway's readiness checks so far (its /metrics)."""
    text = (await system.http.get(f"{system.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("wa_gateway_readiness_checks_total "):
            return float(line.split()[1])
    return 0.0


async def test_readiness_checks_reuse_their_connections_to_the_services(
    start_system: StartSystem,
) -> None:
    async with Relay(free_port()) as proxy:
        # Every service reaches the dlq service through the proxy: the state and the agent
        # each over their one channel, the gateway's readiness over its own.
        system = await start_system(
            wait=False, DLQ_ADDR=f"127.0.0.1:{proxy.port}", GATEWAY_READY_REFRESH_SECONDS="0.1"
        )
        proxy.upstream = ("127.0.0.1", system.ports["dlq"])
        await system.wait_ready()
        start = await _checks(system)
        connections = proxy.accepted
        for _ in range(300):
            if await _checks(system) >= start + 20:
                break
            await asyncio.sleep(0.1)
        assert await _checks(system) >= start + 20
        assert (await system.http.get(f"{system.url}/readyz")).status_code == 200
        assert (await system.http.get(f"{system.url}/readyz?for=ingest")).status_code == 200
        unknown = await system.http.get(f"{system.url}/readyz?for=everything")
        assert unknown.status_code == 400 and "ingest" in unknown.json()["error"]
        # Twenty checks later, no new connection (one a check before).
        assert proxy.accepted == connections, (connections, proxy.accepted)
