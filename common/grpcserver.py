"""gRPC server bootstrap shared by the state, agent and dlq services.

Health (the stock `grpc.health.v1` servicer), reflection, the tracing interceptor (when on),
a Prometheus metrics port, and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import grpc
import prometheus_client
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import balancing, config, runtime, telemetry

log = logging.getLogger(__name__)

GRACE_SECONDS = 5.0
# Every server and channel sends and receives messages up to this size: a delivery of up to
# GATEWAY_MAX_BODY_BYTES (at most 16 MiB) carries its text and its raw payload, and the gateway
# caps its group-committed batches at a quarter of it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# A set-up receives the server (to add its servicers) and yields the full names of its services;
# everything it opened is closed when it exits, after the server has stopped.
S = TypeVar("S", bound=config.Base)
Setup = Callable[[grpc.aio.Server, S], AbstractAsyncContextManager[list[str]]]


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(name: str, port: int, setup: Setup[S], settings: S) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    server = grpc.aio.server(
        interceptors=telemetry.server_interceptors(),
        options=[("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS, *balancing.SERVER_OPTIONS],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    async with setup(server, settings) as service_names:
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        # A port that cannot be bound is a deployment error: say which one, exit 2.
        try:
            bound = server.add_insecure_port(f"[::]:{port}")
        except RuntimeError as exc:
            raise config.ConfigError(f"gRPC port {port} cannot be bound: {exc}") from exc
        if settings.metrics_port:
            try:
                prometheus_client.start_http_server(settings.metrics_port)
            except OSError as exc:
                raise config.ConfigError(
                    f"METRICS_PORT {settings.metrics_port} cannot be bound: {exc.strerror}"
                ) from exc
        runtime.settle()
        await server.start()
        for service in ["", *service_names]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={"port": bound, "services": service_names, "metrics_port": settings.metrics_port},
        )
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            await health_servicer.enter_graceful_shutdown()
            await server.stop(GRACE_SECONDS)
    telemetry.shutdown_telemetry()
    log.info("stopped")


def main(name: str, settings_cls: type[S], port_of: Callable[[S], int], setup: Setup[S]) -> None:
    """Entry point of a gRPC service process."""
    settings = runtime.load_settings(settings_cls, name)
    try:
        uvloop.run(serve(name, port_of(settings), setup, settings))
    except config.ConfigError as exc:
        log.critical("configuration error: %s", exc)
        raise SystemExit(2) from exc


@contextlib.asynccontextmanager
async def channel(target: str, *, traced: bool = True) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel, with the tracing interceptors unless `traced` is false; closed on
    exit. Calls are spread over every replica `target` names (common/balancing.py)."""
    ch = grpc.aio.insecure_channel(
        target,
        interceptors=telemetry.client_interceptors() if traced else [],
        options=[
            *balancing.channel_options(retry_buffer_bytes=MAX_MESSAGE_BYTES // 2),
            ("grpc.keepalive_time_ms", 30000),
            *MESSAGE_SIZE_OPTIONS,
        ],
    )
    try:
        yield ch
    finally:
        await ch.close()


async def check_health(target: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Asks a service's standard health endpoint; returns (serving, detail)."""
    try:
        async with channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
