"""Runs the console under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from common import runtime

from .app import create_app
from .settings import ConsoleSettings

log = logging.getLogger("services.console")


def main() -> None:
    settings = runtime.load_settings(ConsoleSettings, "console")
    if not settings.database_url:
        log.critical("configuration error: OPERATOR_DATABASE_URL is not set")
        raise SystemExit(2)
    log.info(
        "console listening",
        extra={"url": f"http://{settings.console_host}:{settings.console_port}"},
    )
    if settings.console_host in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "console on plain loopback http: its session cookie is sent without Secure to "
            "browsers on this machine only (put TLS in front of it anywhere else)"
        )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.console_host,
            port=settings.console_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            lifespan="on",
            limit_concurrency=200,
        )
    )
    runtime.settle()
    server.run()


if __name__ == "__main__":
    main()
