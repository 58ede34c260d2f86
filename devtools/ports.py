"""Free TCP ports on 127.0.0.1 for the servers `make run`, the tests and the benchmarks start."""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from pathlib import Path

# Ports handed out by free_port in this process, so two callers never get the same one.
_handed_out: set[int] = set()
_LOWEST_PORT = 10000
# Ports handed out by any process on this machine lately, one file each: two test workers (or a
# test run and a benchmark) draw from the same range, and a server binds its port seconds after
# it was picked, so a port free when one process checks it may be another's already (CI once
# saw a gateway fail to bind and the test's POST answered by another worker's server).
_CLAIMS = Path(tempfile.gettempdir()) / f"wa-ports-{os.getuid()}"
_CLAIM_SECONDS = 300.0


def _ephemeral_floor() -> int:
    """Where the kernel's range of ports for outgoing connections starts."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _claim(port: int) -> bool:
    """Whether no other process handed this port out in the last _CLAIM_SECONDS; if so, it is
    this process's now. Only an exclusive create claims, so two processes cannot both win; an
    old claim is removed for a later call to take."""
    path = _CLAIMS / str(port)
    try:
        _CLAIMS.mkdir(exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime > _CLAIM_SECONDS:
                path.unlink()
        except OSError:
            pass
        return False
    except OSError:
        return True  # no shared directory to claim in: this process's own set still holds


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
        # (A port asked for by number is the caller's choice: `make run` again takes it again.)
        if port in _handed_out or (port != preferred and not _claim(port)):
            continue
        _handed_out.add(port)
        return port
    raise OSError("no free port")
