"""Runs the gateway under uvicorn."""

from __future__ import annotations

import logging
import socket
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
    server = uvicorn.Server(
        uvicorn.Config(
            asgi,
            host=settings.gateway_host,
            port=settings.gateway_port,
            log_config=None,
            access_log=False,
            # The gateway reads neither the client's address nor the scheme: X-Forwarded-*
            # rewriting would be work on every request (and trust in a header) for nothing.
            proxy_headers=False,
            # On SIGTERM: stop accepting, answer what is in flight, then close the channels.
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
    )
    sockets = None
    if settings.reuse_port:
        try:
            sockets = [shared_listener(settings.gateway_host, settings.gateway_port)]
        except OSError as exc:
            log.critical(
                "configuration error: GATEWAY_PORT %s cannot be bound: %s",
                settings.gateway_port,
                exc.strerror,
            )
            raise SystemExit(2) from exc
    runtime.settle()
    server.run(sockets=sockets)


def shared_listener(host: str, port: int) -> socket.socket:
    """A listening socket that other gateway replicas on this machine bind too
    (SO_REUSEPORT): the kernel spreads new connections over them. A replica that stops closes
    its own socket only; a connection still in its accept queue then is reset, and Meta
    sends that delivery again."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, reuse_port=True, backlog=2048)


if __name__ == "__main__":
    main()
