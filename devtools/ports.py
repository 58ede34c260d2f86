"""Free TCP ports on 127.0.0.1 for the servers `make run`, the tests and the benchmarks start."""

from __future__ import annotations

import random
import socket

# Ports handed out by free_port in this process, so two callers never get the same one.
_handed_out: set[int] = set()
_LOWEST_PORT = 10000


def _ephemeral_floor() -> int:
    """Where the kernel's range of ports for outgoing connections starts."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on 127.0.0.1, else a free port below the kernel's range for
    outgoing connections. A port from that range (what binding to port 0 gives) can be taken
    by any outgoing connection (to PostgreSQL, Redis, ...) between this call and the server's
    bind; one below it can only be taken by another listener."""
    candidates = [preferred] if preferred else []
    floor = _ephemeral_floor()
    if floor > _LOWEST_PORT + 100:
        candidates += random.sample(range(_LOWEST_PORT, floor), 50)
    candidates.append(0)
    for candidate in candidates:
        if candidate in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _handed_out.add(port)
        return port
    raise OSError("no free port")
