"""`/readyz` from a check made in the background, never per request.

Checking the system (PostgreSQL and Redis through the state service, the three gRPC services'
health) makes several RPCs: done per request, anyone who can reach `/readyz` could make the
gateway call the services as fast as they can send requests. The checks' channels stay open
between checks (a channel per check paid a connection and a TLS handshake each time). One
task checks every `GATEWAY_READY_REFRESH_SECONDS`; `/readyz` answers the last result, and
503 until there is one or when it is too old (the task stuck), so a probe never reports a
readiness nobody checked lately. Changes are logged, the result is the `wa_gateway_ready`
gauge and each check counts in `wa_gateway_readiness_checks_total`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge
from wa.v1 import state_pb2_grpc

from common import config
from common.components import Channels, check_components

log = logging.getLogger(__name__)

READY = Gauge("wa_gateway_ready", "1 when the last readiness check found everything up")
CHECKS = Counter("wa_gateway_readiness_checks_total", "Readiness checks made")
CHECK_TIMEOUT = 10.0


class Readiness:
    def __init__(
        self, settings: config.Base, state: state_pb2_grpc.StateStub, refresh: float
    ) -> None:
        self.settings = settings
        self.state = state
        self.refresh = refresh
        # A result older than this means the checking task is stuck: not ready.
        self.max_age = 3 * refresh + CHECK_TIMEOUT
        self._components: list[dict[str, Any]] | None = None
        self._checked_at = 0.0
        self._ready: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._channels = Channels()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="readiness")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channels.aclose()

    def answer(self, needed: frozenset[str] | None = None) -> tuple[bool, dict[str, Any]]:
        """(ready, the body of `/readyz`): every component up, or those `needed` (by name)."""
        if self._components is None:
            return False, {"status": "not ready", "reason": "not checked yet", "components": []}
        age = time.monotonic() - self._checked_at
        components = [
            c for c in self._components if needed is None or c["name"] in needed | {"gateway"}
        ]
        body = {"checked_seconds_ago": round(age, 3), "components": components}
        if age > self.max_age:
            return False, {"status": "not ready", "reason": "readiness check stale", **body}
        down = [c for c in components if not c["healthy"]]
        # One the check could not name (a check that failed as a whole) is not up either.
        down += [
            {"name": name, "healthy": False, "detail": "not checked"}
            for name in sorted((needed or frozenset()) - {c["name"] for c in components})
        ]
        if not down:
            return True, {"status": "ready", **body}
        # One line an operator (or a probe's log) reads first; the components say the rest.
        reason = "; ".join(f"{c['name']}: {c.get('detail') or 'down'}" for c in down)
        return False, {"status": "not ready", "reason": reason, **body}

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.refresh)

    async def check(self) -> None:
        CHECKS.inc()
        try:
            components = await asyncio.wait_for(
                check_components(self.settings, self.state, self._channels), CHECK_TIMEOUT
            )
        except Exception as exc:  # the loop goes on; what failed is the answer
            components = [{"name": "gateway", "healthy": False, "detail": f"check failed: {exc!r}"}]
        self.record(components)

    def record(self, components: list[dict[str, Any]]) -> None:
        """A check's result: what `answer` says from now on."""
        self._components = components
        self._checked_at = time.monotonic()
        ready = all(c["healthy"] for c in components)
        READY.set(1 if ready else 0)
        if ready != self._ready:
            down = [c["name"] for c in components if not c["healthy"]]
            if ready:
                log.info("ready")
            else:
                log.warning("not ready", extra={"down": down})
            self._ready = ready
