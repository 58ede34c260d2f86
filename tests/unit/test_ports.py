"""Ports for the services a test or `make run` starts: free, never handed out twice, and out of
the kernel's range for outgoing connections, which a connection to PostgreSQL or Redis could
otherwise take between the choice and the server's bind (the agent then could not bind its
metrics port and restarted forever)."""

from __future__ import annotations

import socket

from devtools.ports import free_port


def test_ports_are_free_distinct_and_below_the_range_outgoing_connections_use() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_floor = int(f.read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_floor for port in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_preferred_port_is_used_when_free_and_passed_over_when_taken() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert free_port(taken) != taken
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert free_port(free) == free
