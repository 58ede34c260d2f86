"""gRPC server bootstrap shared by the state, agent and dlq services, and the one way any
process opens a channel to one of them.

Mutual TLS with the process's certificate and the authorization of each call by its caller's
(common/tls.py, common/authz.py), health (the stock `grpc.health.v1` servicer), reflection,
the tracing interceptor (when on), the metrics port with its HTTP probes (common/probes.py),
and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import authz, balancing, config, probes, runtime, telemetry, tls

log = logging.getLogger(__name__)

# How long a stopping server answers the calls in flight, unless its service says (`main`).
GRACE_SECONDS = 5.0
# Every server and channel sends and receives messages up to this size: a delivery of up to
# GATEWAY_MAX_BODY_BYTES (at most 16 MiB) carries its text and its raw payload, and the gateway
# caps its group-committed batches at a quarter of it.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Every server's options, and every client channel's (besides a TLS name override).
SERVER_OPTIONS = [("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS, *balancing.SERVER_OPTIONS]
# The codes of a call that found no one to answer it, or no one in time (as opposed to a
# service that answered no): what callers report as "down", and may try again later.
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

CHANNEL_OPTIONS = [
    *balancing.channel_options(retry_buffer_bytes=MAX_MESSAGE_BYTES // 2),
    ("grpc.keepalive_time_ms", 30000),
    *MESSAGE_SIZE_OPTIONS,
]

# A set-up receives the server (to add its servicers) and an event set when the process is told
# to stop, before the server stops taking calls (what should stop first, taking on new work,
# can); it yields the full names of its services. Everything it opened is closed when it exits,
# after the server has stopped.
S = TypeVar("S", bound=config.Base)
Setup = Callable[[grpc.aio.Server, S, asyncio.Event], AbstractAsyncContextManager[list[str]]]


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def bind(server: grpc.aio.Server, host: str, port: int, transport: tls.Transport) -> int:
    """Listens on host:port (0: any free port), with mutual TLS unless `transport` is None;
    returns the port."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if transport is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, transport.server()))


def interceptors(transport: tls.Transport) -> list[grpc.aio.ServerInterceptor]:
    """Tracing, then (innermost, see authz.Authorize) the caller's authorization."""
    return [*telemetry.server_interceptors(), *([authz.Authorize()] if transport else [])]


async def serve(
    name: str, port: int, setup: Setup[S], settings: S, grace: float = GRACE_SECONDS
) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    transport = tls.transport()
    server = grpc.aio.server(
        interceptors=interceptors(transport),
        options=SERVER_OPTIONS,
    )
    readiness = probes.Readiness()
    probe_server: probes.ProbeServer | None = None
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    async with setup(server, settings, stop) as service_names:
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        # A port that cannot be bound is a deployment error: say which one, exit 2.
        try:
            bound = bind(server, settings.grpc_host, port, transport)
        except RuntimeError as exc:
            raise config.ConfigError(
                f"gRPC port {settings.grpc_host}:{port} cannot be bound: {exc}"
            ) from exc
        if settings.metrics_port:
            try:
                probe_server = probes.ProbeServer(
                    settings.grpc_host, settings.metrics_port, readiness
                )
            except OSError as exc:
                raise config.ConfigError(
                    f"METRICS_PORT {settings.metrics_port} cannot be bound: {exc.strerror}"
                ) from exc
        runtime.settle()
        await server.start()
        for service in ["", *service_names]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        readiness.serving = True
        log.info(
            "serving",
            extra={
                "host": settings.grpc_host,
                "port": bound,
                "tls": transport is not None,
                "services": service_names,
                "metrics_port": settings.metrics_port,
            },
        )
        try:
            await stop.wait()
        finally:
            log.info("stopping")
            readiness.serving = False
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace)
    if probe_server is not None:
        await asyncio.to_thread(probe_server.close)
    telemetry.shutdown_telemetry()
    log.info("stopped")


def main(
    name: str,
    settings_cls: type[S],
    port_of: Callable[[S], int],
    setup: Setup[S],
    grace_of: Callable[[S], float] = lambda _: GRACE_SECONDS,
) -> None:
    """Entry point of a gRPC service process. `grace_of`: how long, once told to stop, its
    server answers the calls in flight before it cuts them."""
    settings = runtime.load_settings(settings_cls, name)
    try:
        uvloop.run(serve(name, port_of(settings), setup, settings, grace_of(settings)))
    except config.ConfigError as exc:
        log.critical("configuration error: %s", exc)
        raise SystemExit(2) from exc


_UNSET: Any = object()


@contextlib.asynccontextmanager
async def channel(
    target: str, *, traced: bool = True, transport: tls.Transport = _UNSET
) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel presenting the process's certificate (`tls.configure`), or that of
    `transport`; with the tracing interceptors unless `traced` is false; closed on exit. Calls
    are spread over every replica `target` names (common/balancing.py)."""
    if transport is _UNSET:
        transport = tls.transport()
    interceptors = telemetry.client_interceptors() if traced else []
    options = list(CHANNEL_OPTIONS)
    if transport is None:
        ch = grpc.aio.insecure_channel(target, interceptors=interceptors, options=options)
    else:
        name = _certificate_name(target)
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        ch = grpc.aio.secure_channel(
            target, transport.channel(), interceptors=interceptors, options=options
        )
    try:
        yield ch
    finally:
        await ch.close()


def _certificate_name(target: str) -> str:
    """The name a server's certificate is checked against when the target's own is no host
    name: an `ipv4:`/`ipv6:` list of replicas (`ipv4:127.0.0.1:50052,127.0.0.1:50062`) has
    none, so its first address's (they are one machine's, or name it with `--hosts`)."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            first = target.removeprefix(scheme).split(",")[0]
            if first.startswith("["):  # [::1]:50052
                return first[1 : first.index("]")]
            return first.split(":")[0] if scheme == "ipv4:" else first
    return ""


async def check_health(
    target: str, timeout: float = 2.0, transport: tls.Transport = _UNSET
) -> tuple[bool, str]:
    """Asks a service's standard health endpoint; returns (serving, detail)."""
    async with channel(target, transport=transport) as ch:
        return await check_health_on(ch, timeout)


async def check_health_on(ch: grpc.aio.Channel, timeout: float = 2.0) -> tuple[bool, str]:
    """`check_health` on a channel already open."""
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
