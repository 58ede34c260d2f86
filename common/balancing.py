"""How every internal gRPC channel spreads its calls over a service's replicas, and which calls it
may send again.

A target names every replica: `dns:///agent:50052` (compose, a headless Kubernetes Service: one
address per replica) or, for replicas on one machine (`WA_SCALE` under `make run`), a list such
as `ipv4:127.0.0.1:50051,127.0.0.1:50061`. `round_robin` keeps a connection to each address and
sends each call to the next ready one (gRPC's default, `pick_first`, would send every call to
one replica).

Replicas come and go:
- a replica that stops (SIGTERM: GOAWAY; SIGKILL: connection lost) leaves the rotation at once;
  a call it refused without reading (REFUSED_STREAM) is re-sent transparently by gRPC, whatever
  the policy below;
- it is reconnected with a backoff capped at RECONNECT_MAX_MS, so a restarted one is back within
  seconds (gRPC's own cap is 120 s);
- a replica that accepts connections and never answers their TLS handshake (frozen by SIGSTOP,
  a starved or swapped-out host: its kernel still completes the TCP handshake) is given up on
  after CONNECT_TIMEOUT_MS, not gRPC's 20 s, so a call to it fails (or goes to another
  replica) in seconds and an operator's command says so (a peer that freezes on a connection
  already open is noticed by the keepalive pings instead: grpcserver.CHANNEL_OPTIONS);
- with DNS, a lost connection asks the resolver again (at most every DNS_MIN_RESOLVE_MS), and
  servers close each connection after a while (`SERVER_OPTIONS`, max connection age) so that
  clients also look up replicas that were added while nothing failed.

Retries: only calls whose repetition changes nothing are re-sent on UNAVAILABLE (the replica
went away before answering), a few times with exponential backoff and gRPC's jitter, within the
caller's deadline (the deadline covers every attempt; none is set here). `retryThrottling`
stops retrying while most calls fail (a whole service down), so an outage does not double the
load. Not retried by the channel:
- `Agent.Reply`: a turn. It is fenced, but a repetition under the same fencing token could run
  beside a first attempt that is still going on the replica that lost its connection; the
  state service's driver asks again itself, after claiming the conversation anew (a new token
  that refuses every write of the first attempt).
- `Agent.Turns`: the same turns, many to a call (services/state/turn_calls.py); a call that
  breaks fails each turn it owes as UNAVAILABLE, for the driver to ask again the same way.
- `State.Ingests`: the gateway's batches, many to a call (services/gateway/batcher.py); a
  call that breaks fails each batch it owes as UNAVAILABLE, and the gateway sends it again
  itself, as this policy does for `IngestBatch` (storing a delivery twice stores it once).
- `Dlq.Enqueue`: a repeat counts one more attempt against the message; the state service's
  sweeper hands over a failure whose hand-over failed.
- `Dlq.Retry`, `Dlq.Purge`: an operator's; a repeat's answer would misreport what the first did.
"""

from __future__ import annotations

import json
from typing import Any

# Calls whose repetition has the effect of one call: reads, and writes keyed so that a second
# one is a no-op (ingest by WhatsApp message id; a redrive only moves a failed message; a
# resolve only an open item).
IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "wa.v1.State": (
        "IngestBatch",
        "Redrive",
        "GetTimeline",
        "CheckDependencies",
        "GetStats",
        "GetSystemHealth",
    ),
    "wa.v1.Agent": ("GetStatus",),
    "wa.v1.Dlq": ("List", "Get", "Resolve"),
    "grpc.health.v1.Health": ("Check",),
}

MAX_ATTEMPTS = 4  # the first and three retries
INITIAL_BACKOFF = "0.05s"
MAX_BACKOFF = "1s"
RECONNECT_MAX_MS = 2000
CONNECT_TIMEOUT_MS = 5000
DNS_MIN_RESOLVE_MS = 2000
# A server closes a connection this old (gracefully: calls on it finish, however long), so that
# its clients resolve the target again and find replicas added since.
MAX_CONNECTION_AGE_MS = 60_000


def service_config() -> dict[str, Any]:
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in IDEMPOTENT.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": MAX_ATTEMPTS,
                    "initialBackoff": INITIAL_BACKOFF,
                    "maxBackoff": MAX_BACKOFF,
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # Each failed call takes a token, each success gives back a tenth of one; retries stop
        # while fewer than half of the 100 are left (one replica lost costs a few).
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


def channel_options(retry_buffer_bytes: int) -> list[tuple[str, Any]]:
    """Options of every client channel. `retry_buffer_bytes`: the largest request that can
    still be re-sent (gRPC keeps a copy of each until it is answered; 256 KiB by default, less
    than a large ingest batch)."""
    return [
        ("grpc.service_config", json.dumps(service_config())),
        # The target's own service config (a DNS TXT record) never replaces ours.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", retry_buffer_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
        # gRPC's name for the least time a connection attempt (TCP and TLS) is given.
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLVE_MS),
    ]


SERVER_OPTIONS: list[tuple[str, Any]] = [("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS)]


def replicas_target(host: str, ports: list[int]) -> str:
    """One target for replicas of a service listening on `host` at `ports`."""
    if len(ports) == 1:
        return f"{host}:{ports[0]}"
    return "ipv4:" + ",".join(f"{host}:{port}" for port in ports)
