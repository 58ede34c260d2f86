"""Runs the gateway under uvicorn."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from common import config, runtime, telemetry
from services.gateway.settings import GatewaySettings

from . import connections
from .app import create_app
from .tracing import RequestTracing

log = logging.getLogger("services.gateway")


def main() -> None:
    settings = runtime.load_settings(GatewaySettings, "gateway")
    try:
        app = create_app(settings)
    except config.ConfigError as exc:
        log.critical("configuration error: %s", exc)
        raise SystemExit(2) from exc
    asgi: Any = app
    if telemetry.export_enabled():
        asgi = RequestTracing(app, excluded_paths=frozenset({"/healthz", "/readyz", "/metrics"}))
    runtime.settle()
    uvicorn.run(
        asgi,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        # Against a hostile internet (README, Security): beyond this many connections or
        # requests at once, 503 at once; slow or oversized headers and bodies cut off.
        limit_concurrency=settings.max_concurrency,
        http=connections.protocol(
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
        ),
    )


if __name__ == "__main__":
    main()
