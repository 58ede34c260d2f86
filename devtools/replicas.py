"""Replicas of the services on one machine (`WA_SCALE=agent=3,state=2,dlq=2,gateway=2`), for
`wa run`, the tests and the benchmarks: each replica is its own supervised process with its own
name, gRPC port, metrics port and log file; the clients of a scaled service get one target that
names every replica (common/balancing.py); gateway replicas share GATEWAY_PORT (SO_REUSEPORT).

A service alone keeps its plain name (`state`) and the environment it always had; its replicas
are `state-1`, `state-2`, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from common import balancing, config

SERVICES = ("state", "agent", "dlq", "gateway")
GRPC_SERVICES = ("state", "agent", "dlq")
MAX_REPLICAS = 16
# Replica n (from 0) of a service listens on its first port + PORT_STRIDE * n when that is free:
# 50051, 50061, ... for state, 9101, 9111, ... for its metrics.
PORT_STRIDE = 10
# The fewest PostgreSQL connections a replica's pool gets: a turn's statements and a call of an
# operator's can still run side by side.
MIN_POOL_SIZE = 2


class ScaleError(ValueError):
    """WA_SCALE cannot be understood."""


def parse(text: str) -> dict[str, int]:
    """`agent=3,state=2` -> replicas per service (1 for a service not named)."""
    counts = dict.fromkeys(SERVICES, 1)
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, number = part.partition("=")
        name = name.strip()
        if not sep or name not in counts:
            raise ScaleError(
                f"WA_SCALE: {part!r} is not SERVICE=N with SERVICE one of {', '.join(SERVICES)}"
            )
        try:
            n = int(number)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_REPLICAS:
            raise ScaleError(f"WA_SCALE: {name} needs from 1 to {MAX_REPLICAS} replicas")
        counts[name] = n
    return counts


@dataclass(frozen=True)
class Replica:
    service: str
    name: str  # the service's name when it runs alone, else `<service>-<n>` from 1
    grpc_port: int | None = None  # gateway: None (it shares GATEWAY_PORT)
    metrics_port: int | None = None
    pool_size: int | None = None  # DATABASE_POOL_SIZE; None: the service's own default


@dataclass(frozen=True)
class Plan:
    replicas: dict[str, list[Replica]]
    host: str = "127.0.0.1"
    shared: dict[str, str] = field(default_factory=dict)

    @property
    def scaled(self) -> bool:
        return any(len(r) > 1 for r in self.replicas.values())

    def all(self) -> list[Replica]:
        return [r for service in SERVICES for r in self.replicas[service]]

    def names(self, service: str) -> list[str]:
        return [r.name for r in self.replicas[service]]

    def env_for(self, replica: Replica) -> dict[str, str]:
        """What this replica's process gets on top of the system's environment: its own ports,
        and the targets of the scaled services it calls."""
        env = dict(self.shared)
        if replica.grpc_port is not None:
            env[f"{replica.service.upper()}_GRPC_PORT"] = str(replica.grpc_port)
        if replica.metrics_port is not None:
            env["METRICS_PORT"] = str(replica.metrics_port)
        if replica.pool_size is not None:
            env["DATABASE_POOL_SIZE"] = str(replica.pool_size)
        return env


def pool_share(service: str, replicas: int) -> int | None:
    """The PostgreSQL pool of one of `replicas` replicas of `service`: its share of what the
    service's one process would open (config.POOL_SIZES), so that replicas add no backends
    (each one costs PostgreSQL memory and the warm-up of its caches and plans, and a pool
    that sees a fraction of the load needs a fraction of the connections). None: alone, or
    no pool."""
    alone = config.POOL_SIZES.get(service)
    if alone is None or replicas == 1:
        return None
    return max(MIN_POOL_SIZE, math.ceil(alone / replicas))


def plan(
    counts: Mapping[str, int],
    grpc_ports: Mapping[str, int],
    metrics_ports: Mapping[str, int | None],
    port_for: Callable[[int], int],
    host: str = "127.0.0.1",
    pool_size: int = 0,
) -> Plan:
    """Names and ports of every replica. The first replica of each service takes the ports it
    would have alone; `port_for(preferred)` finds one for each further replica. Replicas of a
    service share its PostgreSQL connections (`pool_share`), unless `pool_size` (the
    operator's DATABASE_POOL_SIZE) is set: then each gets that."""
    replicas: dict[str, list[Replica]] = {}
    for service in SERVICES:
        n = counts.get(service, 1)
        share = None if pool_size else pool_share(service, n)
        out = []
        for i in range(n):
            grpc_port = metrics_port = None
            if service in grpc_ports:
                base = grpc_ports[service]
                grpc_port = base if i == 0 else port_for(base + PORT_STRIDE * i)
            base_metrics = metrics_ports.get(service)
            if base_metrics:
                metrics_port = base_metrics if i == 0 else port_for(base_metrics + PORT_STRIDE * i)
            name = service if n == 1 else f"{service}-{i + 1}"
            out.append(Replica(service, name, grpc_port, metrics_port, share))
        replicas[service] = out
    shared: dict[str, str] = {}
    for service in GRPC_SERVICES:
        if len(replicas[service]) > 1:
            ports = [r.grpc_port for r in replicas[service] if r.grpc_port is not None]
            shared[f"{service.upper()}_ADDR"] = balancing.replicas_target(host, ports)
    if len(replicas["gateway"]) > 1:
        shared["GATEWAY_REUSE_PORT"] = "true"
    return Plan(replicas, host, shared)
